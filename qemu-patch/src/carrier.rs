//! The carrier: QEMU's migration connections over one livemig session. At the source, QEMU
//! migrates to a unix socket the carrier listens on; the i-th connection QEMU opens (main
//! channel first, then multifd or postcopy-preempt channels) becomes byte-stream channel i of
//! the session. At the destination, channel i is connected to QEMU's incoming unix socket
//! once it carries its first bytes and every earlier channel is connected, so QEMU sees the
//! connections in the source's order (it takes the first for the main channel). Both
//! directions are relayed with `splice(2)` (postcopy's page requests come back on the main
//! channel's return path).
//!
//! Before QEMU starts, the carriers agree over the session's control messages: the source
//! sends the migration capabilities and parameters, the destination sets them on its QEMU
//! (when it has its QMP socket), starts `migrate-incoming`, and answers Ready; at the end it
//! reports how its QEMU finished.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use livemig_transport::{ByteChannel, Transport, TransportError};
use serde_json::{json, Value};

use crate::qmp::{Qmp, QmpError};
use crate::relay;

/// Largest control message between carriers.
pub const MAX_MESSAGE: usize = 64 << 10;

/// Control messages between the two carriers (JSON, one per session message).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum CarrierMsg {
    /// Source → destination: set these on the destination QEMU and start the incoming side.
    Prepare {
        /// Migration capabilities (name, state).
        capabilities: Vec<(String, bool)>,
        /// Migration parameters (`migrate-set-parameters` arguments).
        parameters: serde_json::Map<String, Value>,
        /// Hand every channel's socket to QEMU itself (`getfd` + `fd:`; multifd's through
        /// `x-livemig-channels`, QEMU with livemig's patch), so QEMU speaks on the
        /// authenticated connections with no relay; else relay every channel.
        #[serde(default)]
        handoff: bool,
        /// livemig moves the guest's RAM itself (QEMU with livemig's patch); QEMU's stream
        /// carries the device state only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external_ram: Option<crate::ram::ExternalRam>,
    },
    /// Destination → source: QEMU is waiting for the stream.
    Ready,
    /// Either side: giving up.
    Failed {
        /// Why.
        reason: String,
    },
    /// Destination → source: how the destination's migration ended.
    Finished {
        /// QEMU's migration status there (`completed`, `failed`, …; `unknown` without QMP).
        status: String,
        /// Whether the destination's guest runs.
        running: bool,
        /// QEMU's run state there after the migration (`running`, or `paused` when that QEMU
        /// was started with `-S`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runstate: Option<String>,
        /// QEMU's timestamp of the guest's `RESUME` there, seconds since the epoch.
        #[serde(default)]
        resumed_at: Option<f64>,
        /// With external RAM: the destination engine's report.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ram: Option<Value>,
    },
}

/// Decodes a control message.
pub fn decode(b: &[u8]) -> Result<CarrierMsg, String> {
    if b.len() > MAX_MESSAGE {
        return Err(format!("a {}-byte carrier message is larger than {MAX_MESSAGE}", b.len()));
    }
    let m: CarrierMsg = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    if let CarrierMsg::Prepare { capabilities, .. } = &m {
        if let Some((c, _)) = capabilities
            .iter()
            .find(|(c, _)| c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(format!("not a capability name: {c:?}"));
        }
    }
    Ok(m)
}

/// Encodes a control message.
pub fn encode(m: &CarrierMsg) -> Vec<u8> {
    serde_json::to_vec(m).expect("carrier messages serialise")
}

