//! `livemig qemu carrier` and `livemig qemu migrate`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livemig_transport::auth::Secret;

use crate::carrier::{self, CarrierMsg, Counters, DestOptions};
use crate::migrate::{self, MigrateOptions};

/// Options of `livemig qemu carrier`.
#[derive(Debug, Clone, clap::Args)]
pub struct CarrierArgs {
    /// Destination: accept the source's session here (port 0 picks one; printed at start).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["unix", "to"])]
    pub listen: Option<String>,
    /// Destination: QEMU's incoming unix socket (`-incoming unix:PATH`, or given to
    /// `migrate-incoming` when --dst-qmp is set).
    #[arg(long, value_name = "PATH", requires = "listen")]
    pub incoming: Option<PathBuf>,
    /// Destination: the QEMU's QMP socket (QEMU started with `-incoming defer`): the carrier
    /// sets the source's capabilities and parameters there, starts the incoming side and
    /// reports how it ended.
    #[arg(long, value_name = "PATH", requires = "listen")]
    pub dst_qmp: Option<PathBuf>,
    /// Source: listen on this unix socket; point QEMU's `migrate` at `unix:PATH`.
    #[arg(long, value_name = "PATH", requires = "to")]
    pub unix: Option<PathBuf>,
    /// Source: the destination carrier.
    #[arg(long, value_name = "ADDR")]
    pub to: Option<String>,
    /// Source: connections QEMU will open (1 + multifd channels).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub channels: u8,
    /// Source: capabilities the destination carrier sets on its QEMU (repeatable).
    #[arg(long = "capability", value_name = "NAME")]
    pub capabilities: Vec<String>,
    /// The shared secret's file.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Longest a migration may take.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub max_time: f64,
    /// Seconds of silence after which the peer is declared gone.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = 20.0)]
    pub io_timeout: f64,
    /// The session's backend: tcp, verbs, or auto (verbs when an RDMA device is up). Both
    /// carriers must agree.
    #[arg(long, default_value = "tcp", value_parser = livemig_app::args::transport_parser())]
    pub transport: livemig_engine::connect::TransportChoice,
    /// Destination, external RAM by post-copy: if the link breaks after the guest started
    /// here, accept the source's new session for up to this many seconds (0: the guest is
    /// lost at once).
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_secs, default_value_t = livemig_app::precopy::DEFAULT_RECOVER_WITHIN)]
    pub recover_within: f64,
    /// Machine-readable outcome (JSON) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Source: dial the destination carrier again for up to SECS while it is not there yet
    /// (the unix socket is bound first; QEMU's connections wait in its backlog meanwhile).
    /// For a destination carrier that is started only as the migration begins, by a libvirt
    /// hook at the destination (`qemu-patch/libvirt/`). 0: one attempt.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_secs, default_value_t = 0.0, requires = "unix")]
    pub connect_within: f64,
}

/// Whether dialling failed because nothing listens at the address (yet).
fn is_refused(e: &livemig_transport::TransportError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        cur = err.source();
    }
    false
}

