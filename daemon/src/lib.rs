//! `livemig serve`: one daemon per host serving any number of concurrent sessions —
//! migration destinations and benchmark sinks — each with its own memory and limits.
//!
//! ```text
//!  listen address ─► gate (transport::gate): each connection authenticates on its own
//!                    thread under one handshake deadline; at most N at once
//!                 ─► SessionAssembler: authenticated streams grouped by session id
//!                 ─► session thread: open request (app::open) → limits → memory created
//!                    and exposed → reply → the service (receive_on / bench serve)
//! ```
//!
//! A bad, slow or idle connection costs one gate slot until its deadline and one log line;
//! a session that fails costs its own thread and memory, never the daemon or another session.
//! Sessions run over TCP (`listen`) or RDMA verbs (`listen_verbs`: the same gate and
//! assembler on the out-of-band socket, then a queue pair per connection of the session).

pub mod config;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig_app::open::{OpenReply, OpenRequest, Service};
use livemig_app::precopy::{receive_on, DestMemory, ReceiveArgs};
use livemig_engine::connect::TransportChoice;
use livemig_transport::auth::Secret;
use livemig_transport::wire::{close_code, Frame};
use livemig_transport::{
    Access, Admitted, GateConfig, RegionTable, SessionAssembler, TcpConfig, TcpListener, TcpTransport, Transport,
    TransportKind,
};

pub use config::DaemonConfig;

/// Options of `livemig serve` (flags override the configuration file).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML; `daemon/livemig.toml` is a commented example).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (repeat for several); replaces the file's `listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Out-of-band address for verbs sessions (repeat for several); replaces the file's
    /// `listen_verbs`.
    #[arg(long, value_name = "ADDR")]
    pub listen_verbs: Vec<String>,
    /// Shared-secret file (else the file's `secret_file`, else $LIVEMIG_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Sessions served at once.
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Memory all sessions together may hold (e.g. 8G).
    #[arg(long, value_parser = livemig_app::args::parse_size)]
    pub max_total_bytes: Option<u64>,
    /// Seconds a session may last (0: no limit).
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_secs)]
    pub max_session: Option<f64>,
    /// Receive disks migrated to this daemon into DIR (replaces the file's
    /// `receive_disks_dir`).
    #[arg(long, value_name = "DIR")]
    pub receive_disks_dir: Option<PathBuf>,
    /// Print the daemon's state every SECS seconds (0: never).
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_secs)]
    pub stats_every: Option<f64>,
}

impl ServeArgs {
    /// The configuration: the file's (or the defaults), with the flags applied.
    pub fn config(&self) -> Result<DaemonConfig> {
        let mut c = match &self.config {
            Some(p) => DaemonConfig::load(p)?,
            None => DaemonConfig::default(),
        };
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        if !self.listen_verbs.is_empty() {
            c.listen_verbs = self.listen_verbs.clone();
        }
        if let Some(f) = &self.secret_file {
            c.secret_file = Some(f.clone());
        }
        if let Some(n) = self.max_sessions {
            c.max_sessions = n;
        }
        if let Some(b) = self.max_total_bytes {
            c.max_total_bytes = b;
        }
        if let Some(s) = self.stats_every {
            c.stats_every_s = s;
        }
        if let Some(s) = self.max_session {
            c.max_session_s = s;
        }
        if let Some(d) = &self.receive_disks_dir {
            c.receive_disks_dir = Some(d.clone());
        }
        c.check()?;
        Ok(c)
    }
}

/// What every thread of the daemon shares.
/// How the daemon exports a configured disk or image.
fn export_args(
    cfg: &DaemonConfig,
    socket: Option<PathBuf>,
    listen: Option<String>,
    name: String,
    read_only: bool,
    control: Option<PathBuf>,
) -> livemig_storage::cli::ExportArgs {
    livemig_storage::cli::ExportArgs {
        socket,
        listen,
        name,
        read_only,
        max_connections: 64,
        io_timeout: cfg.io_timeout_s,
        control,
    }
}

