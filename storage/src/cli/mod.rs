//! `livemig disk serve`: an NBD export of a plain image file or of a mirror of a base image,
//! with a control socket through which `livemig disk migrate` moves it live to a host that
//! runs `livemig disk receive`.

pub mod control;
pub mod receive;
pub mod together;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::base::{Base, ChunkDirBase, FileBase};
use crate::live::source::SourceDisk;
use crate::mirror::Mirror;
use crate::nbd::server::{serve_connection, Conn, Export};

/// Options of `livemig disk serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskServeArgs {
    /// The disk: with --base/--base-dir, the local mirror file (created if missing; its
    /// state is kept in FILE.lmmeta); without, a plain image file served as it is.
    pub file: PathBuf,
    /// Read-only base image to mirror lazily (whole chunks on first read; writes stay local).
    #[arg(long, value_name = "IMAGE", conflicts_with = "base_dir")]
    pub base: Option<PathBuf>,
    /// Base as a directory of chunks (`manifest.json` + `chunks/<index>`).
    #[arg(long, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,
    /// Chunk size of a new mirror.
    #[arg(long, value_parser = livemig_app::args::parse_size, default_value = "256K")]
    pub chunk_size: u64,
    #[command(flatten)]
    pub export: ExportArgs,
}

/// How a disk is exported: where, under what name, with what limits, and its control socket
/// (shared by `disk serve`, `image serve` and the daemon).
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Serve on this unix socket (removed first if it is a stale socket).
    #[arg(long, value_name = "PATH", conflicts_with = "listen", required_unless_present = "listen")]
    pub socket: Option<PathBuf>,
    /// Serve on this TCP address (port 0 picks one; printed at start).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Export name (clients may also ask for "").
    #[arg(long, default_value = "")]
    pub name: String,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Most connections served at once.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Seconds a client may take to negotiate or to send a request's payload.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = 30.0)]
    pub io_timeout: f64,
    /// Control socket (mode 0600) for `livemig disk migrate` and `livemig disk switchover`:
    /// one JSON request per line (`{"migrate":{…}}`, `"switchover"`, `"status"`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

fn open_disk(a: &DiskServeArgs) -> Result<Mirror> {
    let chunk = u32::try_from(a.chunk_size).ok().filter(|c| *c >= 4096 && c.is_power_of_two());
    let base: Option<Box<dyn Base>> = match (&a.base, &a.base_dir) {
        (Some(p), _) => Some(Box::new(FileBase::open(p).with_context(|| format!("opening the base {}", p.display()))?)),
        (None, Some(d)) => {
            Some(Box::new(ChunkDirBase::open(d).with_context(|| format!("opening the base {}", d.display()))?))
        }
        (None, None) => None,
    };
    match base {
        Some(b) => {
            let Some(chunk) = chunk else {
                bail!("--chunk-size {} must be a power of two of at least 4K", a.chunk_size)
            };
            Ok(Mirror::open(b, &a.file, chunk)?)
        }
        None => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(!a.export.read_only)
                .open(&a.file)
                .with_context(|| format!("opening {}", a.file.display()))?;
            Ok(Mirror::plain(f)?)
        }
    }
}

fn spawn_conn<C: Conn + Send + 'static>(c: C, export: &Arc<Export>, live: &Arc<AtomicUsize>, max: usize, who: String) {
    if live.fetch_add(1, Ordering::AcqRel) >= max {
        live.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(peer = %who, max, "too many NBD connections; closed one");
        return;
    }
    let (export, live2) = (export.clone(), live.clone());
    let spawned = std::thread::Builder::new().name("livemig-nbd".into()).spawn(move || {
        if let Err(e) = serve_connection(c, &export) {
            tracing::warn!(peer = %who, error = %e, "NBD connection ended");
        }
        live2.fetch_sub(1, Ordering::AcqRel);
    });
    if spawned.is_err() {
        live.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!("no thread for an NBD connection");
    }
}

