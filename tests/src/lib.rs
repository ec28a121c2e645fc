//! Helpers shared by livemig's integration tests (`tests/tests/*.rs`, and `cli/tests/` as a
//! dev-dependency).
//!
//! They only remove plumbing the test files used to copy: each test still spells out what it
//! migrates and what it asserts. Setup failures panic with a message saying what failed
//! (these are test helpers); nothing here swallows an error.
//!
//! - in process: [`Conn`] (backend, options and secret of both ends) with
//!   [`Conn::spawn_dest`] (a destination thread on loopback) and [`Conn::start_source`] (a
//!   registered region, a running workload, a connected transport); [`registered_region`],
//!   [`workload_params`], [`makes_progress`], [`assert_still_running`], [`error_chain`];
//! - the real binary: [`livemig_bin`], [`receive_command`], [`spawn_listening`],
//!   [`parse_listening`]; [`netns`]: two shaped "hosts" joined by a veth pair.

pub mod netns;

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use livemig_engine::connect::{self, Listener, TransportChoice, TransportOptions};
use livemig_engine::dirty::MemoryTracker;
use livemig_engine::guest::{GuestControl, GuestMemory, Idle};
use livemig_engine::precopy::{DestConfig, DestError, DestReport, IterationLine, SourceConfig, SourceError, Summary};
use livemig_transport::auth::Secret;
use livemig_transport::{Access, Region, RegionId, RegionTable, Registration, TcpConfig, Transport, TransportKind};
use livemig_workload::{RunState, Workload, WorkloadKind, WorkloadParams};

/// Migrates a one-region guest through the embedding API: `region` as its memory, tracked
/// with userfaultfd, `workload` (or an idle guest when `None`) as its control.
pub fn migrate_workload(
    t: &mut dyn Transport,
    region: &Arc<Region>,
    workload: Option<&mut Workload>,
    cfg: &SourceConfig,
    on_interval: &mut dyn FnMut(&IterationLine),
) -> Result<Summary, SourceError> {
    let memory = GuestMemory::single(region.clone());
    let mut dirty = MemoryTracker::open(&memory).expect("opening the dirty tracker");
    let mut idle = Idle;
    let guest: &mut dyn GuestControl = match workload {
        Some(w) => w,
        None => &mut idle,
    };
    livemig_engine::precopy::migrate(t, &memory, guest, &mut dirty, cfg, on_interval)
}

/// What [`receive_workload`] returns: the destination's report and the workload it started
/// (if the source migrated one). Derefs to the report.
#[derive(Debug)]
pub struct Received {
    /// The report.
    pub rep: DestReport,
    /// The resumed workload, running.
    pub workload: Option<Workload>,
}

impl std::ops::Deref for Received {
    type Target = DestReport;
    fn deref(&self) -> &DestReport {
        &self.rep
    }
}

/// Receives a one-region guest into `region`, starting the migrated workload (if any).
pub fn receive_workload(
    t: &mut dyn Transport,
    region: &Arc<Region>,
    cfg: &DestConfig,
    on_iteration: &mut dyn FnMut(u32, u64, u64),
) -> Result<Received, DestError> {
    let memory = GuestMemory::single(region.clone());
    let mut workload = None;
    let mut start = livemig_workload::starter(region.clone(), &mut workload);
    let rep = livemig_engine::precopy::receive(t, &memory, &mut start, cfg, on_iteration);
    drop(start);
    rep.map(|rep| Received { rep, workload })
}

/// The shared secret of in-process tests (both ends use it; its value does not matter).
pub const TEST_SECRET: &str = "livemig-test-secret-livemig-test-secret";

/// [`TEST_SECRET`] as a [`Secret`].
pub fn test_secret() -> Secret {
    Secret::new(TEST_SECRET).expect("TEST_SECRET is a valid secret")
}

