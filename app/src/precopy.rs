//! `livemig migrate` (source) and `livemig receive` (destination).

use std::io::{IsTerminal, Write};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use livemig_transport::auth::Secret;
use livemig_transport::{Access, CoalesceConfig, Region, RegionTable, TcpConfig};

use livemig_engine::connect::{self, Listener, TransportChoice, TransportOptions};
use livemig_engine::dirty::MemoryTracker;
use livemig_engine::guest::{GuestControl, GuestMemory, Idle};

use crate::beside::{Beside, WithBeside};
use livemig_engine::policy::{KvmConfig, PolicyConfig, PolicyKind};
use livemig_engine::postcopy::{self, Expansion, PushOrder};
use livemig_engine::precopy::{self as engine_precopy, dest, source, IterationLine, Outcome};
use livemig_workload::{Workload, WorkloadKind, WorkloadParams};

/// Local region id of the source region.
pub const SOURCE_REGION: u32 = 1;
/// Exposed region id of the destination region (the staging view the source writes).
pub const DEST_REGION: u32 = 2;
/// Post-copy's default socket buffer (see `--sock-buf`).
pub const POSTCOPY_SOCKET_BUFFER: u64 = 256 << 10;
/// Local id of the destination guest's own view of its memory.
pub const DEST_VIEW: u32 = 3;

pub use crate::args::{parse_io_timeout, parse_size, transport_arg};
use crate::args::{parse_secs, secs};

/// The `--workload` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadChoice {
    /// Sequential writer.
    Seq,
    /// Uniform random writer.
    Random,
    /// Reader (dirties only its header page).
    Readonly,
    /// No workload: migrate idle memory.
    None,
}

impl WorkloadChoice {
    fn kind(self) -> Option<WorkloadKind> {
        match self {
            WorkloadChoice::Seq => Some(WorkloadKind::Seq),
            WorkloadChoice::Random => Some(WorkloadKind::Random),
            WorkloadChoice::Readonly => Some(WorkloadKind::Readonly),
            WorkloadChoice::None => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            WorkloadChoice::Seq => "seq",
            WorkloadChoice::Random => "random",
            WorkloadChoice::Readonly => "readonly",
            WorkloadChoice::None => "none",
        }
    }
}

/// The `--strategy` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyChoice {
    /// Rounds while the guest runs here, then stop-and-copy (the convergence policies).
    Precopy,
    /// Hand the guest over first, then push its pages while its faults demand them.
    Postcopy,
    /// One pre-copy pass while the guest runs here, then post-copy for what it wrote since.
    Hybrid,
}

/// The `--switchover` choice: how pre-copy ends once its policy decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SwitchoverChoice {
    /// Pause the guest and send the remaining dirty pages (downtime grows with them).
    StopAndCopy,
    /// Hand the guest over at once and move the remaining dirty pages by post-copy.
    Postcopy,
}

/// The `--push` choice (post-copy's push order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushChoice {
    /// Page order from the first page; faults do not move the push.
    Linear,
    /// Bubbles grow around the most recent faults (`--pivots`, `--expansion`).
    Bubbling,
}

/// The `--expansion` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpansionChoice {
    /// Pages after and before each pivot.
    Dual,
    /// Pages after each pivot only.
    Forward,
}

