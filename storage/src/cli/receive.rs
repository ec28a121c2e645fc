//! `livemig disk receive`: the destination of a live disk migration. Waits for one
//! authenticated session, receives the pushed chunks, starts serving the disk over NBD at the
//! handover, pulls the rest, and keeps serving until SIGINT/SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::base::{Base, ChunkDirBase, FileBase};
use crate::disk::{Deferred, Disk};
use crate::live::dest::{self, Offer, ReceiveOptions};
use crate::mirror::{Mirror, DEFAULT_CHUNK};
use crate::nbd::server::Export;

/// Options of `livemig disk receive`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskReceiveArgs {
    /// The disk here: with --base/--base-dir, the local mirror file (the base must be the
    /// source's); without, a plain image file created for the transfer (it must not exist or
    /// be empty).
    pub file: PathBuf,
    /// The same read-only base image as the source's.
    #[arg(long, value_name = "IMAGE", conflicts_with = "base_dir")]
    pub base: Option<PathBuf>,
    /// Base as a directory of chunks.
    #[arg(long, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,
    /// Address to accept the source's session on (port 0 picks one; printed at start).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// The shared secret's file (the same at both ends).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The session's backend: tcp, verbs, or auto (verbs when an RDMA device is up); the
    /// source's `disk migrate --transport` must agree.
    #[arg(long, default_value = "tcp", value_parser = livemig_app::args::transport_parser())]
    pub transport: livemig_engine::connect::TransportChoice,
    /// Serve the disk over NBD on this unix socket from the handover on (with --serve-early,
    /// from the start).
    #[arg(long, value_name = "PATH", conflicts_with = "nbd_listen", required_unless_present = "nbd_listen")]
    pub socket: Option<PathBuf>,
    /// Serve it on this TCP address instead.
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<String>,
    /// Export name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Seconds of silence after which the source is declared gone (also bounds a client's
    /// wait for a chunk pulled on demand).
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = 10.0)]
    pub io_timeout: f64,
    /// Background pulls outstanding at once.
    #[arg(long, default_value_t = 4)]
    pub pulls_in_flight: usize,
    /// Serve the disk from the start, before it arrives: what a destination QEMU started with
    /// `-incoming` needs, as it opens its drives at once. Requests made before the handover
    /// fail at once (EIO): the only ones that come are QEMU's own while it starts (it reads
    /// sector 0 to guess a geometry, and takes the failure), because the destination guest
    /// runs only after the handover. The disk's size comes from --base, or
    /// --size for a plain disk, and the source's must match.
    #[arg(long)]
    pub serve_early: bool,
    /// A plain disk's size in bytes (with --serve-early; suffixes K, M, G).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Exit once the transfer has ended (after saving the disk) instead of serving on.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Machine-readable summary (JSON) on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (bytes, or with K, M, G)"))?;
    n.checked_mul(mul).filter(|&b| b > 0 && b <= 1 << 50).ok_or_else(|| format!("{s} is out of range"))
}

fn open_base(a: &DiskReceiveArgs) -> Result<Option<Box<dyn Base>>> {
    Ok(match (&a.base, &a.base_dir) {
        (Some(p), _) => Some(Box::new(FileBase::open(p).with_context(|| format!("opening the base {}", p.display()))?)),
        (None, Some(d)) => {
            Some(Box::new(ChunkDirBase::open(d).with_context(|| format!("opening the base {}", d.display()))?))
        }
        (None, None) => None,
    })
}

/// Serves `disk` over NBD where the arguments say; returns the endpoint.
fn serve(a: &DiskReceiveArgs, disk: Arc<dyn crate::disk::Disk>, note: &str) -> Result<String> {
    let export = Arc::new(Export {
        name: a.name.clone(),
        description: format!("livemig disk {}{note}", a.file.display()),
        disk,
        read_only: false,
        io_timeout: Duration::from_secs(30),
    });
    super::serve_export(export, a.socket.as_deref(), a.nbd_listen.as_deref(), 64)
}