/// Entry point of `livemig qemu carrier`.
pub fn run_carrier(a: &CarrierArgs) -> Result<()> {
    let secret = Secret::load(a.secret_file.as_deref()).context("loading the shared secret")?;
    let io_timeout = Duration::from_secs_f64(a.io_timeout);
    if let Some(listen) = &a.listen {
        let Some(incoming) = a.incoming.clone() else {
            bail!("--listen needs --incoming PATH (QEMU's incoming socket)")
        };
        let (kind, note) = livemig_engine::connect::resolve(a.transport);
        let opts = options(a.transport, io_timeout, 1);
        let l = std::sync::Arc::new(
            livemig_engine::connect::Listener::bind(kind, listen).with_context(|| format!("binding {listen}"))?,
        );
        println!("listening {} qemu-carrier", l.local_addr()?);
        std::io::stdout().flush()?;
        eprintln!("{note}");
        // What this end exposes (QEMU's RAM, with --ram livemig) is announced on the session
        // and kept in this table, so that a session taking a broken one over exposes it too.
        let table = livemig_transport::RegionTable::new();
        let t = l.accept(&opts, &secret, &table).context("accepting the source carrier")?;
        let recovery = (a.recover_within > 0.0).then(|| {
            let (l, opts, secret, table) = (l.clone(), opts.clone(), secret.clone(), table.clone());
            livemig_engine::postcopy::Recovery::new(
                move |until| l.accept_until(&opts, &secret, &table, Some(until)),
                Duration::from_secs_f64(a.recover_within),
                8,
            )
        });
        let o = DestOptions {
            incoming,
            qmp: a.dst_qmp.clone(),
            timeout: io_timeout,
            max_time: Duration::from_secs_f64(a.max_time),
            recovery,
        };
        let out = carrier::run_dest(t, &o).context("carrying the migration")?;
        if a.json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!(
                "carried into QEMU: {} channel(s), {:.1} MiB in, {:.1} KiB back, {:.2} s; destination {}{}",
                out.channels,
                out.bytes_in as f64 / (1 << 20) as f64,
                out.bytes_back as f64 / 1024.0,
                out.elapsed_s,
                out.status,
                if out.running { ", guest running" } else { "" }
            );
        }
        if a.dst_qmp.is_some() && !(out.status == "completed" && (out.running || dest_waits(out.runstate.as_deref()))) {
            bail!("the destination's migration ended {} (guest running: {})", out.status, out.running);
        }
        return Ok(());
    }
    let (Some(unix), Some(to)) = (&a.unix, &a.to) else {
        bail!("give --listen ADDR --incoming PATH (destination) or --unix PATH --to ADDR (source)")
    };
    let (kind, note) = livemig_engine::connect::resolve(a.transport);
    let opts = options(a.transport, io_timeout, a.channels);
    if std::fs::symlink_metadata(unix).is_ok() {
        bail!("{} exists", unix.display());
    }
    // Bound before the destination is dialled: QEMU may connect as soon as it is told to
    // migrate, and waits in the backlog until the session is up.
    let l = std::os::unix::net::UnixListener::bind(unix).with_context(|| format!("binding {}", unix.display()))?;
    struct Unlink<'a>(&'a std::path::Path);
    impl Drop for Unlink<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _unlink = Unlink(unix);
    println!("listening {} qemu-carrier", unix.display());
    std::io::stdout().flush()?;
    let within = Duration::from_secs_f64(a.connect_within);
    let t0 = std::time::Instant::now();
    let mut t = loop {
        match livemig_engine::connect::connect(kind, to, &opts, &secret, &livemig_transport::RegionTable::new()) {
            Ok(t) => break t,
            // Refused: nobody listens there yet. Anything else (a wrong secret, a timeout)
            // is not going to get better.
            Err(e) if t0.elapsed() < within && is_refused(&e) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e).with_context(|| format!("connecting to the destination carrier {to}")),
        }
    };
    eprintln!("{note}");
    let caps = a.capabilities.iter().map(|c| (c.clone(), true)).collect();
    let mut params = serde_json::Map::new();
    if a.channels > 1 {
        params.insert("multifd-channels".into(), serde_json::json!(a.channels - 1));
    }
    carrier::send(
        &mut *t,
        &CarrierMsg::Prepare { capabilities: caps, parameters: params, handoff: false, external_ram: None },
    )?;
    match carrier::recv(&mut *t, io_timeout + Duration::from_secs(10), "the destination carrier's Ready")? {
        CarrierMsg::Ready => {}
        m => bail!("the destination carrier answered {m:?}"),
    }
    let chans = carrier::take_channels(&mut *t);
    let stop = AtomicBool::new(false);
    let counters = Counters::default();
    let max_time = Duration::from_secs_f64(a.max_time);
    let res = std::thread::scope(|s| {
        let relays = s.spawn(|| carrier::source_relays(l, chans, &stop, &counters));
        // Nothing here watches QEMU: --max-time bounds the carrier (connections QEMU never
        // opened, a stream that stalls).
        let t0 = std::time::Instant::now();
        while !relays.is_finished() && t0.elapsed() < max_time {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !relays.is_finished() {
            eprintln!("qemu carrier: --max-time reached; ending the relays");
            stop.store(true, std::sync::atomic::Ordering::Release);
            counters.abort_all();
        }
        relays.join().unwrap_or_else(|_| Err(carrier::CarrierError::Peer("relays panicked".into())))
    });
    res?;
    let fin = carrier::recv(&mut *t, io_timeout + Duration::from_secs(10), "the destination's outcome").ok();
    println!(
        "carried from QEMU: {} channel(s), {:.1} MiB, {:.1} KiB back; destination: {:?}",
        counters.channels.load(std::sync::atomic::Ordering::Acquire),
        counters.forward.load(std::sync::atomic::Ordering::Acquire) as f64 / (1 << 20) as f64,
        counters.back.load(std::sync::atomic::Ordering::Acquire) as f64 / 1024.0,
        fin
    );
    Ok(())
}