/// Options of `livemig migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Destination address (a `livemig receive --listen` endpoint).
    #[arg(long, value_name = "ADDR", required_unless_present = "local", conflicts_with = "local")]
    pub to: Option<String>,
    /// Start both ends on this machine (the destination in a child process).
    #[arg(long)]
    pub local: bool,
    /// With --local: run each end in its own network namespace, joined by a veth pair shaped
    /// to RATE with tc (e.g. 1gbit, 10gbit, 500mbit). Needs root.
    #[arg(long, value_name = "RATE", requires = "local")]
    pub link: Option<String>,
    /// tcp, verbs or auto.
    #[arg(long, default_value = "auto", value_parser = crate::args::transport_parser())]
    pub transport: TransportChoice,
    /// Workload running in the region.
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadChoice,
    /// Workload threads.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Region size.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub size: u64,
    /// Page size: a power of two from 512 B to 2 MiB.
    #[arg(long, value_parser = parse_size, default_value = "4096")]
    pub page_size: u64,
    /// Working set written by the workload (default: half the region).
    #[arg(long, value_parser = parse_size)]
    pub wss: Option<u64>,
    /// Workload rate in pages/s over all threads (0 = flat out).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How the memory moves: pre-copy rounds, or post-copy (the guest moves first).
    #[arg(long, value_enum, default_value = "precopy")]
    pub strategy: StrategyChoice,
    /// Pre-copy: what happens when the policy says pre-copy no longer pays — stop-and-copy,
    /// or a hand-over to post-copy for the pages still dirty (no downtime for them).
    #[arg(long, value_enum, default_value = "stop-and-copy")]
    pub switchover: SwitchoverChoice,
    /// Post-copy push order.
    #[arg(long, value_enum, default_value = "bubbling")]
    pub push: PushChoice,
    /// Post-copy bubbling: how many recent faults are pivots at once.
    #[arg(long, default_value_t = 7)]
    pub pivots: usize,
    /// Post-copy bubbling: which way bubbles grow.
    #[arg(long, value_enum, default_value = "dual")]
    pub expansion: ExpansionChoice,
    /// Post-copy: pages per push batch (one `Placed` message each).
    #[arg(long, value_name = "PAGES", default_value_t = postcopy::DEFAULT_BATCH_PAGES)]
    pub push_batch: usize,
    /// Post-copy: most pushed pages not yet installed at the destination. A fault on a page
    /// being pushed waits behind at most this many; larger pushes faster on fast links.
    #[arg(long, value_name = "PAGES", default_value_t = postcopy::DEFAULT_PUSH_WINDOW)]
    pub push_window: usize,
    /// SO_SNDBUF/SO_RCVBUF of the TCP streams (default: 256 KiB with post-copy, kernel
    /// autotuning with pre-copy).
    #[arg(long, value_parser = parse_size)]
    pub sock_buf: Option<u64>,
    /// Convergence policy: ibrahim, kvm, xen.
    #[arg(long, default_value = "ibrahim")]
    pub policy: PolicyKind,
    /// Give up after this many seconds (kvm: abort, the source keeps running; ibrahim:
    /// force stop-and-copy; xen ends by its own iteration cap instead). 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub max_time: u64,
    /// kvm downtime limit in ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Seconds of workload warm-up measured before migrating.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds the resumed workload's rate is measured: by the destination that --local
    /// starts (a separate `receive` uses its own --after), or here after an in-doubt resume.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = 2.0)]
    pub after: f64,
    /// Seconds without progress from the peer after which the transport declares the link
    /// dead (silent link cut, frozen host). Also passed to the destination that --local starts.
    #[arg(long, value_name = "SECS", value_parser = parse_io_timeout, default_value_t = default_io_timeout_secs())]
    pub io_timeout: f64,
    /// Post-copy: if the link breaks after the guest moved, dial the destination again for
    /// up to this many seconds and go on where the broken session stopped (0: the guest is
    /// lost instead). Also passed to the destination that --local starts.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = DEFAULT_RECOVER_WITHIN)]
    pub recover_within: f64,
    /// Post-copy: dial attempts within --recover-within.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub recover_tries: u32,
    /// Shared-secret file (else $LIVEMIG_SECRET; --local without it makes a random one and
    /// hands it to the destination it starts).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// A disk that moves with the memory, as CONTROL=DEST: the control socket of its
    /// `livemig disk serve` and its destination (a `disk receive --listen` address, or
    /// NAME@ADDR for a daemon that receives it as NAME); repeat for several. The disks move
    /// first; they are handed over while the guest is paused, before its last pages go, so
    /// both switch over together. Needs --secret-file (the disk servers read it).
    #[arg(long, value_name = "CONTROL=DEST", conflicts_with = "local")]
    pub disk: Vec<String>,
    /// How the disks move: hybrid (push, hand over, pull the rest) or precopy (rounds, the
    /// last one inside the pause).
    #[arg(long, default_value = "hybrid", value_parser = ["hybrid", "precopy"])]
    pub disk_strategy: String,
    /// The disks' sessions: tcp, verbs or auto (their destinations must listen on it).
    #[arg(long, default_value = "tcp", value_parser = crate::args::transport_parser())]
    pub disk_transport: TransportChoice,
    /// Machine-readable summary on stdout (progress lines go to stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress bar (it is also hidden with --json or when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// Options of `livemig receive`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiveArgs {
    /// Address to listen on (port 0 picks one; the bound address is printed first).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// tcp, verbs or auto.
    #[arg(long, default_value = "auto", value_parser = crate::args::transport_parser())]
    pub transport: TransportChoice,
    /// Size of the exposed region (must match the source's).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub size: u64,
    /// Page size (must match the source's; 512 B to 2 MiB).
    #[arg(long, value_parser = parse_size, default_value = "4096")]
    pub page_size: u64,
    /// Seconds to measure the resumed workload before reporting its rate.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = 2.0)]
    pub after: f64,
    /// Seconds without progress from the peer after which the transport declares the link
    /// dead (silent link cut, frozen host).
    #[arg(long, value_name = "SECS", value_parser = parse_io_timeout, default_value_t = default_io_timeout_secs())]
    pub io_timeout: f64,
    /// Post-copy: if the link breaks after the guest started here, its faults wait while
    /// this listener accepts a new session from the source for up to this many seconds
    /// (0: the guest is lost at once).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = DEFAULT_RECOVER_WITHIN)]
    pub recover_within: f64,
    /// Shared-secret file (else $LIVEMIG_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Machine-readable report on stderr.
    #[arg(long)]
    pub json: bool,
    /// No progress spinner (it is also hidden with --json or when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl MigrateArgs {
    /// The policy configuration these flags select.
    pub fn policy_config(&self) -> PolicyConfig {
        let max_time = NonZeroU64::new(self.max_time.saturating_mul(1000));
        match self.policy.default_config() {
            PolicyConfig::Kvm(_) => PolicyConfig::Kvm(KvmConfig {
                downtime_limit_ms: self.downtime_ms,
                max_time_ms: max_time,
                ..Default::default()
            }),
            PolicyConfig::Ibrahim(mut c) => {
                c.max_time_ms = max_time;
                PolicyConfig::Ibrahim(c)
            }
            other => other,
        }
    }

    /// The post-copy push order these flags select.
    pub fn push_order(&self) -> Result<PushOrder> {
        Ok(match self.push {
            PushChoice::Linear => PushOrder::Linear,
            PushChoice::Bubbling => {
                if self.pivots == 0 {
                    bail!("--pivots must be at least 1");
                }
                PushOrder::Bubbling {
                    pivots: self.pivots,
                    expansion: match self.expansion {
                        ExpansionChoice::Dual => Expansion::Dual,
                        ExpansionChoice::Forward => Expansion::Forward,
                    },
                }
            }
        })
    }

    /// The workload parameters, `None` for `--workload none`.
    pub fn workload_params(&self) -> Result<Option<WorkloadParams>> {
        let Some(kind) = self.workload.kind() else { return Ok(None) };
        let pages = self.size / self.page_size;
        // Page 0 holds the workload's header; the working set is the pages after it.
        let wss = match self.wss {
            Some(w) if w < self.page_size || w / self.page_size > pages.saturating_sub(1) => bail!(
                "--wss {w} must be between one page ({}) and the region minus one page ({})",
                self.page_size,
                self.size.saturating_sub(self.page_size)
            ),
            Some(w) => w / self.page_size,
            None => (self.size / 2 / self.page_size).clamp(1, pages.saturating_sub(1).max(1)),
        };
        Ok(Some(WorkloadParams {
            kind,
            working_set_pages: NonZeroU64::new(wss).context("--wss must be at least one page")?,
            rate_pages_per_sec: self.rate,
            threads: NonZeroU32::new(self.threads).context("--threads must be at least 1")?,
            seed: 0x11fe,
        }))
    }

    /// Arguments that re-create this source run against `to` (used by `--local --link`).
    pub fn source_argv(&self, to: &str) -> Vec<String> {
        let mut v: Vec<String> = vec!["migrate".into(), "--to".into(), to.into()];
        let mut kv = |k: &str, val: String| {
            v.push(k.into());
            v.push(val);
        };
        kv("--transport", transport_arg(self.transport).into());
        kv("--workload", self.workload.as_str().into());
        kv("--threads", self.threads.to_string());
        kv("--size", self.size.to_string());
        kv("--page-size", self.page_size.to_string());
        if let Some(w) = self.wss {
            kv("--wss", w.to_string());
        }
        kv("--rate", self.rate.to_string());
        kv("--strategy", value_name(&self.strategy));
        kv("--switchover", value_name(&self.switchover));
        kv("--push", value_name(&self.push));
        kv("--pivots", self.pivots.to_string());
        if let Some(b) = self.sock_buf {
            kv("--sock-buf", b.to_string());
        }
        kv("--expansion", value_name(&self.expansion));
        kv("--policy", self.policy.to_string());
        kv("--max-time", self.max_time.to_string());
        kv("--downtime-ms", self.downtime_ms.to_string());
        kv("--warmup", self.warmup.to_string());
        kv("--after", self.after.to_string());
        kv("--io-timeout", self.io_timeout.to_string());
        kv("--recover-within", self.recover_within.to_string());
        kv("--recover-tries", self.recover_tries.to_string());
        if let Some(f) = &self.secret_file {
            kv("--secret-file", f.display().to_string());
        }
        if self.json {
            v.push("--json".into());
        }
        if self.no_progress {
            v.push("--no-progress".into());
        }
        v
    }
}

