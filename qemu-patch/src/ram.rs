//! `livemig qemu migrate --ram livemig`: QEMU's guest RAM moved by livemig's engine
//! ([`crate::external`]), QEMU's own stream carrying the device state on the same session.
//!
//! The session has the engine's traffic (pages, the urgent channel for post-copy demands,
//! control messages) and one byte channel, handed to both QEMUs as their migration
//! connection (`getfd` + `fd:livemig`). Order of a migration:
//!
//! 1. source: `x-livemig-attach` (QEMU's RAM blocks and userfaultfd), `Prepare` with the
//!    blocks; destination: `x-livemig-attach` on its QEMU (with a userfaultfd for post-copy),
//!    the blocks exposed on the session, `migrate-incoming fd:livemig`, `Ready`;
//! 2. the engine: pre-copy rounds decided by the policy, or hybrid's pass, while the guest
//!    runs; its writes are tracked through QEMU's userfaultfd;
//! 3. pause: QEMU's `migrate fd:livemig` with `pause-before-switchover` and `x-ignore-shared`
//!    (only QEMU's small non-shared blocks go), the guest stops in `pre-switchover`;
//! 4. pre-copy: the last dirty pages, the destination verifies every page; post-copy: the
//!    destination arms userfaultfd on its QEMU's memory and says it resumed;
//! 5. hand-over: `migrate-continue`, QEMU sends the device state, the destination QEMU
//!    starts the guest (post-copy: its faults are served by livemig while the push goes on);
//! 6. the destination reports how its QEMU ended (`Finished`, with the engine's report).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_engine::connect::{TransportChoice, TransportOptions};
use livemig_engine::dirty::{DirtyError, DirtySource, ExternalDirtyLog, MemoryTracker};
use livemig_engine::policy::PolicyKind;
use livemig_engine::postcopy;
use livemig_engine::precopy::{self, DestConfig, SourceConfig};
use livemig_transport::auth::Secret;
use livemig_transport::{Access, PageBitmap, RegionTable, TcpConfig, Transport};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::carrier::{self, CarrierError, CarrierMsg, DestOptions};
use crate::external::{self, Attached, QemuSource};
use crate::qmp::{Qmp, QmpError};

/// How livemig moves QEMU's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RamStrategy {
    /// Pre-copy rounds until the policy stops them, then stop-and-copy.
    Precopy,
    /// The guest moves at once; its pages follow (pushed, or demanded on faults).
    Postcopy,
    /// One pre-copy pass, then post-copy for what was written since.
    Hybrid,
}

/// What the source tells the destination carrier about external RAM (in `Prepare`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExternalRam {
    /// How it moves.
    pub strategy: RamStrategy,
    /// The source QEMU's shared RAM blocks: name and length, in order.
    pub blocks: Vec<(String, u64)>,
}

/// How the source tracks QEMU's writes during pre-copy passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyLogChoice {
    /// userfaultfd write-protect where the kernel has it (6.7+), QEMU's dirty log elsewhere.
    #[default]
    Auto,
    /// Asynchronous userfaultfd write-protect read with `PAGEMAP_SCAN` (no QMP round trip
    /// per pass; Linux 6.7+).
    Uffd,
    /// QEMU's own dirty log through livemig's patch (`x-livemig-dirty-sync` each pass; any
    /// kernel, TCG or KVM).
    Qemu,
}

/// What `qemu migrate --ram livemig` is told.
#[derive(Debug, Clone)]
pub struct RamOptions {
    /// The source QEMU's QMP socket.
    pub src_qmp: PathBuf,
    /// The destination carrier.
    pub to: String,
    /// How the RAM moves.
    pub strategy: RamStrategy,
    /// Pre-copy's convergence policy.
    pub policy: PolicyKind,
    /// Pre-copy: when the policy decides, hand over to post-copy instead of stop-and-copy.
    pub switchover_postcopy: bool,
    /// The session's backend.
    pub transport: TransportChoice,
    /// A silent peer or QEMU is declared gone after this.
    pub io_timeout: Duration,
    /// Longest the whole migration may take (waits on the destination's outcome).
    pub max_time: Duration,
    /// Where the attach socket's directory is created.
    pub socket_dir: PathBuf,
    /// Post-copy: a link that breaks after the hand-over is taken over by a new session
    /// within this long (zero: not at all).
    pub recover_within: Duration,
    /// Take over the post-copy migration with this id, whose livemig source process is gone
    /// (the source QEMU stays stopped with its RAM; see [`take_over_ram`]).
    pub take_over: Option<[u8; 16]>,
    /// How pre-copy passes track QEMU's writes.
    pub dirty_log: DirtyLogChoice,
    /// Post-copy: pages per push batch.
    pub push_batch: usize,
    /// Post-copy: most pushed pages the destination has not acknowledged as installed.
    pub push_window: usize,
}