/// The carrier session's settings: `channels` byte channels, `io_timeout` on both backends.
fn options(
    choice: livemig_engine::connect::TransportChoice,
    io_timeout: Duration,
    channels: u8,
) -> livemig_engine::connect::TransportOptions {
    let tcp = livemig_transport::TcpConfig { io_timeout, byte_streams: channels, ..Default::default() };
    livemig_engine::connect::TransportOptions { choice, io_timeout, tcp, verbs: Default::default() }
}

/// Options of `livemig qemu qmp`.
#[derive(Debug, Clone, clap::Args)]
pub struct QmpArgs {
    /// QEMU's QMP socket.
    #[arg(long, value_name = "PATH")]
    pub qmp: PathBuf,
    /// The QMP command (`query-migrate`, `migrate`, `migrate-incoming`, `cont`, ...).
    pub command: String,
    /// Its arguments: a JSON object.
    #[arg(default_value = "{}", value_parser = parse_json_object)]
    pub arguments: serde_json::Value,
    /// Repeat the command (every 200 ms) until its reply's field KEY has one of the values
    /// (`status=completed|failed`), at most --within seconds.
    #[arg(long, value_name = "KEY=V1|V2", value_parser = parse_until)]
    pub until: Option<(String, Vec<String>)>,
    /// With --until: give up (exit 1) after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_secs, default_value_t = 60.0)]
    pub within: f64,
    /// Longest wait for one reply.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = 10.0)]
    pub timeout: f64,
}

fn parse_json_object(s: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err("the arguments must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn parse_until(s: &str) -> Result<(String, Vec<String>), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=V1|V2")?;
    let vals: Vec<String> = v.split('|').filter(|x| !x.is_empty()).map(String::from).collect();
    if k.is_empty() || vals.is_empty() {
        return Err("expected KEY=V1|V2".into());
    }
    Ok((k.to_string(), vals))
}

