//! `livemig qemu migrate`: drives a QEMU migration over QMP with livemig as its carrier. The
//! source QEMU migrates to a unix socket of this process; its connections ride one
//! authenticated livemig session to the destination carrier (`livemig qemu carrier`), which
//! prepares the destination QEMU with the same capabilities and parameters. Each pass
//! (`MIGRATION_PASS`) is reported with QEMU's own figures; the summary takes total time,
//! downtime and bytes from QEMU and adds the destination's outcome.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use livemig_engine::connect::{TransportChoice, TransportOptions};
use livemig_engine::policy::PolicyKind;
use livemig_transport::auth::Secret;
use livemig_transport::{RegionTable, TcpConfig};
use serde_json::{json, Map, Value};

use crate::carrier::{self, CarrierError, CarrierMsg, Counters};
use crate::controller::{Action, Controller, PassFigures, Switchover};
use crate::qmp::Qmp;
use livemig_storage::cli::together::{DiskOptions, DiskOutcome, DiskSpec, Disks};
use livemig_storage::live::Strategy;

/// What `qemu migrate` is told.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The source QEMU's QMP socket.
    pub src_qmp: PathBuf,
    /// The destination carrier.
    pub to: String,
    /// Multifd channels (0: one channel, no multifd).
    pub multifd: u8,
    /// Allow `postcopy-ram` (set on both QEMUs; switching to it is a later decision).
    pub postcopy: bool,
    /// `max-bandwidth`, bytes/s (None: QEMU's).
    pub max_bandwidth: Option<u64>,
    /// `downtime-limit`, ms (None: QEMU's).
    pub downtime_limit: Option<u64>,
    /// Longest the migration may take before it is cancelled.
    pub max_time: Duration,
    /// A silent peer or QEMU is declared gone after this.
    pub io_timeout: Duration,
    /// Where the carrier's unix socket is created.
    pub socket_dir: PathBuf,
    /// The convergence policy fed with QEMU's passes.
    pub policy: PolicyKind,
    /// What ends pre-copy once the policy decides.
    pub switchover: Switchover,
    /// Cap on the downtime limit the controller sets, ms.
    pub max_downtime_ms: u64,
    /// Relay a single channel too, instead of handing the connection to QEMU.
    pub relay: bool,
    /// The session's backend. On verbs each channel is a queue pair pumped to a unix socket
    /// pair; a single channel's socket is handed to QEMU as the TCP connection would be.
    pub transport: TransportChoice,
    /// Disks that move with the guest (each handed over while QEMU waits in
    /// `pre-switchover`).
    pub disks: Vec<DiskSpec>,
    /// How they move.
    pub disk_options: Option<DiskOptions>,
}

/// One pass, as QEMU reports it after its dirty-bitmap sync.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pass {
    /// Pass number (`MIGRATION_PASS`).
    pub pass: u64,
    /// Since `migrate`, seconds.
    pub elapsed_s: f64,
    /// RAM bytes sent so far.
    pub transferred: u64,
    /// RAM bytes still dirty.
    pub remaining: u64,
    /// Dirty-bitmap syncs.
    pub dirty_sync_count: u64,
    /// QEMU's current throughput, Mbit/s.
    pub mbps: f64,
    /// What the controller did after this pass, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// The outcome.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// QEMU's final status at the source.
    pub status: String,
    /// QEMU's `total-time`, ms.
    pub total_ms: u64,
    /// QEMU's `downtime`, ms.
    pub downtime_ms: u64,
    /// From the source's `STOP` event to the destination's `RESUME` event (QEMU's timestamps
    /// at both ends), ms: the guest's real pause, device state and disk handover included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_to_resume_ms: Option<f64>,
    /// QEMU's `setup-time`, ms.
    pub setup_ms: u64,
    /// RAM bytes QEMU sent.
    pub ram_transferred: u64,
    /// Bytes the carrier moved from QEMU into the session (all channels).
    pub carried: u64,
    /// Bytes back (return path).
    pub carried_back: u64,
    /// QEMU's connections (main and multifd), relayed or handed over.
    pub channels: u64,
    /// The connections were handed to QEMU (no relay).
    pub handoff: bool,
    /// The session's backend (`tcp` or `verbs`).
    pub transport: String,
    /// Carried bytes over the time from `migrate` to completion, MiB/s.
    pub throughput_mib_s: f64,
    /// From `migrate` to the end status, as seen here, ms.
    pub wall_ms: u64,
    /// Dirty-bitmap syncs (passes).
    pub passes: u64,
    /// Every pass.
    pub pass_log: Vec<Pass>,
    /// The destination's migration status.
    pub dest_status: String,
    /// Whether the destination's guest runs.
    pub dest_running: bool,
    /// The destination QEMU's run state after the migration (`running`; `paused` when it was
    /// started with `-S` and waits for `cont`).
    pub dest_runstate: Option<String>,
    /// After a failed migration: whether the guest runs at the source.
    pub source_running: bool,
    /// The policy rule that decided pre-copy no longer pays, if one did.
    pub decided_by: Option<String>,
    /// What was done about it (`downtime-limit N ms`, `postcopy`, `observed`).
    pub action: Option<String>,
    /// Whether postcopy ran.
    pub postcopy: bool,
    /// With disks: how long the guest waited, stopped, for every disk's handover, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_handover_ms: Option<f64>,
    /// With pre-copy disks: when their rounds converged and QEMU's migration started, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_ready_ms: Option<u64>,
    /// The disks were handed over and the memory migration failed after: the source guest is
    /// stopped (its disks are at their destinations).
    pub disks_handed_over: bool,
    /// With disks: disk bytes pushed before the handover.
    pub disk_pushed_before: u64,
    /// How each disk's transfer ended.
    pub disks: Vec<DiskOutcome>,
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64().unwrap_or(0)
}