/// `e` followed by each of its sources, joined by `": "` (as `anyhow`'s `{:#}` prints a chain).
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Options for `choice` with default settings and `io_timeout` for both backends (the TCP
/// backend reads `tcp.io_timeout`, verbs reads `io_timeout`).
pub fn transport_options(choice: TransportChoice, io_timeout: Duration) -> TransportOptions {
    let tcp = TcpConfig { io_timeout, ..Default::default() };
    TransportOptions { choice, io_timeout, tcp, verbs: Default::default() }
}

/// TCP options with `io_timeout` (see [`transport_options`]).
pub fn tcp_options(io_timeout: Duration) -> TransportOptions {
    transport_options(TransportChoice::Tcp, io_timeout)
}

/// Workload parameters: `kind` over `working_set_pages` pages with `threads` threads, flat
/// out (`rate_pages_per_sec: 0`), seed 7. Change the rest with struct update syntax:
/// `WorkloadParams { rate_pages_per_sec: 2000, ..workload_params(kind, 512, 1) }`.
pub fn workload_params(kind: WorkloadKind, working_set_pages: u64, threads: u32) -> WorkloadParams {
    WorkloadParams {
        kind,
        working_set_pages: NonZeroU64::new(working_set_pages).expect("working_set_pages > 0"),
        rate_pages_per_sec: 0,
        threads: NonZeroU32::new(threads).expect("threads > 0"),
        seed: 7,
    }
}

/// An anonymous region registered in its own table; dropping it deregisters the region.
#[derive(Debug)]
pub struct Registered {
    /// The region.
    pub region: Arc<Region>,
    /// The table holding it (what `connect` / `accept` expose or send from).
    pub table: RegionTable,
    /// Keeps the region registered.
    pub reg: Registration,
}

/// A fresh anonymous region `id` of `len` bytes in `page_size` pages, registered with `access`.
pub fn registered_region(id: RegionId, len: u64, page_size: u32, access: Access) -> Registered {
    let region = Arc::new(Region::anonymous(id, len, page_size, access).expect("anonymous region"));
    let table = RegionTable::new();
    let reg = table.register(region.clone()).expect("registering the region");
    Registered { region, table, reg }
}

/// Whether the workload's page counter (pages written plus read) increases over `over`.
pub fn makes_progress(w: &Workload, over: Duration) -> bool {
    let n = w.pages_touched();
    std::thread::sleep(over);
    w.pages_touched() > n
}

/// The workload is running: its state says so and its counter increases over `over`.
pub fn assert_still_running(w: &Workload, over: Duration) {
    assert_eq!(w.state(), RunState::Running);
    assert!(makes_progress(w, over), "the source workload stopped");
}

/// How both ends of an in-process migration connect: backend, options, shared secret.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The backend, resolved from `opts.choice` as the CLI does.
    pub kind: TransportKind,
    /// Transport options of both ends.
    pub opts: TransportOptions,
    /// Shared secret of both ends.
    pub secret: Secret,
}

impl Conn {
    /// `choice` (resolved with [`connect::resolve`]) with [`transport_options`] and
    /// [`test_secret`].
    pub fn new(choice: TransportChoice, io_timeout: Duration) -> Conn {
        let (kind, _) = connect::resolve(choice);
        Conn { kind, opts: transport_options(choice, io_timeout), secret: test_secret() }
    }

    /// TCP with `io_timeout` (see [`Conn::new`]).
    pub fn tcp(io_timeout: Duration) -> Conn {
        Conn::new(TransportChoice::Tcp, io_timeout)
    }