/// The outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RamSummary {
    /// The strategy.
    pub strategy: String,
    /// QEMU's RAM blocks moved by livemig: name and bytes.
    pub blocks: Vec<(String, u64)>,
    /// How the source's writes were tracked.
    pub tracker: String,
    /// The session's backend.
    pub transport: String,
    /// From the start to the destination's report, ms.
    pub total_ms: f64,
    /// From the source's `STOP` to the destination's `RESUME` (QEMU's timestamps), ms: the
    /// guest's real pause.
    pub stop_to_resume_ms: Option<f64>,
    /// The engine's summary (pre-copy or post-copy).
    pub engine: Value,
    /// The engine's own downtime figure (pause to hand-over), ms.
    pub engine_downtime_ms: Option<f64>,
    /// Digest of every page, agreed by both ends.
    pub checksum: Option<String>,
    /// QEMU's status at the source.
    pub status: String,
    /// Bytes QEMU's own stream sent (its non-shared RAM blocks and the device state).
    pub qemu_stream_bytes: u64,
    /// The destination QEMU's migration status.
    pub dest_status: String,
    /// Whether the destination's guest runs.
    pub dest_running: bool,
    /// The destination's run state (`paused`: QEMU started with `-S` waits for `cont`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_runstate: Option<String>,
    /// The destination engine's report.
    pub dest_ram: Option<Value>,
    /// Post-copy: the migration's id (what `--take-over` needs if this process dies).
    pub migration_id: Option<String>,
}

fn ext(e: external::ExternalError) -> CarrierError {
    CarrierError::Peer(format!("external RAM: {}", precopy::error_chain(&e)))
}

/// The capabilities both QEMUs get: QEMU's stream skips shared RAM.
fn capabilities() -> Vec<(String, bool)> {
    [("events", true), ("x-ignore-shared", true), ("multifd", false), ("postcopy-ram", false)]
        .into_iter()
        .map(|(c, s)| (c.to_string(), s))
        .collect()
}