/// Runs one migration; `on_pass` sees each pass as it is reported.
pub fn migrate(o: &MigrateOptions, secret: &Secret, on_pass: &mut dyn FnMut(&Pass)) -> Result<Summary, CarrierError> {
    if o.switchover == Switchover::Postcopy && !o.postcopy {
        return Err(CarrierError::Peer("--switchover postcopy needs --postcopy (the capability on both ends)".into()));
    }
    let mut q = Qmp::connect(&o.src_qmp, o.io_timeout)?;
    // Every capability that changes the connections is set either way: a guest that came in
    // by a multifd migration keeps the capability until it is cleared.
    let mut caps: Vec<(String, bool)> = vec![
        ("events".into(), true),
        ("multifd".into(), o.multifd > 0),
        ("postcopy-ram".into(), o.postcopy),
        // QEMU's stream carries all RAM (a guest that came in with livemig moving its
        // RAM may still have this set).
        ("x-ignore-shared".into(), false),
    ];
    let mut params = Map::new();
    if o.multifd > 0 {
        params.insert("multifd-channels".into(), json!(o.multifd));
    }
    if let Some(b) = o.max_bandwidth {
        params.insert("max-bandwidth".into(), json!(b));
    }
    if let Some(d) = o.downtime_limit {
        params.insert("downtime-limit".into(), json!(d));
    }
    let channels = 1 + o.multifd;
    let tcp = TcpConfig { io_timeout: o.io_timeout, byte_streams: channels, ..TcpConfig::default() };
    let opts = TransportOptions { choice: o.transport, io_timeout: o.io_timeout, tcp, verbs: Default::default() };
    let (kind, note) = livemig_engine::connect::resolve(o.transport);
    tracing::info!("{note}");
    let mut t = livemig_engine::connect::connect(kind, &o.to, &opts, secret, &RegionTable::new())
        .map_err(CarrierError::Transport)?;
    // The channels are handed to QEMU itself at both ends: QEMU speaks on the authenticated
    // connections and nothing is relayed. Multifd's need QEMU with livemig's patch
    // (x-livemig-channels); without it they are relayed.
    let handoff = !o.relay && (o.multifd == 0 || q.has_command(carrier::CHANNELS_COMMAND)?);
    if handoff && o.multifd > 0 {
        // Every given connection is a multifd channel at the destination: no preempt channel.
        caps.push(("postcopy-preempt".into(), false));
    }
    carrier::send(
        &mut *t,
        &CarrierMsg::Prepare { capabilities: caps.clone(), parameters: params.clone(), handoff, external_ram: None },
    )?;
    match carrier::recv(&mut *t, o.io_timeout + Duration::from_secs(10), "the destination carrier's Ready")? {
        CarrierMsg::Ready => {}
        CarrierMsg::Failed { reason } => return Err(CarrierError::Peer(reason)),
        m => return Err(CarrierError::Peer(format!("{m:?} instead of Ready"))),
    }
    // The socket lives in a directory of its own: only QEMU's user may connect and become a
    // channel.
    let sock_dir = carrier::PrivateDir::create(&o.socket_dir, "livemig-qemu")?;
    let sock = sock_dir.path().join("migrate.sock");
    let listener = if handoff {
        None
    } else {
        Some(
            std::os::unix::net::UnixListener::bind(&sock)
                .map_err(|source| CarrierError::Io { what: format!("binding {}", sock.display()), source })?,
        )
    };
    let caps_ref: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
    q.set_capabilities(&caps_ref)?;
    // With disks, QEMU waits for them with the guest stopped before it switches over.
    q.set_capabilities(&[("pause-before-switchover", !o.disks.is_empty())])?;
    let disks = match (&o.disk_options, o.disks.is_empty()) {
        (_, true) => None,
        (Some(d), false) => Some(Disks::start(&o.disks, d)?),
        (None, false) => return Err(CarrierError::Disk("disks given without disk options".into())),
    };
    let mut handed_over = false;
    // The last STOP of the source's guest (the one the switchover made).
    let mut stopped_at: Option<f64> = None;
    if !params.is_empty() {
        q.execute("migrate-set-parameters", Value::Object(params))?;
    }
    let mut chans = carrier::take_channels(&mut *t);
    let uri = if handoff {
        carrier::hand_over(&mut q, &chans)?;
        // QEMU holds its own copies now.
        chans.clear();
        "fd:livemig".to_string()
    } else {
        format!("unix:{}", sock.display())
    };
    let stop = AtomicBool::new(false);
    let counters = Counters::default();
    let started = Instant::now();
    let mut sum = Summary::default();
    let mut controller: Option<Controller> = None;
    let watched = std::thread::scope(|s| {
        let relays = s.spawn(|| match listener {
            Some(l) => carrier::source_relays(l, chans, &stop, &counters),
            None => Ok(()),
        });
        let watched = (|| -> Result<String, CarrierError> {
            if let (Some(d), Some(DiskOptions { strategy: Strategy::Precopy, .. })) = (&disks, &o.disk_options) {
                // Pre-copy disks converge first: their last round runs inside QEMU's downtime.
                d.wait_ready(started + o.max_time)?;
                sum.disk_ready_ms = Some(started.elapsed().as_millis() as u64);
            }
            q.execute("migrate", json!({ "uri": uri }))?;
            loop {
                if started.elapsed() > o.max_time {
                    if handed_over {
                        return Err(CarrierError::Timeout(format!(
                            "the migration took more than {:?} after the disks were handed over: left to QEMU \
                             (not cancelled: the source has no disk any more)",
                            o.max_time
                        )));
                    }
                    if sum.postcopy {
                        return Err(CarrierError::Timeout(format!(
                            "postcopy still running after {:?}: the guest runs at the destination",
                            o.max_time
                        )));
                    }
                    return Err(CarrierError::Timeout(format!(
                        "the migration took more than {:?}: cancelled, the guest runs at the source",
                        o.max_time
                    )));
                }
                if let Some(why) = disks.as_ref().filter(|_| !handed_over).and_then(|d| d.ended()) {
                    // Its error is in the outcome; the guest stays with its disks.
                    return Err(CarrierError::Disk(format!(
                        "{why}: the migration is cancelled; the guest runs on at the source with its disks"
                    )));
                }
                let ev = q.next_event(Duration::from_millis(500))?;
                let status = match ev {
                    Some(e) if e.name == "MIGRATION_PASS" => {
                        let m = q.execute("query-migrate", json!({}))?;
                        let mut p = Pass {
                            pass: e.data.get("pass").and_then(|p| p.as_u64()).unwrap_or(0),
                            elapsed_s: started.elapsed().as_secs_f64(),
                            transferred: u(&m, &["ram", "transferred"]),
                            remaining: u(&m, &["ram", "remaining"]),
                            dirty_sync_count: u(&m, &["ram", "dirty-sync-count"]),
                            mbps: m["ram"]["mbps"].as_f64().unwrap_or(0.0),
                            action: None,
                        };
                        let ctl = controller.get_or_insert_with(|| {
                            Controller::new(
                                &o.policy.default_config(),
                                u(&m, &["ram", "total"]).max(1),
                                4096,
                                o.switchover,
                                o.max_downtime_ms,
                            )
                        });
                        let figures = PassFigures {
                            elapsed: started.elapsed(),
                            transferred: p.transferred,
                            remaining: p.remaining,
                            dirty_sync_count: p.dirty_sync_count,
                            mbps: p.mbps,
                        };
                        match ctl.on_pass(&figures) {
                            Action::Continue => {}
                            Action::Observed { reason } => {
                                sum.decided_by = Some(reason.to_string());
                                sum.action = Some("observed (QEMU's own rule ends pre-copy)".into());
                                p.action = Some(format!("{}: left to QEMU", reason.label()));
                            }
                            Action::RaiseDowntimeLimit { ms, reason } => {
                                // Only ever raised: a limit the operator set higher stays.
                                let current = q
                                    .execute("query-migrate-parameters", json!({}))
                                    .map(|v| u(&v, &["downtime-limit"]))
                                    .unwrap_or(0);
                                let ms = ms.max(current);
                                sum.decided_by = Some(reason.to_string());
                                match q.execute("migrate-set-parameters", json!({ "downtime-limit": ms })) {
                                    Ok(_) => {
                                        sum.action = Some(format!("downtime-limit raised to {ms} ms"));
                                        p.action = Some(format!("{}: downtime-limit {ms} ms", reason.label()));
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "raising downtime-limit");
                                        sum.action = Some(format!("raising downtime-limit failed: {e}"));
                                    }
                                }
                            }
                            Action::StartPostcopy { reason } => {
                                sum.decided_by = Some(reason.to_string());
                                match q.execute("migrate-start-postcopy", json!({})) {
                                    Ok(_) => {
                                        sum.action = Some("postcopy started".into());
                                        sum.postcopy = true;
                                        p.action = Some(format!("{}: postcopy", reason.label()));
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "starting postcopy");
                                        sum.action = Some(format!("starting postcopy failed: {e}"));
                                    }
                                }
                            }
                        }
                        on_pass(&p);
                        sum.pass_log.push(p);
                        continue;
                    }
                    Some(e) if e.name == "MIGRATION" => {
                        e.data.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string()
                    }
                    Some(e) if e.name == "STOP" => {
                        stopped_at = Some(e.at);
                        continue;
                    }
                    Some(_) => continue,
                    None => {
                        let m = q.execute("query-migrate", json!({}))?;
                        m.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string()
                    }
                };
                if status == "pre-switchover" && !handed_over {
                    // The guest is stopped and its disk I/O drained: the disks move now, and
                    // QEMU goes on only once every destination serves its disk.
                    if let Some(d) = &disks {
                        sum.disk_pushed_before = d.pushed();
                        let took = match d.hand_over() {
                            Ok(t) => t,
                            Err(why) => {
                                let states = d.states();
                                if Disks::all_at_source(&states) {
                                    // Every disk is still served at the source: the migration is
                                    // cancelled before its switchover, even when postcopy was
                                    // asked for, and the guest runs on there.
                                    let _ = q.execute("migrate_cancel", json!({}));
                                    return Err(CarrierError::Disk(format!(
                                        "the disk handover failed, the migration is cancelled (the guest runs on at \
                                         the source with its disks): {why}"
                                    )));
                                }
                                // Some disk is at its destination (or may be): neither side has
                                // the guest whole. The guest stays stopped in pre-switchover.
                                handed_over = true;
                                let where_: Vec<String> = states.iter().map(|(c, s)| format!("{c}: {s}")).collect();
                                return Err(CarrierError::Disk(format!(
                                    "the disk handover failed part-way ({why}); disks: {}. The source guest is left \
                                     stopped in pre-switchover: move the disks back (or on) before `migrate-continue` \
                                     or `migrate_cancel`",
                                    where_.join(", ")
                                )));
                            }
                        };
                        sum.disk_handover_ms = Some(took.as_secs_f64() * 1e3);
                    }
                    handed_over = true;
                    q.execute("migrate-continue", json!({ "state": "pre-switchover" }))?;
                    continue;
                }
                // postcopy-paused: the stream broke after the guest moved; it needs a
                // recovery this tool does not drive.
                if matches!(status.as_str(), "completed" | "failed" | "cancelled" | "postcopy-paused") {
                    return Ok(status);
                }
            }
        })();
        let watched = match watched {
            Err(e) if !sum.postcopy && !handed_over => {
                // Whatever failed here, QEMU must not go on migrating unobserved (a handed-over
                // connection would carry on by itself): cancel, so the guest runs at the source.
                let _ = q.execute("migrate_cancel", json!({}));
                Err(e)
            }
            w => w,
        };
        let elapsed = started.elapsed();
        sum.wall_ms = elapsed.as_millis() as u64;
        // QEMU closes its connections when it is done; wait for the relays to drain (briefly
        // after a failure: QEMU may keep a failed stream's socket open), then end them.
        let grace = if matches!(&watched, Ok(s) if s == "completed") { o.io_timeout } else { Duration::from_secs(1) };
        let deadline = Instant::now() + grace;
        while !relays.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Release);
        let drained = relays.is_finished();
        counters.abort_all();
        let r = relays.join().unwrap_or_else(|_| Err(CarrierError::Peer("relays panicked".into())));
        let r = if drained || watched.is_err() {
            r
        } else {
            Err(CarrierError::Timeout("QEMU's connections did not end after the migration".into()))
        };
        sum.throughput_mib_s =
            counters.forward.load(Ordering::Acquire) as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
        match (watched, r) {
            (Ok(st), Err(e)) => {
                // QEMU's own status is the outcome (a completed migration stays completed: the
                // guest runs at the destination, whatever a relay said after).
                tracing::warn!(error = %e, status = %st, "the carrier's relay ended with an error");
                Ok(st)
            }
            (Ok(st), Ok(())) => Ok(st),
            (Err(e), _) => Err(e),
        }
    });
    // A STOP still queued (read while a command waited for its reply).
    while let Ok(Some(e)) = q.next_event(Duration::from_millis(1)) {
        if e.name == "STOP" {
            stopped_at = Some(e.at);
        }
    }
    sum.carried = counters.forward.load(Ordering::Acquire);
    sum.carried_back = counters.back.load(Ordering::Acquire);
    sum.channels = counters.channels.load(Ordering::Acquire);
    sum.handoff = handoff;
    sum.transport = kind.to_string();
    if handoff {
        if o.multifd > 0 {
            // Connections QEMU did not use (a migration that failed early) are closed.
            let _ = q.execute(carrier::CHANNELS_COMMAND, json!({ "fdnames": [] }));
        }
        sum.carried = u(&q.execute("query-migrate", json!({}))?, &["ram", "transferred"]);
        sum.channels = 1 + u64::from(o.multifd);
        sum.throughput_mib_s = sum.carried as f64 / (1 << 20) as f64 / (sum.wall_ms.max(1) as f64 / 1e3);
    }
    if let Some(mut d) = disks {
        if !handed_over {
            // The disks stay with the guest at the source. (Handed over and the memory
            // migration failed after: each disk lives at its destination now, and its
            // outcome says so.)
            d.cancel();
        }
        sum.disks = d.finish();
    }
    let disk_errors: Vec<String> =
        sum.disks.iter().filter_map(|d| d.error.as_ref().map(|e| format!("disk {}: {e}", d.control))).collect();
    let watched = match watched {
        Err(CarrierError::Disk(m)) if !disk_errors.is_empty() => {
            Err(CarrierError::Disk(format!("{m} ({})", disk_errors.join("; "))))
        }
        w => w,
    };
    let status = watched?;
    let m = q.execute("query-migrate", json!({}))?;
    sum.status = status;
    sum.total_ms = u(&m, &["total-time"]);
    sum.downtime_ms = u(&m, &["downtime"]);
    sum.setup_ms = u(&m, &["setup-time"]);
    sum.ram_transferred = u(&m, &["ram", "transferred"]);
    sum.passes = u(&m, &["ram", "dirty-sync-count"]);
    if sum.status != "completed" {
        if handed_over && !sum.postcopy {
            // QEMU resumes the guest at the source on a failure, but its disks were handed
            // over: it must not run there without them.
            let _ = q.execute("stop", json!({}));
            sum.disks_handed_over = true;
        }
        // Not migrated: QEMU resumes the guest at the source; say whether it runs.
        let st = q.execute("query-status", json!({}))?;
        sum.source_running = st.get("running").and_then(|r| r.as_bool()).unwrap_or(false);
        sum.dest_status = "unknown (the migration failed)".into();
        return Ok(sum);
    }
    match carrier::recv(&mut *t, o.io_timeout + Duration::from_secs(10), "the destination's outcome") {
        Ok(CarrierMsg::Finished { status, running, runstate, resumed_at, .. }) => {
            sum.dest_status = status;
            sum.dest_running = running;
            sum.dest_runstate = runstate;
            if let (Some(stop), Some(resume)) = (stopped_at, resumed_at) {
                // Two QEMUs' clocks: the same host's here; across hosts, as good as their sync.
                sum.stop_to_resume_ms = Some(((resume - stop) * 1e3).max(0.0));
            }
        }
        Ok(CarrierMsg::Failed { reason }) => {
            sum.dest_status = format!("unknown (the destination carrier failed: {reason})")
        }
        Ok(m) => return Err(CarrierError::Peer(format!("{m:?} instead of Finished"))),
        // QEMU completed at the source; only the report from the destination is missing.
        Err(e) => sum.dest_status = format!("unknown (no report from the destination carrier: {e})"),
    }
    Ok(sum)
}