#[derive(Debug)]
struct Daemon {
    cfg: DaemonConfig,
    tcp: TcpConfig,
    #[cfg(feature = "verbs")]
    verbs: livemig_transport::verbs::VerbsConfig,
    active: AtomicUsize,
    next_id: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    held_bytes: AtomicU64,
    /// Disks and images served over NBD, by name (set before any session is accepted).
    served: std::sync::OnceLock<Vec<(String, Arc<livemig_storage::cli::Served>)>>,
    /// Disks migrated here, by name: being received, or received and served.
    received: std::sync::Mutex<Vec<(String, Option<Arc<livemig_storage::mirror::Mirror>>)>>,
}

/// Memory reserved for one session against `max_total_bytes`; released on drop.
struct Reservation<'a> {
    d: &'a Daemon,
    bytes: u64,
}

impl Daemon {
    fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        let mut cur = self.held_bytes.load(Ordering::Acquire);
        loop {
            let next = cur.checked_add(bytes).filter(|n| *n <= self.cfg.max_total_bytes)?;
            match self.held_bytes.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Reservation { d: self, bytes }),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.d.held_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Entry point of `livemig serve`: binds every address (printing `listening ADDR tcp` for
/// each, first thing on stdout), then serves until killed.
pub fn run(a: &ServeArgs) -> Result<()> {
    let cfg = a.config()?;
    let secret = Secret::load(cfg.secret_file.as_deref()).context("loading the shared secret")?;
    let io_timeout = Duration::from_secs_f64(cfg.io_timeout_s);
    let tcp = TcpConfig {
        gate: GateConfig {
            handshake_timeout: Duration::from_secs_f64(cfg.handshake_timeout_s),
            max_pending: cfg.max_pending_handshakes,
            tls: cfg.tls.clone().or_else(livemig_app::args::tls),
        },
        ..livemig_app::precopy::transport_options(TransportChoice::Tcp, io_timeout).tcp
    };
    #[cfg(feature = "verbs")]
    let verbs = livemig_transport::verbs::VerbsConfig {
        gate: tcp.gate.clone(),
        io_timeout,
        window: tcp.window,
        ..Default::default()
    };
    let d = Arc::new(Daemon {
        cfg,
        tcp,
        #[cfg(feature = "verbs")]
        verbs,
        active: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        held_bytes: AtomicU64::new(0),
        served: std::sync::OnceLock::new(),
        received: std::sync::Mutex::new(Vec::new()),
    });
    let mut listeners = Vec::new();
    for addr in &d.cfg.listen {
        let l = TcpListener::bind(addr.as_str()).with_context(|| format!("listening on {addr}"))?;
        println!("listening {} tcp", l.local_addr()?);
        listeners.push(Bound::Tcp(l));
    }
    for addr in &d.cfg.listen_verbs {
        listeners.push(bind_verbs(addr)?);
    }
    // Disks served over NBD by the daemon.
    let mut served = Vec::new();
    for dc in &d.cfg.disks {
        let args = livemig_storage::cli::DiskServeArgs {
            file: dc.file.clone(),
            base: dc.base.clone(),
            base_dir: dc.base_dir.clone(),
            chunk_size: dc.chunk_size,
            export: export_args(
                &d.cfg,
                dc.socket.clone(),
                dc.listen.clone(),
                dc.name.clone(),
                dc.read_only,
                dc.control.clone(),
            ),
        };
        let s =
            livemig_storage::cli::start(&args).with_context(|| format!("serving the disk {}", dc.file.display()))?;
        println!("listening {} nbd", s.endpoint);
        served.push((dc.name.clone(), Arc::new(s)));
    }
    for ic in &d.cfg.images {
        let args = livemig_image::cli::ServeArgs {
            image: ic.image.clone(),
            local: ic.local.clone(),
            export: export_args(
                &d.cfg,
                ic.socket.clone(),
                ic.listen.clone(),
                ic.name.clone(),
                ic.read_only,
                ic.control.clone(),
            ),
            repo: livemig_image::cli::RepoArg { repo: ic.repo.clone() },
            follow_binding: true,
        };
        let (s, _) =
            livemig_image::cli::start_serve(&args).with_context(|| format!("serving the image {}", ic.name))?;
        println!("listening {} nbd {}", s.endpoint, ic.name);
        served.push((ic.name.clone(), Arc::new(s)));
    }
    let _ = d.served.set(served.clone());
    // SIGINT/SIGTERM: save every disk's state, then exit.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("installing signal handlers")?;
    let d2 = d.clone();
    std::thread::Builder::new().name("livemig-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            for (_, s) in &served {
                match s.stop() {
                    Ok(summary) => eprintln!("disk {summary}"),
                    Err(e) => eprintln!("error: disk {}: {e:#}", s.endpoint),
                }
            }
            for (name, m) in d2.received.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                if let Some(m) = m {
                    match m.flush() {
                        Ok(()) => eprintln!("received disk {name}: saved"),
                        Err(e) => eprintln!("error: received disk {name}: {e:#}"),
                    }
                }
            }
            eprintln!("livemig serve: stopped on signal {sig}");
            std::process::exit(0);
        }
    })?;
    use std::io::Write;
    std::io::stdout().flush()?;
    eprintln!(
        "livemig serve: {} address(es), at most {} sessions and {} MiB in all, {} unauthenticated connections per address",
        listeners.len(),
        d.cfg.max_sessions,
        d.cfg.max_total_bytes >> 20,
        d.cfg.max_pending_handshakes
    );
    for l in listeners {
        let (d, secret) = (d.clone(), secret.clone());
        std::thread::Builder::new().name("livemig-accept".into()).spawn(move || accept_loop(&l, &secret, &d))?;
    }
    let every = d.cfg.stats_every_s;
    loop {
        if every > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(every));
            eprintln!("{}", stats_line(&d));
        } else {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Resident memory (bytes) and open file descriptors of this process.
pub fn process_usage() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    (rss * page, fds)
}

