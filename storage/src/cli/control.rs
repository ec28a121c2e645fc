//! The control socket of `livemig disk serve` and its clients `livemig disk migrate`,
//! `livemig disk switchover` and `livemig disk status`. One JSON value per line, in the
//! manner of QMP: a request (`{"migrate":{…}}`, `"switchover"`, `"status"`), then replies
//! (`{"progress":{…}}` lines while a migration runs, and one `{"return":…}` or
//! `{"error":"…"}` to end it). [`Client`] and [`call`] are the client side for other tools.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::live::source::{MigrateOptions, SourceDisk};
use crate::live::{Strategy, SwitchoverMode};

/// Longest a `handover` request waits for the destination's confirmation.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(120);

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Migrate the disk live; replies stream until it ends.
    Migrate(MigrateRequest),
    /// Hand over now (a migration started with `switchover: command`, or earlier than auto).
    Switchover,
    /// Hand over now and reply once the destination serves the disk (or the handover failed):
    /// what an orchestrator that moves the guest at the same instant needs.
    Handover,
    /// Cancel a migration that has not handed over: the disk stays served here.
    Cancel,
    /// Where the disk stands.
    Status,
    /// CLONE: a new image in the repository sharing all content with the one this disk
    /// mirrors; the disk's local modifications are bound to it from now on.
    Clone(CloneRequest),
    /// COMMIT: the disk's local modifications become a new version of the image it is bound
    /// to, and are marked clean.
    Commit(CommitRequest),
}

/// The `clone` request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The new image's name.
    pub name: String,
    /// Refused unless the disk is bound to this image.
    #[serde(default)]
    pub from: Option<String>,
}

/// The `commit` request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// Refused unless the disk is bound to this image.
    #[serde(default)]
    pub name: Option<String>,
}

/// What a disk mirrored from an image repository adds to the control socket.
pub trait Snapshots: Send + Sync + std::fmt::Debug {
    /// CLONE into a new image `name`; the reply's `return` value.
    fn clone_to(&self, disk: &SourceDisk, req: &CloneRequest) -> Result<serde_json::Value, String>;
    /// COMMIT (refused unless the disk is bound to `name`, if given); the reply's `return`
    /// value.
    fn commit(&self, disk: &SourceDisk, name: Option<&str>) -> Result<serde_json::Value, String>;
}

/// The `migrate` request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination: a `livemig disk receive --listen` address, or `NAME@ADDR` for a
    /// daemon at ADDR that receives the disk as NAME.
    pub to: String,
    /// The shared secret's file (read by the server).
    pub secret_file: PathBuf,
    /// `hybrid` or `precopy`.
    pub strategy: Strategy,
    /// Hybrid: chunks written this often are held back from pushing.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// `auto` or `command`.
    #[serde(default)]
    pub switchover: SwitchoverMode,
    /// Pre-copy: the last round must fit this, ms.
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Pre-copy: last round forced after this many rounds.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Seconds of silence after which the peer is declared gone.
    #[serde(default = "default_io_timeout")]
    pub io_timeout_s: f64,
    /// Pushed MiB beyond what the destination reported installed.
    #[serde(default = "default_push_window")]
    pub push_window_mib: u64,
    /// The session's backend: `tcp` (the default), `verbs` or `auto`.
    #[serde(default = "default_transport")]
    pub transport: livemig_engine::connect::TransportChoice,
}

fn default_transport() -> livemig_engine::connect::TransportChoice {
    livemig_engine::connect::TransportChoice::Tcp
}

fn default_push_window() -> u64 {
    crate::live::proto::PUSH_WINDOW >> 20
}

fn default_threshold() -> u32 {
    2
}
fn default_downtime() -> u64 {
    300
}
fn default_rounds() -> u32 {
    30
}
fn default_io_timeout() -> f64 {
    10.0
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    let r: Request = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if let Request::Migrate(m) = &r {
        if !(m.io_timeout_s.is_finite() && m.io_timeout_s > 0.0 && m.io_timeout_s <= 3600.0) {
            return Err(format!("io_timeout_s {} must be in (0, 3600]", m.io_timeout_s));
        }
        if m.max_downtime_ms > 3_600_000 {
            return Err("max_downtime_ms is more than an hour".into());
        }
    }
    Ok(r)
}