/// Default `--recover-within`, seconds.
pub const DEFAULT_RECOVER_WITHIN: f64 = 30.0;

/// The transport's default `--io-timeout`, in seconds.
pub fn default_io_timeout_secs() -> f64 {
    TcpConfig::default().io_timeout.as_secs_f64()
}

/// Transport settings for migration sessions: `io_timeout` bounds how long a silent peer is
/// tolerated, on TCP (socket timeouts, TCP_USER_TIMEOUT, keepalive, completion waits) and on
/// verbs (completion waits, out-of-band socket).
pub fn transport_options(choice: TransportChoice, io_timeout: Duration) -> TransportOptions {
    let mut tcp = TcpConfig { io_timeout, ..TcpConfig::default() };
    tcp.gate.tls = crate::args::tls();
    TransportOptions { choice, io_timeout, tcp, verbs: Default::default() }
}

/// Largest `--page-size`: one page must fit one write (the coalescer's default write limit).
pub const MAX_PAGE_SIZE: u64 = 2 << 20;

fn page_size(p: u64) -> Result<u32> {
    if !p.is_power_of_two() || p > MAX_PAGE_SIZE || (p as usize) < livemig_workload::MIN_PAGE_SIZE {
        bail!("--page-size {p} must be a power of two between 512 B and 2 MiB");
    }
    Ok(p as u32)
}

/// Entry point of `livemig migrate`.
pub fn run_migrate(a: &MigrateArgs) -> Result<()> {
    // Before anything starts (a --local destination would only see the source go).
    postcopy::check_push(a.push_batch, a.push_window).context("--push-batch / --push-window")?;
    if a.local {
        return crate::local::run(a);
    }
    let to = a.to.as_deref().context("give --to ADDR or --local")?;
    let secret = Secret::load(a.secret_file.as_deref()).context("loading the shared secret")?;
    run_source(a, to, &secret)
}

/// The source side against a listening destination at `to`.
pub fn run_source(a: &MigrateArgs, to: &str, secret: &Secret) -> Result<()> {
    run_source_with(a, to, secret, None)
}

