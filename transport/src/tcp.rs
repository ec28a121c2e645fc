//! TCP backend: the fallback for Ethernet-only nodes.
//!
//! Send path: a batch of work requests becomes WRITE frames (header + entry table, then the
//! payload). The header and entry table are copied into the socket (`send`, `MSG_MORE`); the
//! payload is not copied at all ([`TcpConfig::zero_copy`]): its pages are `vmsplice`d into a
//! per-stream pipe and `splice`d into the socket, so the socket buffers reference the
//! registered source pages and the kernel reads them when the data leaves (on loopback: when
//! the receiver copies them out). Like an RDMA WRITE, a request's source bytes may therefore
//! be read at any time until the request completes. Small payloads, and streams where
//! vmsplice is unavailable, use one `writev` whose slices point into the regions (the kernel
//! copies the bytes during the call).
//!
//! Receive path: one reader thread per stream reads a frame's entry table, checks every entry
//! against the regions this endpoint exposed, then reads the payload with `readv` straight
//! into the destination ranges. Nothing is written before the whole frame has been validated,
//! and nothing is written at all before the peer authenticated (see [`crate::auth`]). While a
//! payload is read, `SO_RCVLOWAT` ([`TcpConfig::rcv_lowat`], never more than what the frame
//! still owes) lets the kernel wake the reader once per that many bytes instead of once per
//! arriving segment.
//!
//! Completions: a signaled frame is acknowledged (ACK) by the receiver after placement;
//! acknowledgements are cumulative per stream. Parallel streams (`streams > 1`) spread
//! frames round-robin; control messages ride on stream 0 and, to keep the ordering contract
//! of [`crate::Transport`], wait until all earlier writes are acknowledged.
//!
//! Urgent channel ([`TcpConfig::urgent_stream`]): one more connection, the last, carries
//! only URGENT messages and URGENT writes (see `wire`), so a demand request and its page never
//! queue behind bulk frames in a socket buffer. It has no reader thread: the thread that
//! calls [`UrgentChannel::recv`] reads the socket itself, places an urgent write and returns
//! it as an [`UrgentEvent::Placed`] — one wake-up per hop instead of two (a reader thread,
//! then the waiting thread). [`Transport::urgent`] hands the channel out, usable from any
//! thread.
//!
//! Threads per stream: a reader (never blocks on the writer lock) and an acknowledger. The
//! reader wakes the acknowledgers through their own condition variable, so placing data does
//! not wake threads that wait for messages or acknowledgements.

use crate::oob::{io_err, keepalive, set_int_option, take_channel, BoundListener};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::num::NonZeroU8;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{self, HandshakeParams, Secret};
use crate::gate::{Admitted, Deadlined, Gate, GateConfig};
use crate::region::{RegionInfo, RegionTable};
use crate::window::{SendWindow, WindowConfig};
use crate::wire::{self, close_code, Frame, Header, Role, WriteEntry, WriteFrame};
use crate::{
    check_remote, Transport, TransportError, TransportKind, TransportStats, UrgentChannel, UrgentEvent, WriteRequest,
};

/// TCP backend settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Parallel TCP connections per session.
    pub streams: NonZeroU8,
    /// Outstanding-work window and signaling.
    pub window: WindowConfig,
    /// SO_SNDBUF/SO_RCVBUF in bytes; `None` keeps kernel autotuning.
    pub socket_buffer: Option<usize>,
    /// Maximum payload bytes per WRITE frame.
    pub max_frame_bytes: u32,
    /// A peer that makes no progress for this long is declared gone.
    pub io_timeout: Duration,
    /// Send WRITE payloads without copying them (vmsplice + splice; see the module doc).
    /// `false`: one writev per frame, the kernel copies the payload during the call.
    #[serde(default = "default_zero_copy")]
    pub zero_copy: bool,
    /// Receive low-water mark in bytes while a WRITE payload is read (`SO_RCVLOWAT`, capped
    /// by what the frame still owes): the reader is woken once this much has arrived rather
    /// than per segment. 0 keeps the kernel default (wake on every arrival).
    #[serde(default = "default_rcv_lowat")]
    pub rcv_lowat: u32,
    /// Open an urgent channel: one more connection for demand requests and the pages that
    /// answer them (the connector decides; the acceptor follows).
    #[serde(default)]
    pub urgent_stream: bool,
    /// Byte-stream channels to open with the session (`Transport::byte_channel`), up to
    /// `wire::MAX_BYTE_STREAMS`; the connector decides, the acceptor follows.
    #[serde(default)]
    pub byte_streams: u8,
    /// Limits on connections that have not authenticated yet (listener side), and the
    /// handshake deadline (both sides).
    #[serde(default)]
    pub gate: GateConfig,
}

fn default_zero_copy() -> bool {
    true
}

fn default_rcv_lowat() -> u32 {
    256 << 10
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            streams: NonZeroU8::new(1).expect("non-zero"),
            window: WindowConfig::default(),
            socket_buffer: None,
            max_frame_bytes: 8 << 20,
            io_timeout: Duration::from_secs(20),
            zero_copy: default_zero_copy(),
            rcv_lowat: default_rcv_lowat(),
            urgent_stream: false,
            byte_streams: 0,
            gate: GateConfig::default(),
        }
    }
}

/// Why the connection ended, as seen by a reader thread.
#[derive(Debug, Clone)]
enum Ended {
    Closed,
    Aborted(String),
    Broken(String),
    Protocol(wire::DecodeError),
}

#[derive(Debug, Default)]
struct State {
    acked: Vec<u64>,
    pending_ack: Vec<u64>,
    messages: VecDeque<Vec<u8>>,
    urgent: VecDeque<UrgentEvent>,
    /// Every region the peer exposed, the handshake's and those announced since.
    peer_regions: Vec<RegionInfo>,
    /// Regions announced since the owner last looked (merged into its copy).
    peer_regions_new: usize,
    ended: Option<Ended>,
    shutdown: bool,
    bytes_received: u64,
    messages_received: u64,
}

#[derive(Debug, Default)]
struct Shared {
    st: Mutex<State>,
    /// Messages, acknowledgements received, the end: what the owner of the transport waits for.
    cv: Condvar,
    /// Acknowledgements to send (`pending_ack`), shutdown, the end: what the acknowledgers wait for.
    ack_cv: Condvar,
    /// Urgent events, the end: what users of the urgent channel wait for.
    urgent_cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn end(&self, why: Ended) {
        let mut st = self.lock();
        if st.ended.is_none() {
            st.ended = Some(why);
        }
        drop(st);
        self.cv.notify_all();
        self.ack_cv.notify_all();
        self.urgent_cv.notify_all();
    }
}

fn ended_error(e: &Ended) -> TransportError {
    match e {
        Ended::Closed => TransportError::Disconnected("peer closed the connection".into()),
        Ended::Aborted(r) => TransportError::PeerAborted(r.clone()),
        Ended::Broken(r) => TransportError::Disconnected(r.clone()),
        Ended::Protocol(d) => TransportError::Protocol(d.clone()),
    }
}

#[derive(Debug)]
struct StreamTx {
    sock: Arc<Mutex<TcpStream>>,
    /// (first id, last id) of frames sent on this stream and not yet acknowledged.
    frames: VecDeque<(u64, u64)>,
    last_signaled: u64,
    last_sent: u64,
    /// The zero-copy path's pipe; `None`: writev only.
    pipe: Option<Pipe>,
}

/// Payloads smaller than this go by writev even with zero copy: three system calls
/// (send, vmsplice, splice) and per-page references cost more than copying a few pages.
const ZERO_COPY_MIN: usize = 16 << 10;

