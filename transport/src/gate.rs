//! The pre-authentication gate of a listening socket: every accepted connection is
//! authenticated on its own thread, bounded by a deadline for the whole handshake, with a cap
//! on how many are in that state at once: at the cap, a new connection evicts the oldest one that
//! has not yet sent a whole HELLO (idle, slow or garbage), else the oldest (a peer that knows
//! the secret takes a few round trips, so under a flood of idle connections the victims are
//! the idle ones; a flood of well-formed HELLOs faster than the cap per handshake time can
//! still crowd a real peer out). A connection that closes early,
//! sends garbage, stays silent or trickles bytes costs one slot until its deadline or its
//! eviction and one log line; it never ends the listener.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{self, Authenticated, HandshakeError, HandshakeParams, Secret};
use crate::oob::{io_err, BoundListener};
use crate::wire::Role;
use crate::TransportError;

/// Limits on connections that have not authenticated yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Longest a connection may take to authenticate (HELLO, PAKE and AUTH together).
    pub handshake_timeout: Duration,
    /// Most connections authenticating at once; one more evicts the oldest (logged).
    pub max_pending: usize,
    /// TLS 1.3 on every connection, before the handshake ([`crate::tls`]); both ends must
    /// agree. `None`: plain TCP.
    pub tls: Option<crate::tls::TlsSettings>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig { handshake_timeout: Duration::from_secs(10), max_pending: 64, tls: None }
    }
}

/// A stream whose every read and write must finish before one deadline, so a peer that
/// trickles bytes cannot stretch a bounded exchange.
#[derive(Debug)]
pub struct Deadlined<'a> {
    sock: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Deadlined<'a> {
    /// Wraps `sock` until `deadline`; the socket's own timeouts are overwritten on each call.
    pub fn new(sock: &'a TcpStream, deadline: Instant) -> Self {
        Deadlined { sock, deadline }
    }

    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the handshake deadline passed"));
        }
        Ok(left)
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.set_read_timeout(Some(self.left()?))?;
        (&*self.sock).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.set_write_timeout(Some(self.left()?))?;
        (&*self.sock).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.sock).flush()
    }
}

/// Authenticates `sock` as `p.role` within `timeout`.
pub fn authenticate_within(
    sock: &TcpStream,
    secret: &Secret,
    p: &HandshakeParams,
    timeout: Duration,
) -> Result<Authenticated, HandshakeError> {
    auth::authenticate(&mut Deadlined::new(sock, Instant::now() + timeout), secret, p)
}

/// A connection that proved the secret.
#[derive(Debug)]
pub struct Admitted {
    /// The socket (blocking, its timeouts left as the handshake set them).
    pub stream: TcpStream,
    /// The peer's address.
    pub addr: SocketAddr,
    /// What the handshake established.
    pub auth: Authenticated,
}

/// Counters of a gate.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Connections admitted.
    pub admitted: AtomicUsize,
    /// Connections whose handshake failed or timed out.
    pub rejected: AtomicUsize,
    /// Connections closed because `max_pending` were authenticating and they were the oldest.
    pub evicted: AtomicUsize,
}

/// Accepts and authenticates connections on a listener (see the module doc).
#[derive(Debug)]
pub struct Gate<'l> {
    listener: &'l BoundListener,
    secret: Secret,
    cfg: GateConfig,
    tx: Sender<Admitted>,
    rx: Receiver<Admitted>,
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
    pending: Arc<Mutex<Pending>>,
    stats: Arc<GateStats>,
}

/// Connections authenticating now: id → (since, a handle to shut it down, bytes it sent).
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    conns: std::collections::BTreeMap<u64, (Instant, TcpStream, Arc<AtomicU64>)>,
}

/// Bytes of a whole HELLO frame: a connection that sent this much is past the first step.
const HELLO_BYTES: u64 = (crate::wire::HEADER_LEN + 48) as u64;

impl Pending {
    /// The entry to evict: the oldest that has not sent a whole HELLO yet (idle, slow or
    /// garbage), else the oldest. Ids grow with time, so map order is age order.
    fn victim(&self) -> Option<u64> {
        self.conns
            .iter()
            .find(|(_, (_, _, read))| read.load(Ordering::Relaxed) < HELLO_BYTES)
            .or_else(|| self.conns.iter().next())
            .map(|(id, _)| *id)
    }
}

/// A handshake stream that counts what the peer sent (for [`Pending::victim`]).
struct Progress<'a> {
    inner: Deadlined<'a>,
    read: &'a AtomicU64,
}