/// Opens the disk for an offer, or says why it cannot take it.
fn open_for(a: &DiskReceiveArgs, base: Option<Box<dyn Base>>, o: &Offer) -> Result<Arc<Mirror>, String> {
    let m = match base {
        Some(b) => {
            if crate::mirror::meta_path(&a.file).exists() {
                // Chunks held from an earlier run would be served unchecked.
                return Err(format!(
                    "{} already holds a mirror ({}): give a new file",
                    a.file.display(),
                    "FILE.lmmeta"
                ));
            }
            if b.size() != o.disk_size {
                return Err(format!("the base here has {} bytes, the source's disk {}", b.size(), o.disk_size));
            }
            let m = Mirror::open(b, &a.file, o.chunk_size).map_err(|e| format!("{}: {e}", a.file.display()))?;
            if m.base_fingerprint().map_err(|e| e.to_string())? != o.base {
                return Err("the base here is not the source's base".into());
            }
            m
        }
        None => {
            if o.base != 0 {
                return Err("the source mirrors a base: give this end the same --base".into());
            }
            if o.chunk_size != DEFAULT_CHUNK {
                return Err(format!("a plain disk moves in {DEFAULT_CHUNK}-byte chunks, not {}", o.chunk_size));
            }
            if std::fs::metadata(&a.file).is_ok_and(|m| m.len() > 0) {
                return Err(format!("{} exists and is not empty", a.file.display()));
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&a.file)
                .map_err(|e| format!("creating {}: {e}", a.file.display()))?;
            f.set_len(o.disk_size).map_err(|e| format!("sizing {}: {e}", a.file.display()))?;
            Mirror::plain(f).map_err(|e| e.to_string())?
        }
    };
    if m.chunk_size() != o.chunk_size || m.size() != o.disk_size {
        return Err(format!(
            "{} holds a {}-byte disk in {}-byte chunks; the source's is {} bytes in {}-byte chunks",
            a.file.display(),
            m.size(),
            m.chunk_size(),
            o.disk_size,
            o.chunk_size
        ));
    }
    Ok(Arc::new(m))
}

/// Entry point of `livemig disk receive`: prints `listening ADDR disk` first on stdout, then
/// `serving ENDPOINT nbd` at the handover, and the summary at the end.
pub fn run_receive(a: &DiskReceiveArgs) -> Result<()> {
    let secret =
        livemig_transport::auth::Secret::load(a.secret_file.as_deref()).context("loading the shared secret")?;
    let base = open_base(a)?;
    let io_timeout = Duration::from_secs_f64(a.io_timeout);
    let early = if a.serve_early {
        let size = match (&base, a.size) {
            (Some(b), None) => b.size(),
            (Some(b), Some(s)) if s == b.size() => s,
            (Some(b), Some(s)) => bail!("--size {s} differs from the base's {} bytes", b.size()),
            (None, Some(s)) => s,
            (None, None) => bail!("--serve-early needs the disk's size: --base, or --size for a plain disk"),
        };
        // No wait: a request that waited would hold QEMU's start-up, and with it the
        // migration that would bring the disk.
        let d = Arc::new(Deferred::new(size, Duration::ZERO));
        let endpoint = serve(a, d.clone(), " (arriving)")?;
        Some((d, endpoint))
    } else {
        if a.size.is_some() {
            bail!("--size is for --serve-early");
        }
        None
    };
    let (kind, note) = livemig_engine::connect::resolve(a.transport);
    let opts = crate::live::options(a.transport, io_timeout);
    let l = livemig_engine::connect::Listener::bind(kind, a.listen.as_str())
        .with_context(|| format!("binding {}", a.listen))?;
    println!("listening {} disk", l.local_addr()?);
    eprintln!("{note}");
    if let Some((_, endpoint)) = &early {
        println!("serving {endpoint} nbd (early: requests fail until the handover)");
    }
    std::io::stdout().flush()?;
    // Stray connections (scans, wrong secrets) cost a log line each; the first session that
    // authenticates is the transfer.
    let t = l.accept(&opts, &secret, &livemig_transport::RegionTable::new()).context("accepting the source")?;
    let Received { outcome, served, opened } = receive_on(a, t, base, early.as_ref());
    let outcome = match outcome {
        Ok(s) if a.json => {
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Ok(s) => {
            println!("{}", describe(&s));
            Ok(())
        }
        Err(e) => Err(e),
    };
    std::io::stdout().flush()?;
    let Some((mirror, endpoint)) = served else {
        if let Some((d, _)) = &early {
            d.fail("the transfer failed before the handover".into());
        }
        // Never handed over: nothing was served here; keep what arrived (the source still
        // has everything).
        if let Some(m) = opened {
            m.flush().context("saving the disk state")?;
        }
        return outcome;
    };
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
        eprintln!("disk receive: still serving {endpoint}; reads of the missing chunks fail with EIO");
    }
    if !a.exit_when_done {
        let sig = super::wait_for_stop_signal()?;
        eprintln!("disk receive: stopped on signal {sig}");
    }
    mirror.flush().context("saving the disk state")?;
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    if outcome.is_err() {
        bail!("the transfer did not complete");
    }
    Ok(())
}