/// Entry point of `livemig qemu qmp`: one QMP command, its `return` value printed as JSON
/// (QEMU's error is the command's error); with --until, repeated until a field says so.
pub fn run_qmp(a: &QmpArgs) -> Result<()> {
    let mut q = crate::qmp::Qmp::connect(&a.qmp, Duration::from_secs_f64(a.timeout))
        .with_context(|| format!("connecting to QMP at {}", a.qmp.display()))?;
    let t0 = std::time::Instant::now();
    loop {
        let v = q.execute(&a.command, a.arguments.clone()).with_context(|| format!("QMP {}", a.command))?;
        let done = match &a.until {
            None => true,
            Some((k, vals)) => v.get(k).and_then(|x| x.as_str()).is_some_and(|x| vals.iter().any(|w| w == x)),
        };
        if done {
            println!("{v}");
            return Ok(());
        }
        if t0.elapsed().as_secs_f64() >= a.within {
            println!("{v}");
            let (k, vals) = a.until.as_ref().expect("only --until repeats");
            bail!("{} did not reach {k}={} within {} s", a.command, vals.join("|"), a.within);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Options of `livemig qemu migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct QemuMigrateArgs {
    /// The source QEMU's QMP socket.
    #[arg(long, value_name = "PATH")]
    pub src_qmp: PathBuf,
    /// The destination carrier (`livemig qemu carrier --listen ADDR --incoming … --dst-qmp …`).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// The shared secret's file.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Multifd channels (0: a single channel).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=15))]
    pub multifd: u8,
    /// Enable QEMU's postcopy-ram capability on both ends.
    #[arg(long)]
    pub postcopy: bool,
    /// QEMU's max-bandwidth, bytes/s (K, M, G suffixes); QEMU's default when absent.
    #[arg(long, value_parser = livemig_app::args::parse_size)]
    pub max_bandwidth: Option<u64>,
    /// QEMU's downtime-limit, ms.
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,
    /// Cancel the migration after this many seconds (the guest keeps running at the source).
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub max_time: f64,
    /// Seconds of silence after which the peer or QEMU is declared gone.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = 20.0)]
    pub io_timeout: f64,
    /// Convergence policy fed with QEMU's passes (ibrahim: the SC11 patterns a/b/c).
    #[arg(long, default_value = "ibrahim")]
    pub policy: livemig_engine::policy::PolicyKind,
    /// When the policy decides pre-copy no longer pays: leave it to QEMU (qemu), raise
    /// downtime-limit to what the remainder needs (stop-and-copy), or start postcopy
    /// (postcopy, needs --postcopy). A dirty set that drains by itself is always left to QEMU.
    #[arg(long, value_enum, default_value_t = crate::controller::Switchover::Qemu)]
    pub switchover: crate::controller::Switchover,
    /// Cap on the downtime limit the controller sets, ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub max_downtime: u64,
    /// Relay every channel through a unix socket (by default the authenticated connections
    /// are handed to QEMU with getfd and `fd:`, so nothing is relayed: a single channel with
    /// any QEMU, multifd's when QEMU has livemig's patch, `x-livemig-channels`).
    #[arg(long)]
    pub relay: bool,
    /// Directory for the carrier's unix socket.
    #[arg(long, value_name = "DIR", default_value = "/tmp")]
    pub socket_dir: PathBuf,
    /// A disk that moves with the guest: the control socket of the `livemig disk serve`
    /// that serves it to the source QEMU, and the address of the `livemig disk receive
    /// --serve-early` that serves it to the destination QEMU. Repeatable. Its transfer starts
    /// before the memory migration; while QEMU waits in pre-switchover (guest stopped) it is
    /// handed over, and QEMU goes on once the destination serves it. Needs --secret-file.
    #[arg(long, value_name = "CONTROL=ADDR", requires = "secret_file")]
    pub disk: Vec<livemig_storage::cli::together::DiskSpec>,
    /// How the disks move: hybrid (push, hand over, pull the rest on demand and hottest
    /// first) or precopy (rounds; the last inside QEMU's downtime).
    #[arg(long, value_enum, default_value_t = livemig_storage::live::Strategy::Hybrid)]
    pub disk_strategy: livemig_storage::live::Strategy,
    /// Hybrid: disk chunks written this many times are held back from the push.
    #[arg(long, default_value_t = 2)]
    pub disk_threshold: u32,
    /// Who moves the guest's RAM: QEMU's own stream (qemu), or livemig's engine (livemig:
    /// needs QEMU with livemig's patch on both hosts and RAM in shared memory,
    /// `memory-backend-memfd,share=on`; QEMU's stream then carries the device state only).
    #[arg(long, value_enum, default_value_t = RamMover::Qemu)]
    pub ram: RamMover,
    /// With --ram livemig: how the RAM moves (pre-copy rounds decided by --policy, post-copy,
    /// or hybrid: one pass, then post-copy). Pre-copy with `--switchover postcopy` hands over
    /// to post-copy when the policy decides, instead of stop-and-copy.
    #[arg(long, value_enum, default_value_t = crate::ram::RamStrategy::Precopy)]
    pub strategy: crate::ram::RamStrategy,
    /// The session's backend: tcp, verbs, or auto (verbs when an RDMA device is up). The
    /// destination carrier must use the same.
    #[arg(long, default_value = "tcp", value_parser = livemig_app::args::transport_parser())]
    pub transport: livemig_engine::connect::TransportChoice,
    /// With --ram livemig, post-copy: if the link breaks after the hand-over, dial the
    /// destination carrier again for up to this many seconds and go on (0: the guest is lost).
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_secs, default_value_t = livemig_app::precopy::DEFAULT_RECOVER_WITHIN)]
    pub recover_within: f64,
    /// With --ram livemig: take over the post-copy migration with this id (printed by the
    /// `qemu migrate` that started it) whose livemig process died after the hand-over: the
    /// stopped source QEMU's RAM is attached again and the pages the destination still
    /// misses are sent to the carrier at --to (which waits --recover-within for it).
    #[arg(long, value_name = "ID", value_parser = parse_migration_id)]
    pub take_over: Option<[u8; 16]>,
    /// With --ram livemig, pre-copy and hybrid: how the guest's writes are tracked — uffd
    /// (asynchronous userfaultfd write-protect read with PAGEMAP_SCAN, Linux 6.7+), qemu
    /// (QEMU's own dirty log, read through livemig's patch each pass: any kernel), auto (uffd
    /// where the kernel has it).
    #[arg(long, value_enum, default_value_t = crate::ram::DirtyLogChoice::Auto)]
    pub dirty_log: crate::ram::DirtyLogChoice,
    /// With --ram livemig, post-copy and hybrid: pages per push batch.
    #[arg(long, value_name = "PAGES", default_value_t = livemig_engine::postcopy::DEFAULT_BATCH_PAGES)]
    pub push_batch: usize,
    /// With --ram livemig, post-copy and hybrid: most pushed pages the destination has not
    /// yet acknowledged as installed (a vCPU faulting on a page on its way waits behind at
    /// most this many).
    #[arg(long, value_name = "PAGES", default_value_t = livemig_engine::postcopy::DEFAULT_PUSH_WINDOW)]
    pub push_window: usize,
    /// Machine-readable summary (JSON) on stdout; no per-pass lines.
    #[arg(long)]
    pub json: bool,
}