/// Runs one migration of a QEMU with external RAM; `on_line` sees one line per pre-copy
/// round or post-copy progress step.
pub fn migrate_ram(o: &RamOptions, secret: &Secret, on_line: &mut dyn FnMut(&str)) -> Result<RamSummary, CarrierError> {
    let started = Instant::now();
    let mut q = Qmp::connect(&o.src_qmp, o.io_timeout)?;
    let dir = carrier::PrivateDir::create(&o.socket_dir, "livemig-ram")?;
    let mut att: Attached = external::attach(&mut q, dir.path(), true, Access::LOCAL, o.io_timeout).map_err(ext)?;
    let (table, _regs) = register(&att)?;
    let (kind, _) = livemig_engine::connect::resolve(o.transport);
    // Pre-copy handing over to post-copy runs in post-copy's protocol: its rounds are a
    // hybrid pass followed by more, ended by the policy.
    let strategy = match o.strategy {
        RamStrategy::Precopy if o.switchover_postcopy => RamStrategy::Hybrid,
        s => s,
    };
    let rounds = (strategy != o.strategy).then(|| o.policy.default_config());
    let opts = session_options(o, strategy != RamStrategy::Precopy);
    let t = livemig_engine::connect::connect(kind, &o.to, &opts, secret, &table).map_err(CarrierError::Transport)?;
    let mut t = livemig_app::precopy::cut_from_env(t);
    // Post-copy after a broken link: the same carrier dialled again; the session that took
    // the migration over carries the rest of this exchange.
    let relink = (!o.recover_within.is_zero()).then(|| redial(o, secret, &table, opts));
    let blocks: Vec<(String, u64)> = att.blocks.iter().map(|b| (b.name.clone(), b.length)).collect();
    let caps = capabilities();
    carrier::send(
        &mut *t,
        &CarrierMsg::Prepare {
            capabilities: caps.clone(),
            parameters: Default::default(),
            handoff: true,
            external_ram: Some(ExternalRam { strategy, blocks: blocks.clone() }),
        },
    )?;
    match carrier::recv(&mut *t, o.io_timeout + Duration::from_secs(10), "the destination carrier's Ready")? {
        CarrierMsg::Ready => {}
        CarrierMsg::Failed { reason } => return Err(CarrierError::Peer(reason)),
        m => return Err(CarrierError::Peer(format!("{m:?} instead of Ready"))),
    }
    let mut c: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
    c.push(("pause-before-switchover", true));
    q.set_capabilities(&c)?;
    // QEMU gets its own copy of the connection; ours closes after.
    let ch = t.byte_channel(0).map_err(CarrierError::Transport)?;
    let fd = ch.raw_fd().ok_or_else(|| CarrierError::Peer("the session's channel has no descriptor".into()))?;
    q.execute_with_fd("getfd", json!({ "fdname": "livemig" }), fd)?;
    drop(ch);
    let mut sum = RamSummary {
        strategy: match (o.strategy, &rounds) {
            (_, Some(_)) => "precopy→postcopy".into(),
            (s, None) => format!("{s:?}").to_lowercase(),
        },
        blocks,
        transport: kind.to_string(),
        ..Default::default()
    };
    // Pre-copy passes track QEMU's writes: with asynchronous userfaultfd write-protect and
    // PAGEMAP_SCAN (Linux 6.7; no QMP round trip per pass), or QEMU's own dirty log.
    let (tracker, qemu_log) = match strategy {
        RamStrategy::Postcopy => (None, None),
        _ => {
            let uffd = match o.dirty_log {
                DirtyLogChoice::Qemu => None,
                choice => {
                    let f = att.foreign().ok_or_else(|| CarrierError::Peer("QEMU sent no userfaultfd".into()))?;
                    match MemoryTracker::foreign(&att.memory, f) {
                        Ok(t) => Some(t),
                        Err(e) if choice == DirtyLogChoice::Auto => {
                            on_line(&format!(
                                "userfaultfd write-protect tracking unavailable ({}): QEMU's dirty log instead",
                                precopy::error_chain(&e)
                            ));
                            None
                        }
                        Err(e) => {
                            return Err(CarrierError::Peer(format!(
                                "tracking QEMU's writes: {}",
                                precopy::error_chain(&e)
                            )))
                        }
                    }
                }
            };
            match uffd {
                Some(t) => (Some(t), None),
                None => (None, Some(external::QemuDirtyLog::start(&mut q, att.memory.pages()).map_err(ext)?)),
            }
        }
    };
    let memory = att.memory.clone();
    let qm = std::sync::Mutex::new(q);
    let mut dirty: Option<Box<dyn DirtySource + '_>> = match (tracker, &qemu_log) {
        (Some(t), _) => Some(Box::new(t)),
        (None, Some(l)) => {
            let qm = &qm;
            Some(Box::new(ExternalDirtyLog::new(memory.pages(), "qemu-dirty-log", move |into: &mut PageBitmap| {
                l.sync(&mut qm.lock().unwrap_or_else(|e| e.into_inner()), into)
                    .map_err(|e| DirtyError::External(Box::new(e)))
            })))
        }
        (None, None) => None,
    };
    sum.tracker = dirty.as_ref().map_or("none".into(), |d| d.mechanism().to_string());
    let mut guest = QemuSource::new(&qm, "fd:livemig".into(), o.io_timeout.max(Duration::from_secs(30)));
    let engine: Result<(Value, Option<f64>, Option<String>), String> = match strategy {
        RamStrategy::Precopy => {
            let cfg = SourceConfig { policy: o.policy.default_config(), ..Default::default() };
            let d = dirty.as_deref_mut().expect("tracked for pre-copy");
            precopy::migrate(&mut *t, &memory, &mut guest, d, &cfg, &mut |l| {
                on_line(&format!(
                    "round {}: {} pages sent, {} zero, {} dirty, {:.0} ms",
                    l.iter, l.sent, l.zero, l.dirty, l.interval_ms
                ))
            })
            .map(|s| (serde_json::to_value(&s).unwrap_or_default(), s.downtime_ms, s.checksum.clone()))
            .map_err(|e| precopy::error_chain(&e))
        }
        RamStrategy::Postcopy | RamStrategy::Hybrid => {
            let recovery = relink.clone().map(|l| postcopy::Recovery::shared(l, o.recover_within, 10));
            let id = postcopy::new_migration_id();
            sum.migration_id = Some(postcopy::id_hex(&id));
            on_line(&format!(
                "post-copy migration id {} (should this process die after the hand-over, \
                 `livemig qemu migrate --ram livemig --take-over {0} …` goes on from the stopped source QEMU)",
                postcopy::id_hex(&id)
            ));
            let cfg = postcopy::PostcopyConfig {
                rounds,
                recovery,
                id: Some(id),
                batch_pages: o.push_batch,
                push_window: o.push_window,
                ..Default::default()
            };
            let mut last = Instant::now();
            let mut progress = |p: &postcopy::PushProgress| {
                if last.elapsed() >= Duration::from_millis(250) {
                    last = Instant::now();
                    on_line(&format!("post-copy: {}/{} pages sent, {} on demand", p.sent, p.pages, p.demanded));
                }
            };
            let r = match dirty.as_deref_mut() {
                Some(d) => postcopy::migrate_hybrid(&mut *t, &memory, &mut guest, d, &cfg, &mut progress),
                None => postcopy::migrate(&mut *t, &memory, &mut guest, &cfg, &mut progress),
            };
            r.map(|s| (serde_json::to_value(&s).unwrap_or_default(), Some(s.downtime_ms), Some(s.checksum.clone())))
                .map_err(|e| precopy::error_chain(&e))
        }
    };
    // The destination QEMU can start only from the device state, which goes only after
    // `migrate-continue`: until then no copy runs there, and whatever failed (the engine,
    // even in doubt about the destination's engine, or `migrate-continue` refused), the guest
    // runs on here.
    let failed = match (&engine, &guest.continued) {
        (Err(e), _) => Some(format!("moving QEMU's RAM: {e}")),
        (Ok(_), Some(Err(e))) => Some(format!("the RAM moved but migrate-continue failed: {e}")),
        _ => None,
    };
    if let Some(why) = failed {
        let resumed = match guest.continued {
            Some(Ok(())) => "the destination has the device state: the guest is not resumed here".to_string(),
            _ => match guest.cancel() {
                Ok(()) => "the guest runs on at the source".to_string(),
                Err(e) => format!("resuming the guest at the source failed: {}", precopy::error_chain(&e)),
            },
        };
        drop(guest);
        drop(dirty);
        let mut q = qm.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = &qemu_log {
            l.stop(&mut q);
        }
        reset_source(&mut q);
        return Err(CarrierError::Peer(format!("{why}; {resumed}")));
    }
    let stopped_at = guest.stopped_at;
    drop(guest);
    drop(dirty);
    let mut q = qm.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = &qemu_log {
        l.stop(&mut q);
    }
    if let Some(n) = relink.as_ref().and_then(|l| l.take()) {
        t = n;
    }
    let (engine, engine_downtime, checksum) = engine.expect("errors returned above");
    sum.engine = engine;
    sum.engine_downtime_ms = engine_downtime;
    sum.checksum = checksum;
    // QEMU sends the device state now; its migration completes.
    let deadline = Instant::now() + o.io_timeout.max(Duration::from_secs(30));
    loop {
        let m = q.execute("query-migrate", json!({}))?;
        let st = m.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string();
        if matches!(st.as_str(), "completed" | "failed" | "cancelled") || Instant::now() > deadline {
            sum.qemu_stream_bytes = m["ram"]["transferred"].as_u64().unwrap_or(0);
            sum.status = st;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reset_source(&mut q);
    let wait = o.max_time.saturating_sub(started.elapsed()).max(o.io_timeout);
    match recv_outcome(&mut *t, wait)? {
        CarrierMsg::Finished { status, running, runstate, resumed_at, ram } => {
            sum.dest_status = status;
            sum.dest_running = running;
            sum.dest_runstate = runstate;
            sum.dest_ram = ram;
            if let (Some(a), Some(b)) = (stopped_at, resumed_at) {
                sum.stop_to_resume_ms = Some((b - a) * 1e3);
            }
        }
        CarrierMsg::Failed { reason } => return Err(CarrierError::Peer(reason)),
        m => return Err(CarrierError::Peer(format!("{m:?} instead of Finished"))),
    }
    sum.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(sum)
}

/// Takes over a post-copy migration of QEMU's RAM whose livemig source process died after
/// the hand-over: the source QEMU is stopped (it handed its guest over) but keeps its RAM.
/// Its blocks are attached again (without a userfaultfd), a session to the destination
/// carrier presents the migration's `id`, the pages the destination still misses are sent,
/// and the carrier's report ends it as in [`migrate_ram`].
pub fn take_over_ram(
    o: &RamOptions,
    secret: &Secret,
    id: [u8; 16],
    on_line: &mut dyn FnMut(&str),
) -> Result<RamSummary, CarrierError> {
    let started = Instant::now();
    let mut q = Qmp::connect(&o.src_qmp, o.io_timeout)?;
    // Frozen memory only: the guest stopped for the migration and never ran here again.
    frozen(&mut q)?;
    let dir = carrier::PrivateDir::create(&o.socket_dir, "livemig-ram")?;
    let att: Attached = external::attach(&mut q, dir.path(), false, Access::LOCAL, o.io_timeout).map_err(ext)?;
    let (table, _regs) = register(&att)?;
    let (kind, _) = livemig_engine::connect::resolve(o.transport);
    let relink = redial(o, secret, &table, session_options(o, true));
    let within = if o.recover_within.is_zero() { o.io_timeout } else { o.recover_within };
    let cfg = postcopy::PostcopyConfig {
        recovery: Some(postcopy::Recovery::shared(relink.clone(), within, 10)),
        id: Some(id),
        batch_pages: o.push_batch,
        push_window: o.push_window,
        ..Default::default()
    };
    let mut last = Instant::now();
    let mut progress = |p: &postcopy::PushProgress| {
        if last.elapsed() >= Duration::from_millis(250) {
            last = Instant::now();
            on_line(&format!("post-copy: {}/{} pages sent, {} on demand", p.sent, p.pages, p.demanded));
        }
    };
    // The destination took the session: its guest was started there. A QEMU still waiting in
    // pre-switchover (its livemig died before `migrate-continue`) sends its device state now.
    let mut continued = Ok(());
    let mut on_attached = || {
        let st = q.execute("query-migrate", json!({})).ok();
        if st.as_ref().and_then(|m| m.get("status")).and_then(|s| s.as_str()) == Some("pre-switchover") {
            continued = q.execute("migrate-continue", json!({ "state": "pre-switchover" })).map(|_| ());
        }
    };
    let s = postcopy::take_over(&att.memory, id, &cfg, &mut on_attached, &mut progress)
        .map_err(|e| CarrierError::Peer(format!("taking the migration over: {}", precopy::error_chain(&e))));
    if let Err(e) = continued {
        tracing::error!(error = %e, "migrate-continue failed after the take-over");
    }
    // Still frozen: had the guest run here meanwhile, the destination's pages would mix.
    if let Err(e) = frozen(&mut q) {
        let _ = q.execute("x-livemig-detach", json!({}));
        return Err(e);
    }
    let s = match s {
        Ok(s) => s,
        Err(e) => {
            let _ = q.execute("x-livemig-detach", json!({}));
            return Err(e);
        }
    };
    let mut t = relink.take().ok_or_else(|| CarrierError::Peer("no session took the migration over".into()))?;
    let mut sum = RamSummary {
        strategy: s.strategy.clone(),
        blocks: att.blocks.iter().map(|b| (b.name.clone(), b.length)).collect(),
        tracker: "none".into(),
        transport: kind.to_string(),
        engine: serde_json::to_value(&s).unwrap_or_default(),
        checksum: Some(s.checksum.clone()),
        status: qemu_outcome(&mut q, o.io_timeout.max(Duration::from_secs(30)))?,
        migration_id: Some(postcopy::id_hex(&id)),
        ..Default::default()
    };
    let wait = o.max_time.saturating_sub(started.elapsed()).max(o.io_timeout);
    match recv_outcome(&mut *t, wait)? {
        CarrierMsg::Finished { status, running, runstate, ram, .. } => {
            sum.dest_status = status;
            sum.dest_running = running;
            sum.dest_runstate = runstate;
            sum.dest_ram = ram;
        }
        CarrierMsg::Failed { reason } => return Err(CarrierError::Peer(reason)),
        m => return Err(CarrierError::Peer(format!("{m:?} instead of Finished"))),
    }
    reset_source(&mut q);
    sum.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(sum)
}

/// Registers the attached QEMU RAM with a new table (what the session sends from).
fn register(att: &Attached) -> Result<(RegionTable, Vec<livemig_transport::Registration>), CarrierError> {
    let table = RegionTable::new();
    let regs = att
        .memory
        .regions()
        .iter()
        .map(|r| table.register(r.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CarrierError::Peer(format!("registering QEMU's RAM: {e}")))?;
    Ok((table, regs))
}

/// The source's session to the destination carrier: one byte channel (QEMU's stream) and,
/// for post-copy, the urgent channel.
fn session_options(o: &RamOptions, urgent: bool) -> TransportOptions {
    let tcp = TcpConfig { io_timeout: o.io_timeout, byte_streams: 1, urgent_stream: urgent, ..TcpConfig::default() };
    TransportOptions { choice: o.transport, io_timeout: o.io_timeout, tcp, verbs: Default::default() }
}

/// Dials the destination carrier again with `opts` (a post-copy session taken over); keeps
/// the session that took over for the rest of the exchange.
#[allow(clippy::type_complexity)]
fn redial(
    o: &RamOptions,
    secret: &Secret,
    table: &RegionTable,
    opts: TransportOptions,
) -> std::sync::Arc<
    postcopy::Relinked<impl Fn(Instant) -> Result<Box<dyn Transport>, livemig_transport::TransportError> + Send + Sync>,
> {
    let (kind, _) = livemig_engine::connect::resolve(o.transport);
    let (to, secret, table) = (o.to.clone(), secret.clone(), table.clone());
    postcopy::Relinked::new(move |_until: Instant| livemig_engine::connect::connect(kind, &to, &opts, &secret, &table))
}

/// The source guest stopped for the migration and has not run since: QEMU's run state is
/// `finish-migrate` (waiting in pre-switchover) or `postmigrate`.
fn frozen(q: &mut Qmp) -> Result<(), CarrierError> {
    let status = q.execute("query-status", json!({}))?;
    match status.get("status").and_then(|s| s.as_str()) {
        Some("postmigrate" | "finish-migrate") => Ok(()),
        _ => Err(CarrierError::Peer(format!(
            "the source guest is not frozen by the migration ({status}): its memory may not be what the \
             destination took over"
        ))),
    }
}

/// Waits (up to `wait`) for QEMU's migration to end; its final status.
fn qemu_outcome(q: &mut Qmp, wait: Duration) -> Result<String, CarrierError> {
    let deadline = Instant::now() + wait;
    loop {
        let m = q.execute("query-migrate", json!({}))?;
        let st = m.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string();
        if matches!(st.as_str(), "completed" | "failed" | "cancelled") || Instant::now() > deadline {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Leaves the source QEMU as a plain QEMU again: its userfaultfd reference closed, the
/// capabilities this mode set cleared (a later migration of another kind must not skip its
/// shared RAM).
fn reset_source(q: &mut Qmp) {
    let _ = q.execute("x-livemig-detach", json!({}));
    if let Err(e) = q.set_capabilities(&[("x-ignore-shared", false), ("pause-before-switchover", false)]) {
        tracing::warn!(error = %e, "clearing the source QEMU's capabilities");
    }
}

/// The destination carrier's `Finished` (or `Failed`), past the engine's last message (the
/// post-copy destination's `Done`, which the source need not wait for).
fn recv_outcome(t: &mut dyn Transport, wait: Duration) -> Result<CarrierMsg, CarrierError> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(b) = t.recv_message(Some(left)).map_err(CarrierError::Transport)? else {
            return Err(CarrierError::Timeout("the destination's outcome".into()));
        };
        match carrier::decode(&b) {
            Ok(m) => return Ok(m),
            Err(_) if precopy::decode(&b).is_ok() => continue,
            Err(e) => return Err(CarrierError::Peer(e)),
        }
    }
}

/// The destination side, once `Prepare` asked for external RAM: attaches the destination
/// QEMU, exposes its RAM on the session, receives it with the engine while QEMU takes its
/// own stream on the handed-over channel, and reports.
pub fn receive_ram(
    mut t: Box<dyn Transport>,
    o: &DestOptions,
    caps: Vec<(String, bool)>,
    ram: ExternalRam,
) -> Result<carrier::DestOutcome, CarrierError> {
    let started = Instant::now();
    let fail = |t: &mut dyn Transport, reason: String| {
        let _ = carrier::send(t, &CarrierMsg::Failed { reason: reason.clone() });
        CarrierError::Peer(reason)
    };
    let Some(qmp) = &o.qmp else {
        return Err(fail(&mut *t, "external RAM needs the destination QEMU's QMP socket (--dst-qmp)".into()));
    };
    let dir = carrier::PrivateDir::create(&std::env::temp_dir(), "livemig-ram")?;
    let prepared = (|| -> Result<(Qmp, Attached), String> {
        let chain = |e: &dyn std::error::Error| precopy::error_chain(e);
        let mut q = Qmp::connect(qmp, o.timeout).map_err(|e| chain(&e))?;
        let att =
            external::attach(&mut q, dir.path(), ram.strategy != RamStrategy::Precopy, Access::REMOTE_WRITE, o.timeout)
                .map_err(|e| chain(&e))?;
        let here: Vec<(String, u64)> = att.blocks.iter().map(|b| (b.name.clone(), b.length)).collect();
        if here != ram.blocks {
            return Err(format!("the source's RAM blocks {:?} differ from this QEMU's {here:?}", ram.blocks));
        }
        let c: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        q.set_capabilities(&c).map_err(|e| chain(&e))?;
        Ok((q, att))
    })();
    let (mut q, mut att) = match prepared {
        Ok(v) => v,
        Err(e) => return Err(fail(&mut *t, format!("destination QEMU: {e}"))),
    };
    let mut regs = Vec::new();
    for r in att.memory.regions() {
        match t.expose(r.clone()) {
            Ok(reg) => regs.push(reg),
            Err(e) => return Err(fail(&mut *t, format!("exposing QEMU's RAM: {e}"))),
        }
    }
    let handed = (|| -> Result<(), String> {
        // QEMU gets its own copy of the connection; ours closes after.
        let ch = t.byte_channel(0).map_err(|e| format!("the session has no channel for QEMU: {e}"))?;
        let fd = ch.raw_fd().ok_or("the session's channel has no descriptor to hand over")?;
        let chain = |e: QmpError| precopy::error_chain(&e);
        q.execute_with_fd("getfd", json!({ "fdname": "livemig" }), fd).map_err(chain)?;
        drop(ch);
        q.execute("migrate-incoming", json!({ "uri": "fd:livemig" })).map_err(chain)?;
        Ok(())
    })();
    if let Err(e) = handed {
        return Err(fail(&mut *t, format!("destination QEMU: {e}")));
    }
    carrier::send(&mut *t, &CarrierMsg::Ready)?;
    let memory = att.memory.clone();
    let mut start = |_state: Vec<u8>| Ok(());
    // QEMU's RESUME, when seen while the pages still came.
    let mut resumed_early = None;
    let report: Result<Value, String> = match ram.strategy {
        RamStrategy::Precopy => {
            let cfg =
                DestConfig { reply_timeout: o.timeout.max(DestConfig::default().reply_timeout), ..Default::default() };
            precopy::dest::receive_from(&mut *t, None, &memory, &mut start, &cfg, &mut |_, _, _| {})
                .map(|r| {
                    json!({
                        "iterations": r.iterations,
                        "zero_pages": r.zero_pages,
                        "bytes_received": r.bytes_received,
                        "checksum": r.checksum,
                        "verify_ms": r.verify_ms,
                    })
                })
                .map_err(|e| precopy::error_chain(&e))
        }
        RamStrategy::Postcopy | RamStrategy::Hybrid => {
            let foreign = att.foreign().ok_or("QEMU sent no userfaultfd");
            match foreign {
                Err(e) => Err(e.to_string()),
                Ok(f) => {
                    // A broken link after the hand-over: the carrier's listener takes the new
                    // session, which carries the rest of this exchange.
                    let relink = o.recovery.as_ref().map(|r| {
                        let dial = r.link.clone();
                        (postcopy::Relinked::new(move |until: Instant| dial.relink(until)), r.within, r.tries)
                    });
                    // QEMU runs the guest once it loaded the device state, which its stream
                    // carries after the hand-over: the push waits for that (see RunningGate).
                    let gate = postcopy::RunningGate { running: Arc::new(AtomicBool::new(false)), within: START_GATE };
                    let cfg = postcopy::PostcopyDestConfig {
                        reply_timeout: o.timeout.max(Duration::from_secs(10)),
                        recovery: relink.as_ref().map(|(l, w, n)| postcopy::Recovery::shared(l.clone(), *w, *n)),
                        running: Some(gate.clone()),
                    };
                    let received = AtomicBool::new(false);
                    let r = std::thread::scope(|s| {
                        let watcher = s.spawn(|| watch_resume(&mut q, &gate.running, &received));
                        let r = postcopy::receive_foreign(&mut *t, None, &memory, f, &mut start, &cfg, &mut |_, _| {});
                        received.store(true, Ordering::SeqCst);
                        resumed_early = watcher.join().unwrap_or(None);
                        r
                    })
                    .map(|r| serde_json::to_value(&r).unwrap_or_default())
                    .map_err(|e| precopy::error_chain(&e));
                    if let Some(n) = relink.and_then(|(l, _, _)| l.take()) {
                        t = n;
                    }
                    r
                }
            }
        }
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let _ = carrier::send(
                &mut *t,
                &CarrierMsg::Finished {
                    status: "failed".into(),
                    running: false,
                    runstate: None,
                    resumed_at: None,
                    ram: None,
                },
            );
            return Err(CarrierError::Peer(format!("receiving QEMU's RAM: {e}")));
        }
    };
    let mut resumed_at = resumed_early;
    let watched =
        carrier::watch_dest(&mut q, started, o.max_time, &std::sync::atomic::AtomicBool::new(false), &mut resumed_at);
    // Every page is in place: QEMU's userfaultfd has nothing more to serve, and a later
    // migration of another kind must not skip its shared RAM.
    let _ = q.execute("x-livemig-detach", json!({}));
    let _ = q.set_capabilities(&[("x-ignore-shared", false)]);
    let carrier::Watched { status, running, runstate } =
        watched.unwrap_or_else(|e| carrier::Watched { status: format!("failed: {e}"), running: false, runstate: None });
    let _ = carrier::send(
        &mut *t,
        &CarrierMsg::Finished {
            status: status.clone(),
            running,
            runstate: runstate.clone(),
            resumed_at,
            ram: Some(report),
        },
    );
    let _ = t.recv_message(Some(Duration::from_millis(200)));
    drop(regs);
    Ok(carrier::DestOutcome {
        status,
        running,
        runstate,
        channels: 1,
        bytes_in: 0,
        bytes_back: 0,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// Longest the destination withholds `Running` (the source's push) waiting for QEMU to run
/// the guest (its device state loaded).
const START_GATE: Duration = Duration::from_secs(2);

/// Sets `running` when the destination QEMU reports `RESUME` (returns its timestamp) or that
/// its incoming migration ended (a QEMU started with `-S` loads the device state and waits
/// for `cont`: the pages may come); gives up once `done` is set (the pages all came, or the
/// engine failed) or on a QMP failure (the gate then opens by its bound).
fn watch_resume(q: &mut Qmp, running: &AtomicBool, done: &AtomicBool) -> Option<f64> {
    while !done.load(Ordering::SeqCst) {
        match q.next_event(Duration::from_millis(50)) {
            Ok(Some(e)) => match starts_push(&e) {
                Some(StartSeen::Resumed) => {
                    running.store(true, Ordering::SeqCst);
                    return Some(e.at);
                }
                Some(StartSeen::Ended) => {
                    running.store(true, Ordering::SeqCst);
                    // The end is what the carrier's watch waits for next.
                    q.requeue_event(e);
                    return None;
                }
                None => {}
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "watching the destination QEMU for its RESUME");
                return None;
            }
        }
    }
    None
}

/// What in the destination QEMU's events lets the push start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartSeen {
    /// `RESUME`: the guest runs.
    Resumed,
    /// The incoming migration ended (with `-S` the guest waits for `cont`, its device state
    /// loaded; or the load failed): nothing more to wait for.
    Ended,
}

/// Whether `e` lets the push start. Pure.
fn starts_push(e: &crate::qmp::Event) -> Option<StartSeen> {
    match e.name.as_str() {
        "RESUME" => Some(StartSeen::Resumed),
        "MIGRATION" if matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled")) => {
            Some(StartSeen::Ended)
        }
        _ => None,
    }
}

#[cfg(test)]
mod start_tests {
    use serde_json::json;

    use super::{starts_push, StartSeen};
    use crate::qmp::Event;

    fn ev(name: &str, data: serde_json::Value) -> Event {
        Event { name: name.into(), data, at: 1.0 }
    }

    #[test]
    fn the_push_starts_on_resume_or_the_end_of_the_incoming_migration() {
        assert_eq!(starts_push(&ev("RESUME", json!(null))), Some(StartSeen::Resumed));
        assert_eq!(starts_push(&ev("MIGRATION", json!({"status": "completed"}))), Some(StartSeen::Ended));
        assert_eq!(starts_push(&ev("MIGRATION", json!({"status": "failed"}))), Some(StartSeen::Ended));
        assert_eq!(starts_push(&ev("MIGRATION", json!({"status": "active"}))), None);
        assert_eq!(starts_push(&ev("MIGRATION", json!({}))), None);
        assert_eq!(starts_push(&ev("STOP", json!(null))), None);
    }
}
