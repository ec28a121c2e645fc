//! Disks that move together with a guest's memory (a QEMU migration, or livemig's own
//! `migrate`). Each disk is served at the source by `livemig disk serve --control` (or an
//! image serve, or the daemon) and received by `livemig disk receive` or a daemon at the
//! destination. Its live transfer runs beside the memory migration with the switchover left
//! to this module: while the guest is stopped (QEMU waiting in `pre-switchover`, its disk I/O
//! drained and flushed; or the engine's pause), every disk is handed over, and the memory
//! migration goes on only once every destination serves its disk. A disk that cannot be
//! handed over cancels the migration: the guest runs on at the source with its disks intact.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_engine::connect::TransportChoice;
use serde_json::Value;

use super::control::{self, Client, MigrateRequest, Request};
use crate::live::{Strategy, SwitchoverMode};

/// Why the disks could not start moving, or did not converge.
#[derive(Debug, thiserror::Error)]
pub enum DisksError {
    /// A disk's transfer could not start or ended early.
    #[error("{0}")]
    Disk(String),
    /// A transfer did not start or converge in time.
    #[error("{0}")]
    Timeout(String),
    /// A local file or thread.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One disk: the control socket of its `disk serve` and the address of its destination
/// (`disk receive`, or a daemon: `NAME@ADDR` receives it as the daemon's disk NAME).
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// The source's control socket.
    pub control: PathBuf,
    /// The destination (`livemig disk receive --listen`).
    pub to: String,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (control, to) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: expected CONTROL_SOCKET=DESTINATION_ADDR"))?;
        if control.is_empty() || to.is_empty() {
            return Err(format!("{s:?}: expected CONTROL_SOCKET=DESTINATION_ADDR"));
        }
        Ok(DiskSpec { control: control.into(), to: to.into() })
    }
}

/// How the disks move.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// `hybrid` (push, hand over, pull the rest) or `precopy` (rounds; the last one runs
    /// during the handover, inside QEMU's downtime).
    pub strategy: Strategy,
    /// Hybrid: chunks written this often are held back.
    pub threshold: u32,
    /// The shared secret's file, read by each disk server.
    pub secret_file: PathBuf,
    /// A silent peer is declared gone after this.
    pub io_timeout: Duration,
    /// The sessions' backend (the destinations must listen on it).
    pub transport: TransportChoice,
}

/// How one disk's transfer ended.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskOutcome {
    /// The source's control socket.
    pub control: String,
    /// The destination.
    pub to: String,
    /// Whether the transfer completed (every chunk checked equal at both ends).
    pub ok: bool,
    /// The source's summary (`disk migrate --json`), when it completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Value>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Disk transfers under way.
#[derive(Debug)]
pub struct Disks {
    runs: Vec<Run>,
}

#[derive(Debug)]
struct Run {
    spec: DiskSpec,
    progress: Arc<Mutex<Option<Value>>>,
    thread: Option<JoinHandle<Result<Value, String>>>,
}

