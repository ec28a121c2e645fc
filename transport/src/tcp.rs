//! TCP backend: the fallback for Ethernet-only nodes.
//!
//! Send path: a batch of work requests becomes WRITE frames (header + entry table, then the
//! payload); each frame goes out with vectored writes whose slices point straight into the
//! registered source regions — no user-space copy. Receive path: one reader thread per
//! stream reads a frame's entry table, checks every entry against the regions this endpoint
//! exposed, then reads the payload with `readv` straight into the destination ranges.
//! Nothing is written before the whole frame has been validated, and nothing is written at
//! all before the peer authenticated (see [`crate::auth`]).
//!
//! Completions: a signaled frame is acknowledged (ACK) by the receiver after placement;
//! acknowledgements are cumulative per stream. Parallel streams (`streams > 1`) spread
//! frames round-robin; control messages ride on stream 0 and, to keep the ordering contract
//! of [`crate::Transport`], wait until all earlier writes are acknowledged.
//!
//! Threads per stream: a reader (never blocks on the writer lock) and an acknowledger.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::num::NonZeroU8;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{self, HandshakeParams, Secret};
use crate::region::{RegionInfo, RegionTable};
use crate::window::{SendWindow, WindowConfig};
use crate::wire::{self, close_code, Frame, Header, Role, WriteEntry, WriteFrame};
use crate::{check_remote, Transport, TransportError, TransportKind, TransportStats, WriteRequest};

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
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            streams: NonZeroU8::new(1).expect("non-zero"),
            window: WindowConfig::default(),
            socket_buffer: None,
            max_frame_bytes: 8 << 20,
            io_timeout: Duration::from_secs(20),
        }
    }
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
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
    ended: Option<Ended>,
    shutdown: bool,
    bytes_received: u64,
    messages_received: u64,
}

#[derive(Debug, Default)]
struct Shared {
    st: Mutex<State>,
    cv: Condvar,
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
    window: SendWindow,
    next_stream: usize,
    stats: TransportStats,
    head_buf: Vec<u8>,
}

/// Accepts livemig TCP sessions.
#[derive(Debug)]
pub struct TcpListener {
    inner: std::net::TcpListener,
}

fn tune(s: &TcpStream, cfg: &TcpConfig) -> Result<(), TransportError> {
    s.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
    let fd = s.as_raw_fd();
    let set = |level: i32, opt: i32, val: i32| {
        // SAFETY: `fd` is an open socket owned by `s`; the option value is a live i32 whose
        // size is passed alongside.
        let rc = unsafe {
            libc::setsockopt(fd, level, opt, (&val as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t)
        };
        if rc != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
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
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).map_err(io_err("setting SO_KEEPALIVE"))?;
    let idle = (cfg.io_timeout.as_secs() / 3).clamp(1, 7200) as i32;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle).map_err(io_err("setting TCP_KEEPIDLE"))?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle).map_err(io_err("setting TCP_KEEPINTVL"))?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3).map_err(io_err("setting TCP_KEEPCNT"))?;
    s.set_write_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the write timeout"))?;
    Ok(())
}

impl TcpListener {
    /// Binds a listening socket.
    pub fn bind(addr: impl ToSocketAddrs) -> Result<Self, TransportError> {
        let inner = std::net::TcpListener::bind(addr).map_err(io_err("binding the listening socket"))?;
        Ok(TcpListener { inner })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.inner.local_addr().map_err(io_err("reading the local address"))
    }