    /// A destination listening on `127.0.0.1:0` with a fresh exposed region (id 2, `len`
    /// bytes, `page_size` pages, remote-writable). Its thread accepts one session (checked to
    /// be of this backend), runs `serve` on the accepted transport and the region, and returns
    /// what `serve` returns. The transport is dropped when `serve` returns (unless `serve`
    /// returns it), the registration when the thread ends. Returns the address to connect to
    /// and the thread.
    pub fn spawn_dest<T: Send + 'static>(
        &self,
        len: u64,
        page_size: u32,
        serve: impl FnOnce(Box<dyn Transport>, Arc<Region>) -> T + Send + 'static,
    ) -> (String, JoinHandle<T>) {
        let Registered { region, table, reg } = registered_region(2, len, page_size, Access::REMOTE_WRITE);
        let l = Listener::bind(self.kind, "127.0.0.1:0").expect("binding the destination listener");
        let addr = l.local_addr().expect("listener address").to_string();
        let conn = self.clone();
        let h = std::thread::spawn(move || {
            let _reg = reg;
            let t = l.accept(&conn.opts, &conn.secret, &table).expect("accept");
            assert_eq!(t.kind(), conn.kind);
            serve(t, region)
        });
        (addr, h)
    }

    /// Connects to `addr` exposing `table`; checks the session is of this backend.
    pub fn connect(&self, addr: &str, table: &RegionTable) -> Box<dyn Transport> {
        let t = connect::connect(self.kind, addr, &self.opts, &self.secret, table).expect("connect");
        assert_eq!(t.kind(), self.kind);
        t
    }

    /// The source side: a fresh local region (id 1, `len` bytes, `page_size` pages), a
    /// workload with `params` started in it, then a transport connected to `addr`.
    pub fn start_source(&self, addr: &str, len: u64, page_size: u32, params: WorkloadParams) -> Source {
        let Registered { region, table, reg } = registered_region(1, len, page_size, Access::LOCAL);
        let mut workload = Workload::init(region.clone(), params).expect("workload init");
        workload.start().expect("workload start");
        let t = self.connect(addr, &table);
        Source { region, reg, t, workload }
    }
}

/// What [`Conn::start_source`] sets up.
pub struct Source {
    /// The source region.
    pub region: Arc<Region>,
    /// Keeps the region registered.
    pub reg: Registration,
    /// The connected transport.
    pub t: Box<dyn Transport>,
    /// The workload running in the region.
    pub workload: Workload,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("region", &self.region)
            .field("transport", &self.t.kind())
            .field("workload", &self.workload)
            .finish_non_exhaustive()
    }
}

/// The `livemig` binary: `LIVEMIG_BIN` if set, else `livemig` in the target directory of this
/// test executable (`target/<profile>/deps/<test>-…` → `target/<profile>/livemig`) when it was
/// built there; `None` otherwise.
pub fn livemig_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEMIG_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("livemig");
    p.exists().then_some(p)
}

/// `bin receive ARGS` with `LIVEMIG_SECRET=secret` and stderr piped; start it with
/// [`spawn_listening`].
pub fn receive_command(bin: &Path, secret: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("receive").args(args).env("LIVEMIG_SECRET", secret).stderr(Stdio::piped());
    cmd
}

/// The address and the transport of a `listening ADDR KIND` line (what `livemig receive`
/// and `livemig bench … --listen` print first).
pub fn parse_listening(line: &str) -> Option<(&str, &str)> {
    let mut words = line.strip_prefix("listening ")?.split_whitespace();
    Some((words.next()?, words.next()?))
}

/// A child process that reported where it listens.
#[derive(Debug)]
pub struct Listening {
    /// The process (its stdout is closed: nothing after the first line is read).
    pub child: Child,
    /// The address it listens on.
    pub addr: String,
    /// The transport it named (`tcp`, `verbs`).
    pub kind: String,
}

/// Spawns `cmd` with stdout piped and reads its first line, `listening ADDR KIND`. Panics
/// (after killing the child) when the line is anything else.
pub fn spawn_listening(cmd: &mut Command) -> Listening {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawning the listening process");
    let mut line = String::new();
    let out = child.stdout.take().expect("piped stdout");
    BufReader::new(out).read_line(&mut line).expect("reading the listening line");
    let Some((addr, kind)) = parse_listening(&line) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("expected `listening ADDR KIND` as the first line, got {line:?}");
    };
    let (addr, kind) = (addr.to_string(), kind.to_string());
    Listening { child, addr, kind }
}

/// How a post-copy pair recovers from a broken link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recover {
    /// Not at all.
    Off,
    /// Within this long: the source dials the destination's listener again (3 attempts),
    /// the destination accepts there.
    Within(Duration),
    /// The source does not recover (as a process that died); once it failed, a new source
    /// takes the migration over from its frozen memory ([`livemig_engine::postcopy::take_over`])
    /// within this long.
    TakeOver(Duration),
}