/// How a transfer received on a session ended.
#[derive(Debug)]
pub struct Received {
    /// The transfer's end: its summary, or why it failed.
    pub outcome: Result<dest::DestSummary>,
    /// The disk and where it is served, once handed over (it is served on after the
    /// transfer, failed or not: reads of chunks that never came fail with EIO).
    pub served: Option<(Arc<Mirror>, String)>,
    /// The disk opened for the transfer (to save when it was never handed over).
    pub opened: Option<Arc<Mirror>>,
}

/// Receives one disk transfer on the authenticated session `t` (the `disk receive` command,
/// and the daemon's `disk-receive` service): installs the pushed chunks, serves the disk
/// over NBD where `a` says from the handover on (or makes the `early` export live), pulls the
/// rest and prints the summary.
pub fn receive_on(
    a: &DiskReceiveArgs,
    t: Box<dyn livemig_transport::Transport>,
    base: Option<Box<dyn Base>>,
    early: Option<&(Arc<Deferred>, String)>,
) -> Received {
    let io_timeout = Duration::from_secs_f64(a.io_timeout);
    let o = ReceiveOptions { io_timeout, pulls_in_flight: a.pulls_in_flight };
    let mut served: Option<(Arc<Mirror>, String)> = None;
    let mut opened: Option<Arc<Mirror>> = None;
    let json = a.json;
    let res = dest::receive(
        t,
        &o,
        |offer| {
            if let Some((d, _)) = &early {
                if d.size() != offer.disk_size {
                    return Err(format!(
                        "this end serves a {}-byte disk already; the source's is {} bytes",
                        d.size(),
                        offer.disk_size
                    ));
                }
            }
            let m = open_for(a, base, offer)?;
            opened = Some(m.clone());
            Ok(m)
        },
        |disk| {
            if let Some((d, endpoint)) = &early {
                d.arrive(disk.clone())?;
                served = Some((disk.mirror().clone(), endpoint.clone()));
                return Ok(());
            }
            let endpoint = serve(a, disk.clone(), "").map_err(|e| format!("{e:#}"))?;
            println!("serving {endpoint} nbd");
            let _ = std::io::stdout().flush();
            served = Some((disk.mirror().clone(), endpoint));
            Ok(())
        },
        &mut |p| {
            if !json {
                eprintln!(
                    "disk receive: {} {:.1}s: {} chunks pushed ({:.1} MiB), {} pulled, {} to come",
                    p.phase,
                    p.elapsed_s,
                    p.chunks_pushed,
                    p.bytes_pushed as f64 / (1 << 20) as f64,
                    p.chunks_pulled,
                    p.pending
                );
            }
        },
    );
    let outcome = res.map_err(|e| {
        anyhow::anyhow!("disk transfer failed: {}: {}", livemig_engine::precopy::error_chain(&e.cause), e)
    });
    Received { outcome, served, opened }
}

/// One line on a received disk's transfer.
pub fn describe(s: &dest::DestSummary) -> String {
    format!(
        "disk received ({}): {:.2} s total, handover at {:.2} s, then {:.2} s of pulls; \
         {} chunks pushed ({:.1} MiB), {} left at the handover: {} pulled in the background, \
         {} on demand, {} cancelled by writes ({:.1} MiB pulled); {} chunks verified equal to the source's",
        s.strategy,
        s.total_s,
        s.handover_s,
        s.pull_s,
        s.chunks_pushed,
        s.bytes_pushed as f64 / (1 << 20) as f64,
        s.remaining_at_handover,
        s.chunks_pulled,
        s.chunks_pulled_urgent,
        s.pulls_cancelled,
        s.bytes_pulled as f64 / (1 << 20) as f64,
        s.verified_chunks
    )
}