impl Read for Progress<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Write for Progress<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<'l> Gate<'l> {
    pub(crate) fn new(listener: &'l BoundListener, secret: &Secret, cfg: &GateConfig) -> Result<Self, TransportError> {
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_err("creating the gate's wake-up pipe"))?;
        wake_rx.set_nonblocking(true).map_err(io_err("creating the gate's wake-up pipe"))?;
        wake_tx.set_nonblocking(true).map_err(io_err("creating the gate's wake-up pipe"))?;
        let (tx, rx) = mpsc::channel();
        Ok(Gate {
            listener,
            secret: secret.clone(),
            cfg: cfg.clone(),
            tx,
            rx,
            wake_rx,
            wake_tx: Arc::new(wake_tx),
            pending: Arc::new(Mutex::new(Pending::default())),
            stats: Arc::new(GateStats::default()),
        })
    }

    /// The gate's counters.
    pub fn stats(&self) -> &GateStats {
        &self.stats
    }

    /// The next authenticated connection; `None` once `deadline` passes without one.
    pub fn next(&mut self, deadline: Option<Instant>) -> Result<Option<Admitted>, TransportError> {
        loop {
            if let Ok(a) = self.rx.try_recv() {
                return Ok(Some(a));
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
                None => -1,
            };
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.wake_rx.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a live array of two initialised pollfd structs and its length is
            // passed alongside.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("waiting for connections")(e));
            }
            if fds[1].revents != 0 {
                let mut sink = [0u8; 64];
                while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
            }
            if fds[0].revents & libc::POLLIN != 0 {
                // Drain the backlog (bounded, so admitted connections are handed out too).
                for _ in 0..256 {
                    if !self.admit_one()? {
                        break;
                    }
                }
            }
        }
    }

    /// Accepts one waiting connection and starts its handshake; `false` if none was waiting.
    fn admit_one(&mut self) -> Result<bool, TransportError> {
        let (sock, addr) = match self.listener.accept_nonblocking() {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(false),
            Err(e) => {
                // Per-connection failures (ECONNABORTED, EMFILE under load) must not end the
                // listener; they are logged and the gate goes on.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                return Ok(false);
            }
        };
        let Ok(handle) = sock.try_clone() else {
            tracing::warn!(peer = %addr, "cannot track a connection; closed it");
            return Ok(true);
        };
        let progress = Arc::new(AtomicU64::new(0));
        let (id, evicted) = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let evicted =
                if p.conns.len() >= self.cfg.max_pending { p.victim().and_then(|v| p.conns.remove(&v)) } else { None };
            let id = p.next;
            p.next += 1;
            p.conns.insert(id, (Instant::now(), handle, progress.clone()));
            (id, evicted)
        };
        // Logged outside the lock: a slow log sink must not stall the handshake threads.
        if let Some((since, old, _)) = evicted {
            let _ = old.shutdown(std::net::Shutdown::Both);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                peer = ?old.peer_addr().ok(),
                after = ?since.elapsed(),
                max = self.cfg.max_pending,
                "too many unauthenticated connections; closed the oldest"
            );
        }
        let (secret, timeout, tx) = (self.secret.clone(), self.cfg.handshake_timeout, self.tx.clone());
        let (pending, stats, wake) = (self.pending.clone(), self.stats.clone(), self.wake_tx.clone());
        let tls = self.cfg.tls.clone();
        let spawned = std::thread::Builder::new().name("livemig-handshake".into()).spawn(move || {
            let deadline = Instant::now() + timeout;
            // The network socket itself, to close when the handshake fails: with TLS, dropping
            // the plaintext end would leave the tunnel waiting on the peer.
            let raw = sock.try_clone().ok();
            let r = (move || -> Result<(TcpStream, Authenticated), String> {
                sock.set_nonblocking(false).map_err(|e| e.to_string())?;
                // TLS first (within the same deadline), then the handshake inside it with
                // the secret bound to the TLS session.
                let (sock, secret) = match &tls {
                    Some(t) => {
                        crate::tls::wrap(sock, t, None, &secret, deadline).map_err(|e| crate::error_chain(&e))?
                    }
                    None => (sock, secret),
                };
                let mut s = Progress { inner: Deadlined::new(&sock, deadline), read: &progress };
                let auth =
                    auth::authenticate(&mut s, &secret, &acceptor_params()).map_err(|e| crate::error_chain(&e))?;
                Ok((sock, auth))
            })();
            // Leave the pending set first: an entry still there can be evicted (shut down),
            // and an authenticated connection must not be handed out after that.
            let still_ours = pending.lock().unwrap_or_else(|e| e.into_inner()).conns.remove(&id).is_some();
            match r {
                Ok((stream, auth)) if still_ours => {
                    stats.admitted.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Admitted { stream, addr, auth });
                }
                Ok(_) => {
                    if let Some(raw) = &raw {
                        let _ = raw.shutdown(std::net::Shutdown::Both);
                    }
                }
                Err(e) => {
                    if let Some(raw) = &raw {
                        let _ = raw.shutdown(std::net::Shutdown::Both);
                    }
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %addr, error = %e, "handshake failed; connection closed");
                }
            }
            let _ = (&*wake).write(&[1]);
        });
        if let Err(e) = spawned {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).conns.remove(&id);
            tracing::warn!(peer = %addr, error = %e, "no thread for a handshake; connection closed");
        }
        Ok(true)
    }
}

/// What an acceptor brings to a handshake (it adopts the connector's session and streams).
fn acceptor_params() -> HandshakeParams {
    HandshakeParams {
        role: Role::Acceptor,
        stream: 0,
        streams: 1,
        flags: 0,
        byte_streams: 0,
        session: 0,
        exposed: vec![],
    }
}