impl Disks {
    /// Starts every disk's transfer (switchover on command) and returns once each is
    /// pushing, or the first failure (the ones started are cancelled).
    pub fn start(specs: &[DiskSpec], o: &DiskOptions) -> Result<Disks, DisksError> {
        let secret_file = std::fs::canonicalize(&o.secret_file).map_err(|source| DisksError::Io {
            what: format!("the secret file {}", o.secret_file.display()),
            source,
        })?;
        let mut d = Disks { runs: Vec::new() };
        for spec in specs {
            let req = Request::Migrate(MigrateRequest {
                to: spec.to.clone(),
                secret_file: secret_file.clone(),
                strategy: o.strategy,
                threshold: o.threshold.max(1),
                switchover: SwitchoverMode::Command,
                max_downtime_ms: 300,
                max_rounds: 30,
                io_timeout_s: o.io_timeout.as_secs_f64(),
                push_window_mib: crate::live::proto::PUSH_WINDOW >> 20,
                transport: o.transport,
            });
            let mut c = match Client::connect(&spec.control).and_then(|mut c| c.send(&req).map(|_| c)) {
                Ok(c) => c,
                Err(e) => {
                    d.cancel();
                    return Err(DisksError::Disk(format!("disk {}: {e:#}", spec.control.display())));
                }
            };
            let progress = Arc::new(Mutex::new(None));
            // Replies come once a second while the transfer pushes or pulls; a pre-copy's last
            // round and the final check (which reads every chunk moved) send none: the bound
            // only catches a server that is gone.
            let quiet = o.io_timeout + Duration::from_secs(1800);
            let p = progress.clone();
            let thread = std::thread::Builder::new()
                .name("livemig-disk-beside".into())
                .spawn(move || loop {
                    let v = c.reply(Some(quiet)).map_err(|e| format!("{e:#}"))?;
                    if let Some(x) = v.get("progress") {
                        *p.lock().unwrap_or_else(|e| e.into_inner()) = Some(x.clone());
                    } else if let Some(e) = v.get("error") {
                        return Err(e.as_str().unwrap_or("?").to_string());
                    } else {
                        return Ok(v.get("return").cloned().unwrap_or_default());
                    }
                })
                .map_err(|source| DisksError::Io { what: "starting a disk thread".into(), source })?;
            d.runs.push(Run { spec: spec.clone(), progress, thread: Some(thread) });
        }
        // Each transfer is under way once its server says so (the destination accepted).
        let deadline = Instant::now() + o.io_timeout + Duration::from_secs(10);
        for i in 0..d.runs.len() {
            loop {
                let r = &mut d.runs[i];
                if r.thread.as_ref().is_some_and(|t| t.is_finished()) {
                    let why = match r.thread.take().map(|t| t.join()) {
                        Some(Ok(Err(e))) => e,
                        _ => "the transfer ended at once".into(),
                    };
                    let what = format!("disk {} to {}: {why}", r.spec.control.display(), r.spec.to);
                    d.cancel();
                    return Err(DisksError::Disk(what));
                }
                let state = control::call(&r.spec.control, &Request::Status, Duration::from_secs(5))
                    .map(|v| v.get("state").and_then(|s| s.as_str()).unwrap_or("").to_string());
                if matches!(state.as_deref(), Ok("migrating")) {
                    break;
                }
                if Instant::now() > deadline {
                    let what = format!("disk {}: its transfer did not start ({state:?})", r.spec.control.display());
                    d.cancel();
                    return Err(DisksError::Timeout(what));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(d)
    }

    /// How many disks move.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether no disk moves.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Bytes pushed so far, all disks.
    pub fn pushed(&self) -> u64 {
        self.runs
            .iter()
            .filter_map(|r| r.progress.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .map(|p| p.get("bytes_pushed").and_then(|b| b.as_u64()).unwrap_or(0))
            .sum()
    }

    /// A transfer that already ended, and how (before the handover, any end is a failure).
    pub fn ended(&self) -> Option<String> {
        self.runs.iter().find(|r| r.thread.as_ref().is_some_and(|t| t.is_finished())).map(|r| {
            format!("the transfer of disk {} to {} ended before the handover", r.spec.control.display(), r.spec.to)
        })
    }

    /// Waits until every transfer could hand over within its bound (pre-copy: its rounds
    /// converged), as libvirt waits for its mirror jobs to be ready before it migrates memory;
    /// at most until `deadline`.
    pub fn wait_ready(&self, deadline: Instant) -> Result<(), DisksError> {
        loop {
            if let Some(why) = self.ended() {
                return Err(DisksError::Disk(why));
            }
            let ready = self.runs.iter().all(|r| {
                r.progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|p| p.get("ready").and_then(|x| x.as_bool()).unwrap_or(false))
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DisksError::Timeout("the disks' transfers did not converge".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Hands every disk over at once and returns when every destination serves its disk, or
    /// the first failure. Must be called with the guest stopped.
    pub fn hand_over(&self) -> Result<Duration, String> {
        let t0 = Instant::now();
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .runs
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        control::call(
                            &r.spec.control,
                            &Request::Handover,
                            control::HANDOVER_WAIT + Duration::from_secs(5),
                        )
                        .map(|_| ())
                        .map_err(|e| format!("disk {}: {e:#}", r.spec.control.display()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a handover thread panicked".into()))).collect()
        });
        let failed: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
        if failed.is_empty() {
            Ok(t0.elapsed())
        } else {
            Err(failed.join("; "))
        }
    }

    /// Each disk's state at its source (`idle`, `migrating`, `handed-over`, or why unknown).
    pub fn states(&self) -> Vec<(String, String)> {
        self.runs
            .iter()
            .map(|r| {
                let s = control::call(&r.spec.control, &Request::Status, Duration::from_secs(5))
                    .map(|v| v.get("state").and_then(|s| s.as_str()).unwrap_or("?").to_string())
                    .unwrap_or_else(|e| format!("unknown ({e:#})"));
                (r.spec.control.display().to_string(), s)
            })
            .collect()
    }

    /// Whether every disk is still served at its source, by [`states`](Self::states): only
    /// then may the guest run on there after a failed handover.
    pub fn all_at_source(states: &[(String, String)]) -> bool {
        states.iter().all(|(_, s)| s == "migrating" || s == "idle")
    }

    /// Cancels every transfer that has not handed over (its disk stays served at the source).
    pub fn cancel(&self) {
        for r in &self.runs {
            let _ = control::call(&r.spec.control, &Request::Cancel, Duration::from_secs(5));
        }
    }

    /// Waits for every transfer to end (after a handover: the pulls and the final check).
    pub fn finish(&mut self) -> Vec<DiskOutcome> {
        self.runs
            .iter_mut()
            .map(|r| {
                let res = match r.thread.take() {
                    Some(t) => t.join().unwrap_or_else(|_| Err("the disk thread panicked".into())),
                    None => Err("not started".into()),
                };
                let (ok, summary, error) = match res {
                    Ok(v) => (true, Some(v), None),
                    Err(e) => (false, None, Some(e)),
                };
                DiskOutcome { control: r.spec.control.display().to_string(), to: r.spec.to.clone(), ok, summary, error }
            })
            .collect()
    }
}

impl livemig_app::beside::Beside for Disks {
    fn switch_over(&mut self) -> Result<(), livemig_app::beside::SwitchoverFailed> {
        self.hand_over().map(|_| ()).map_err(|reason| livemig_app::beside::SwitchoverFailed {
            reason,
            all_at_source: Disks::all_at_source(&self.states()),
        })
    }

    fn cancel(&mut self) {
        Disks::cancel(self)
    }

    fn describe(&self) -> String {
        format!("{} disk(s)", self.len())
    }

    fn finish(&mut self) -> Value {
        serde_json::to_value(Disks::finish(self)).unwrap_or_default()
    }
}

/// `livemig migrate --disk …`: the disks start moving first (as libvirt starts its mirror
/// jobs), and once each could hand over within its bound the memory migration runs, the
/// disks switched over inside its pause.
pub fn run_migrate(a: &livemig_app::precopy::MigrateArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    if a.local {
        anyhow::bail!("--disk moves disks to another host: give --to, not --local");
    }
    let to = a.to.as_deref().context("give --to ADDR")?;
    let Some(secret_file) = &a.secret_file else {
        anyhow::bail!("--disk needs --secret-file: each disk's server reads the secret from it");
    };
    let specs =
        a.disk.iter().map(|s| s.parse::<DiskSpec>()).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    let strategy = match a.disk_strategy.as_str() {
        "precopy" => Strategy::Precopy,
        _ => Strategy::Hybrid,
    };
    let io_timeout = Duration::from_secs_f64(a.io_timeout);
    let o = DiskOptions {
        strategy,
        threshold: 2,
        secret_file: secret_file.clone(),
        io_timeout,
        transport: a.disk_transport,
    };
    let secret = livemig_transport::auth::Secret::load(Some(secret_file)).context("loading the shared secret")?;
    let t0 = Instant::now();
    let mut disks = Disks::start(&specs, &o)?;
    eprintln!("{} disk(s) moving; waiting until each could hand over", disks.len());
    disks.wait_ready(Instant::now() + Duration::from_secs(a.max_time.max(600)))?;
    eprintln!("disks ready after {:.2} s; migrating the memory", t0.elapsed().as_secs_f64());
    livemig_app::precopy::run_source_with(a, to, &secret, Some(&mut disks))
}

impl Drop for Disks {
    /// Transfers not waited for (an early return) are cancelled if they have not handed over,
    /// so none runs on unattended.
    fn drop(&mut self) {
        for r in self.runs.iter().filter(|r| r.thread.is_some()) {
            let _ = control::call(&r.spec.control, &Request::Cancel, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_named_by_its_control_socket_and_its_destination() {
        let d: DiskSpec = "/run/disk0.ctl=10.0.0.2:7000".parse().unwrap();
        assert_eq!(d, DiskSpec { control: "/run/disk0.ctl".into(), to: "10.0.0.2:7000".into() });
        assert!("/run/disk0.ctl".parse::<DiskSpec>().is_err());
        assert!("=10.0.0.2:7000".parse::<DiskSpec>().is_err());
        assert!("/run/x=".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn the_guest_runs_on_at_the_source_only_with_every_disk_there() {
        let st = |v: &[&str]| v.iter().map(|s| ("d".to_string(), s.to_string())).collect::<Vec<_>>();
        assert!(Disks::all_at_source(&st(&["migrating", "idle"])));
        assert!(!Disks::all_at_source(&st(&["migrating", "handed-over"])));
        assert!(!Disks::all_at_source(&st(&["idle", "unknown (no reply)"])), "a disk in doubt");
    }
}