/// Listens on `path` (mode 0600) and serves requests for `disk`, a thread per connection;
/// `clone` and `commit` go to `snapshots` (refused without).
pub fn listen(path: &Path, disk: Arc<SourceDisk>, snapshots: Option<Arc<dyn Snapshots>>) -> Result<()> {
    let l = super::bind_unix(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let (disk, snapshots) = (disk.clone(), snapshots.clone());
            let _ = std::thread::Builder::new().name("livemig-disk-control".into()).spawn(move || {
                if let Err(e) = serve_control(c, &disk, snapshots.as_deref()) {
                    tracing::warn!(error = %e, "control connection");
                }
            });
        }
    });
    Ok(())
}

fn reply(w: &mut UnixStream, v: &serde_json::Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).expect("JSON values serialise");
    line.push(b'\n');
    w.write_all(&line)
}

/// Answers every request but `migrate` (which streams its progress and runs on a control
/// socket's connection): `{"return":…}` or `{"error":"…"}`. The daemon calls it too.
pub fn handle(req: &Request, disk: &SourceDisk, snapshots: Option<&dyn Snapshots>) -> serde_json::Value {
    let ok = |v: serde_json::Value| serde_json::json!({ "return": v });
    let err = |e: String| serde_json::json!({ "error": e });
    match req {
        Request::Clone(_) | Request::Commit(_) if snapshots.is_none() => {
            err("this disk is not an image from a repository (`livemig image serve` serves those)".into())
        }
        Request::Clone(c) => snapshots.expect("checked above").clone_to(disk, c).map_or_else(err, ok),
        Request::Commit(c) => snapshots.expect("checked above").commit(disk, c.name.as_deref()).map_or_else(err, ok),
        Request::Status => ok(serde_json::json!({ "state": disk.state() })),
        Request::Switchover => {
            if disk.request_switchover() {
                ok(serde_json::json!({}))
            } else {
                err("no migration is running".into())
            }
        }
        Request::Handover => match disk.hand_over_now(HANDOVER_WAIT) {
            Ok(()) => ok(serde_json::json!({ "state": disk.state() })),
            Err(why) => err(format!("the handover failed: {why}")),
        },
        Request::Cancel => {
            if disk.cancel() {
                ok(serde_json::json!({}))
            } else {
                err("no migration before its handover is running".into())
            }
        }
        Request::Migrate(_) => err("migrate streams its progress: send it on the disk's control socket".into()),
    }
}

fn serve_control(c: UnixStream, disk: &SourceDisk, snapshots: Option<&dyn Snapshots>) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    loop {
        let mut line = Vec::new();
        let n = (&mut r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let req = match parse_request(line.trim_ascii()) {
            Ok(r) => r,
            Err(e) => {
                reply(&mut w, &serde_json::json!({ "error": format!("bad request: {e}") }))?;
                if line.len() > MAX_LINE {
                    return Ok(());
                }
                continue;
            }
        };
        match req {
            Request::Migrate(m) => {
                let secret = match livemig_transport::auth::Secret::load(Some(&m.secret_file)) {
                    Ok(s) => s,
                    Err(e) => {
                        reply(&mut w, &serde_json::json!({ "error": format!("loading the shared secret: {e}") }))?;
                        continue;
                    }
                };
                let o = MigrateOptions {
                    to: m.to,
                    strategy: m.strategy,
                    threshold: m.threshold.max(1),
                    switchover: m.switchover,
                    max_downtime: Duration::from_millis(m.max_downtime_ms),
                    max_rounds: m.max_rounds.max(1),
                    io_timeout: Duration::from_secs_f64(m.io_timeout_s),
                    push_window: m.push_window_mib.clamp(1, 1 << 20) << 20,
                    transport: m.transport,
                };
                // A client that stops reading its progress does not stop the migration.
                let mut pw = w.try_clone()?;
                pw.set_write_timeout(Some(Duration::from_secs(1)))?;
                let res = disk.migrate(&o, &secret, &mut |p| {
                    let _ = reply(&mut pw, &serde_json::json!({ "progress": p }));
                });
                // The timeout is the socket's: the final reply gets a longer one.
                w.set_write_timeout(Some(Duration::from_secs(30)))?;
                match res {
                    Ok(s) => reply(&mut w, &serde_json::json!({ "return": s }))?,
                    Err(e) => {
                        tracing::warn!(error = %livemig_engine::precopy::error_chain(&e), "disk migration failed");
                        reply(&mut w, &serde_json::json!({ "error": livemig_engine::precopy::error_chain(&e) }))?
                    }
                }
            }
            other => reply(&mut w, &handle(&other, disk, snapshots))?,
        }
    }
}