fn parse_migration_id(s: &str) -> Result<[u8; 16], String> {
    livemig_engine::postcopy::parse_id(s).ok_or_else(|| format!("`{s}` is not a migration id (32 hex digits)"))
}

/// Who moves a QEMU guest's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RamMover {
    /// QEMU's migration stream (livemig carries it).
    Qemu,
    /// livemig's engine, through QEMU's `x-livemig-attach` (livemig's QEMU patch).
    Livemig,
}

/// `livemig qemu migrate --ram livemig`.
fn run_migrate_ram(a: &QemuMigrateArgs, secret: &Secret) -> Result<()> {
    livemig_engine::postcopy::check_push(a.push_batch, a.push_window).context("--push-batch / --push-window")?;
    if a.multifd > 0 || a.postcopy || !a.disk.is_empty() || a.relay {
        bail!("--ram livemig moves the RAM itself: --multifd, --postcopy, --disk and --relay do not apply");
    }
    let o = crate::ram::RamOptions {
        src_qmp: a.src_qmp.clone(),
        to: a.to.clone(),
        strategy: a.strategy,
        policy: a.policy,
        switchover_postcopy: a.switchover == crate::controller::Switchover::Postcopy,
        transport: a.transport,
        io_timeout: Duration::from_secs_f64(a.io_timeout),
        max_time: Duration::from_secs_f64(a.max_time),
        socket_dir: a.socket_dir.clone(),
        recover_within: Duration::from_secs_f64(a.recover_within),
        take_over: a.take_over,
        dirty_log: a.dirty_log,
        push_batch: a.push_batch,
        push_window: a.push_window,
    };
    let json = a.json;
    let mut on_line = |l: &str| {
        if !json {
            println!("{l}");
        }
    };
    let s = match o.take_over {
        Some(id) => crate::ram::take_over_ram(&o, secret, id, &mut on_line)
            .context("taking over the QEMU migration whose livemig source died")?,
        None => {
            crate::ram::migrate_ram(&o, secret, &mut on_line).context("QEMU migration with livemig moving the RAM")?
        }
    };
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let mib: u64 = s.blocks.iter().map(|b| b.1).sum::<u64>() >> 20;
        let f = |k: &str| s.engine.get(k).and_then(|v| v.as_f64());
        println!(
            "QEMU RAM ({} MiB in {} block(s)) moved by livemig ({}, {}, writes tracked by {}): {:.0} ms total; \
             engine {:.2} s, {:.1} MiB sent; \
             the guest was paused {} (source STOP to destination RESUME); \
             QEMU's own stream {:.1} KiB; digest {} verified; destination {}{}",
            mib,
            s.blocks.len(),
            s.strategy,
            s.transport,
            s.tracker,
            s.total_ms,
            f("total_s").unwrap_or(0.0),
            f("bytes").unwrap_or(0.0) / (1 << 20) as f64,
            s.stop_to_resume_ms.map_or("?".into(), |ms| format!("{ms:.1} ms")),
            s.qemu_stream_bytes as f64 / 1024.0,
            s.checksum.as_deref().map_or("-", |c| &c[..c.len().min(16)]),
            s.dest_status,
            dest_guest(s.dest_running, s.dest_runstate.as_deref())
        );
        if let Some(r) = s.engine.get("end_reason").and_then(|v| v.as_str()) {
            println!("pre-copy ended: {r}");
        }
        if let Some(d) = &s.dest_ram {
            if let Some(p99) = d.get("fault_p99_us").and_then(|v| v.as_f64()) {
                println!(
                    "destination faults: {} demand requests, service p50 {:.0} µs, p99 {p99:.0} µs",
                    d.get("demand_requests").and_then(|v| v.as_u64()).unwrap_or(0),
                    d.get("fault_p50_us").and_then(|v| v.as_f64()).unwrap_or(0.0)
                );
            }
        }
    }
    if s.status != "completed" || !(s.dest_running || dest_waits(s.dest_runstate.as_deref())) {
        bail!(
            "QEMU's migration ended {} at the source and {} at the destination (guest running there: {})",
            s.status,
            s.dest_status,
            s.dest_running
        );
    }
    Ok(())
}