/// A carrier failed.
#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    /// The session failed.
    #[error("the session failed")]
    Transport(#[source] TransportError),
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A socket failed.
    #[error("{what}")]
    Io {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The other carrier broke the protocol or gave up.
    #[error("the other carrier: {0}")]
    Peer(String),
    /// Waited too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A disk moving with the guest failed.
    #[error("{0}")]
    Disk(String),
}

impl From<livemig_storage::cli::together::DisksError> for CarrierError {
    fn from(e: livemig_storage::cli::together::DisksError) -> Self {
        use livemig_storage::cli::together::DisksError as D;
        match e {
            D::Disk(m) => CarrierError::Disk(m),
            D::Timeout(m) => CarrierError::Timeout(m),
            D::Io { what, source } => CarrierError::Io { what, source },
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CarrierError {
    let what = what.into();
    move |source| CarrierError::Io { what, source }
}

pub(crate) fn send(t: &mut dyn Transport, m: &CarrierMsg) -> Result<(), CarrierError> {
    t.send_message(&encode(m)).map_err(CarrierError::Transport)
}

pub(crate) fn recv(t: &mut dyn Transport, timeout: Duration, what: &str) -> Result<CarrierMsg, CarrierError> {
    match t.recv_message(Some(timeout)).map_err(CarrierError::Transport)? {
        Some(b) => decode(&b).map_err(CarrierError::Peer),
        None => Err(CarrierError::Timeout(what.into())),
    }
}

/// A directory of this process's own (`BASE/PREFIX-PID-RANDOM`, mode 0700: only this user
/// — QEMU runs as it, or as root — may connect to the sockets in it), removed with all it
/// holds when dropped.
#[derive(Debug)]
pub(crate) struct PrivateDir(PathBuf);

impl PrivateDir {
    pub(crate) fn create(base: &Path, prefix: &str) -> Result<Self, CarrierError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut b = [0u8; 8];
        // SAFETY: getrandom(2) writes at most b.len() bytes into the buffer we own.
        if unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) } < 0 {
            return Err(io("reading random bytes for a directory name")(std::io::Error::last_os_error()));
        }
        let dir = base.join(format!("{prefix}-{}-{:x}", std::process::id(), u64::from_le_bytes(b)));
        // `create` fails if the name exists: nobody else's directory is taken over.
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(PrivateDir(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Per-channel byte counts of a carrier, and the sockets of the relays under way.
#[derive(Debug, Default)]
pub struct Counters {
    /// Channels QEMU opened (source) or that were connected to QEMU (destination).
    pub channels: AtomicU64,
    /// Bytes from QEMU into the session (source) or from the session into QEMU (destination).
    pub forward: AtomicU64,
    /// Bytes the other way (the return path).
    pub back: AtomicU64,
    /// A relay failed (the destination's watch stops waiting for QEMU then).
    pub failed: AtomicBool,
    /// Whether every relay was ended, and the descriptors of the relays under way (removed,
    /// under this lock, before they close).
    live: Mutex<(bool, Vec<RawFd>)>,
}

impl Counters {
    /// Ends every relay under way: QEMU may keep a failed migration's socket open without
    /// sending, so the carrier shuts the sockets down itself once the migration is over.
    /// Relays that start later are ended as they start.
    pub fn abort_all(&self) {
        let mut l = self.live.lock().unwrap_or_else(|e| e.into_inner());
        l.0 = true;
        for &fd in l.1.iter() {
            // SAFETY: shutdown(2) on a descriptor that stays open while it is in the list.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn track(&self, fds: [RawFd; 2], on: bool) {
        let mut l = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            if l.0 {
                for fd in fds {
                    // SAFETY: shutdown(2) on descriptors the caller keeps open.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            l.1.extend(fds);
        } else {
            l.1.retain(|f| !fds.contains(f));
        }
    }
}

/// The source half: QEMU's connections to `listener` become the session's byte channels, in
/// the order QEMU opens them, until `stop`. Channels QEMU never opened are closed then, so the
/// destination sees them end. Returns when every relay has ended.
pub fn source_relays(
    listener: UnixListener,
    channels: Vec<Box<dyn ByteChannel>>,
    stop: &AtomicBool,
    counters: &Counters,
) -> Result<(), CarrierError> {
    listener.set_nonblocking(true).map_err(io("the carrier's unix socket"))?;
    let mut channels: std::collections::VecDeque<Box<dyn ByteChannel>> = channels.into();
    std::thread::scope(|s| {
        let mut relays = Vec::new();
        // QEMU opens every channel while its main channel is open: once that one has ended,
        // no more will come.
        while !stop.load(Ordering::Acquire)
            && !channels.is_empty()
            && !relays
                .first()
                .is_some_and(|r: &std::thread::ScopedJoinHandle<'_, Result<(), CarrierError>>| r.is_finished())
        {
            match listener.accept() {
                Ok((conn, _)) => {
                    let ch = channels.pop_front().expect("checked above");
                    let i = counters.channels.fetch_add(1, Ordering::AcqRel);
                    let _ = conn.set_nonblocking(false);
                    relays.push(s.spawn(move || relay_pair(&conn, &*ch, counters, i, true)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(io("accepting QEMU's connection")(e)),
            }
        }
        // Channels QEMU did not open end now.
        for ch in channels.drain(..) {
            let _ = ch.shutdown_write();
        }
        join_relays(relays)
    })
}

/// Relays QEMU's connection ⇄ channel `i`; `from_qemu` at the source (forward = QEMU's bytes
/// into the session), not at the destination (forward = the session's bytes into QEMU).
fn relay_pair(
    qemu: &UnixStream,
    ch: &dyn ByteChannel,
    counters: &Counters,
    i: u64,
    from_qemu: bool,
) -> Result<(), CarrierError> {
    let fd = ch.raw_fd().ok_or_else(|| CarrierError::Peer("this backend has no descriptor to splice".into()))?;
    counters.track([qemu.as_raw_fd(), fd], true);
    let m = relay::relay(qemu.as_raw_fd(), fd);
    counters.track([qemu.as_raw_fd(), fd], false);
    let m = m.map_err(|e| {
        counters.failed.store(true, Ordering::Release);
        io(format!("relaying channel {i}"))(e)
    })?;
    let (fwd, back) = if from_qemu { (m.a_to_b, m.b_to_a) } else { (m.b_to_a, m.a_to_b) };
    counters.forward.fetch_add(fwd, Ordering::Relaxed);
    counters.back.fetch_add(back, Ordering::Relaxed);
    tracing::info!(channel = i, forward = fwd, back, "channel ended");
    Ok(())
}

/// Waits for every relay; the first failure (if any) is the result.
fn join_relays(relays: Vec<std::thread::ScopedJoinHandle<'_, Result<(), CarrierError>>>) -> Result<(), CarrierError> {
    let mut first = Ok(());
    for r in relays {
        let res = r.join().unwrap_or_else(|_| Err(CarrierError::Peer("a relay panicked".into())));
        if first.is_ok() {
            first = res;
        }
    }
    first
}

/// Whether `fd` has bytes to read or has ended, waiting up to `wait`.
fn readable(fd: RawFd, wait: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one pollfd we own, for a descriptor the caller keeps open.
    let n = unsafe { libc::poll(&mut p, 1, wait.as_millis().min(i32::MAX as u128) as i32) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(n > 0)
}

/// Whether a readable `fd` holds data (not only its end).
fn has_data(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv into a one-byte buffer we own; MSG_PEEK leaves the byte in the socket.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n > 0
}

/// The destination half: each byte channel is connected to QEMU's `incoming` unix socket once
/// it carries data and the earlier channels are connected (a channel that ends without data is
/// skipped), then relayed. Returns when every relay has ended or `stop` is set while channels
/// still wait.
pub fn dest_relays(
    incoming: &Path,
    channels: Vec<Box<dyn ByteChannel>>,
    stop: &AtomicBool,
    counters: &Counters,
) -> Result<(), CarrierError> {
    let turn = (Mutex::new(0usize), Condvar::new());
    std::thread::scope(|s| {
        let mut relays = Vec::new();
        for (i, ch) in channels.into_iter().enumerate() {
            let turn = &turn;
            relays.push(s.spawn(move || -> Result<(), CarrierError> {
                let fd = ch.raw_fd().ok_or_else(|| CarrierError::Peer("no descriptor to splice".into()))?;
                while !readable(fd, Duration::from_millis(100)).map_err(io("waiting on a channel"))? {
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                }
                let data = has_data(fd);
                let mut g = turn.0.lock().unwrap_or_else(|e| e.into_inner());
                while *g != i {
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    g = turn.1.wait_timeout(g, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
                }
                let conn = if data {
                    match UnixStream::connect(incoming) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            // The later channels must not wait for a turn that never comes.
                            counters.failed.store(true, Ordering::Release);
                            stop.store(true, Ordering::Release);
                            turn.1.notify_all();
                            return Err(io(format!("connecting channel {i} to QEMU at {}", incoming.display()))(e));
                        }
                    }
                } else {
                    None
                };
                *g += 1;
                turn.1.notify_all();
                drop(g);
                match conn {
                    Some(c) => {
                        counters.channels.fetch_add(1, Ordering::AcqRel);
                        relay_pair(&c, &*ch, counters, i as u64, false)
                    }
                    None => Ok(()),
                }
            }));
        }
        join_relays(relays)
    })
}

/// Takes every byte channel of the session.
pub fn take_channels(t: &mut dyn Transport) -> Vec<Box<dyn ByteChannel>> {
    (0..).map_while(|i| t.byte_channel(i).ok()).collect()
}

/// The QMP command of livemig's QEMU patch that gives QEMU the multifd channels' connections.
pub(crate) const CHANNELS_COMMAND: &str = "x-livemig-channels";

/// Hands the session's channels to QEMU: the first as `fd:livemig`'s descriptor, the others
/// (multifd's) named `livemig-1`… and given to [`CHANNELS_COMMAND`], which a QEMU without
/// livemig's patch lacks.
pub(crate) fn hand_over(q: &mut Qmp, chans: &[Box<dyn ByteChannel>]) -> Result<(), QmpError> {
    let channels_command = CHANNELS_COMMAND;
    let fds = chans
        .iter()
        .map(|c| c.raw_fd())
        .collect::<Option<Vec<_>>>()
        .filter(|f| !f.is_empty())
        .ok_or_else(|| QmpError::Protocol("a channel has no descriptor to hand to QEMU".into()))?;
    if fds.len() > 1 {
        if !q.has_command(channels_command)? {
            return Err(QmpError::Protocol(format!(
                "this QEMU cannot take multifd channels handed over ({channels_command}: QEMU with livemig's \
                 patch); relay them with --relay at the source"
            )));
        }
        let names: Vec<String> = (1..fds.len()).map(|i| format!("livemig-{i}")).collect();
        for (name, fd) in names.iter().zip(&fds[1..]) {
            q.execute_with_fd("getfd", json!({ "fdname": name }), *fd)?;
        }
        q.execute(channels_command, json!({ "fdnames": names }))?;
    }
    q.execute_with_fd("getfd", json!({ "fdname": "livemig" }), fds[0])?;
    Ok(())
}

/// Options of the destination carrier.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// QEMU's incoming unix socket (`-incoming unix:PATH`, or what `migrate-incoming` is
    /// given when `qmp` is set).
    pub incoming: PathBuf,
    /// The destination QEMU's QMP socket (started with `-incoming defer`): capabilities and
    /// parameters are set there and the outcome is watched.
    pub qmp: Option<PathBuf>,
    /// Bound on every wait (the whole migration: `max_time`).
    pub timeout: Duration,
    /// Longest a migration may take.
    pub max_time: Duration,
    /// External RAM by post-copy: how a session that broke after the hand-over is taken over
    /// (its link accepts on the carrier's listener).
    pub recovery: Option<livemig_engine::postcopy::Recovery>,
}

/// How the destination ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DestOutcome {
    /// QEMU's migration status (`unknown` without QMP).
    pub status: String,
    /// Whether the guest runs here.
    pub running: bool,
    /// QEMU's run state after the migration (`paused` when it was started with `-S`).
    pub runstate: Option<String>,
    /// Channels connected to QEMU.
    pub channels: u64,
    /// Bytes into QEMU.
    pub bytes_in: u64,
    /// Bytes back to the source (return path).
    pub bytes_back: u64,
    /// Seconds from Ready to the end.
    pub elapsed_s: f64,
}

/// Runs the destination carrier on an accepted session.
pub fn run_dest(mut t: Box<dyn Transport>, o: &DestOptions) -> Result<DestOutcome, CarrierError> {
    let (caps, params) = match recv(&mut *t, o.timeout, "the source carrier's Prepare")? {
        CarrierMsg::Prepare { capabilities, external_ram: Some(ram), .. } => {
            return crate::ram::receive_ram(t, o, capabilities, ram)
        }
        CarrierMsg::Prepare { capabilities, parameters, handoff, external_ram: None } => {
            (capabilities, (parameters, handoff))
        }
        m => return Err(CarrierError::Peer(format!("{m:?} instead of Prepare"))),
    };
    let (caps, params, handoff) = (caps, params.0, params.1);
    let mut channels = take_channels(&mut *t);
    if handoff && (o.qmp.is_none() || channels.is_empty()) {
        let reason = "handing the connections to QEMU needs --dst-qmp and a channel".to_string();
        let _ = send(&mut *t, &CarrierMsg::Failed { reason: reason.clone() });
        return Err(CarrierError::Peer(reason));
    }
    let mut qmp = match &o.qmp {
        Some(p) => {
            let prepared = (|| -> Result<Qmp, QmpError> {
                let mut q = Qmp::connect(p, o.timeout)?;
                let c: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
                if !c.is_empty() {
                    q.set_capabilities(&c)?;
                }
                if !params.is_empty() {
                    q.execute("migrate-set-parameters", Value::Object(params.clone()))?;
                }
                if handoff {
                    // QEMU reads the stream straight from the authenticated connections.
                    hand_over(&mut q, &channels)?;
                    q.execute("migrate-incoming", json!({ "uri": "fd:livemig" }))?;
                } else {
                    q.execute("migrate-incoming", json!({ "uri": format!("unix:{}", o.incoming.display()) }))?;
                }
                Ok(q)
            })();
            match prepared {
                Ok(q) => Some(q),
                Err(e) => {
                    let _ = send(&mut *t, &CarrierMsg::Failed { reason: format!("destination QEMU: {e}") });
                    return Err(e.into());
                }
            }
        }
        None => None,
    };
    if handoff {
        // QEMU holds its own copy of the socket now; nothing to relay.
        channels.clear();
    }
    send(&mut *t, &CarrierMsg::Ready)?;
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let counters = Counters::default();
    let mut resumed_at = None;
    let (Watched { status, running, runstate }, relays) = std::thread::scope(|s| {
        let relays = s.spawn(|| dest_relays(&o.incoming, channels, &stop, &counters));
        let watched = match qmp.as_mut() {
            Some(q) => watch_dest(q, started, o.max_time, &counters.failed, &mut resumed_at),
            None => {
                while !relays.is_finished() && started.elapsed() < o.max_time {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Watched { status: "unknown".to_string(), running: false, runstate: None })
            }
        };
        // The stream is over either way: relays still waiting for a first byte stop.
        if watched.is_err() || started.elapsed() >= o.max_time {
            stop.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relays.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Release);
        counters.abort_all();
        let r = relays.join().unwrap_or_else(|_| Err(CarrierError::Peer("relays panicked".into())));
        match watched {
            Ok(w) if w.status == "completed" => {
                // The guest runs here: a relay that ended badly afterwards changes nothing.
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "a relay ended with an error after the migration completed");
                }
                (w, Ok(()))
            }
            Ok(w) => (w, r),
            Err(e) => (Watched { status: "failed".to_string(), running: false, runstate: None }, Err(e)),
        }
    });
    let out = DestOutcome {
        status: status.clone(),
        running,
        runstate: runstate.clone(),
        channels: counters.channels.load(Ordering::Acquire),
        bytes_in: counters.forward.load(Ordering::Acquire),
        bytes_back: counters.back.load(Ordering::Acquire),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let _ = send(&mut *t, &CarrierMsg::Finished { status, running, runstate, resumed_at, ram: None });
    // Let the report leave before the session closes.
    let _ = t.recv_message(Some(Duration::from_millis(200)));
    relays.map(|()| out)
}

/// How the destination QEMU's migration ended.
pub(crate) struct Watched {
    /// QEMU's migration status (`completed`, `failed`, …).
    pub status: String,
    /// Whether the guest runs.
    pub running: bool,
    /// QEMU's run state after it (`running`, `paused`, …), when QEMU answered.
    pub runstate: Option<String>,
}

/// Waits for the destination QEMU's migration to end; returns how it ended, and notes when
/// QEMU said it resumed the guest.
pub(crate) fn watch_dest(
    q: &mut Qmp,
    started: Instant,
    max_time: Duration,
    relay_failed: &AtomicBool,
    resumed_at: &mut Option<f64>,
) -> Result<Watched, CarrierError> {
    loop {
        if started.elapsed() > max_time {
            return Err(CarrierError::Timeout(format!("the incoming migration took more than {max_time:?}")));
        }
        if relay_failed.load(Ordering::Acquire) {
            // QEMU may wait forever for a channel that will not come.
            let st = q.execute("query-migrate", json!({})).ok();
            let status = st.as_ref().and_then(|m| m.get("status")).and_then(|s| s.as_str()).unwrap_or("");
            if status != "completed" {
                return Err(CarrierError::Peer(format!("a channel failed (QEMU's incoming status: {status:?})")));
            }
        }
        let e = q.next_event(Duration::from_millis(500))?;
        let status = match e {
            Some(e) if e.name == "MIGRATION" => e.data.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string(),
            Some(e) if e.name == "RESUME" => {
                *resumed_at = Some(e.at);
                continue;
            }
            Some(_) => continue,
            None => {
                let m = q.execute("query-migrate", json!({}))?;
                m.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string()
            }
        };
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            // A completed incoming migration starts the guest (unless QEMU runs with -S).
            let mut running = false;
            let mut runstate = None;
            for _ in 0..50 {
                while let Some(e) = q.next_event(Duration::from_millis(1))? {
                    if e.name == "RESUME" {
                        *resumed_at = Some(e.at);
                    }
                }
                let st = q.execute("query-status", json!({}))?;
                running = st.get("running").and_then(|r| r.as_bool()).unwrap_or(false);
                runstate = st.get("status").and_then(|r| r.as_str()).map(str::to_string);
                // `paused`: that QEMU runs with -S and waits for `cont`.
                if running || status != "completed" || runstate.as_deref() == Some("paused") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return Ok(Watched { status, running, runstate });
        }
    }
}