/// Options of `livemig disk migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskMigrateArgs {
    /// The control socket of the `livemig disk serve` that serves the disk.
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// The destination: `livemig disk receive --listen ADDR` on the other host, or
    /// `NAME@ADDR`: the host's daemon (`livemig serve` with `receive_disks_dir`) at ADDR
    /// receives the disk and serves it as NAME.
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// The shared secret's file (read by the serving process; the same file at both ends).
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
    /// hybrid: push the ModifiedSet, hand over, pull the rest hottest-first (and on demand);
    /// precopy: rounds of dirty chunks, then a last round with I/O stopped.
    #[arg(long, value_enum, default_value_t = Strategy::Hybrid)]
    pub strategy: Strategy,
    /// Hybrid: chunks written this many times during the migration are held back from the
    /// push (they would only cross again) and pulled after the handover.
    #[arg(long, default_value_t = 2)]
    pub threshold: u32,
    /// auto: hand over when the push is done (hybrid) or the rest fits --max-downtime
    /// (precopy); command: when `livemig disk switchover` is run.
    #[arg(long, value_enum, default_value_t = SwitchoverMode::Auto)]
    pub switchover: SwitchoverMode,
    /// Pre-copy: the last round (I/O stopped) must fit this, in ms at the measured rate.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub max_downtime: u64,
    /// Pre-copy: force the last round after this many rounds.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Seconds of silence after which the peer is declared gone.
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = 10.0)]
    pub io_timeout: f64,
    /// Pushed MiB the destination may hold not yet installed (its memory bound; the push
    /// waits beyond it).
    #[arg(long, value_name = "MIB", default_value_t = crate::live::proto::PUSH_WINDOW >> 20)]
    pub push_window: u64,
    /// The session's backend: tcp, verbs, or auto (verbs when an RDMA device is up); the
    /// destination's `disk receive --transport` must agree.
    #[arg(long, default_value = "tcp", value_parser = livemig_app::args::transport_parser())]
    pub transport: livemig_engine::connect::TransportChoice,
    /// Machine-readable summary (JSON) on stdout, no progress.
    #[arg(long)]
    pub json: bool,
}

/// A connection to a disk server's control socket.
#[derive(Debug)]
pub struct Client {
    c: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client> {
        let c = UnixStream::connect(path)
            .with_context(|| format!("connecting to the control socket {}", path.display()))?;
        let r = BufReader::new(c.try_clone()?);
        Ok(Client { c, r })
    }

    /// Sends one request.
    pub fn send(&mut self, req: &Request) -> Result<()> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.c.write_all(&line).context("sending the request")
    }

    /// The next reply (`None` waits without bound: a migration's replies come at least once
    /// a second while it runs, and it has its own timeouts).
    pub fn reply(&mut self, timeout: Option<Duration>) -> Result<serde_json::Value> {
        self.c.set_read_timeout(timeout)?;
        let mut line = String::new();
        if (&mut self.r).take(MAX_LINE as u64 * 16).read_line(&mut line).context("reading the reply")? == 0 {
            bail!("the disk server closed the control connection");
        }
        serde_json::from_str(&line).context("a reply that is not JSON")
    }
}