    /// Accepts one session (all of its parallel streams), authenticating each connection.
    /// `regions` holds what this endpoint exposes (and may send from).
    pub fn accept(
        &self,
        cfg: &TcpConfig,
        secret: &Secret,
        regions: &RegionTable,
    ) -> Result<TcpTransport, TransportError> {
        let mut socks: Vec<Option<TcpStream>> = Vec::new();
        let mut session = None;
        let mut peer_regions = Vec::new();
        let mut peer = String::new();
        loop {
            let (mut s, addr) = self.inner.accept().map_err(io_err("accepting a connection"))?;
            tune(&s, cfg)?;
            s.set_read_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the read timeout"))?;
            let params =
                HandshakeParams { role: Role::Acceptor, stream: 0, streams: 1, session: 0, exposed: regions.exposed() };
            let out = match auth::handshake(&mut s, secret, &params) {
                Ok(o) => o,
                Err(source) => {
                    let e = TransportError::Handshake { peer: addr.to_string(), source };
                    if session.is_none() {
                        return Err(e);
                    }
                    tracing::warn!(peer = %addr, error = %e, "rejected a stream");
                    continue;
                }
            };
            match session {
                None => {
                    session = Some(out.peer.session);
                    socks = (0..out.peer.streams).map(|_| None).collect();
                    peer_regions = out.peer_regions;
                    peer = addr.to_string();
                }
                Some(id) if id != out.peer.session => {
                    let _ = auth::write_frame(
                        &mut s,
                        &Frame::Close { code: close_code::REFUSED, reason: "another session is being accepted".into() },
                    );
                    continue;
                }
                Some(_) => {}
            }
            let i = out.peer.stream as usize;
            if i < socks.len() && socks[i].is_none() {
                s.set_read_timeout(None).map_err(io_err("clearing the read timeout"))?;
                socks[i] = Some(s);
            }
            if socks.iter().all(|s| s.is_some()) {
                break;
            }
        }
        let socks = socks.into_iter().map(|s| s.expect("all streams present")).collect();
        TcpTransport::start(cfg.clone(), peer, peer_regions, regions.clone(), socks)
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
        let n = cfg.streams.get();
        let mut socks = Vec::new();
        let mut peer_regions = Vec::new();
        for i in 0..n {
            let mut s = TcpStream::connect_timeout(&target, cfg.io_timeout).map_err(io_err("connecting"))?;
            tune(&s, cfg)?;
            s.set_read_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the read timeout"))?;
            let params =
                HandshakeParams { role: Role::Connector, stream: i, streams: n, session, exposed: regions.exposed() };
            let out = auth::handshake(&mut s, secret, &params)
                .map_err(|source| TransportError::Handshake { peer: target.to_string(), source })?;
            s.set_read_timeout(None).map_err(io_err("clearing the read timeout"))?;
            if i == 0 {
                peer_regions = out.peer_regions;
            }
            socks.push(s);
        }
        Self::start(cfg.clone(), target.to_string(), peer_regions, regions.clone(), socks)
    }

    fn start(
        cfg: TcpConfig,
        peer: String,
        peer_regions: Vec<RegionInfo>,
        regions: RegionTable,
        socks: Vec<TcpStream>,
    ) -> Result<TcpTransport, TransportError> {
        let n = socks.len();
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.lock();
            st.acked = vec![0; n];
            st.pending_ack = vec![0; n];
        }
        let mut streams = Vec::new();
        let mut threads = Vec::new();
        // One span per connection (a child of the caller's span at connect/accept time); the
        // stream threads log inside it.
        let conn_span = tracing::info_span!("tcp", peer = %peer, streams = n);
        for (i, s) in socks.into_iter().enumerate() {
            let rd = s.try_clone().map_err(io_err("cloning the socket"))?;
            let sock = Arc::new(Mutex::new(s));
            let (sh, tbl) = (shared.clone(), regions.clone());
            let span = tracing::debug_span!(parent: &conn_span, "stream", i);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("livemig-rx{i}"))
                    .spawn(move || span.in_scope(|| reader(i, rd, tbl, sh)))
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
            streams.push(StreamTx { sock, frames: VecDeque::new(), last_signaled: 0, last_sent: 0 });
        }
        Ok(TcpTransport {
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

    fn send_frame(&mut self, stream: usize, head: &[u8], wrs: &[WriteRequest<'_>]) -> Result<(), TransportError> {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(1 + wrs.len());
        iov.push(IoSlice::new(head));
        let mut keep: Vec<Arc<crate::Region>> = Vec::new();
        for w in wrs {
            let r = match keep.last() {
                Some(r) if r.id() == w.local => r.clone(),
                _ => self.regions.get(w.local).ok_or(TransportError::LocalRange {
                    region: w.local,
                    offset: 0,
                    len: 0,
                })?,
            };
            for s in w.segments {
                // SAFETY: the segment was bounds-checked against this region in post_writes;
                // the region is kept alive by `keep` until the write returns. The bytes are
                // read as raw shared memory (module doc of `region`).
                let slice = unsafe { std::slice::from_raw_parts(r.as_ptr().add(s.offset as usize), s.len as usize) };
                iov.push(IoSlice::new(slice));
            }
            keep.push(r);
        }
        let mut g = self.streams[stream].sock.lock().unwrap_or_else(|e| e.into_inner());
        write_all_vectored(&mut *g, &mut iov).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
                TransportError::Timeout(self.cfg.io_timeout, "the peer to drain the socket")
            } else {
                TransportError::Disconnected(format!("sending to {}: {e}", self.peer))
            }
        })
    }
}