fn stats_line(d: &Daemon) -> String {
    let (rss, fds) = process_usage();
    format!(
        "stats: {} active, {} done, {} failed, {} refused; {} MiB held for sessions; rss {:.1} MiB, {fds} open files",
        d.active.load(Ordering::Relaxed),
        d.done.load(Ordering::Relaxed),
        d.failed.load(Ordering::Relaxed),
        d.refused.load(Ordering::Relaxed),
        d.held_bytes.load(Ordering::Relaxed) >> 20,
        rss as f64 / (1 << 20) as f64
    )
}

/// A bound listening socket of either backend.
enum Bound {
    Tcp(TcpListener),
    #[cfg(feature = "verbs")]
    Verbs(livemig_transport::verbs::VerbsListener),
}

impl Bound {
    fn kind(&self) -> TransportKind {
        match self {
            Bound::Tcp(_) => TransportKind::Tcp,
            #[cfg(feature = "verbs")]
            Bound::Verbs(_) => TransportKind::Verbs,
        }
    }

    fn gate(
        &self,
        secret: &Secret,
        cfg: &GateConfig,
    ) -> Result<livemig_transport::gate::Gate<'_>, livemig_transport::TransportError> {
        match self {
            Bound::Tcp(l) => l.gate(secret, cfg),
            #[cfg(feature = "verbs")]
            Bound::Verbs(l) => l.gate(secret, cfg),
        }
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            #[cfg(feature = "verbs")]
            Bound::Verbs(l) => l.local_addr().ok(),
        }
    }
}

#[cfg(feature = "verbs")]
fn bind_verbs(addr: &str) -> Result<Bound> {
    if !livemig_transport::verbs::active_device_present() {
        bail!(
            "listen_verbs {addr}: no RDMA device with an active port on this host (devices: {:?})",
            livemig_transport::verbs::device_names()
        );
    }
    let l = livemig_transport::verbs::VerbsListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    println!("listening {} verbs", l.local_addr()?);
    Ok(Bound::Verbs(l))
}