/// Sends `req` to the control socket at `path` and returns its `return` value; an `error`
/// reply is the error. Waits at most `timeout` for the reply.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value> {
    let mut c = Client::connect(path)?;
    c.send(req)?;
    let v = c.reply(Some(timeout))?;
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().unwrap_or("?"));
    }
    Ok(v.get("return").cloned().unwrap_or_default())
}

/// Entry point of `livemig disk migrate`.
pub fn run_migrate(a: &DiskMigrateArgs) -> Result<()> {
    let secret_file = std::fs::canonicalize(&a.secret_file)
        .with_context(|| format!("the secret file {}", a.secret_file.display()))?;
    let mut c = Client::connect(&a.control)?;
    c.send(&Request::Migrate(MigrateRequest {
        to: a.to.clone(),
        secret_file,
        strategy: a.strategy,
        threshold: a.threshold,
        switchover: a.switchover,
        max_downtime_ms: a.max_downtime,
        max_rounds: a.max_rounds,
        io_timeout_s: a.io_timeout,
        push_window_mib: a.push_window,
        transport: a.transport,
    }))?;
    use std::io::IsTerminal;
    let bar = if a.json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(200));
        b
    };
    loop {
        let v = c.reply(None)?;
        if let Some(p) = v.get("progress") {
            let mib = |k: &str| p.get(k).and_then(|x| x.as_u64()).unwrap_or(0) as f64 / (1 << 20) as f64;
            bar.set_message(format!(
                "{} {:.1}s: pushed {:.1} MiB ({} chunks), pending {}, pulled {}",
                p.get("phase").and_then(|x| x.as_str()).unwrap_or(""),
                p.get("elapsed_s").and_then(|x| x.as_f64()).unwrap_or(0.0),
                mib("bytes_pushed"),
                p.get("chunks_pushed").and_then(|x| x.as_u64()).unwrap_or(0),
                p.get("pending").and_then(|x| x.as_u64()).unwrap_or(0),
                p.get("chunks_pulled").and_then(|x| x.as_u64()).unwrap_or(0),
            ));
            continue;
        }
        bar.finish_and_clear();
        if let Some(e) = v.get("error") {
            bail!("disk migration failed: {}", e.as_str().unwrap_or("?"));
        }
        let s = v.get("return").cloned().unwrap_or_default();
        if a.json {
            println!("{s}");
        } else {
            let f = |k: &str| s.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
            let u = |k: &str| s.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            println!(
                "disk migrated ({}): {:.2} s total, handed over at {:.2} s (I/O stopped {:.1} ms); \
                 pushed {} chunks ({:.1} MiB), pulled {} in the background + {} on demand ({:.1} MiB); \
                 {} chunks left at the handover{}; {} chunks verified equal at both ends",
                s.get("strategy").and_then(|x| x.as_str()).unwrap_or("?"),
                f("total_s"),
                f("switchover_s"),
                f("handover_ms"),
                u("chunks_pushed"),
                u("bytes_pushed") as f64 / (1 << 20) as f64,
                u("chunks_pulled"),
                u("chunks_pulled_urgent"),
                u("bytes_pulled") as f64 / (1 << 20) as f64,
                u("remaining_at_switchover"),
                if u("rounds") > 0 { format!(", {} rounds", u("rounds")) } else { String::new() },
                u("verified_chunks"),
            );
        }
        return Ok(());
    }
}

/// Options of `livemig disk switchover` and `livemig disk status`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskControlArgs {
    /// The control socket of the `livemig disk serve` that serves the disk.
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
}

/// Entry point of `livemig disk switchover|handover|cancel|status`.
pub fn run_simple(a: &DiskControlArgs, req: &Request) -> Result<()> {
    let v = call(&a.control, req, HANDOVER_WAIT + Duration::from_secs(5))?;
    println!("{v}");
    Ok(())
}