/// Entry point of `livemig qemu migrate`.
pub fn run_migrate(a: &QemuMigrateArgs) -> Result<()> {
    let secret = Secret::load(a.secret_file.as_deref()).context("loading the shared secret")?;
    if a.ram == RamMover::Livemig {
        return run_migrate_ram(a, &secret);
    }
    if a.take_over.is_some() {
        bail!("--take-over continues a migration of --ram livemig");
    }
    let o = MigrateOptions {
        src_qmp: a.src_qmp.clone(),
        to: a.to.clone(),
        multifd: a.multifd,
        postcopy: a.postcopy,
        max_bandwidth: a.max_bandwidth,
        downtime_limit: a.downtime_limit,
        max_time: Duration::from_secs_f64(a.max_time),
        io_timeout: Duration::from_secs_f64(a.io_timeout),
        socket_dir: a.socket_dir.clone(),
        policy: a.policy,
        switchover: a.switchover,
        max_downtime_ms: a.max_downtime,
        relay: a.relay,
        transport: a.transport,
        disks: a.disk.clone(),
        disk_options: a.secret_file.as_ref().map(|f| livemig_storage::cli::together::DiskOptions {
            strategy: a.disk_strategy,
            threshold: a.disk_threshold,
            secret_file: f.clone(),
            io_timeout: Duration::from_secs_f64(a.io_timeout),
            transport: livemig_engine::connect::TransportChoice::Tcp,
        }),
    };
    let json = a.json;
    let s = migrate::migrate(&o, &secret, &mut |p| {
        if !json {
            println!(
                "pass {:>3} at {:6.2} s: {:8.1} MiB sent, {:8.1} MiB remaining, {:7.0} Mbit/s{}",
                p.pass,
                p.elapsed_s,
                p.transferred as f64 / (1 << 20) as f64,
                p.remaining as f64 / (1 << 20) as f64,
                p.mbps,
                p.action.as_ref().map(|a| format!("  → {a}")).unwrap_or_default()
            );
        }
    })
    .context("QEMU migration through livemig")?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else if s.status == "completed" {
        println!(
            "QEMU migration {} over {}: {} ms total, {} ms downtime, {} passes; {:.1} MiB carried on {} \
             channel(s) at {:.0} MiB/s ({:.1} MiB of RAM); destination {}{}",
            s.status,
            s.transport,
            s.total_ms,
            s.downtime_ms,
            s.passes,
            s.carried as f64 / (1 << 20) as f64,
            s.channels,
            s.throughput_mib_s,
            s.ram_transferred as f64 / (1 << 20) as f64,
            s.dest_status,
            dest_guest(s.dest_running, s.dest_runstate.as_deref())
        );
        if let (Some(by), Some(action)) = (&s.decided_by, &s.action) {
            println!("decided by {by}: {action}");
        }
        if let Some(ms) = s.stop_to_resume_ms {
            println!("the guest was paused {ms:.0} ms (source STOP to destination RESUME)");
        }
        if let Some(ms) = s.disk_ready_ms {
            println!("pre-copy disks converged after {:.1} s; QEMU's migration started then", ms as f64 / 1e3);
        }
        if let Some(ms) = s.disk_handover_ms {
            println!(
                "disks handed over in {ms:.1} ms with the guest stopped ({:.1} MiB pushed before)",
                s.disk_pushed_before as f64 / (1 << 20) as f64
            );
        }
    }
    for d in &s.disks {
        match (&d.summary, &d.error) {
            (Some(v), _) if !json => {
                let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
                let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                println!(
                    "disk {} → {}: {:.2} s, {:.1} MiB pushed, {} chunks left at the handover, {} pulled + {} on \
                     demand ({:.1} MiB); {} chunks verified equal at both ends",
                    d.control,
                    d.to,
                    f("total_s"),
                    n("bytes_pushed") as f64 / (1 << 20) as f64,
                    n("remaining_at_switchover"),
                    n("chunks_pulled"),
                    n("chunks_pulled_urgent"),
                    n("bytes_pulled") as f64 / (1 << 20) as f64,
                    n("verified_chunks")
                );
            }
            (None, Some(e)) => eprintln!("disk {} → {}: {e}", d.control, d.to),
            _ => {}
        }
    }
    if s.disks_handed_over {
        bail!(
            "the migration ended {} after the disks were handed over: the disks are at their destinations, \
             and the source guest is stopped (it must not run without them)",
            s.status
        );
    }
    if s.status != "completed" {
        bail!(
            "the migration ended {}; the guest {} at the source",
            s.status,
            if s.source_running { "runs on" } else { "does NOT run" }
        );
    }
    if let Some(d) = s.disks.iter().find(|d| !d.ok) {
        bail!(
            "the guest runs at the destination, but the transfer of disk {} did not complete: {}",
            d.control,
            d.error.as_deref().unwrap_or("?")
        );
    }
    if !s.dest_running && !dest_waits(s.dest_runstate.as_deref()) {
        bail!(
            "QEMU completed the migration at the source, but the destination's guest is not known to run ({}); \
             check the destination QEMU",
            s.dest_status
        );
    }
    Ok(())
}

/// A destination QEMU started with `-S` ends an incoming migration `paused`, waiting for
/// `cont`: the migration succeeded, the guest just does not run yet.
fn dest_waits(runstate: Option<&str>) -> bool {
    runstate == Some("paused")
}

/// How the destination's guest ended, for the summary line.
fn dest_guest(running: bool, runstate: Option<&str>) -> &'static str {
    if running {
        ", guest running"
    } else if dest_waits(runstate) {
        ", guest paused (that QEMU runs with -S: `cont` starts it)"
    } else {
        ", guest NOT running"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_arguments_and_until_are_checked() {
        assert_eq!(parse_json_object(r#"{"uri":"tcp:h:1"}"#).unwrap()["uri"], "tcp:h:1");
        assert!(parse_json_object("[1]").is_err());
        assert!(parse_json_object("{").is_err());
        assert_eq!(
            parse_until("status=completed|failed").unwrap(),
            ("status".to_string(), vec!["completed".to_string(), "failed".to_string()])
        );
        for bad in ["status", "=x", "status=", "status=|"] {
            assert!(parse_until(bad).is_err(), "{bad}");
        }
    }
}