/// What [`postcopy_pair`] returns.
#[derive(Debug)]
pub struct PostcopyRun {
    /// The source's result.
    pub source: Result<livemig_engine::postcopy::PostcopySummary, livemig_engine::postcopy::PostcopyError>,
    /// The destination's result.
    pub dest: Result<livemig_engine::postcopy::PostcopyDestReport, livemig_engine::postcopy::PostcopyDestError>,
    /// The digest of the source memory after the migration (frozen since the hand-over).
    pub source_digest: String,
    /// The workload running at the destination, if one was migrated and started.
    pub workload: Option<Workload>,
    /// The source's workload (paused after a hand-over, running after a failure before it).
    pub source_workload: Option<Workload>,
    /// With [`Recover::TakeOver`]: the new source's result.
    pub taken_over: Option<Result<livemig_engine::postcopy::PostcopySummary, livemig_engine::postcopy::PostcopyError>>,
}

/// One post-copy migration in process over TCP loopback (with the urgent channel): a source
/// region of `len` bytes running a workload with `params` (or an idle guest when `None`),
/// into a memfd at the destination, placed through its staging alias.
pub fn postcopy_pair(
    len: u64,
    params: Option<WorkloadParams>,
    cfg: &livemig_engine::postcopy::PostcopyConfig,
) -> PostcopyRun {
    postcopy_pair_filled(len, params, cfg, 0, false)
}

/// [`postcopy_pair`] with the hybrid strategy: one pre-copy pass (the workload tracked with
/// userfaultfd) before the hand-over.
pub fn hybrid_pair(
    len: u64,
    params: Option<WorkloadParams>,
    cfg: &livemig_engine::postcopy::PostcopyConfig,
) -> PostcopyRun {
    postcopy_pair_filled(len, params, cfg, 0, true)
}

/// [`postcopy_pair`] with the first `filled` pages of the source holding test data before
/// the workload (if any) starts, post-copy or (`hybrid`) hybrid.
pub fn postcopy_pair_filled(
    len: u64,
    params: Option<WorkloadParams>,
    cfg: &livemig_engine::postcopy::PostcopyConfig,
    filled: u64,
    hybrid: bool,
) -> PostcopyRun {
    postcopy_pair_with(len, params, cfg, filled, hybrid, Recover::Off, |t| t)
}

/// [`postcopy_pair_filled`] with the source's transport passed through `wrap` first (e.g. a
/// fault injector that cuts the link at a chosen message), recovering as `recover` says
/// (`cfg.recovery` is replaced).
#[allow(clippy::too_many_arguments)]
pub fn postcopy_pair_with(
    len: u64,
    params: Option<WorkloadParams>,
    cfg: &livemig_engine::postcopy::PostcopyConfig,
    filled: u64,
    hybrid: bool,
    recover: Recover,
    wrap: impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport>,
) -> PostcopyRun {
    postcopy_pair_over(TransportKind::Tcp, len, params, cfg, filled, hybrid, recover, wrap, None)
}

/// [`postcopy_pair_filled`] (post-copy over TCP, no workload) whose destination says its
/// guest runs through `running` (see [`livemig_engine::postcopy::RunningGate`]).
pub fn postcopy_pair_gated(len: u64, filled: u64, running: livemig_engine::postcopy::RunningGate) -> PostcopyRun {
    let cfg = livemig_engine::postcopy::PostcopyConfig::default();
    postcopy_pair_over(TransportKind::Tcp, len, None, &cfg, filled, false, Recover::Off, |t| t, Some(running))
}