/// Requested pipe capacity for the zero-copy path (one vmsplice + splice pair moves at most
/// this much). Unprivileged processes may be held to `fs.pipe-max-size`; any size works.
const PIPE_BYTES: usize = 1 << 20;

/// A pipe that carries payload pages from vmsplice to splice. It is empty between frames.
#[derive(Debug)]
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and belong to nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer system calls per frame; if refused, the default works too.
        // SAFETY: fcntl on a descriptor we own.
        let _ = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int) };
        Ok(Pipe { rd, wr })
    }
}

/// A connected TCP endpoint.
#[derive(Debug)]
pub struct TcpTransport {
    cfg: TcpConfig,
    peer: String,
    peer_regions: Vec<RegionInfo>,
    regions: RegionTable,
    streams: Vec<StreamTx>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    urgent: Option<Arc<TcpUrgent>>,
    byte_streams: Vec<Option<TcpStream>>,
    window: SendWindow,
    next_stream: usize,
    stats: TransportStats,
    head_buf: Vec<u8>,
}

/// Accepts livemig TCP sessions.
#[derive(Debug)]
pub struct TcpListener {
    inner: BoundListener,
}

fn tune(s: &TcpStream, cfg: &TcpConfig) -> Result<(), TransportError> {
    s.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
    let set = |level: i32, opt: i32, val: i32| set_int_option(s, level, opt, val);
    if let Some(b) = cfg.socket_buffer {
        let b = b.min(i32::MAX as usize) as i32;
        // As root the FORCE variants lift the net.core.{w,r}mem_max cap.
        if set(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, b).is_err() {
            set(libc::SOL_SOCKET, libc::SO_SNDBUF, b).map_err(io_err("setting SO_SNDBUF"))?;
        }
        if set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, b).is_err() {
            set(libc::SOL_SOCKET, libc::SO_RCVBUF, b).map_err(io_err("setting SO_RCVBUF"))?;
        }
    }
    // A vanished peer (host down, link cut) must surface as an error, not a hang.
    let ms = cfg.io_timeout.as_millis().min(i32::MAX as u128) as i32;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms).map_err(io_err("setting TCP_USER_TIMEOUT"))?;
    keepalive(s, cfg.io_timeout)?;
    s.set_write_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the write timeout"))?;
    Ok(())
}

impl TcpListener {
    /// Binds a listening socket.
    pub fn bind(addr: impl ToSocketAddrs) -> Result<Self, TransportError> {
        Ok(TcpListener { inner: BoundListener::bind(addr)? })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.inner.local_addr()
    }

    /// Accepts one session (all of its parallel streams), authenticating each connection
    /// through the gate (`cfg.gate`): connections that fail to authenticate are logged and
    /// closed while the listener goes on waiting. Once a session's first stream is in, the
    /// others must follow within `cfg.gate.handshake_timeout + cfg.io_timeout`, else that
    /// session is dropped (and logged) and the listener goes on. `regions` holds what this endpoint exposes
    /// (and may send from).
    pub fn accept(
        &self,
        cfg: &TcpConfig,
        secret: &Secret,
        regions: &RegionTable,
    ) -> Result<TcpTransport, TransportError> {
        self.accept_until(cfg, secret, regions, None)
    }