#[cfg(not(feature = "verbs"))]
fn bind_verbs(addr: &str) -> Result<Bound> {
    bail!("listen_verbs {addr}: this build has no verbs support")
}

fn accept_loop(l: &Bound, secret: &Secret, d: &Arc<Daemon>) {
    let kind = l.kind();
    let mut gate = match l.gate(secret, &d.tcp.gate) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: cannot serve {:?}: {e:#}", l.local_addr());
            std::process::exit(1);
        }
    };
    let mut sessions = SessionAssembler::new(d.tcp.gate.handshake_timeout + d.tcp.io_timeout);
    loop {
        let wake = sessions.next_expiry().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let admitted = match gate.next(Some(wake)) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting");
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        };
        for e in sessions.expire(Instant::now()) {
            tracing::warn!(error = %e, "incomplete session dropped");
        }
        let Some(a) = admitted else { continue };
        match sessions.offer(a) {
            Ok(Some(streams)) => dispatch(streams, kind, d),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "session refused"),
        }
    }
}

fn refuse_streams(streams: Vec<Admitted>, reason: &str) {
    for a in streams {
        let mut s = a.stream;
        let _ = livemig_transport::auth::write_frame(
            &mut s,
            &Frame::Close { code: close_code::REFUSED, reason: reason.to_string() },
        );
    }
}

fn dispatch(streams: Vec<Admitted>, kind: TransportKind, d: &Arc<Daemon>) {
    let id = d.next_id.fetch_add(1, Ordering::Relaxed);
    let peer = streams[0].addr.to_string();
    if d.active.fetch_add(1, Ordering::AcqRel) >= d.cfg.max_sessions {
        d.active.fetch_sub(1, Ordering::AcqRel);
        d.refused.fetch_add(1, Ordering::Relaxed);
        let reason = format!("the daemon serves its limit of {} sessions; try again later", d.cfg.max_sessions);
        eprintln!("session {id} from {peer}: refused: {reason}");
        refuse_streams(streams, &reason);
        return;
    }
    let d2 = d.clone();
    let spawned = std::thread::Builder::new().name(format!("livemig-session-{id}")).spawn(move || {
        // The slot is given back however the session ends, a panic included.
        struct Slot<'a>(&'a Daemon);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _slot = Slot(&d2);
        let t0 = Instant::now();
        let r = session(id, streams, kind, &d2);
        let secs = t0.elapsed().as_secs_f64();
        match r {
            Ok(what) => {
                d2.done.fetch_add(1, Ordering::Relaxed);
                eprintln!("session {id} from {peer}: {what}: done in {secs:.2} s");
            }
            Err(e) => {
                d2.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("session {id} from {peer}: failed after {secs:.2} s: {e:#}");
            }
        }
    });
    if let Err(e) = spawned {
        d.active.fetch_sub(1, Ordering::AcqRel);
        d.failed.fetch_add(1, Ordering::Relaxed);
        eprintln!("session {id}: no thread for it: {e}");
    }
}