/// [`postcopy_pair_with`] over backend `kind` (verbs needs an RDMA device), the destination's
/// guest saying it runs through `running` if given.
#[allow(clippy::too_many_arguments)]
pub fn postcopy_pair_over(
    kind: TransportKind,
    len: u64,
    params: Option<WorkloadParams>,
    cfg: &livemig_engine::postcopy::PostcopyConfig,
    filled: u64,
    hybrid: bool,
    recover: Recover,
    wrap: impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport>,
    running: Option<livemig_engine::postcopy::RunningGate>,
) -> PostcopyRun {
    use livemig_engine::postcopy::{self, PostcopyDestConfig, Recovery};
    let io = Duration::from_secs(10);
    let opts = TransportOptions {
        choice: match kind {
            TransportKind::Tcp => TransportChoice::Tcp,
            TransportKind::Verbs => TransportChoice::Verbs,
        },
        io_timeout: io,
        tcp: TcpConfig { io_timeout: io, urgent_stream: true, ..Default::default() },
        verbs: Default::default(),
    };
    let secret = test_secret();
    // Destination: the guest's view is a memfd; its staging alias is what the source writes.
    let view = Arc::new(Region::memfd(2, len, 4096, Access::LOCAL).expect("memfd region"));
    let memory = GuestMemory::single(view.clone());
    let aliases = postcopy::staging_aliases(&memory, |_| 3, Access::REMOTE_WRITE).expect("staging alias");
    let table = RegionTable::new();
    let reg = table.register(aliases[0].clone()).expect("registering the alias");
    let l = Arc::new(Listener::bind(kind, "127.0.0.1:0").expect("binding"));
    let addr = l.local_addr().expect("address").to_string();
    let (o, s) = (opts.clone(), secret.clone());
    let dest_within = match recover {
        Recover::Off => None,
        Recover::Within(d) | Recover::TakeOver(d) => Some(d),
    };
    let dest_recovery = dest_within.map(|within| {
        let (l, o, s, table) = (l.clone(), opts.clone(), secret.clone(), table.clone());
        Recovery::new(move |until| l.accept_until(&o, &s, &table, Some(until)), within, 3)
    });
    let dst = std::thread::spawn(move || {
        let _reg = reg;
        let mut t = l.accept(&o, &s, &table).expect("accept");
        let mut workload = None;
        let mut start = livemig_workload::starter(view.clone(), &mut workload);
        let dcfg = PostcopyDestConfig { reply_timeout: Duration::from_secs(20), recovery: dest_recovery, running };
        let r = postcopy::receive(t.as_mut(), None, &memory, &aliases, &mut start, &dcfg, &mut |_, _| {});
        drop(start);
        (r, workload)
    });
    let Registered { region, table, reg: _reg } = registered_region(1, len, 4096, Access::LOCAL);
    let mut fill = livemig_transport::PageBitmap::new(region.pages());
    fill.set_range(0, filled.min(region.pages() as u64) as usize);
    livemig_transport::testdata::fill_pages(&region, &fill, 1);
    let mut source_workload = params.map(|p| {
        let mut w = Workload::init(region.clone(), p).expect("workload init");
        w.start().expect("workload start");
        w
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = connect::connect(kind, &addr, &opts, &secret, &table).expect("connect");
    assert_eq!(t.kind(), kind);
    let mut t = wrap(t);
    let mut cfg = cfg.clone();
    let redial = |within| {
        let (addr, o, s, table) = (addr.clone(), opts.clone(), secret.clone(), table.clone());
        Recovery::new(move |_until| connect::connect(kind, &addr, &o, &s, &table), within, 3)
    };
    cfg.recovery = match recover {
        Recover::Within(d) => Some(redial(d)),
        Recover::Off | Recover::TakeOver(_) => None,
    };
    if let Recover::TakeOver(_) = recover {
        cfg.id = Some(postcopy::new_migration_id());
    }
    let cfg = &cfg;
    let memory = GuestMemory::single(region.clone());
    let mut idle = Idle;
    let guest: &mut dyn GuestControl = match source_workload.as_mut() {
        Some(w) => w,
        None => &mut idle,
    };
    let source = if hybrid {
        let mut dirty = MemoryTracker::open(&memory).expect("opening the dirty tracker");
        postcopy::migrate_hybrid(t.as_mut(), &memory, guest, &mut dirty, cfg, &mut |_| {})
    } else {
        postcopy::migrate(t.as_mut(), &memory, guest, cfg, &mut |_| {})
    };
    drop(t);
    // The source is gone; its memory, frozen since the hand-over, is taken over.
    let taken_over = match (recover, &source) {
        (Recover::TakeOver(d), Err(_)) => {
            let tcfg = postcopy::PostcopyConfig { recovery: Some(redial(d)), ..cfg.clone() };
            Some(postcopy::take_over(&memory, cfg.id.expect("set above"), &tcfg, &mut || {}, &mut |_| {}))
        }
        _ => None,
    };
    let source_digest = livemig_engine::integrity::region_digest(&region, len).hex();
    let (dest, workload) = dst.join().expect("destination thread");
    PostcopyRun { source, dest, source_digest, workload, source_workload, taken_over }
}