    /// [`accept`](Self::accept), giving up with [`TransportError::Timeout`] at `until`.
    pub fn accept_until(
        &self,
        cfg: &TcpConfig,
        secret: &Secret,
        regions: &RegionTable,
        until: Option<Instant>,
    ) -> Result<TcpTransport, TransportError> {
        let t0 = Instant::now();
        let mut gate = self.gate(secret, &cfg.gate)?;
        // A connector authenticates its streams one after another, each within the handshake
        // timeout plus the I/O timeout.
        let mut sessions = SessionAssembler::new(cfg.gate.handshake_timeout + cfg.io_timeout);
        loop {
            if until.is_some_and(|u| Instant::now() >= u) {
                return Err(TransportError::Timeout(t0.elapsed(), "a session to accept"));
            }
            let deadline = match (sessions.next_expiry(), until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let admitted = gate.next(deadline)?;
            // A session whose streams did not all come is dropped; the listener goes on.
            for e in sessions.expire(Instant::now()) {
                tracing::warn!(error = %e, "incomplete session dropped");
            }
            let Some(a) = admitted else { continue };
            match sessions.offer(a) {
                Ok(Some(streams)) => return TcpTransport::from_admitted(cfg, streams, regions),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The gate of this listener, for a caller that assembles sessions itself (a daemon
    /// serving many at once: [`SessionAssembler`], [`TcpTransport::from_admitted`]).
    pub fn gate(&self, secret: &Secret, cfg: &GateConfig) -> Result<Gate<'_>, TransportError> {
        self.inner.gate(secret, cfg)
    }
}

/// Groups authenticated connections into sessions by the session id of their HELLO; a session
/// is complete when all of its streams are in. Pure bookkeeping: no I/O but the CLOSE frames
/// sent to connections it turns away.
#[derive(Debug)]
pub struct SessionAssembler {
    follow_within: Duration,
    pending: std::collections::HashMap<u64, PendingSession>,
}

#[derive(Debug)]
struct PendingSession {
    streams: Vec<Option<Admitted>>,
    peer: String,
    expires: Instant,
}

impl SessionAssembler {
    /// A session's streams must all arrive within `follow_within` of its first.
    pub fn new(follow_within: Duration) -> Self {
        SessionAssembler { follow_within, pending: Default::default() }
    }

    /// Sessions still missing streams.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// When the oldest incomplete session expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.expires).min()
    }

    /// Adds one authenticated connection; returns the session's streams, in order, once all
    /// are in. A stream index seen twice is refused (CLOSE) and the first one kept.
    pub fn offer(&mut self, a: Admitted) -> Result<Option<Vec<Admitted>>, TransportError> {
        let h = a.auth.peer;
        if h.flags & wire::HELLO_URGENT_STREAM != 0 && h.streams < 2 {
            return Err(TransportError::Disconnected("an urgent channel needs a bulk stream too".into()));
        }
        let p = self.pending.entry(h.session).or_insert_with(|| PendingSession {
            streams: (0..h.streams).map(|_| None).collect(),
            peer: a.addr.to_string(),
            expires: Instant::now() + self.follow_within,
        });
        let i = h.stream as usize;
        if i >= p.streams.len() || p.streams[i].is_some() {
            let mut s = a.stream;
            let _ = auth::write_frame(
                &mut s,
                &Frame::Close { code: close_code::REFUSED, reason: format!("stream {i} is not expected") },
            );
            return Ok(None);
        }
        p.streams[i] = Some(a);
        if p.streams.iter().all(Option::is_some) {
            let p = self.pending.remove(&h.session).expect("present");
            return Ok(Some(p.streams.into_iter().map(|s| s.expect("all streams present")).collect()));
        }
        Ok(None)
    }

    /// Drops the sessions whose streams did not all follow in time; one error for each.
    pub fn expire(&mut self, now: Instant) -> Vec<TransportError> {
        let late: Vec<u64> = self.pending.iter().filter(|(_, p)| p.expires <= now).map(|(k, _)| *k).collect();
        late.into_iter()
            .map(|k| {
                let p = self.pending.remove(&k).expect("present");
                let missing = p.streams.iter().filter(|s| s.is_none()).count();
                TransportError::Disconnected(format!(
                    "{} opened its session but {missing} of its {} streams did not follow within {:?}",
                    p.peer,
                    p.streams.len(),
                    self.follow_within
                ))
            })
            .collect()
    }
}

impl TcpTransport {
    /// Starts a session from its authenticated streams ([`SessionAssembler::offer`]):
    /// exchanges the region tables on each (exposing `regions`) and starts the readers.
    pub fn from_admitted(
        cfg: &TcpConfig,
        streams: Vec<Admitted>,
        regions: &RegionTable,
    ) -> Result<TcpTransport, TransportError> {
        let first = streams.first().ok_or_else(|| TransportError::Disconnected("a session without streams".into()))?;
        let hello = first.auth.peer;
        let peer = first.addr.to_string();
        let deadline = Instant::now() + cfg.io_timeout;
        let mut socks = Vec::with_capacity(streams.len());
        let mut peer_regions = Vec::new();
        for (i, a) in streams.into_iter().enumerate() {
            let s = a.stream;
            tune(&s, cfg)?;
            let theirs = auth::exchange_regions(&mut Deadlined::new(&s, deadline), &regions.exposed())
                .map_err(|source| TransportError::Handshake { peer: a.addr.to_string(), source })?;
            if i == 0 {
                peer_regions = theirs;
            }
            s.set_read_timeout(None).map_err(io_err("clearing the read timeout"))?;
            s.set_write_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the write timeout"))?;
            socks.push(s);
        }
        let urgent = hello.flags & wire::HELLO_URGENT_STREAM != 0;
        TcpTransport::start(cfg.clone(), peer, peer_regions, regions.clone(), socks, urgent, hello.byte_streams)
    }
}

impl TcpTransport {
    /// Connects to a listener, authenticates and opens `cfg.streams` streams.
    pub fn connect(
        addr: impl ToSocketAddrs,
        cfg: &TcpConfig,
        secret: &Secret,
        regions: &RegionTable,
    ) -> Result<TcpTransport, TransportError> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(io_err("resolving the peer address"))?.collect();
        let target =
            *addrs.first().ok_or_else(|| TransportError::Disconnected("address resolved to nothing".into()))?;
        let mut session = [0u8; 8];
        getrandom::getrandom(&mut session)
            .map_err(|e| io_err("drawing a session id")(std::io::Error::other(e.to_string())))?;
        let session = u64::from_le_bytes(session);
        let urgent = cfg.urgent_stream;
        if cfg.byte_streams > wire::MAX_BYTE_STREAMS {
            return Err(TransportError::TooLarge(format!(
                "{} byte-stream channels (at most {})",
                cfg.byte_streams,
                wire::MAX_BYTE_STREAMS
            )));
        }
        let n = cfg
            .streams
            .get()
            .checked_add(urgent as u8)
            .and_then(|n| n.checked_add(cfg.byte_streams))
            .ok_or(TransportError::TooLarge("more than 255 connections in one session".into()))?;
        let flags = if urgent { wire::HELLO_URGENT_STREAM } else { 0 };
        // Every stream authenticates first; the region tables are exchanged once all are in
        // (the acceptor assembles the whole session before it answers them).
        let mut socks = Vec::new();
        for i in 0..n {
            let s = TcpStream::connect_timeout(&target, cfg.io_timeout).map_err(io_err("connecting"))?;
            // The listener may be busy with other connections: each stream's authentication
            // (TLS included) is bounded by the handshake timeout plus the I/O timeout.
            let d = Instant::now() + cfg.gate.handshake_timeout + cfg.io_timeout;
            let (s, conn_secret) = match &cfg.gate.tls {
                Some(t) => crate::tls::wrap(s, t, Some(&target.ip().to_string()), secret, d)?,
                None => (s, secret.clone()),
            };
            tune(&s, cfg)?;
            let params = HandshakeParams {
                role: Role::Connector,
                stream: i,
                streams: n,
                flags,
                byte_streams: cfg.byte_streams,
                session,
                exposed: Vec::new(),
            };
            auth::authenticate(&mut Deadlined::new(&s, d), &conn_secret, &params)
                .map_err(|source| TransportError::Handshake { peer: target.to_string(), source })?;
            socks.push(s);
        }
        let d = Instant::now() + cfg.io_timeout;
        let mut peer_regions = Vec::new();
        for (i, s) in socks.iter().enumerate() {
            let theirs = auth::exchange_regions(&mut Deadlined::new(s, d), &regions.exposed())
                .map_err(|source| TransportError::Handshake { peer: target.to_string(), source })?;
            s.set_read_timeout(None).map_err(io_err("clearing the read timeout"))?;
            s.set_write_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the write timeout"))?;
            if i == 0 {
                peer_regions = theirs;
            }
        }
        Self::start(cfg.clone(), target.to_string(), peer_regions, regions.clone(), socks, urgent, cfg.byte_streams)
    }

    fn start(
        cfg: TcpConfig,
        peer: String,
        peer_regions: Vec<RegionInfo>,
        regions: RegionTable,
        mut socks: Vec<TcpStream>,
        urgent: bool,
        byte_streams: u8,
    ) -> Result<TcpTransport, TransportError> {
        // Connections: bulk streams, then the urgent channel, then the byte streams.
        let byte_socks: Vec<Option<TcpStream>> =
            socks.split_off(socks.len() - byte_streams as usize).into_iter().map(Some).collect();
        let urgent_sock = if urgent { socks.pop() } else { None };
        let n = socks.len();
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.lock();
            st.acked = vec![0; n];
            st.pending_ack = vec![0; n];
            st.peer_regions = peer_regions.clone();
        }
        let mut streams = Vec::new();
        let mut threads = Vec::new();
        // One span per connection (a child of the caller's span at connect/accept time); the
        // stream threads log inside it.
        let conn_span = tracing::info_span!("tcp", peer = %peer, streams = n);
        for (i, s) in socks.into_iter().enumerate() {
            let rd = s.try_clone().map_err(io_err("cloning the socket"))?;
            let sock = Arc::new(Mutex::new(s));
            let (sh, tbl, lowat) = (shared.clone(), regions.clone(), cfg.rcv_lowat as usize);
            let span = tracing::debug_span!(parent: &conn_span, "stream", i);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("livemig-rx{i}"))
                    .spawn(move || span.in_scope(|| reader(i, rd, tbl, sh, lowat, false)))
                    .map_err(io_err("spawning the reader thread"))?,
            );
            let (sh, wr) = (shared.clone(), sock.clone());
            let span = tracing::debug_span!(parent: &conn_span, "stream", i);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("livemig-ack{i}"))
                    .spawn(move || span.in_scope(|| acker(i, wr, sh)))
                    .map_err(io_err("spawning the acknowledger thread"))?,
            );
            let pipe = if cfg.zero_copy {
                Pipe::new()
                    .inspect_err(|e| tracing::debug!(stream = i, error = %e, "no pipe: sending with writev"))
                    .ok()
            } else {
                None
            };
            streams.push(StreamTx { sock, frames: VecDeque::new(), last_signaled: 0, last_sent: 0, pipe });
        }
        let urgent = match urgent_sock {
            Some(s) => {
                mark_urgent(&s);
                let rd = s.try_clone().map_err(io_err("cloning the socket"))?;
                Some(Arc::new(TcpUrgent {
                    sock: Mutex::new(s),
                    rd: Mutex::new(rd),
                    shared: shared.clone(),
                    regions: regions.clone(),
                    next_id: std::sync::atomic::AtomicU64::new(1),
                    max_frame_bytes: cfg.max_frame_bytes,
                    io_timeout: cfg.io_timeout,
                    peer: peer.clone(),
                }))
            }
            None => None,
        };
        Ok(TcpTransport {
            urgent,
            byte_streams: byte_socks,
            window: SendWindow::new(cfg.window),
            cfg,
            peer,
            peer_regions,
            regions,
            streams,
            shared,
            threads,
            next_stream: 0,
            stats: TransportStats::default(),
            head_buf: Vec::new(),
        })
    }

    /// Peer address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Takes in the regions the peer announced since the last call.
    fn merge_peer_regions(&mut self) {
        let mut st = self.shared.lock();
        if st.peer_regions_new > 0 {
            st.peer_regions_new = 0;
            self.peer_regions = st.peer_regions.clone();
        }
    }

    fn check_ended(&self) -> Result<(), TransportError> {
        match &self.shared.lock().ended {
            Some(e) => Err(ended_error(e)),
            None => Ok(()),
        }
    }

    /// Moves acknowledged frames out of the window; returns true if anything completed.
    fn reap(&mut self) -> bool {
        let acked = self.shared.lock().acked.clone();
        let mut progressed = false;
        for (i, s) in self.streams.iter_mut().enumerate() {
            while s.frames.front().is_some_and(|&(_, last)| last <= acked[i]) {
                s.frames.pop_front();
                progressed = true;
            }
        }
        let upto = self
            .streams
            .iter()
            .filter_map(|s| s.frames.front().map(|&(first, _)| first - 1))
            .min()
            .unwrap_or(self.window.last_posted());
        if upto > self.window.completed() {
            let before = self.window.completed();
            self.window.on_complete(upto);
            self.stats.writes_completed += upto - before;
        }
        progressed
    }

    /// Asks every stream with unacknowledged, unsignaled frames for an acknowledgement.
    fn sync_tails(&mut self) -> Result<(), TransportError> {
        for s in &mut self.streams {
            if s.last_sent > s.last_signaled && !s.frames.is_empty() {
                let mut g = s.sock.lock().unwrap_or_else(|e| e.into_inner());
                g.write_all(&Frame::Sync(s.last_sent).encode()).map_err(io_err("sending SYNC"))?;
                s.last_signaled = s.last_sent;
                self.stats.signaled += 1;
            }
        }
        Ok(())
    }

    /// Blocks until `done(self)` or the peer makes no progress for `io_timeout`.
    fn wait_until(
        &mut self,
        what: &'static str,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), TransportError> {
        let mut last_progress = Instant::now();
        let mut synced = false;
        loop {
            if self.reap() {
                last_progress = Instant::now();
            }
            if done(self) {
                return Ok(());
            }
            self.check_ended()?;
            if !synced {
                self.sync_tails()?;
                synced = true;
            }
            if last_progress.elapsed() > self.cfg.io_timeout {
                return Err(TransportError::Timeout(self.cfg.io_timeout, what));
            }
            let st = self.shared.lock();
            let _ = self.shared.cv.wait_timeout(st, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends one WRITE frame: `head` (header and entry table), then the payload of `wrs`
    /// (`payload` bytes). A failure leaves the stream in the middle of a frame, so it also
    /// ends the connection.
    fn send_frame(
        &mut self,
        stream: usize,
        head: &[u8],
        wrs: &[WriteRequest<'_>],
        payload: u64,
    ) -> Result<(), TransportError> {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(1 + wrs.len());
        iov.push(IoSlice::new(head));
        // Regions stay alive (mapped) in `cur` and `keep` until the frame is sent.
        let mut cur: Option<Arc<crate::Region>> = None;
        let mut keep: Vec<Arc<crate::Region>> = Vec::new();
        for w in wrs {
            if cur.as_ref().is_none_or(|r| r.id() != w.local) {
                let r = self.regions.get(w.local).ok_or(TransportError::LocalRange {
                    region: w.local,
                    offset: 0,
                    len: 0,
                })?;
                keep.extend(cur.replace(r));
            }
            let r = cur.as_ref().expect("set above");
            for s in w.segments {
                // SAFETY: the segment was bounds-checked against this region in post_writes;
                // the region is kept alive by `cur`/`keep` until the write returns. The bytes
                // are read as raw shared memory (module doc of `region`).
                let slice = unsafe { std::slice::from_raw_parts(r.as_ptr().add(s.offset as usize), s.len as usize) };
                iov.push(IoSlice::new(slice));
            }
        }
        let st = &mut self.streams[stream];
        let sock = st.sock.clone();
        let mut g = sock.lock().unwrap_or_else(|e| e.into_inner());
        let res = match &st.pipe {
            Some(pipe) if payload >= ZERO_COPY_MIN as u64 => match send_spliced(&g, pipe, &mut iov) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    st.pipe = None;
                    Ok(())
                }
                Err(e) => Err(e),
            },
            _ => write_all_vectored(&mut *g, &mut iov),
        };
        res.map_err(|e| {
            // The peer would parse whatever comes next as the rest of this frame.
            let _ = g.shutdown(Shutdown::Both);
            drop(g);
            self.shared.end(Ended::Broken(format!("sending a WRITE frame failed: {e}")));
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
                TransportError::Timeout(self.cfg.io_timeout, "the peer to drain the socket")
            } else {
                TransportError::Disconnected(format!("sending to {}: {e}", self.peer))
            }
        })
    }
}