/// The `disk-receive` service: the disk `name` arrives into `receive_disks_dir`, is served
/// over NBD there from the handover on, and stays served until the daemon stops.
fn receive_disk(id: u64, mut t: Box<dyn Transport>, kind: TransportKind, name: &str, d: &Daemon) -> Result<String> {
    let Some(dir) = d.cfg.receive_disks_dir.clone() else {
        return refuse(t.as_mut(), "this daemon receives no disks (receive_disks_dir is not set)".into());
    };
    let served = d.served.get().map(Vec::as_slice).unwrap_or_default();
    {
        let mut received = d.received.lock().unwrap_or_else(|e| e.into_inner());
        if served.iter().any(|(n, _)| n == name) || received.iter().any(|(n, _)| n == name) {
            drop(received);
            return refuse(t.as_mut(), format!("this daemon already has a disk named {name:?}"));
        }
        received.push((name.to_string(), None));
    }
    // The name is taken until the disk is received and served; a failed transfer frees it.
    let forget = || d.received.lock().unwrap_or_else(|e| e.into_inner()).retain(|(n, m)| n != name || m.is_some());
    let file = dir.join(format!("{name}.img"));
    if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
        forget();
        return refuse(t.as_mut(), format!("{} already exists here", file.display()));
    }
    if let Err(e) = reply(t.as_mut(), &OpenReply::Opened { session: id }) {
        forget();
        return Err(e);
    }
    let a = livemig_storage::cli::receive::DiskReceiveArgs {
        file: file.clone(),
        base: None,
        base_dir: None,
        listen: String::new(),
        secret_file: None,
        transport: match kind {
            TransportKind::Tcp => TransportChoice::Tcp,
            TransportKind::Verbs => TransportChoice::Verbs,
        },
        socket: Some(dir.join(format!("{name}.sock"))),
        nbd_listen: None,
        name: name.to_string(),
        io_timeout: d.cfg.io_timeout_s,
        pulls_in_flight: 4,
        serve_early: false,
        size: None,
        exit_when_done: false,
        json: false,
    };
    let r = livemig_storage::cli::receive::receive_on(&a, t, None, None);
    match (r.outcome, r.served) {
        (Ok(s), Some((m, endpoint))) => {
            let mut received = d.received.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = received.iter_mut().find(|(n, _)| n == name) {
                e.1 = Some(m);
            }
            Ok(format!("disk-receive {name}, served on {endpoint}: {}", livemig_storage::cli::receive::describe(&s)))
        }
        (Err(e), Some((m, endpoint))) => {
            // Handed over: the disk is served here (reads of chunks that never came fail with
            // EIO); it keeps its name.
            let mut received = d.received.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = received.iter_mut().find(|(n, _)| n == name) {
                e.1 = Some(m);
            }
            Err(e.context(format!("disk {name} (still served on {endpoint})")))
        }
        (outcome, None) => {
            // Never handed over: the source still serves the disk with every write; what
            // arrived here is dropped, and the name is free again.
            if let Some(m) = r.opened {
                drop(m);
            }
            let _ = std::fs::remove_file(&file);
            forget();
            Err(outcome.err().unwrap_or_else(|| anyhow::anyhow!("the transfer ended before the handover")))
                .with_context(|| format!("receiving disk {name}"))
        }
    }
}

fn reply(t: &mut dyn Transport, r: &OpenReply) -> Result<()> {
    t.send_message(&r.encode()).context("answering the service request")
}

fn refuse(t: &mut dyn Transport, reason: String) -> Result<String> {
    let _ = reply(t, &OpenReply::Refused { reason: reason.clone() });
    bail!("refused: {reason}")
}