/// Binds a unix socket, replacing a stale one (never a file that is not a socket).
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    std::os::unix::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Serves `export` on the unix socket `socket` or the TCP address `listen` (accept loop on a
/// thread of its own); returns the socket path or the bound address.
pub fn serve_export(export: Arc<Export>, socket: Option<&Path>, listen: Option<&str>, max: usize) -> Result<String> {
    let live = Arc::new(AtomicUsize::new(0));
    let max = max.max(1);
    if let Some(path) = socket {
        let l = bind_unix(path)?;
        std::thread::spawn(move || {
            for c in l.incoming() {
                match c {
                    Ok(c) => spawn_conn(c, &export, &live, max, "unix".into()),
                    Err(e) => tracing::warn!(error = %e, "accept"),
                }
            }
        });
        return Ok(path.display().to_string());
    }
    let Some(addr) = listen else { bail!("give --socket PATH or --listen ADDR") };
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let endpoint = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            match c {
                Ok(c) => {
                    let _ = c.set_nodelay(true);
                    let who = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                    spawn_conn(c, &export, &live, max, who);
                }
                Err(e) => tracing::warn!(error = %e, "accept"),
            }
        }
    });
    Ok(endpoint)
}

/// Waits for SIGINT or SIGTERM; returns the signal.
fn wait_for_stop_signal() -> Result<i32> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("installing signal handlers")?;
    Ok(signals.forever().next().unwrap_or(0))
}

/// Entry point of `livemig disk serve`: prints `listening ADDR|PATH nbd` first on stdout,
/// serves until SIGINT/SIGTERM, then saves the mirror state and exits.
pub fn run_serve(a: &DiskServeArgs) -> Result<()> {
    let served = start(a)?;
    println!("listening {} nbd", served.endpoint);
    use std::io::Write;
    std::io::stdout().flush()?;
    let sig = wait_for_stop_signal()?;
    let summary = served.stop()?;
    eprintln!("disk serve: stopped on signal {sig}; {summary}");
    Ok(())
}

/// An export being served (by `disk serve`, or by the daemon).
#[derive(Debug)]
pub struct Served {
    /// The disk.
    pub disk: Arc<Mirror>,
    /// The disk as served (it can be migrated live).
    pub source: Arc<SourceDisk>,
    /// The socket path or bound TCP address.
    pub endpoint: String,
    socket: Option<PathBuf>,
    control: Option<PathBuf>,
    /// CLONE and COMMIT, for a disk mirrored from an image repository.
    pub snapshots: Option<Arc<dyn control::Snapshots>>,
}

impl Served {
    /// Saves the disk state (and removes the unix sockets); returns a one-line summary.
    pub fn stop(&self) -> Result<String> {
        self.disk.flush().context("saving the disk state")?;
        for p in [&self.socket, &self.control].into_iter().flatten() {
            let _ = std::fs::remove_file(p);
        }
        let map = self.disk.map();
        Ok(format!(
            "{}: {} of {} chunks local, {} modified; {}; state saved",
            self.endpoint,
            map.local_chunks(),
            map.len(),
            map.modified().len(),
            self.source.state()
        ))
    }
}

/// Opens the disk and starts serving it on `a.socket` or `a.listen` (threads of their own),
/// and the control socket if asked.
pub fn start(a: &DiskServeArgs) -> Result<Served> {
    start_with(&a.export, format!("livemig disk {}", a.file.display()), open_disk(a)?, None)
}

/// Serves `disk` (opened by the caller) as [`start`] does, exported as `a` says, with
/// `snapshots` behind the control socket's `clone` and `commit`.
pub fn start_with(
    a: &ExportArgs,
    description: String,
    disk: Mirror,
    snapshots: Option<Arc<dyn control::Snapshots>>,
) -> Result<Served> {
    let disk = Arc::new(disk);
    let source = Arc::new(SourceDisk::new(disk.clone()));
    let export = Arc::new(Export {
        name: a.name.clone(),
        description,
        disk: source.clone(),
        read_only: a.read_only,
        io_timeout: Duration::from_secs_f64(a.io_timeout),
    });
    if let Some(c) = &a.control {
        control::listen(c, source.clone(), snapshots.clone())?;
    }
    let endpoint = serve_export(export, a.socket.as_deref(), a.listen.as_deref(), a.max_connections)?;
    Ok(Served { disk, source, endpoint, socket: a.socket.clone(), control: a.control.clone(), snapshots })
}