/// `write_all` for vectored I/O, at most IOV_MAX slices per system call.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(1024);
        match w.write_vectored(&bufs[..n]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => IoSlice::advance_slices(&mut bufs, k),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read_exact` for vectored I/O.
fn read_exact_vectored(r: &mut impl Read, mut bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(1024);
        match r.read_vectored(&mut bufs[..n]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => IoSliceMut::advance_slices(&mut bufs, k),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn refuse(sock: &TcpStream, shared: &Shared, code: u32, why: Ended, reason: String) {
    let mut s = sock;
    let _ = s.write_all(&Frame::Close { code, reason }.encode());
    let _ = sock.shutdown(Shutdown::Both);
    shared.end(why);
}

/// Reader thread: places WRITE payloads, records ACKs, queues messages.
fn reader(idx: usize, mut sock: TcpStream, regions: RegionTable, shared: Arc<Shared>) {
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
        match f {
            Frame::Write(w) => {
                if let Err(e) = place(&mut sock, &regions, &w) {
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
                if w.signaled {
                    st.pending_ack[idx] = st.pending_ack[idx].max(w.wr_last());
                    drop(st);
                    shared.cv.notify_all();
                }
            }
            Frame::Sync(upto) => {
                let mut st = shared.lock();
                st.pending_ack[idx] = st.pending_ack[idx].max(upto);
                drop(st);
                shared.cv.notify_all();
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
            Frame::Close { code, reason } => {
                shared.end(if code == close_code::NORMAL { Ended::Closed } else { Ended::Aborted(reason) });
                return;
            }
            other => {
                let d = wire::DecodeError::Unexpected { got: other.kind(), expected: "WRITE, ACK, SYNC, MSG or CLOSE" };
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
fn place(sock: &mut TcpStream, regions: &RegionTable, w: &WriteFrame) -> Result<(), PlaceError> {
    let mut targets = Vec::with_capacity(w.entries.len());
    for (i, e) in w.entries.iter().enumerate() {
        let WriteEntry { region, len, offset } = *e;
        let r = regions.get(region).filter(|r| r.access().remote_write).ok_or_else(|| {
            PlaceError::Refused(format!(
                "work request {}: region {region} is not exposed for writing",
                w.wr_first + i as u64
            ))
        })?;
        if !r.contains(offset, len as u64) {
            return Err(PlaceError::Refused(format!(
                "work request {}: [{offset}, +{len}) is outside region {region} of {} bytes",
                w.wr_first + i as u64,
                r.len()
            )));
        }
        targets.push((r, offset, len));
    }
    let mut iov: Vec<IoSliceMut<'_>> = targets
        .iter()
        .map(|(r, off, len)| {
            // SAFETY: [off, off+len) was checked to lie inside the region above; the Arc in
            // `targets` keeps the mapping alive until the read returns. The region is exposed
            // raw memory the peer may write, like an RDMA MR with REMOTE_WRITE.
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(r.as_ptr().add(*off as usize), *len as usize) })
        })
        .collect();
    read_exact_vectored(sock, &mut iov).map_err(PlaceError::Io)
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
                st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
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
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn peer_regions(&self) -> &[RegionInfo] {
        &self.peer_regions
    }

    fn post_writes(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError> {
        self.check_ended()?;
        // Validate everything before sending anything.
        let mut cached: Option<Arc<crate::Region>> = None;
        for w in wrs {
            let r = match &cached {
                Some(r) if r.id() == w.local => r.clone(),
                _ => {
                    let r = self.regions.get(w.local).ok_or(TransportError::LocalRange {
                        region: w.local,
                        offset: 0,
                        len: 0,
                    })?;
                    cached = Some(r.clone());
                    r
                }
            };
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
            let wf = WriteFrame { wr_first: first, signaled, entries };
            let last = wf.wr_last();
            let mut head = std::mem::take(&mut self.head_buf);
            head.clear();
            head.extend_from_slice(&Frame::Write(wf).encode());
            let res = self.send_frame(stream, &head, &wrs[i..j]);
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
                return Ok(Some(m));
            }
            if let Some(e) = &st.ended {
                return Err(ended_error(e));
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    (d - now).min(Duration::from_millis(200))
                }
                None => Duration::from_millis(200),
            };
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
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
        }
        self.shared.cv.notify_all();
        for s in &self.streams {
            let mut g = s.sock.lock().unwrap_or_else(|e| e.into_inner());
            let _ = g.write_all(&Frame::Close { code: close_code::NORMAL, reason: String::new() }.encode());
            let _ = g.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