/// One session, start to end; returns what it served.
fn session(id: u64, streams: Vec<Admitted>, kind: TransportKind, d: &Daemon) -> Result<String> {
    let table = RegionTable::new();
    let mut t: Box<dyn Transport> = match kind {
        TransportKind::Tcp => {
            Box::new(TcpTransport::from_admitted(&d.tcp, streams, &table).context("setting up the session")?)
        }
        #[cfg(feature = "verbs")]
        TransportKind::Verbs => Box::new(
            livemig_transport::verbs::VerbsTransport::from_admitted(&d.verbs, streams, &table)
                .context("setting up the verbs session")?,
        ),
        #[cfg(not(feature = "verbs"))]
        TransportKind::Verbs => bail!("this build has no verbs support"),
    };
    if d.cfg.max_session_s > 0.0 {
        let limit = Duration::from_secs_f64(d.cfg.max_session_s);
        t = Box::new(livemig_transport::SessionDeadline::new(t, limit));
    }
    let io_timeout = d.tcp.io_timeout;
    let m = t
        .recv_message(Some(io_timeout))
        .context("waiting for the service request")?
        .with_context(|| format!("no service request within {io_timeout:?}"))?;
    let req = match OpenRequest::decode(&m) {
        Ok(r) => r,
        Err(e) => return refuse(t.as_mut(), e.to_string()),
    };
    if req.size > d.cfg.max_session_bytes {
        return refuse(
            t.as_mut(),
            format!("{} MiB asked, at most {} MiB per session", req.size >> 20, d.cfg.max_session_bytes >> 20),
        );
    }
    let Some(_held) = d.reserve(req.size) else {
        let free = d.cfg.max_total_bytes.saturating_sub(d.held_bytes.load(Ordering::Relaxed));
        return refuse(t.as_mut(), format!("{} MiB asked, {} MiB free on this daemon", req.size >> 20, free >> 20));
    };
    let what = format!("{} {} MiB", req.service.name(), req.size >> 20);
    match req.service {
        Service::DiskControl => {
            let served = d.served.get().map(Vec::as_slice).unwrap_or_default();
            let Some((_, s)) = served.iter().find(|(n, _)| *n == req.disk) else {
                return refuse(t.as_mut(), format!("this daemon serves no disk named {:?}", req.disk));
            };
            let line = serde_json::to_vec(req.request.as_ref().expect("checked by decode")).expect("JSON serialises");
            let r = match livemig_storage::cli::control::parse_request(&line) {
                Ok(r) => r,
                Err(e) => return refuse(t.as_mut(), format!("bad disk request: {e}")),
            };
            // Over the network, only what a snapshot needs: moving a disk stays with whoever
            // holds its control socket.
            use livemig_storage::cli::control::Request as R;
            if !matches!(r, R::Clone(_) | R::Commit(_) | R::Status) {
                return refuse(t.as_mut(), "through the daemon a disk takes clone, commit and status only".into());
            }
            reply(t.as_mut(), &OpenReply::Opened { session: id })?;
            let answer = livemig_storage::cli::control::handle(&r, &s.source, s.snapshots.as_deref());
            t.send_message(&serde_json::to_vec(&answer).expect("JSON serialises")).context("sending the answer")?;
            // The peer closes once it has the answer.
            let _ = t.recv_message(Some(io_timeout));
            return Ok(format!("disk-control {}", req.disk));
        }
        Service::DiskReceive => return receive_disk(id, t, kind, &req.disk, d),
        Service::Receive => {
            let dm = match DestMemory::new(req.size, req.page_size) {
                Ok(m) => m,
                Err(e) => return refuse(t.as_mut(), format!("cannot create the memory: {e:#}")),
            };
            let _reg = t.expose(dm.aliases[0].clone()).context("exposing the memory")?;
            reply(t.as_mut(), &OpenReply::Opened { session: id })?;
            let args = ReceiveArgs {
                listen: String::new(),
                transport: match kind {
                    TransportKind::Tcp => TransportChoice::Tcp,
                    TransportKind::Verbs => TransportChoice::Verbs,
                },
                size: req.size,
                page_size: req.page_size,
                after: req.after_s,
                io_timeout: io_timeout.as_secs_f64(),
                recover_within: 0.0,
                secret_file: None,
                json: false,
                no_progress: true,
            };
            // A daemon routes each session to a new service: a broken post-copy session
            // cannot be taken over through it.
            receive_on(&args, t, &dm, indicatif::ProgressBar::hidden(), None)?;
        }
        Service::BenchPages | Service::BenchChunks => {
            let kind = if req.service == Service::BenchChunks {
                livemig_bench::pages::CHUNKS
            } else {
                livemig_bench::pages::PAGES
            };
            let ps = u32::try_from(req.page_size).context("page size")?;
            let r = match livemig_bench::pages::make_region_in(
                &d.cfg.region_dir,
                kind,
                2,
                req.size,
                ps,
                Access::REMOTE_WRITE,
            ) {
                Ok(r) => r,
                Err(e) => return refuse(t.as_mut(), format!("cannot create the region: {e:#}")),
            };
            let _reg = t.expose(r.clone()).context("exposing the region")?;
            reply(t.as_mut(), &OpenReply::Opened { session: id })?;
            livemig_bench::pages::serve(t.as_mut(), &r, io_timeout)?;
            // The session's memory goes before its reservation is given back.
            drop(t);
            drop(r);
        }
    }
    Ok(what)
}