/// Most slices one vectored system call takes (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

fn cvt(rc: isize) -> std::io::Result<usize> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Marks the urgent connection's packets for the network: socket priority 6
/// (`TC_PRIO_INTERACTIVE`: the first band of a `prio` or `pfifo_fast` queue) and DSCP EF
/// (expedited forwarding) for routers that honour it, so that a queue holding the bulk
/// streams' packets lets them pass. Best effort: a refusal only costs the priority.
fn mark_urgent(s: &TcpStream) {
    // IP_TOS also sets the socket priority (from the TOS bits): priority goes last.
    for (level, opt, val, what) in [
        (libc::IPPROTO_IP, libc::IP_TOS, 0xb8, "IP_TOS"),
        (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0xb8, "IPV6_TCLASS"),
        (libc::SOL_SOCKET, libc::SO_PRIORITY, 6, "SO_PRIORITY"),
    ] {
        if let Err(e) = set_int_option(s, level, opt, val) {
            // IPv6 options on an IPv4 socket and the reverse fail; that is expected.
            tracing::trace!(option = what, error = %e, "not marking the urgent stream");
        }
    }
}

/// Zero-copy send of one frame: `bufs[0]` (header and entry table) is copied into the socket
/// with `MSG_MORE`; the payload slices `bufs[1..]` are vmspliced into `pipe` — which takes
/// references to their pages, not copies — and spliced from there into the socket, one
/// pipe-full at a time. The pipe is empty again on success. Returns `Ok(false)` if vmsplice
/// refused the memory: the rest of the payload then went by writev, and the caller should
/// stop using the pipe.
fn send_spliced(sock: &TcpStream, pipe: &Pipe, bufs: &mut [IoSlice<'_>]) -> std::io::Result<bool> {
    let fd = sock.as_raw_fd();
    let Some((head, mut payload)) = bufs.split_first_mut() else { return Ok(true) };
    let mut h: &[u8] = head;
    while !h.is_empty() {
        // SAFETY: `h` is a live byte slice of the given length.
        match cvt(unsafe { libc::send(fd, h.as_ptr().cast(), h.len(), libc::MSG_MORE | libc::MSG_NOSIGNAL) }) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => h = &h[k..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    IoSlice::advance_slices(&mut payload, 0);
    while !payload.is_empty() {
        let n = payload.len().min(IOV_MAX);
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` (guaranteed by std on Unix)
        // and the `n` slices are live for the call. The pipe is empty, so this does not block.
        let moved = match cvt(unsafe { libc::vmsplice(pipe.wr.as_raw_fd(), payload.as_ptr().cast(), n, 0) }) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Memory vmsplice cannot reference (e.g. a PFN mapping): copy the rest.
                tracing::debug!(error = %e, "vmsplice refused the payload; sending with writev");
                let mut s = sock;
                write_all_vectored(&mut s, payload)?;
                return Ok(false);
            }
        };
        IoSlice::advance_slices(&mut payload, moved);
        let mut left = moved;
        while left > 0 {
            let more = if payload.is_empty() { 0 } else { libc::SPLICE_F_MORE };
            // SAFETY: splice between two descriptors we own, no offsets.
            let rc = unsafe {
                libc::splice(pipe.rd.as_raw_fd(), std::ptr::null_mut(), fd, std::ptr::null_mut(), left, more)
            };
            match cvt(rc) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(k) => left -= k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(true)
}

/// `write_all` for vectored I/O, at most IOV_MAX slices per system call.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        match w.write_vectored(&bufs[..n]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => IoSlice::advance_slices(&mut bufs, k),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read_exact` that gives up at `deadline` however the bytes trickle in.
fn read_exact_until(sock: &TcpStream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut r = sock;
    while !buf.is_empty() {
        let left = deadline.checked_duration_since(Instant::now()).filter(|t| !t.is_zero());
        let Some(left) = left else { return Err(std::io::ErrorKind::TimedOut.into()) };
        sock.set_read_timeout(Some(left))?;
        match r.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => buf = &mut buf[k..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Longest wait for the receive low-water mark. When it passes, the read returns what has
/// arrived (the mark stays for the next read); if nothing arrived, the rest of the frame is
/// read without a mark. The kernel does not always wake a reader whose mark is out of reach —
/// the receive window can close first, e.g. when a peer trickles its segments — so the mark
/// is an optimisation with a time limit, never a condition the reader depends on.
const LOWAT_WAIT: Duration = Duration::from_millis(1);

/// `read_exact` for vectored I/O into a WRITE payload. With `lowat > 0` and a payload larger
/// than that, the socket's receive low-water mark is min(`lowat`, bytes still owed) while
/// reading — never more than the peer still has to send — so the kernel wakes the reader once
/// per `lowat` bytes rather than per segment. Every wait for the mark is bounded by
/// [`LOWAT_WAIT`]. The mark is back to 1 (and the socket without a read timeout) when this
/// returns: headers and small frames must wake the reader at once.
fn read_exact_vectored(
    sock: &TcpStream,
    mut bufs: &mut [IoSliceMut<'_>],
    lowat: usize,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    let mut remaining: usize = bufs.iter().map(|b| b.len()).sum();
    let mut armed = lowat > 1 && remaining > lowat && sock.set_read_timeout(Some(LOWAT_WAIT)).is_ok();
    let mut mark = 1;
    let mut r = sock;
    IoSliceMut::advance_slices(&mut bufs, 0);
    let res = loop {
        if bufs.is_empty() {
            break Ok(());
        }
        let want = if armed { remaining.min(lowat) } else { 1 };
        if want != mark {
            if let Err(e) = set_rcvlowat(sock, want) {
                break Err(e);
            }
            mark = want;
        }
        if let Some(d) = deadline {
            // Each read waits at most until the frame's deadline (without a mark to wait for).
            match d.checked_duration_since(Instant::now()).filter(|t| !t.is_zero()) {
                Some(left) if !armed => {
                    if let Err(e) = sock.set_read_timeout(Some(left)) {
                        break Err(e);
                    }
                }
                Some(_) => {}
                None => break Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        let n = bufs.len().min(IOV_MAX);
        match r.read_vectored(&mut bufs[..n]) {
            Ok(0) => break Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => {
                IoSliceMut::advance_slices(&mut bufs, k);
                remaining -= k;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Nothing arrived within LOWAT_WAIT (recvmsg returns what it copied, if anything, so
            // no byte is lost): read the rest of the frame as it comes.
            Err(e) if armed && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                armed = false;
                if let Err(e) = sock.set_read_timeout(None) {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    if mark != 1 {
        set_rcvlowat(sock, 1)?;
    }
    if armed {
        sock.set_read_timeout(None)?;
    }
    res
}

fn set_rcvlowat(sock: &TcpStream, bytes: usize) -> std::io::Result<()> {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `v` is a live c_int whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn refuse(sock: &TcpStream, shared: &Shared, code: u32, why: Ended, reason: String) {
    let mut s = sock;
    let _ = s.write_all(&Frame::Close { code, reason }.encode());
    let _ = sock.shutdown(Shutdown::Both);
    shared.end(why);
}

/// Reader thread: places WRITE payloads, records ACKs, queues messages. On the urgent
/// stream (`urgent`) only URGENT frames (and CLOSE) are allowed, elsewhere none.
fn reader(idx: usize, mut sock: TcpStream, regions: RegionTable, shared: Arc<Shared>, lowat: usize, urgent: bool) {
    let mut hb = [0u8; wire::HEADER_LEN];
    let mut ctl = Vec::new();
    loop {
        if let Err(e) = sock.read_exact(&mut hb) {
            let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "connection closed without CLOSE".to_string()
            } else {
                format!("receive failed: {e}")
            };
            shared.end(Ended::Broken(why));
            return;
        }
        let h = match Header::decode(&hb) {
            Ok(h) => h,
            Err(d) => {
                refuse(&sock, &shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                return;
            }
        };
        ctl.resize(h.control_len(), 0);
        if let Err(e) = sock.read_exact(&mut ctl) {
            shared.end(Ended::Broken(format!("truncated {:?} frame: {e}", h.kind)));
            return;
        }
        let f = match Frame::decode_body(&h, &ctl) {
            Ok(f) => f,
            Err(d) => {
                refuse(&sock, &shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                return;
            }
        };
        let is_urgent = matches!(&f, Frame::Urgent(_) | Frame::Write(WriteFrame { urgent: true, .. }));
        if is_urgent != urgent && !matches!(f, Frame::Close { .. }) {
            let d = wire::DecodeError::Unexpected {
                got: f.kind(),
                expected: if urgent {
                    "URGENT frames on the urgent stream"
                } else {
                    "no URGENT frame on a bulk stream"
                },
            };
            refuse(&sock, &shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
            return;
        }
        match f {
            Frame::Write(w) => {
                if let Err(e) = place(&sock, &regions, &w, lowat, None) {
                    match e {
                        PlaceError::Refused(reason) => {
                            let d = wire::DecodeError::Invalid { field: "write target", value: w.wr_first };
                            tracing::warn!(stream = idx, %reason, "refusing a write");
                            refuse(&sock, &shared, close_code::REFUSED, Ended::Protocol(d), reason);
                        }
                        PlaceError::Io(e) => shared.end(Ended::Broken(format!("truncated WRITE payload: {e}"))),
                    }
                    return;
                }
                let mut st = shared.lock();
                st.bytes_received += w.payload_len();
                if w.urgent {
                    for e in &w.entries {
                        st.urgent.push_back(UrgentEvent::Placed { region: e.region, offset: e.offset, len: e.len });
                    }
                    drop(st);
                    shared.urgent_cv.notify_all();
                } else if w.signaled {
                    st.pending_ack[idx] = st.pending_ack[idx].max(w.wr_last());
                    drop(st);
                    shared.ack_cv.notify_all();
                }
            }
            Frame::Sync(upto) => {
                let mut st = shared.lock();
                st.pending_ack[idx] = st.pending_ack[idx].max(upto);
                drop(st);
                shared.ack_cv.notify_all();
            }
            Frame::Ack(upto) => {
                let mut st = shared.lock();
                st.acked[idx] = st.acked[idx].max(upto);
                drop(st);
                shared.cv.notify_all();
            }
            Frame::Msg(m) => {
                let mut st = shared.lock();
                st.messages.push_back(m);
                st.messages_received += 1;
                drop(st);
                shared.cv.notify_all();
            }
            Frame::Urgent(m) => {
                let mut st = shared.lock();
                st.urgent.push_back(UrgentEvent::Message(m));
                st.messages_received += 1;
                drop(st);
                shared.urgent_cv.notify_all();
            }
            Frame::Regions(rs) if idx == 0 => {
                // Regions exposed mid-session: new ids only (an id is never redefined).
                let mut st = shared.lock();
                let clash = rs.iter().enumerate().find(|(i, r)| {
                    st.peer_regions.iter().any(|p| p.id == r.id) || rs[..*i].iter().any(|o| o.id == r.id)
                });
                if let Some((_, r)) = clash {
                    drop(st);
                    let d = wire::DecodeError::Invalid {
                        field: "announced region id (already exposed)",
                        value: r.id as u64,
                    };
                    refuse(&sock, &shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                    return;
                }
                if st.peer_regions.len() + rs.len() > wire::MAX_REGIONS as usize {
                    drop(st);
                    let d = wire::DecodeError::TooLong {
                        kind: wire::FrameType::Regions,
                        len: rs.len() as u64,
                        max: wire::MAX_REGIONS as u64,
                    };
                    refuse(&sock, &shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                    return;
                }
                st.peer_regions_new += rs.len();
                st.peer_regions.extend(rs);
            }
            Frame::Close { code, reason } => {
                shared.end(if code == close_code::NORMAL { Ended::Closed } else { Ended::Aborted(reason) });
                return;
            }
            other => {
                let d = wire::DecodeError::Unexpected {
                    got: other.kind(),
                    expected: "WRITE, ACK, SYNC, MSG, URGENT, REGIONS (stream 0) or CLOSE",
                };
                refuse(&sock, &shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                return;
            }
        }
    }
}

enum PlaceError {
    Refused(String),
    Io(std::io::Error),
}

/// Validates every entry of a WRITE frame, then reads its payload straight into the regions.
fn place(
    sock: &TcpStream,
    regions: &RegionTable,
    w: &WriteFrame,
    lowat: usize,
    deadline: Option<Instant>,
) -> Result<(), PlaceError> {
    // Regions stay alive (mapped) in `cur` and `keep` until the payload is read. Consecutive
    // entries nearly always name the same region: look it up once per change.
    let mut cur: Option<Arc<crate::Region>> = None;
    let mut keep: Vec<Arc<crate::Region>> = Vec::new();
    let mut targets: Vec<(*mut u8, usize)> = Vec::with_capacity(w.entries.len());
    for (i, e) in w.entries.iter().enumerate() {
        let WriteEntry { region, len, offset } = *e;
        if cur.as_ref().is_none_or(|r| r.id() != region) {
            let r = regions.get(region).filter(|r| r.access().remote_write).ok_or_else(|| {
                PlaceError::Refused(format!(
                    "work request {}: region {region} is not exposed for writing",
                    w.wr_first + i as u64
                ))
            })?;
            keep.extend(cur.replace(r));
        }
        let r = cur.as_ref().expect("set above");
        if !r.contains(offset, len as u64) {
            return Err(PlaceError::Refused(format!(
                "work request {}: [{offset}, +{len}) is outside region {region} of {} bytes",
                w.wr_first + i as u64,
                r.len()
            )));
        }
        if !r.write_allowed(offset, len as u64) {
            return Err(PlaceError::Refused(format!(
                "work request {}: [{offset}, +{len}) of region {region} may not be written now",
                w.wr_first + i as u64
            )));
        }
        // SAFETY: [offset, offset+len) was checked to lie inside the region just above.
        targets.push((unsafe { r.as_ptr().add(offset as usize) }, len as usize));
    }
    // Every entry is valid: only now may bytes be placed.
    let mut iov: Vec<IoSliceMut<'_>> = targets
        .iter()
        .map(|&(p, len)| {
            // SAFETY: each range was checked to lie inside its region above; `cur`/`keep` keep
            // the mappings alive until the read returns. The region is exposed raw memory the
            // peer may write, like an RDMA MR with REMOTE_WRITE.
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, len) })
        })
        .collect();
    read_exact_vectored(sock, &mut iov, lowat, deadline).map_err(PlaceError::Io)
}

/// Acknowledger thread: sends cumulative ACKs without ever blocking the reader.
fn acker(idx: usize, sock: Arc<Mutex<TcpStream>>, shared: Arc<Shared>) {
    let mut sent = 0u64;
    loop {
        let upto = {
            let mut st = shared.lock();
            loop {
                if st.shutdown || st.ended.is_some() {
                    return;
                }
                if st.pending_ack[idx] > sent {
                    break st.pending_ack[idx];
                }
                st = shared.ack_cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut g = sock.lock().unwrap_or_else(|e| e.into_inner());
        if g.write_all(&Frame::Ack(upto).encode()).is_err() {
            drop(g);
            shared.end(Ended::Broken("sending ACK failed".into()));
            return;
        }
        sent = upto;
    }
}

impl Transport for TcpTransport {
    fn shutdown(&mut self) {
        // The readers that place the peer's writes end with their connections.
        self.end(false);
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn peer_regions(&self) -> &[RegionInfo] {
        &self.peer_regions
    }

    fn post_writes(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError> {
        self.check_ended()?;
        self.merge_peer_regions();
        // Validate everything before sending anything.
        let mut cached: Option<Arc<crate::Region>> = None;
        for w in wrs {
            // Look the region up once per run of requests naming it (no reference count
            // traffic per request).
            if cached.as_ref().is_none_or(|r| r.id() != w.local) {
                cached = Some(self.regions.get(w.local).ok_or(TransportError::LocalRange {
                    region: w.local,
                    offset: 0,
                    len: 0,
                })?);
            }
            let r = cached.as_ref().expect("set above");
            for s in w.segments {
                if !r.contains(s.offset, s.len as u64) {
                    return Err(TransportError::LocalRange { region: w.local, offset: s.offset, len: s.len as u64 });
                }
            }
            let bytes = w.bytes();
            if bytes > self.cfg.max_frame_bytes as u64 {
                return Err(TransportError::TooLarge(format!(
                    "{bytes}-byte write exceeds the frame limit {}",
                    self.cfg.max_frame_bytes
                )));
            }
            check_remote(&self.peer_regions, w.remote, w.remote_offset, bytes)?;
        }
        let mut i = 0;
        while i < wrs.len() {
            // Frame: as many requests as fit the entry, byte and window limits.
            let mut j = i;
            let mut bytes = 0u64;
            while j < wrs.len() && j - i < wire::MAX_WRITE_ENTRIES as usize {
                let b = wrs[j].bytes();
                if j > i && bytes + b > self.cfg.max_frame_bytes as u64 {
                    break;
                }
                if !self.window.can_post(bytes + b) {
                    break;
                }
                bytes += b;
                j += 1;
            }
            if j == i {
                self.stats.window_stalls += 1;
                let need = wrs[i].bytes();
                self.wait_until("write completions (window full)", |t| t.window.can_post(need))?;
                continue;
            }
            let stream = self.next_stream;
            self.next_stream = (self.next_stream + 1) % self.streams.len();
            let mut entries = Vec::with_capacity(j - i);
            let mut signaled = false;
            let mut first = 0;
            for w in &wrs[i..j] {
                let (id, sig) = self.window.on_post(w.bytes(), false);
                if first == 0 {
                    first = id;
                }
                signaled |= sig;
                entries.push(WriteEntry { region: w.remote, len: w.bytes() as u32, offset: w.remote_offset });
            }
            let wf = WriteFrame { wr_first: first, signaled, urgent: false, entries };
            let last = wf.wr_last();
            let mut head = std::mem::take(&mut self.head_buf);
            head.clear();
            head.extend_from_slice(&Frame::Write(wf).encode());
            let res = self.send_frame(stream, &head, &wrs[i..j], bytes);
            self.head_buf = head;
            res?;
            let s = &mut self.streams[stream];
            s.frames.push_back((first, last));
            s.last_sent = last;
            if signaled {
                s.last_signaled = last;
                self.stats.signaled += 1;
            }
            self.stats.writes_posted += (j - i) as u64;
            self.stats.bytes_posted += bytes;
            i = j;
        }
        Ok(self.window.last_posted())
    }

    fn send_message(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        self.check_ended()?;
        if msg.len() > wire::MAX_MESSAGE as usize {
            return Err(TransportError::TooLarge(format!("{}-byte message exceeds {}", msg.len(), wire::MAX_MESSAGE)));
        }
        if self.streams.len() > 1 {
            // Writes on other streams may still be in flight: wait for their placement.
            self.flush()?;
        }
        let mut buf = Frame::Msg(Vec::new()).encode();
        buf[8..12].copy_from_slice(&(msg.len() as u32).to_le_bytes());
        let mut iov = [IoSlice::new(&buf), IoSlice::new(msg)];
        let mut g = self.streams[0].sock.lock().unwrap_or_else(|e| e.into_inner());
        write_all_vectored(&mut *g, &mut iov)
            .map_err(|e| TransportError::Disconnected(format!("sending a message: {e}")))?;
        drop(g);
        buf.clear();
        self.stats.messages_sent += 1;
        Ok(())
    }

    fn recv_message(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.shared.lock();
        loop {
            if let Some(m) = st.messages.pop_front() {
                drop(st);
                // Regions announced before this message are known once it is read.
                self.merge_peer_regions();
                return Ok(Some(m));
            }
            if let Some(e) = &st.ended {
                return Err(ended_error(e));
            }
            let Some(wait) = wait_slice(deadline) else { return Ok(None) };
            st = self.shared.cv.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn poll_completions(&mut self) -> Result<u64, TransportError> {
        self.reap();
        if self.window.completed() < self.window.last_posted() {
            self.check_ended()?;
        }
        Ok(self.window.completed())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        let target = self.window.last_posted();
        self.wait_until("write completions (flush)", |t| t.window.completed() >= target)
    }

    fn stats(&self) -> TransportStats {
        let st = self.shared.lock();
        TransportStats { bytes_received: st.bytes_received, messages_received: st.messages_received, ..self.stats }
    }

    fn regions(&self) -> &RegionTable {
        &self.regions
    }

    fn expose(&mut self, region: Arc<crate::Region>) -> Result<crate::Registration, TransportError> {
        self.check_ended()?;
        let id = region.id();
        let reg = self.regions.register(region).map_err(TransportError::Register)?;
        let Some(info) = self.regions.exposed().into_iter().find(|r| r.id == id) else {
            return Ok(reg); // local only: nothing to announce
        };
        let mut g = self.streams[0].sock.lock().unwrap_or_else(|e| e.into_inner());
        g.write_all(&Frame::Regions(vec![info]).encode())
            .map_err(|e| TransportError::Disconnected(format!("announcing region {id}: {e}")))?;
        Ok(reg)
    }

    fn byte_channel(&mut self, i: usize) -> Result<Box<dyn crate::ByteChannel>, TransportError> {
        let missing = "this TCP session has no such byte-stream channel (TcpConfig::byte_streams)";
        let sock = take_channel(&mut self.byte_streams, i, missing)?;
        Ok(Box::new(TcpByteChannel { sock }))
    }

    fn urgent(&self) -> Result<Arc<dyn UrgentChannel>, TransportError> {
        match &self.urgent {
            Some(u) => Ok(u.clone()),
            None => {
                Err(TransportError::Unsupported("this TCP session has no urgent stream (TcpConfig::urgent_stream)"))
            }
        }
    }
}

/// A byte-stream channel of a TCP session: its authenticated connection, handed over whole.
#[derive(Debug)]
struct TcpByteChannel {
    sock: TcpStream,
}

impl std::io::Read for TcpByteChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.read(buf)
    }
}

impl std::io::Write for TcpByteChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

impl crate::ByteChannel for TcpByteChannel {
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.sock.as_raw_fd())
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.sock.shutdown(Shutdown::Write)
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

/// The urgent channel of a TCP session: its own connection, shared by every user.
#[derive(Debug)]
struct TcpUrgent {
    /// The write half (frames are written whole under this lock).
    sock: Mutex<TcpStream>,
    /// The read half: whoever calls `recv` reads frames from it.
    rd: Mutex<TcpStream>,
    shared: Arc<Shared>,
    regions: RegionTable,
    next_id: std::sync::atomic::AtomicU64,
    max_frame_bytes: u32,
    io_timeout: Duration,
    peer: String,
}

impl TcpUrgent {
    fn send(&self, bufs: &mut [IoSlice<'_>], what: &str) -> Result<(), TransportError> {
        if let Some(e) = &self.shared.lock().ended {
            return Err(ended_error(e));
        }
        let mut g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        write_all_vectored(&mut *g, bufs).map_err(|e| {
            // The peer would parse whatever comes next as the rest of this frame.
            let _ = g.shutdown(Shutdown::Both);
            self.shared.end(Ended::Broken(format!("sending an urgent {what} failed: {e}")));
            TransportError::Disconnected(format!("sending an urgent {what} to {}: {e}", self.peer))
        })
    }
}

impl UrgentChannel for TcpUrgent {
    fn send_message(&self, msg: &[u8]) -> Result<(), TransportError> {
        if msg.len() > wire::MAX_MESSAGE as usize {
            return Err(TransportError::TooLarge(format!("{}-byte message exceeds {}", msg.len(), wire::MAX_MESSAGE)));
        }
        let mut head = Frame::Urgent(Vec::new()).encode();
        head[8..12].copy_from_slice(&(msg.len() as u32).to_le_bytes());
        self.send(&mut [IoSlice::new(&head), IoSlice::new(msg)], "message")
    }

    fn post_write(&self, w: &WriteRequest<'_>) -> Result<(), TransportError> {
        let r = self.regions.get(w.local).ok_or(TransportError::LocalRange { region: w.local, offset: 0, len: 0 })?;
        for s in w.segments {
            if !r.contains(s.offset, s.len as u64) {
                return Err(TransportError::LocalRange { region: w.local, offset: s.offset, len: s.len as u64 });
            }
        }
        let bytes = w.bytes();
        if bytes == 0 || bytes > self.max_frame_bytes as u64 {
            return Err(TransportError::TooLarge(format!(
                "{bytes}-byte urgent write (1..={} allowed)",
                self.max_frame_bytes
            )));
        }
        check_remote(&self.shared.lock().peer_regions, w.remote, w.remote_offset, bytes)?;
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = WriteEntry { region: w.remote, len: bytes as u32, offset: w.remote_offset };
        let head =
            Frame::Write(WriteFrame { wr_first: id, signaled: false, urgent: true, entries: vec![entry] }).encode();
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(1 + w.segments.len());
        iov.push(IoSlice::new(&head));
        for s in w.segments {
            // SAFETY: checked against the region just above; `r` keeps it mapped until the
            // write returns. The bytes are read as raw shared memory (see `region`).
            iov.push(IoSlice::new(unsafe {
                std::slice::from_raw_parts(r.as_ptr().add(s.offset as usize), s.len as usize)
            }));
        }
        self.send(&mut iov, "write")
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Option<UrgentEvent>, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let rd = self.rd.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Events of an earlier multi-entry write come first.
            {
                let st = self.shared.lock();
                if let Some(e) = &st.ended {
                    return Err(ended_error(e));
                }
            }
            if let Some(e) = self.shared.lock().urgent.pop_front() {
                return Ok(Some(e));
            }
            // Wait for the start of a frame (bounded slices, so the end of the session is
            // noticed); once it starts, the frame is read whole.
            let Some(slice) = wait_slice(deadline) else { return Ok(None) };
            if !readable(&rd, slice).map_err(io_err("polling the urgent stream"))? {
                continue;
            }
            self.read_frame(&rd)?;
        }
    }
}

impl TcpUrgent {
    /// Reads one frame from the urgent stream: queues its event(s), or ends the session.
    fn read_frame(&self, rd: &TcpStream) -> Result<(), TransportError> {
        let fail = |why: Ended| {
            let e = ended_error(&why);
            self.shared.end(why);
            Err(e)
        };
        // One deadline for the whole frame: a peer that trickles a frame a byte at a time
        // cannot hold the reader longer than the I/O timeout.
        let deadline = Instant::now() + self.io_timeout;
        let mut hb = [0u8; wire::HEADER_LEN];
        if let Err(e) = read_exact_until(rd, &mut hb, deadline) {
            return fail(Ended::Broken(format!("urgent stream: {e}")));
        }
        let h = match Header::decode(&hb) {
            Ok(h) => h,
            Err(d) => {
                refuse(rd, &self.shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                return Err(TransportError::Protocol(d));
            }
        };
        let mut ctl = vec![0u8; h.control_len()];
        if let Err(e) = read_exact_until(rd, &mut ctl, deadline) {
            return fail(Ended::Broken(format!("truncated urgent {:?} frame: {e}", h.kind)));
        }
        let f = match Frame::decode_body(&h, &ctl) {
            Ok(f) => f,
            Err(d) => {
                refuse(rd, &self.shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                return Err(TransportError::Protocol(d));
            }
        };
        let event = match f {
            Frame::Urgent(m) => vec![UrgentEvent::Message(m)],
            Frame::Write(w) if w.urgent => {
                match place(rd, &self.regions, &w, 0, Some(deadline)) {
                    Ok(()) => {}
                    Err(PlaceError::Refused(reason)) => {
                        let d = wire::DecodeError::Invalid { field: "urgent write target", value: w.wr_first };
                        tracing::warn!(%reason, "refusing an urgent write");
                        refuse(rd, &self.shared, close_code::REFUSED, Ended::Protocol(d.clone()), reason);
                        return Err(TransportError::Protocol(d));
                    }
                    Err(PlaceError::Io(e)) => return fail(Ended::Broken(format!("truncated urgent WRITE: {e}"))),
                }
                w.entries
                    .iter()
                    .map(|e| UrgentEvent::Placed { region: e.region, offset: e.offset, len: e.len })
                    .collect()
            }
            Frame::Close { code, reason } => {
                return fail(if code == close_code::NORMAL { Ended::Closed } else { Ended::Aborted(reason) })
            }
            other => {
                let d =
                    wire::DecodeError::Unexpected { got: other.kind(), expected: "URGENT frames on the urgent stream" };
                refuse(rd, &self.shared, close_code::PROTOCOL, Ended::Protocol(d.clone()), d.to_string());
                return Err(TransportError::Protocol(d));
            }
        };
        let mut st = self.shared.lock();
        st.messages_received += event.iter().filter(|e| matches!(e, UrgentEvent::Message(_))).count() as u64;
        st.urgent.extend(event);
        Ok(())
    }
}

/// The next bounded wait before `deadline` (200 ms at most, so the end of the session is
/// noticed); `None` once the deadline has passed.
fn wait_slice(deadline: Option<Instant>) -> Option<Duration> {
    const SLICE: Duration = Duration::from_millis(200);
    match deadline {
        Some(d) => d.checked_duration_since(Instant::now()).filter(|r| !r.is_zero()).map(|r| r.min(SLICE)),
        None => Some(SLICE),
    }
}

/// Waits up to `d` for `s` to become readable (data, end of stream or error).
fn readable(s: &TcpStream, d: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for an open socket, for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(rc > 0)
}

impl TcpTransport {
    /// Ends the session: wakes every waiter, shuts every connection down (after a CLOSE
    /// frame when `goodbye`: an orderly end; without one for a link that may be dead), and
    /// joins the threads that place the peer's writes.
    fn end(&mut self, goodbye: bool) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
        }
        self.shared.cv.notify_all();
        self.shared.ack_cv.notify_all();
        self.shared.urgent_cv.notify_all();
        let socks = self.streams.iter().map(|s| &*s.sock).chain(self.urgent.as_ref().map(|u| &u.sock));
        for sock in socks {
            let mut g = sock.lock().unwrap_or_else(|e| e.into_inner());
            if goodbye {
                let _ = g.write_all(&Frame::Close { code: close_code::NORMAL, reason: String::new() }.encode());
            }
            let _ = g.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.end(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Head copied, payload spliced: the byte stream is head then payload, in order, and the
    /// pipe is empty afterwards (a second frame follows intact).
    #[test]
    fn spliced_frames_arrive_in_order() {
        let (a, mut b) = socket_pair();
        let pipe = Pipe::new().unwrap();
        let (p1, p2) = (payload(3 << 20, 1), payload(70_001, 2));
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; 5 + (3 << 20) + 3 + 70_001];
            b.read_exact(&mut got).unwrap();
            got
        });
        for (head, p) in [(&b"head1"[..], &p1), (&b"h2!"[..], &p2)] {
            let mut iov: Vec<IoSlice<'_>> = vec![IoSlice::new(head)];
            iov.extend(p.chunks(4096 + 17).map(IoSlice::new));
            assert!(send_spliced(&a, &pipe, &mut iov).unwrap());
        }
        let got = t.join().unwrap();
        let want: Vec<u8> = [&b"head1"[..], &p1, b"h2!", &p2].concat();
        assert!(got == want);
    }

    /// When vmsplice refuses (here: the "pipe" is not a pipe), the rest of the frame goes by
    /// writev and the caller is told to stop splicing.
    #[test]
    fn vmsplice_refusal_falls_back_to_writev() {
        let (a, mut b) = socket_pair();
        let null = |w| OwnedFd::from(std::fs::OpenOptions::new().read(true).write(w).open("/dev/null").unwrap());
        let not_a_pipe = Pipe { rd: null(false), wr: null(true) };
        let p = payload(200_000, 3);
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; 4 + 200_000];
            b.read_exact(&mut got).unwrap();
            got
        });
        let mut iov = vec![IoSlice::new(b"head"), IoSlice::new(&p[..100]), IoSlice::new(&p[100..])];
        assert!(!send_spliced(&a, &not_a_pipe, &mut iov).unwrap());
        let got = t.join().unwrap();
        assert!(got[..4] == b"head"[..] && got[4..] == p[..]);
    }
}