/// The source side, with `beside` (the guest's disks) switched over inside the guest's
/// pause; its report joins the summary (`beside`).
pub fn run_source_with(a: &MigrateArgs, to: &str, secret: &Secret, beside: Option<&mut dyn Beside>) -> Result<()> {
    let ps = page_size(a.page_size)?;
    if a.size == 0 || a.size % ps as u64 != 0 {
        bail!("--size {} must be a positive multiple of the page size {ps}", a.size);
    }
    let (kind, note) = connect::resolve(a.transport);
    let region = Arc::new(Region::anonymous(SOURCE_REGION, a.size, ps, Access::LOCAL)?);
    let table = RegionTable::new();
    let _reg = table.register(region.clone())?;
    let mut workload = match a.workload_params()? {
        Some(p) => {
            let mut w = Workload::init(region.clone(), p).context("starting the workload")?;
            w.start().context("starting the workload")?;
            Some(w)
        }
        None => None,
    };
    let mut opts = transport_options(a.transport, secs(a.io_timeout));
    let to_postcopy = a.strategy != StrategyChoice::Precopy || a.switchover == SwitchoverChoice::Postcopy;
    if to_postcopy {
        // Demand requests and their pages travel on a connection of their own.
        opts.tcp.urgent_stream = true;
        // A page the guest faults on may already be in flight in the push: keep the push's
        // queue short so that it is not queued behind megabytes.
        opts.tcp.socket_buffer = Some(a.sock_buf.unwrap_or(POSTCOPY_SOCKET_BUFFER) as usize);
    } else if let Some(b) = a.sock_buf {
        opts.tcp.socket_buffer = Some(b as usize);
    }
    let t = connect::connect(kind, to, &opts, secret, &table).with_context(|| format!("connecting to {to}"))?;
    let mut t = cut_from_env(t);
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{note}");
    // Post-copy after a broken link: dial the same listener again with the same settings.
    let mut recovery = (a.recover_within > 0.0).then(|| {
        let (to, opts, secret, table) = (to.to_string(), opts.clone(), secret.clone(), table.clone());
        postcopy::Recovery::new(
            move |_until: std::time::Instant| connect::connect(kind, &to, &opts, &secret, &table),
            secs(a.recover_within),
            a.recover_tries,
        )
    });
    if crate::open::peer_is_daemon(t.as_ref()) {
        // A daemon routes each new session to a new service: a broken post-copy session
        // cannot be taken over through it.
        recovery = None;
        let req = crate::open::OpenRequest {
            version: crate::open::OPEN_VERSION,
            service: crate::open::Service::Receive,
            size: a.size,
            page_size: a.page_size,
            after_s: a.after,
            disk: String::new(),
            request: None,
        };
        let n = crate::open::open(t.as_mut(), &req, secs(a.io_timeout))?;
        let _ = writeln!(err, "{to} is a livemig daemon: session {n} opened");
    }
    let how = match a.strategy {
        StrategyChoice::Precopy if a.switchover == SwitchoverChoice::Postcopy => {
            format!("pre-copy, policy {}, then post-copy, push {:?}", a.policy, a.push_order()?)
        }
        StrategyChoice::Precopy => format!("pre-copy, policy {}", a.policy),
        StrategyChoice::Postcopy => format!("post-copy, push {:?}", a.push_order()?),
        StrategyChoice::Hybrid => format!("hybrid (one pre-copy pass, then post-copy), push {:?}", a.push_order()?),
    };
    let _ = writeln!(
        err,
        "migrating {} MiB ({} workload, wss {} MiB, rate {}) to {to} with {how}; warming up {:.1} s",
        a.size >> 20,
        a.workload.as_str(),
        workload.as_ref().map_or(0, |w| w.params().working_set_pages.get() * ps as u64) >> 20,
        if a.rate == 0 { "flat out".to_string() } else { format!("{} pg/s", a.rate) },
        a.warmup
    );
    // The workload's rate before the migration, to compare with its rate during pre-copy.
    let before = match workload.as_ref() {
        Some(w) if a.warmup > 0.0 => {
            let (n0, t0) = (w.pages_touched(), std::time::Instant::now());
            std::thread::sleep(secs(a.warmup));
            Some((w.pages_touched() - n0) as f64 / t0.elapsed().as_secs_f64())
        }
        _ => None,
    };
    if to_postcopy {
        return run_postcopy_source(a, t, &region, workload.as_mut(), before, recovery, beside);
    }
    let cfg = source::SourceConfig {
        policy: a.policy_config(),
        coalesce: CoalesceConfig { page_size: ps, ..Default::default() },
        reply_timeout: engine_precopy::REPLY_TIMEOUT.max(secs(a.after * 2.0 + 10.0)),
        // The destination sends Alive every 250 ms while it hashes.
        switchover_idle: secs(a.io_timeout).max(Duration::from_secs(1)),
    };
    let json = a.json;
    let mut progress = SourceProgress::new(region.pages() as u64, json || a.no_progress);
    let mut on_line = |l: &IterationLine| {
        // The line itself is printed exactly as without the bar (stdout, or stderr with
        // --json); the bar is taken off the terminal meanwhile so nothing tears.
        progress.bar.suspend(|| {
            if json {
                eprintln!("{l}");
            } else {
                println!("{l}");
            }
        });
        progress.on_interval(l);
    };
    let memory = GuestMemory::single(region.clone());
    let mut dirty = MemoryTracker::open(&memory).context("opening the dirty tracker")?;
    let mut idle = Idle;
    let guest: &mut dyn GuestControl = match workload.as_mut() {
        Some(w) => w,
        None => &mut idle,
    };
    let (res, beside) =
        with_beside(guest, beside, |g| source::migrate(t.as_mut(), &memory, g, &mut dirty, &cfg, &mut on_line));
    progress.bar.finish_and_clear();
    if let Some(b) = &beside {
        print_beside(b, json);
    }
    let summary = match res {
        Ok(s) => s,
        Err(e) if e.in_doubt() => {
            drop(t);
            return hold_in_doubt(e, workload.as_mut(), secs(a.after));
        }
        Err(e) => {
            let running = workload.as_ref().map(|w| w.state().to_string()).unwrap_or_else(|| "none".into());
            return Err(anyhow::Error::new(e).context(format!("migration failed (source workload: {running})")));
        }
    };
    // The workload's rate while pre-copy ran, as a share of its rate before (both measured
    // rates are printed: a share above 100 % is what was measured, not a figure to hide).
    let during_share = match (before, summary.guest_rate_during) {
        (Some(b), Some(d)) if b > 0.0 => Some(d / b * 100.0),
        _ => None,
    };
    if json {
        let mut v = serde_json::to_value(&summary)?;
        v["workload_before"] = serde_json::json!(before);
        v["during_percent_of_before"] = serde_json::json!(during_share);
        if let Some(b) = beside {
            v["beside"] = b;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", summary.render());
        if let (Some(b), Some(d), Some(p)) = (before, summary.guest_rate_during, during_share) {
            println!("  workload       {b:.0} pages/s before, {d:.0} pages/s during pre-copy ({p:.0} % of before)");
        }
    }
    if summary.outcome == Outcome::Aborted {
        let running = workload.as_ref().map(|w| w.state().to_string()).unwrap_or_else(|| "none".into());
        bail!("migration aborted: {} (source workload {running})", summary.end_reason);
    }
    Ok(())
}

/// The source side of a post-copy migration over the connected `t`.
fn run_postcopy_source(
    a: &MigrateArgs,
    mut t: Box<dyn livemig_transport::Transport>,
    region: &Arc<Region>,
    mut workload: Option<&mut Workload>,
    before: Option<f64>,
    recovery: Option<postcopy::Recovery>,
    beside: Option<&mut dyn Beside>,
) -> Result<()> {
    postcopy::check_push(a.push_batch, a.push_window).context("--push-batch / --push-window")?;
    let cfg = postcopy::PostcopyConfig {
        recovery,
        order: a.push_order()?,
        batch_pages: a.push_batch,
        push_window: a.push_window,
        reply_timeout: engine_precopy::REPLY_TIMEOUT.max(secs(a.after * 2.0 + 10.0)),
        // Pre-copy rounds until the policy decides, then post-copy.
        rounds: (a.strategy == StrategyChoice::Precopy).then(|| a.policy_config()),
        ..Default::default()
    };
    let bar = progress_bar(Some(region.pages() as u64), a.json || a.no_progress);
    bar.set_style(spinner_style("{spinner} {elapsed} post-copy: sent {pos}/{len} pages ({msg} on demand)"));
    bar.set_message("0");
    let memory = GuestMemory::single(region.clone());
    let mut idle = Idle;
    let guest: &mut dyn GuestControl = match workload.as_deref_mut() {
        Some(w) => w,
        None => &mut idle,
    };
    let mut on_progress = |p: &postcopy::PushProgress| {
        bar.set_position(p.sent);
        bar.set_message(p.demanded.to_string());
    };
    let mut dirty = match a.strategy {
        StrategyChoice::Postcopy => None,
        _ => Some(MemoryTracker::open(&memory).context("opening the dirty tracker")?),
    };
    let (res, beside) = with_beside(guest, beside, |g| match dirty.as_mut() {
        Some(d) => postcopy::migrate_hybrid(t.as_mut(), &memory, g, d, &cfg, &mut on_progress),
        None => postcopy::migrate(t.as_mut(), &memory, g, &cfg, &mut on_progress),
    });
    bar.finish_and_clear();
    if let Some(b) = &beside {
        print_beside(b, a.json);
    }
    let summary = match res {
        Ok(s) => s,
        Err(e @ postcopy::PostcopyError::HandedOver(_)) => {
            // The destination runs the guest: this copy is never resumed.
            if let Some(w) = workload {
                w.stop().context("discarding the source copy")?;
            }
            return Err(anyhow::Error::new(e).context("post-copy migration failed after the hand-over"));
        }
        Err(e @ postcopy::PostcopyError::InDoubt(_)) => {
            drop(t);
            return hold_postcopy_in_doubt(e, workload, secs(a.after));
        }
        Err(e) => {
            let running = workload.as_ref().map(|w| w.state().to_string()).unwrap_or_else(|| "none".into());
            return Err(anyhow::Error::new(e).context(format!("migration failed (source workload: {running})")));
        }
    };
    // The destination verified every page: the frozen source copy is released.
    if let Some(w) = workload {
        w.stop().context("releasing the source copy")?;
    }
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        v["workload_before"] = serde_json::json!(before);
        if let Some(b) = beside {
            v["beside"] = b;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", summary.render());
        println!("  source copy    released after the destination verified every page");
    }
    Ok(())
}

/// Runs `migrate` on `guest`, with `beside` switched over inside its pause; then waits for
/// `beside` to end (cancelled first if it was not handed over) and returns its report with
/// the switchover's duration.
fn with_beside<R>(
    guest: &mut dyn GuestControl,
    beside: Option<&mut dyn Beside>,
    migrate: impl FnOnce(&mut dyn GuestControl) -> R,
) -> (R, Option<serde_json::Value>) {
    let Some(b) = beside else {
        return (migrate(guest), None);
    };
    let mut w = WithBeside::new(guest, b);
    let r = migrate(&mut w);
    let (handed_over, took) = (w.handed_over(), w.switchover);
    if !handed_over {
        b.cancel();
    }
    let report = serde_json::json!({
        "handed_over": handed_over,
        "switchover_ms": took.map(|d| d.as_secs_f64() * 1e3),
        "moved": b.finish(),
    });
    (r, Some(report))
}

/// The report of what moved beside the memory: one line, then one per disk (stdout; stderr
/// with `--json`, whose summary carries it as `beside`).
fn print_beside(b: &serde_json::Value, json: bool) {
    let mut lines = vec![format!(
        "beside the memory: {}",
        match b["switchover_ms"].as_f64() {
            Some(ms) if b["handed_over"].as_bool() == Some(true) => format!("handed over in the pause ({ms:.1} ms)"),
            _ if b["handed_over"].as_bool() == Some(true) => "handed over in part".to_string(),
            _ => "not handed over (left at the source)".to_string(),
        }
    )];
    for d in b["moved"].as_array().into_iter().flatten() {
        let n = |k: &str| d["summary"][k].as_u64().unwrap_or(0);
        lines.push(match d["ok"].as_bool() {
            Some(true) => format!(
                "  disk {} -> {}: {} chunks pushed, {} pulled, {} verified equal at both ends",
                d["control"].as_str().unwrap_or("?"),
                d["to"].as_str().unwrap_or("?"),
                n("chunks_pushed"),
                n("chunks_pulled"),
                n("verified_chunks")
            ),
            _ => format!(
                "  disk {} -> {}: FAILED: {}",
                d["control"].as_str().unwrap_or("?"),
                d["to"].as_str().unwrap_or("?"),
                d["error"].as_str().unwrap_or("?")
            ),
        });
    }
    for l in lines {
        if json {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    }
}

/// Post-copy's hand-over is in doubt: held like pre-copy's ([`hold_in_doubt`]).
fn hold_postcopy_in_doubt(e: postcopy::PostcopyError, workload: Option<&mut Workload>, after: Duration) -> Result<()> {
    hold_paused(engine_precopy::error_chain(&e), workload, after)
}

/// The switchover is in doubt ([`source::SourceError::InDoubt`]): the destination may run the
/// workload, so the source copy is held paused — never resumed on its own, never thrown away
/// on its own — until the operator says which copy lives: `SIGUSR1` resumes it here (do that
/// only after making sure the destination does not run it), `SIGTERM`/`SIGINT` discards it.
fn hold_in_doubt(e: source::SourceError, workload: Option<&mut Workload>, after: Duration) -> Result<()> {
    hold_paused(engine_precopy::error_chain(&e), workload, after)
}

/// Holds the paused source copy until the operator decides (see [`hold_in_doubt`]).
fn hold_paused(msg: String, workload: Option<&mut Workload>, after: Duration) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Some(w) = workload else {
        bail!("{msg} (no workload: nothing to hold)");
    };
    let got = Arc::new(AtomicUsize::new(0));
    for sig in [SIGUSR1, SIGTERM, SIGINT] {
        // Registering `sig` sets `got` to it when it arrives (and replaces the default action).
        signal_hook::flag::register_usize(sig, got.clone(), sig as usize).context("installing signal handlers")?;
    }
    let pid = std::process::id();
    eprintln!("{msg}");
    eprintln!(
        "HOLDING the source copy paused (pid {pid}). Check the destination: if it does NOT run the workload, \
         resume it here with `kill -USR1 {pid}`; to discard this copy: `kill -TERM {pid}` (or Ctrl-C)."
    );
    let sig = loop {
        match got.load(Ordering::SeqCst) {
            0 => std::thread::sleep(Duration::from_millis(50)),
            s => break s as i32,
        }
    };
    if sig != SIGUSR1 {
        w.stop().context("discarding the held workload")?;
        bail!("switchover was in doubt; the held source copy was discarded on signal {sig}");
    }
    w.resume().context("resuming the held workload")?;
    let rate = rate_over(w, after);
    eprintln!("resumed the held source copy on SIGUSR1: workload {} at {rate:.0} pg/s", w.state());
    w.stop().context("stopping the workload")?;
    bail!("migration did not complete (switchover in doubt); the source copy was resumed by the operator")
}

/// The workload's pages per second, measured over `d`.
fn rate_over(w: &Workload, d: Duration) -> f64 {
    let (n0, t0) = (w.pages_touched(), std::time::Instant::now());
    std::thread::sleep(d);
    (w.pages_touched() - n0) as f64 / t0.elapsed().as_secs_f64().max(1e-9)
}

/// The command-line spelling of a `clap::ValueEnum` value.
fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

/// A progress bar on stderr, hidden when `hide` (`--json`, `--no-progress`) or when stderr is
/// not a terminal (scripts and tests then see only the plain lines).
fn progress_bar(len: Option<u64>, hide: bool) -> ProgressBar {
    if hide || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(len, ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn spinner_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// The source's bar: pages sent against the region during the first pass, then the interval
/// number and the dirty count.
struct SourceProgress {
    bar: ProgressBar,
    pages: u64,
    sent: u64,
    first_pass: bool,
}

impl SourceProgress {
    fn new(pages: u64, hide: bool) -> Self {
        let bar = progress_bar(Some(pages), hide);
        bar.set_style(spinner_style("{spinner} {elapsed} iter {prefix} sent {pos}/{len} pages, dirty {msg}"));
        bar.set_prefix("1");
        bar.set_message("-");
        SourceProgress { bar, pages, sent: 0, first_pass: true }
    }

    fn on_interval(&mut self, l: &IterationLine) {
        self.sent += l.sent + l.zero;
        self.bar.set_prefix((l.iter + 1).to_string());
        if self.first_pass && self.sent >= self.pages {
            // First pass over: from now on the interval and the dirty set tell the story.
            self.first_pass = false;
            self.bar
                .set_style(spinner_style("{spinner} {elapsed} iter {prefix} sent {pos} pages in total, dirty {msg}"));
        }
        self.bar.set_position(self.sent);
        self.bar.set_message(l.dirty.to_string());
    }
}

/// A destination's memory: the guest's view (a memfd) and its staging alias, the same pages
/// through a second mapping, which is what the peer writes: pre-copy sees its writes at once,
/// post-copy installs them with userfaultfd.
#[derive(Debug)]
pub struct DestMemory {
    /// The guest's view.
    pub region: Arc<Region>,
    /// The view as guest memory.
    pub memory: GuestMemory,
    /// The staging alias (region id [`DEST_REGION`], remote-writable).
    pub aliases: Vec<Arc<Region>>,
}

impl DestMemory {
    /// `size` bytes of `page_size` pages.
    pub fn new(size: u64, page_size: u64) -> Result<DestMemory> {
        let ps = self::page_size(page_size)?;
        let region = Arc::new(Region::memfd(DEST_VIEW, size, ps, Access::LOCAL)?);
        let memory = GuestMemory::single(region.clone());
        let aliases = postcopy::staging_aliases(&memory, |_| DEST_REGION, Access::REMOTE_WRITE)?;
        Ok(DestMemory { region, memory, aliases })
    }
}

/// A post-copy destination whose guest cannot go on (its missing pages will never come);
/// `livemig receive` exits with status 3 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuestLost(pub String);

/// Entry point of `livemig receive`.
pub fn run_receive(a: &ReceiveArgs) -> Result<()> {
    let (kind, note) = connect::resolve(a.transport);
    let secret = Secret::load(a.secret_file.as_deref()).context("loading the shared secret")?;
    let dm = DestMemory::new(a.size, a.page_size)?;
    let table = RegionTable::new();
    let _reg = table.register(dm.aliases[0].clone())?;
    let l = Arc::new(Listener::bind(kind, &a.listen)?);
    // The first stdout line lets a parent (--local) or a script find us; the rest goes to
    // stderr so a parent may close the pipe.
    println!("listening {} {}", l.local_addr()?, kind);
    std::io::stdout().flush()?;
    // Why this backend: for a person watching (a parent such as --local prints its own).
    if std::io::stdout().is_terminal() {
        eprintln!("{note}");
    }
    let bar = progress_bar(None, a.json || a.no_progress);
    bar.set_style(spinner_style("{spinner} {elapsed} {msg}"));
    bar.set_message("waiting for the source");
    let opts = transport_options(a.transport, secs(a.io_timeout));
    let accepted = l.accept(&opts, &secret, &table);
    // Post-copy after a broken link: the source dials this listener again.
    let recovery = (a.recover_within > 0.0).then(|| {
        let (l, table) = (l.clone(), table.clone());
        postcopy::Recovery::new(
            move |until| l.accept_until(&opts, &secret, &table, Some(until)),
            secs(a.recover_within),
            // Sessions that fail to take the migration over before it gives up.
            8,
        )
    });
    let t = match accepted {
        Ok(t) => cut_from_env(t),
        Err(e) => {
            bar.finish_and_clear();
            return Err(e.into());
        }
    };
    match receive_on(a, t, &dm, bar, recovery) {
        Err(e) if e.downcast_ref::<GuestLost>().is_some() => {
            // Its missing pages will never come: end the process (and the guest with it).
            eprintln!("{e}");
            std::process::exit(3);
        }
        r => r,
    }
}

/// The destination side of a migration on the accepted session `t` into `dm` (the alias is
/// exposed to the peer already): pre-copy, post-copy or hybrid, as the source's `Begin` says.
/// `a` gives the timeouts, the measurement after the resume and the output format;
/// `recovery` how a broken post-copy session is taken over by a new one.
pub fn receive_on(
    a: &ReceiveArgs,
    mut t: Box<dyn livemig_transport::Transport>,
    dm: &DestMemory,
    bar: ProgressBar,
    recovery: Option<postcopy::Recovery>,
) -> Result<()> {
    let (memory, aliases, region) = (&dm.memory, &dm.aliases, &dm.region);
    bar.set_message("connected; waiting for Begin");
    let cfg = dest::DestConfig::default();
    // The first message says how the memory will move.
    let first = match t.recv_message(Some(cfg.reply_timeout)) {
        Ok(Some(b)) => b,
        Ok(None) => {
            bar.finish_and_clear();
            bail!("no Begin from the source within {:?}", cfg.reply_timeout);
        }
        Err(e) => {
            bar.finish_and_clear();
            return Err(anyhow::Error::new(e).context("waiting for Begin"));
        }
    };
    if let Ok(engine_precopy::Msg::Begin {
        strategy: engine_precopy::Strategy::Postcopy | engine_precopy::Strategy::Hybrid,
        ..
    }) = engine_precopy::decode(&first)
    {
        return run_postcopy_receive(a, t.as_mut(), first, memory, aliases, region, bar, recovery);
    }
    bar.set_message("receiving the first pass");
    let mut on_iter = |i: u32, p: u64, d: u64| {
        tracing::debug!(iter = i, pages = p, dirty = d, "interval received");
        bar.set_message(format!("received interval {i}: {p} pages, {d} dirty at the source"));
    };
    let mut workload = None;
    let mut start = livemig_workload::starter(region.clone(), &mut workload);
    let res = dest::receive_from(t.as_mut(), Some(first), memory, &mut start, &cfg, &mut on_iter);
    drop(start);
    bar.finish_and_clear();
    let rep = res.context("receiving the migration")?;
    // The resumed workload's rate, measured here.
    let after_rate = workload.as_ref().map(|w| rate_over(w, secs(a.after)));
    if a.json {
        let v = serde_json::json!({
            "iterations": rep.iterations,
            "zero_pages": rep.zero_pages,
            "bytes_received": rep.bytes_received,
            "checksum": rep.checksum,
            "verify_ms": rep.verify_ms,
            "switchover_ms": rep.switchover_ms,
            "after_rate": after_rate,
        });
        eprintln!("{v}");
    } else {
        eprintln!(
            "destination: verified {} after {} intervals ({:.1} MiB received, {} zero pages); digest {:.1} ms, switchover {:.1} ms; workload {}",
            &rep.checksum[..16],
            rep.iterations,
            rep.bytes_received as f64 / (1 << 20) as f64,
            rep.zero_pages,
            rep.verify_ms,
            rep.switchover_ms,
            after_rate.map_or("none".into(), |r| format!("resumed at {r:.0} pg/s"))
        );
    }
    if let Some(w) = workload.as_mut() {
        w.stop().context("stopping the workload")?;
    }
    Ok(())
}

/// The destination side of a post-copy migration whose `Begin` is `first`.
#[allow(clippy::too_many_arguments)]
fn run_postcopy_receive(
    a: &ReceiveArgs,
    t: &mut dyn livemig_transport::Transport,
    first: Vec<u8>,
    memory: &GuestMemory,
    aliases: &[Arc<Region>],
    region: &Arc<Region>,
    bar: ProgressBar,
    recovery: Option<postcopy::Recovery>,
) -> Result<()> {
    bar.set_style(spinner_style("{spinner} {elapsed} post-copy: {msg}"));
    bar.set_message("hand-over");
    let mut workload = None;
    let mut start = livemig_workload::starter(region.clone(), &mut workload);
    let cfg = postcopy::PostcopyDestConfig {
        reply_timeout: secs(a.io_timeout).max(Duration::from_secs(10)),
        recovery,
        running: None,
    };
    let res = postcopy::receive(t, Some(first), memory, aliases, &mut start, &cfg, &mut |done, pages| {
        bar.set_message(format!("the guest runs here; {done}/{pages} pages installed"));
    });
    drop(start);
    bar.finish_and_clear();
    let rep = match res {
        Ok(r) => r,
        Err(e @ postcopy::PostcopyDestError::GuestLost { .. }) => {
            // Its threads wait for pages that will never come: stopping it would wait for
            // them forever. It ends with the process (`livemig receive` exits).
            std::mem::forget(workload.take());
            return Err(GuestLost(engine_precopy::error_chain(&e)).into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context("receiving the migration")),
    };
    let after_rate = workload.as_ref().map(|w| rate_over(w, secs(a.after)));
    if a.json {
        let mut v = serde_json::to_value(&rep)?;
        v["after_rate"] = serde_json::json!(after_rate);
        eprintln!("{v}");
    } else {
        let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        eprintln!(
            "destination: post-copy verified {} ({} pages: {} pushed, {} on demand, {} zero) in {:.1} ms after the start; \
             {} demand requests ({} faults installed a pushed page at once), fault service p50 {} µs, p99 {} µs, \
             max {} µs; workload {}",
            &rep.checksum[..16],
            rep.pages,
            rep.pushed_pages,
            rep.urgent_pages,
            rep.zero_pages,
            rep.complete_ms,
            rep.demand_requests,
            rep.landed_faults,
            us(rep.fault_p50_us),
            us(rep.fault_p99_us),
            us(rep.fault_max_us),
            after_rate.map_or("none".into(), |r| format!("runs at {r:.0} pg/s"))
        );
    }
    if let Some(w) = workload.as_mut() {
        w.stop().context("stopping the workload")?;
    }
    Ok(())
}

/// `LIVEMIG_CUT_AT=<message>` cuts the link at that message (fault-injection builds only).
#[cfg(feature = "fault-injection")]
pub fn cut_from_env(t: Box<dyn livemig_transport::Transport>) -> Box<dyn livemig_transport::Transport> {
    livemig_engine::precopy::cut::from_env(t)
}

/// `LIVEMIG_CUT_AT` is ignored (with a warning) without fault injection.
#[cfg(not(feature = "fault-injection"))]
pub fn cut_from_env(t: Box<dyn livemig_transport::Transport>) -> Box<dyn livemig_transport::Transport> {
    if std::env::var_os("LIVEMIG_CUT_AT").is_some_and(|v| !v.is_empty()) {
        tracing::warn!("LIVEMIG_CUT_AT ignored: this build has no fault injection");
    }
    t
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct M {
        #[command(flatten)]
        a: MigrateArgs,
    }

    #[derive(Debug, Parser)]
    struct R {
        #[command(flatten)]
        a: ReceiveArgs,
    }

    #[test]
    fn io_timeout_defaults_to_the_transport_default() {
        let m = M::try_parse_from(["x", "--to", "h:1"]).unwrap();
        assert_eq!(secs(m.a.io_timeout), TcpConfig::default().io_timeout);
        let r = R::try_parse_from(["x", "--listen", "h:0"]).unwrap();
        assert_eq!(secs(r.a.io_timeout), TcpConfig::default().io_timeout);
    }

    #[test]
    fn io_timeout_reaches_tcp_and_verbs_settings() {
        // `connect::verbs_config` takes the verbs timeout from `TransportOptions::io_timeout`.
        let o = transport_options(TransportChoice::Tcp, Duration::from_millis(3500));
        assert_eq!(o.io_timeout, Duration::from_millis(3500));
        assert_eq!(o.tcp.io_timeout, Duration::from_millis(3500));
    }

    #[test]
    fn io_timeout_is_validated() {
        for bad in ["0", "-1", "nan", "inf", "x", "1e12"] {
            assert!(M::try_parse_from(["x", "--to", "h:1", "--io-timeout", bad]).is_err(), "{bad}");
        }
        let m = M::try_parse_from(["x", "--to", "h:1", "--io-timeout", "2.5"]).unwrap();
        assert_eq!(secs(m.a.io_timeout), Duration::from_millis(2500));
    }

    #[test]
    fn source_argv_round_trips() {
        let m = M::try_parse_from([
            "x",
            "--local",
            "--link",
            "1gbit",
            "--io-timeout",
            "3",
            "--size",
            "64M",
            "--wss",
            "48M",
            "--policy",
            "kvm",
            "--strategy",
            "postcopy",
            "--push",
            "linear",
            "--pivots",
            "3",
            "--expansion",
            "forward",
            "--sock-buf",
            "1M",
        ])
        .unwrap();
        let argv = m.a.source_argv("10.0.0.2:4000");
        let i = argv.iter().position(|s| s == "--io-timeout").expect("forwarded");
        assert_eq!(argv[i + 1], "3");
        // argv[0] is the subcommand; parse the rest as the source's own flags.
        let again = M::try_parse_from(std::iter::once("x".to_string()).chain(argv.into_iter().skip(1))).unwrap();
        assert_eq!(again.a.io_timeout, 3.0);
        assert_eq!(again.a.to.as_deref(), Some("10.0.0.2:4000"));
        assert_eq!(again.a.size, 64 << 20);
        assert_eq!(again.a.wss, Some(48 << 20));
        assert_eq!(again.a.strategy, StrategyChoice::Postcopy);
        assert_eq!(again.a.push, PushChoice::Linear);
        assert_eq!(again.a.pivots, 3);
        assert_eq!(again.a.expansion, ExpansionChoice::Forward);
        assert_eq!(again.a.sock_buf, Some(1 << 20));
    }
}
