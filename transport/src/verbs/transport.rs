//! [`VerbsTransport`]: the [`Transport`] implementation on one RC queue pair, and
//! [`VerbsListener`] for the accepting side. See the module doc of [`super`] for the design.

use crate::oob::{io_err, BoundListener};
use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod bytes;
mod urgent;

use super::ctrl::{self, MsgHeader, Setup, MSG_HEADER_LEN};
use super::device::{
    self, status, CompletionChannel, CompletionQueue, Context, Endpoint, MemoryRegion, MrAccess, PreparedQueuePair,
    ProtectionDomain, QpCaps, QueuePair, SendBatch, SendOp, Sge, VerbsError, WorkCompletion,
};
use super::events::{self, Verdict, Watched};
use super::registration::MrCache;
use super::{error_chain, CompletionMode, VerbsConfig};
use crate::auth::{self, HandshakeError, HandshakeParams, Secret};
use crate::gate::Admitted;
use crate::region::{Access, Region, RegionInfo, RegionTable};
use crate::window::SendWindow;
use crate::wire::{self, close_code, DecodeError, Frame, FrameType, Role, VerbsInfo};
use crate::{
    check_remote, ByteChannel, CoalesceConfig, Registration, Transport, TransportError, TransportKind, TransportStats,
    UrgentChannel, WriteRequest,
};

/// Offset of the credit word (the peer writes our consumed count here) in the control page.
const CREDIT_WORD: u64 = 0;
/// Offset of the local source of a non-inline credit return in the control page.
const CREDIT_SRC: u64 = 64;
/// Most receive credits a peer may grant (bounds our bookkeeping against a hostile VERBS).
const MAX_PEER_CREDITS: u32 = 1 << 16;
/// Longest chain handed to one ibv_post_send.
const MAX_CHAIN: usize = 64;
/// Busy-poll mode: how often the TCP socket is checked for the peer's EOF (and, in both modes,
/// the device's async event fd outside of `block`).
const PEER_CHECK_EVERY: Duration = Duration::from_millis(5);
/// Longest single sleep in event mode (so the TCP socket and deadlines are rechecked).
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// How long an error completion that a local failure may explain waits for that failure's
/// event (or port state) before it is reported on its own.
const DEVICE_GRACE: Duration = Duration::from_millis(250);
/// Bound on the drain of outstanding sends in `Drop`.
const DROP_DRAIN: Duration = Duration::from_secs(5);

fn verbs_err(e: VerbsError) -> TransportError {
    match e {
        VerbsError::Verb { op, source } => TransportError::Io { op, source },
        other => TransportError::Device(error_chain(&other)),
    }
}

/// Why the connection is unusable (sticky). Kept as data so every later call can report it.
#[derive(Debug, Clone)]
enum Broken {
    Completion { wr_id: u64, opcode: &'static str, status: u32, status_str: String },
    Disconnected(String),
    Aborted(String),
    Protocol(DecodeError),
    Fatal(String),
    DeviceEvent { event: &'static str, reason: String },
}

impl Broken {
    fn error(&self) -> TransportError {
        match self {
            Broken::Completion { wr_id, opcode, status, status_str } => {
                TransportError::Completion { wr_id: *wr_id, opcode, status: *status, status_str: status_str.clone() }
            }
            Broken::Disconnected(s) => TransportError::Disconnected(s.clone()),
            Broken::Aborted(s) => TransportError::PeerAborted(s.clone()),
            Broken::Protocol(d) => TransportError::Protocol(d.clone()),
            Broken::Fatal(s) => TransportError::Device(s.clone()),
            Broken::DeviceEvent { event, reason } => TransportError::DeviceEvent { event, reason: reason.clone() },
        }
    }
}

/// A registered buffer cut into equal slots (receive ring, send ring, control page).
#[derive(Debug)]
struct Ring {
    mr: MemoryRegion,
    slot: u32,
    count: u32,
}

impl Ring {
    fn new(pd: &Arc<ProtectionDomain>, count: u32, slot: u32, access: MrAccess) -> Result<Ring, TransportError> {
        let bytes = (count as u64 * slot as u64).div_ceil(4096).max(1) * 4096;
        // Not in any RegionTable: private to the transport. The id is unused.
        let mem = Region::anonymous(u32::MAX, bytes, 4096, Access::LOCAL).map_err(|e| {
            TransportError::Device(format!("allocating a {bytes}-byte buffer ring: {}", error_chain(&e)))
        })?;
        let mr = MemoryRegion::register(pd, Arc::new(mem), 0, bytes, access).map_err(verbs_err)?;
        Ok(Ring { mr, slot, count })
    }
    fn addr(&self, i: u32) -> u64 {
        debug_assert!(i < self.count);
        self.mr.addr() + i as u64 * self.slot as u64
    }
    fn ptr(&self, i: u32) -> *mut u8 {
        debug_assert!(i < self.count);
        // SAFETY: slot `i < count` lies inside the mapping (sized count × slot, rounded up).
        unsafe { self.mr.region().as_ptr().add(i as usize * self.slot as usize) }
    }
    fn bytes(&self) -> u64 {
        self.mr.len()
    }
}

/// What a send-queue entry was, for completion bookkeeping and error reports.
#[derive(Debug, Clone, Copy)]
enum SqKind {
    Write { id: u64 },
    Msg { slot: Option<u32> },
    Credit,
    Flush,
}

impl SqKind {
    fn opcode(&self) -> &'static str {
        match self {
            SqKind::Write { .. } => "RDMA_WRITE",
            SqKind::Msg { .. } => "SEND",
            SqKind::Credit => "RDMA_WRITE (credit return)",
            SqKind::Flush => "RDMA_WRITE (flush marker)",
        }
    }
}

/// Send-queue occupancy. Every WR gets a sequence number as its wr_id; completions are
/// cumulative, so a signaled completion of `seq` retires every entry `<= seq`.
#[derive(Debug)]
struct SendQueue {
    depth: u64,
    next: u64,
    completed: u64,
    last_signaled: u64,
    last_write_seq: u64,
    entries: VecDeque<(u64, SqKind)>,
    free_slots: Vec<u32>,
}

impl SendQueue {
    fn outstanding(&self) -> u64 {
        self.next - 1 - self.completed
    }
    fn has_room(&self, n: u64) -> bool {
        self.outstanding() + n <= self.depth
    }
    /// Signal at least every half queue, so a full queue always has a completion coming.
    fn must_signal(&self) -> bool {
        self.next - self.last_signaled >= (self.depth / 2).max(1)
    }
    fn push(&mut self, kind: SqKind, signaled: bool) -> u64 {
        let seq = self.next;
        self.next += 1;
        if signaled {
            self.last_signaled = seq;
        }
        if let SqKind::Write { .. } = kind {
            self.last_write_seq = seq;
        }
        self.entries.push_back((seq, kind));
        seq
    }
    fn kind_of(&self, seq: u64) -> Option<SqKind> {
        self.entries.iter().find(|(s, _)| *s == seq).map(|(_, k)| *k)
    }
}

/// Receive-side state.
#[derive(Debug, Default)]
struct RecvState {
    /// Completed receives not yet consumed: (slot, byte_len).
    arrived: VecDeque<(u32, u32)>,
    /// Fragments of a message being reassembled.
    partial: Vec<u8>,
    /// Receive buffers consumed and re-posted (what the credit word tells the peer).
    consumed: u64,
    /// Last consumed count written to the peer.
    reported: u64,
}

/// The peer's side of the credit scheme.
#[derive(Debug)]
struct PeerInfo {
    credits: u32,
    recv_buf: u32,
    credit_addr: u64,
    credit_rkey: u32,
}

/// Accepts verbs connections (the out-of-band TCP listener).
#[derive(Debug)]
pub struct VerbsListener {
    inner: BoundListener,
}

impl VerbsListener {
    /// Binds the out-of-band listening socket.
    pub fn bind(addr: impl ToSocketAddrs) -> Result<Self, TransportError> {
        Ok(VerbsListener { inner: BoundListener::bind(addr)? })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.inner.local_addr()
    }

    /// Accepts one session: authenticates its connections (the main queue pair's, and the
    /// urgent and byte-channel ones the connector asked for), exposes the remote-writable
    /// regions of `regions` (registered with the device, addr+rkey sent to the peer) and
    /// connects a queue pair on each. The session's shape is the connector's.
    pub fn accept(
        &self,
        cfg: &VerbsConfig,
        secret: &Secret,
        regions: &RegionTable,
    ) -> Result<VerbsTransport, TransportError> {
        self.accept_until(cfg, secret, regions, None)
    }

    /// [`accept`](Self::accept), giving up with [`TransportError::Timeout`] at `until`.
    pub fn accept_until(
        &self,
        cfg: &VerbsConfig,
        secret: &Secret,
        regions: &RegionTable,
        until: Option<Instant>,
    ) -> Result<VerbsTransport, TransportError> {
        let t0 = Instant::now();
        // Connections that fail to authenticate are logged and closed; the listener goes on.
        let mut gate = self.inner.gate(secret, &cfg.gate)?;
        let mut sessions = crate::SessionAssembler::new(cfg.gate.handshake_timeout + cfg.io_timeout);
        loop {
            if until.is_some_and(|u| Instant::now() >= u) {
                return Err(TransportError::Timeout(t0.elapsed(), "a session to accept"));
            }
            let deadline = match (sessions.next_expiry(), until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let admitted = gate.next(deadline)?;
            for e in sessions.expire(Instant::now()) {
                tracing::warn!(error = %e, "incomplete verbs session dropped");
            }
            let Some(a) = admitted else { continue };
            if let Some(streams) = sessions.offer(a)? {
                return VerbsTransport::from_admitted(cfg, streams, regions);
            }
        }
    }

    /// The gate of this listener, for a caller that assembles sessions itself (a daemon:
    /// [`crate::SessionAssembler`], then [`VerbsTransport::from_admitted`]).
    pub fn gate(&self, secret: &Secret, cfg: &crate::GateConfig) -> Result<crate::gate::Gate<'_>, TransportError> {
        self.inner.gate(secret, cfg)
    }
}

/// A connected verbs endpoint.
pub struct VerbsTransport {
    // Drop order matters: the QP goes first (in Drop::drop), then registrations, CQs, the
    // channel, the PD and the context. The Arcs inside the device wrappers enforce the same.
    qp: Option<QueuePair>,
    cache: MrCache,
    recv_ring: Ring,
    send_ring: Ring,
    ctrl: Ring,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    channel: Option<Arc<CompletionChannel>>,
    _pd: Arc<ProtectionDomain>,
    ctx: Arc<Context>,
    sock: TcpStream,
    cfg: VerbsConfig,
    peer: String,
    peer_regions: Vec<RegionInfo>,
    regions: RegionTable,
    remote: PeerInfo,
    max_sge: u32,
    max_inline: u32,
    window: SendWindow,
    sq: SendQueue,
    rx: RecvState,
    stats: TransportStats,
    broken: Option<Broken>,
    /// SENDs posted (message fragments): what the peer's credit word is compared with.
    sends_posted: u64,
    batch: SendBatch,
    sges: Vec<Sge>,
    wcs: Vec<WorkCompletion>,
    last_peer_check: Instant,
    last_event_check: Instant,
    /// The session's urgent queue pair (a connection of its own), when asked for.
    urgent: Option<Arc<urgent::VerbsUrgent>>,
    /// The session's byte-channel connections, until taken.
    byte_conns: Vec<Option<VerbsTransport>>,
}

impl std::fmt::Debug for VerbsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTransport")
            .field("peer", &self.peer)
            .field("device", &self.ctx)
            .field("qp", &self.qp)
            .field("stats", &self.stats)
            .field("broken", &self.broken)
            .finish()
    }
}

fn tune(s: &TcpStream, timeout: Duration) -> Result<(), TransportError> {
    s.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
    s.set_read_timeout(Some(timeout)).map_err(io_err("setting the read timeout"))?;
    s.set_write_timeout(Some(timeout)).map_err(io_err("setting the write timeout"))?;
    // The socket is the liveness channel of the connection: a vanished host must show up.
    crate::oob::keepalive(s, timeout)
}

fn expect_frame(s: &mut TcpStream, peer: &str, kind: FrameType, what: &'static str) -> Result<Frame, TransportError> {
    let f = auth::read_frame(s).map_err(|e| match e {
        HandshakeError::Io(e) => {
            TransportError::Disconnected(format!("{peer} closed the connection during verbs setup: {e}"))
        }
        HandshakeError::Protocol(d) => TransportError::Protocol(d),
        other => TransportError::Handshake { peer: peer.to_owned(), source: other },
    })?;
    match f {
        Frame::Close { code, reason } if code == close_code::NORMAL => {
            Err(TransportError::Disconnected(format!("{peer} closed the connection during verbs setup: {reason}")))
        }
        Frame::Close { reason, .. } => Err(TransportError::PeerAborted(reason)),
        f if f.kind() == kind => Ok(f),
        f => Err(TransportError::Protocol(DecodeError::Unexpected { got: f.kind(), expected: what })),
    }
}

impl VerbsTransport {
    /// Connects to a [`VerbsListener`] at `addr`: authenticates, exchanges region tables and
    /// queue-pair endpoints over TCP, and connects an RC queue pair — one for the bulk
    /// transport, one more for the urgent channel when [`VerbsConfig::urgent_channel`] is
    /// set, and one per byte channel ([`VerbsConfig::byte_streams`]), each with its own
    /// authenticated out-of-band connection, all bound to one session.
    pub fn connect(
        addr: impl ToSocketAddrs,
        cfg: &VerbsConfig,
        secret: &Secret,
        regions: &RegionTable,
    ) -> Result<VerbsTransport, TransportError> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(io_err("resolving the peer address"))?.collect();
        let target =
            *addrs.first().ok_or_else(|| TransportError::Disconnected("address resolved to nothing".into()))?;
        if cfg.byte_streams > wire::MAX_BYTE_STREAMS {
            return Err(TransportError::TooLarge(format!(
                "{} byte-stream channels (at most {})",
                cfg.byte_streams,
                wire::MAX_BYTE_STREAMS
            )));
        }
        let mut session = [0u8; 8];
        getrandom::getrandom(&mut session)
            .map_err(|e| io_err("drawing a session id")(std::io::Error::other(e.to_string())))?;
        let n = 1 + cfg.urgent_channel as u8 + cfg.byte_streams;
        let flags = if cfg.urgent_channel { wire::HELLO_URGENT_STREAM } else { 0 };
        // Every connection authenticates first; the acceptor assembles the whole session
        // before it sets up any queue pair.
        let mut socks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let s = TcpStream::connect_timeout(&target, cfg.io_timeout).map_err(io_err("connecting"))?;
            let timeout = cfg.gate.handshake_timeout + cfg.io_timeout;
            let (s, conn_secret) = match &cfg.gate.tls {
                Some(t) => crate::tls::wrap(s, t, Some(&target.ip().to_string()), secret, Instant::now() + timeout)?,
                None => (s, secret.clone()),
            };
            tune(&s, cfg.io_timeout)?;
            let params = HandshakeParams {
                role: Role::Connector,
                stream: i,
                streams: n,
                flags,
                byte_streams: cfg.byte_streams,
                session: u64::from_le_bytes(session),
                exposed: Vec::new(),
            };
            crate::gate::authenticate_within(&s, &conn_secret, &params, timeout)
                .map_err(|source| TransportError::Handshake { peer: target.to_string(), source })?;
            socks.push(s);
        }
        Self::session(socks, target.to_string(), cfg, cfg.urgent_channel, cfg.byte_streams, regions)
    }

    /// Starts a session from its authenticated connections ([`crate::SessionAssembler::offer`]),
    /// in the shape the connector asked for.
    pub fn from_admitted(
        cfg: &VerbsConfig,
        streams: Vec<Admitted>,
        regions: &RegionTable,
    ) -> Result<VerbsTransport, TransportError> {
        let first = streams.first().ok_or_else(|| TransportError::Disconnected("a session without streams".into()))?;
        let hello = first.auth.peer;
        let peer = first.addr.to_string();
        let urgent = hello.flags & wire::HELLO_URGENT_STREAM != 0;
        if streams.len() != 1 + urgent as usize + hello.byte_streams as usize {
            let reason = format!(
                "a verbs session has one bulk connection; {} connections with{} an urgent channel and {} byte channels",
                streams.len(),
                if urgent { "" } else { "out" },
                hello.byte_streams
            );
            for a in streams {
                let mut s = a.stream;
                let _ = auth::write_frame(&mut s, &Frame::Close { code: close_code::REFUSED, reason: reason.clone() });
            }
            return Err(TransportError::Protocol(DecodeError::Invalid {
                field: "verbs session connections",
                value: hello.streams as u64,
            }));
        }
        let socks = streams
            .into_iter()
            .map(|a| tune(&a.stream, cfg.io_timeout).map(|_| a.stream))
            .collect::<Result<Vec<_>, _>>()?;
        Self::session(socks, peer, cfg, urgent, hello.byte_streams, regions)
    }

    /// Sets up the queue pairs of a session over its authenticated connections, in order:
    /// bulk, urgent (if any), byte channels. Both ends walk the same order.
    fn session(
        socks: Vec<TcpStream>,
        peer: String,
        cfg: &VerbsConfig,
        urgent: bool,
        byte_streams: u8,
        regions: &RegionTable,
    ) -> Result<VerbsTransport, TransportError> {
        let mut it = socks.into_iter();
        let first = it.next().ok_or_else(|| TransportError::Disconnected("a session without streams".into()))?;
        let mut main = Self::establish(first, peer.clone(), cfg, regions)?;
        if urgent {
            let s = it.next().ok_or_else(|| TransportError::Disconnected("the urgent connection is missing".into()))?;
            // Registered like the bulk connection (pin-all pins every region a second time):
            // registering on first use instead would pin pages in the middle of a post-copy,
            // where a source page still write-protected by a synchronous userfaultfd tracker
            // that has stopped would block the registration for good.
            let u = Self::establish(s, peer.clone(), cfg, regions)?;
            main.urgent = Some(Arc::new(urgent::VerbsUrgent::new(u)));
        }
        let bcfg = bytes::channel_config(cfg);
        let none = RegionTable::new();
        for s in it.take(byte_streams as usize) {
            main.byte_conns.push(Some(Self::establish(s, peer.clone(), &bcfg, &none)?));
        }
        Ok(main)
    }

    /// Sets up one authenticated connection: registers memory, exchanges the region tables,
    /// connects the queue pair.
    fn establish(
        mut sock: TcpStream,
        peer: String,
        cfg: &VerbsConfig,
        regions: &RegionTable,
    ) -> Result<VerbsTransport, TransportError> {
        sock.set_read_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the read timeout"))?;
        sock.set_write_timeout(Some(cfg.io_timeout)).map_err(io_err("setting the write timeout"))?;
        let local = match LocalSetup::new(cfg, regions) {
            Ok(l) => l,
            Err(e) => {
                // Tell the peer why instead of just dropping the socket.
                let _ = auth::write_frame(
                    &mut sock,
                    &Frame::Close {
                        code: close_code::REFUSED,
                        reason: format!("verbs setup failed: {}", error_chain(&e)),
                    },
                );
                return Err(e);
            }
        };
        let peer_regions = auth::exchange_regions(&mut sock, &local.exposed)
            .map_err(|source| TransportError::Handshake { peer: peer.clone(), source })?;

        let ep = local.qp.endpoint();
        let info = VerbsInfo {
            qpn: ep.qpn,
            psn: ep.psn,
            lid: ep.lid,
            mtu: ep.mtu,
            gid_index: ep.gid_index,
            gid: ep.gid,
            max_sge: local.max_sge,
            credits: local.recv_ring.count,
        };
        auth::write_frame(&mut sock, &Frame::Verbs(info)).map_err(io_err("sending the VERBS frame"))?;
        let Frame::Verbs(theirs) = expect_frame(&mut sock, &peer, FrameType::Verbs, "VERBS")? else {
            unreachable!("kind checked")
        };
        if theirs.credits == 0 || theirs.credits > MAX_PEER_CREDITS {
            return Err(TransportError::Protocol(DecodeError::Invalid {
                field: "verbs credits",
                value: theirs.credits as u64,
            }));
        }
        let remote_ep = Endpoint {
            qpn: theirs.qpn,
            psn: theirs.psn,
            lid: theirs.lid,
            gid: theirs.gid,
            gid_index: theirs.gid_index,
            mtu: theirs.mtu,
        };
        let qp = local.qp.connect(remote_ep).map_err(verbs_err)?;

        // RTS reached: send our setup blob (credit word, buffer size); the peer's blob tells us
        // its QP is in RTS too.
        let setup = Setup {
            credit_addr: local.ctrl.addr(0) + CREDIT_WORD,
            credit_rkey: local.ctrl.mr.rkey(),
            recv_buf: local.recv_ring.slot,
        };
        auth::write_frame(&mut sock, &Frame::Msg(setup.encode().to_vec()))
            .map_err(io_err("sending the verbs setup"))?;
        let Frame::Msg(blob) = expect_frame(&mut sock, &peer, FrameType::Msg, "verbs setup MSG")? else {
            unreachable!("kind checked")
        };
        let Setup { credit_addr, credit_rkey, recv_buf } = Setup::decode(&blob)?;

        tracing::debug!(
            %peer, device = local.ctx.name(), qpn = ep.qpn, remote_qpn = theirs.qpn,
            path_mtu = device::mtu_bytes(qp.path_mtu()), credits = theirs.credits, "verbs connection established"
        );
        let caps = qp.caps();
        let depth = local.sq_depth as u64;
        let free_slots = (0..local.send_ring.count).rev().collect();
        Ok(VerbsTransport {
            qp: Some(qp),
            cache: local.cache,
            recv_ring: local.recv_ring,
            send_ring: local.send_ring,
            ctrl: local.ctrl,
            send_cq: local.send_cq,
            recv_cq: local.recv_cq,
            channel: local.channel,
            _pd: local.pd,
            ctx: local.ctx,
            sock,
            cfg: cfg.clone(),
            peer,
            peer_regions,
            regions: regions.clone(),
            remote: PeerInfo { credits: theirs.credits, recv_buf, credit_addr, credit_rkey },
            max_sge: caps.max_send_sge.min(local.max_sge).max(1),
            max_inline: caps.max_inline,
            window: SendWindow::new(cfg.window),
            sq: SendQueue {
                depth,
                next: 1,
                completed: 0,
                last_signaled: 0,
                last_write_seq: 0,
                entries: VecDeque::new(),
                free_slots,
            },
            rx: RecvState::default(),
            stats: TransportStats::default(),
            broken: None,
            sends_posted: 0,
            batch: SendBatch::new(),
            sges: Vec::new(),
            wcs: Vec::with_capacity(64),
            last_peer_check: Instant::now(),
            // Events queued during the setup (e.g. a port that went down meanwhile) are read
            // by the first call.
            last_event_check: Instant::now().checked_sub(PEER_CHECK_EVERY).unwrap_or_else(Instant::now),
            urgent: None,
            byte_conns: Vec::new(),
        })
    }

    /// Peer address (of the out-of-band socket).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Device name, port and GID index in use.
    pub fn device(&self) -> (&str, u8, u8) {
        (self.ctx.name(), self.ctx.port(), self.ctx.gid_index())
    }

    /// Path MTU in bytes.
    pub fn path_mtu(&self) -> u32 {
        self.qp.as_ref().map_or(0, |q| device::mtu_bytes(q.path_mtu()))
    }

    /// Scatter-gather elements allowed per write.
    pub fn max_sge(&self) -> u32 {
        self.max_sge
    }

    /// Bytes currently pinned (registered) by this connection.
    pub fn pinned_bytes(&self) -> u64 {
        self.cache.pinned()
    }

    /// Chunks registered on demand so far.
    pub fn registered_chunks(&self) -> usize {
        self.cache.chunk_count()
    }

    /// Adapts a coalescer configuration to this connection: at most `max_sge` elements per
    /// work request, elements cut at the registration chunk size (on-demand mode), writes no
    /// larger than the port's message limit.
    pub fn coalesce_config(&self, mut c: CoalesceConfig) -> CoalesceConfig {
        c.max_sges = c.max_sges.min(self.max_sge).max(1);
        let b = self.cfg.sge_boundary();
        if b != 0 {
            c.sge_boundary = b;
        }
        let max_msg = self.ctx.limits().max_msg_sz as u64;
        if max_msg != 0 {
            c.max_write_bytes =
                c.max_write_bytes.min(max_msg / c.page_size as u64 * c.page_size as u64).max(c.page_size as u64);
        }
        c
    }

    fn qp(&self) -> &QueuePair {
        self.qp.as_ref().expect("the QP lives until drop")
    }

    fn usable(&self) -> Result<(), TransportError> {
        match &self.broken {
            Some(b) => Err(b.error()),
            None => Ok(()),
        }
    }

    /// Fails when a device event broke the connection (even with nothing outstanding: the
    /// device itself is gone, unlike a peer that closed after the last completion).
    fn device_ok(&self) -> Result<(), TransportError> {
        match &self.broken {
            Some(b @ Broken::DeviceEvent { .. }) => Err(b.error()),
            _ => Ok(()),
        }
    }

    fn set_broken(&mut self, b: Broken) {
        if self.broken.is_none() {
            tracing::debug!(peer = %self.peer, reason = ?b, "verbs connection broken");
            self.broken = Some(b);
        }
    }

    /// Credits the peer has granted and we have not used.
    fn credits_available(&self) -> u64 {
        // SAFETY: CREDIT_WORD is an aligned 8-byte slot inside the control page, which stays
        // mapped for our lifetime. The peer's NIC writes it by RDMA; a volatile read plus an
        // acquire fence observes the latest value, and a monotonic counter tolerates staleness.
        let consumed = unsafe { std::ptr::read_volatile(self.ctrl.ptr(0).add(CREDIT_WORD as usize) as *const u64) };
        fence(Ordering::Acquire);
        let sent = self.sends_posted;
        let consumed = consumed.min(sent); // a lying peer cannot make us overrun it
        (self.remote.credits as u64).saturating_sub(sent - consumed)
    }

    // ---- send queue -------------------------------------------------------------------

    /// Hands the pending chain to the device.
    fn post_batch(&mut self) -> Result<(), TransportError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let qp = self.qp.as_ref().expect("the QP lives until drop");
        // Non-inline SGEs come from `MrCache::sges` or our rings: those MRs (and the mappings
        // they hold) live in `self` until after the QP is destroyed, and the cache never
        // deregisters while the connection lives. Inline SGEs point to caller buffers alive
        // for this call (messages and credits post at once).
        // SAFETY: every SGE of the batch is valid until the device has read it (above).
        let r = unsafe { qp.post_send(&mut self.batch) };
        if let Err(e) = r {
            let msg = error_chain(&e);
            self.set_broken(Broken::Fatal(msg.clone()));
            return Err(TransportError::Io { op: "ibv_post_send", source: e.source });
        }
        Ok(())
    }

    fn push_wr(&mut self, kind: SqKind, op: SendOp, sges: &[Sge], signaled: bool, inline: bool) -> u64 {
        let signaled = signaled || self.sq.must_signal();
        let seq = self.sq.push(kind, signaled);
        self.batch.push(seq, op, sges, signaled, inline);
        if signaled && matches!(kind, SqKind::Write { .. } | SqKind::Flush) {
            self.stats.signaled += 1;
        }
        seq
    }

    fn retire(&mut self, seq: u64) {
        let mut upto_write = 0;
        while let Some(&(s, k)) = self.sq.entries.front() {
            if s > seq {
                break;
            }
            self.sq.entries.pop_front();
            match k {
                SqKind::Write { id } => upto_write = id,
                SqKind::Msg { slot: Some(slot) } => self.sq.free_slots.push(slot),
                _ => {}
            }
        }
        self.sq.completed = self.sq.completed.max(seq);
        if upto_write > self.window.completed() {
            self.window.on_complete(upto_write);
            self.stats.writes_completed = self.window.completed();
        }
    }

    fn classify(&mut self, wc: &WorkCompletion, kind: Option<SqKind>) -> Broken {
        let status_str = device::wc_status_str(wc.status);
        let opcode = kind.map_or(if wc.opcode >= 128 { "RECV" } else { "unknown" }, |k| k.opcode());
        let wr_id = match kind {
            Some(SqKind::Write { id }) => id,
            _ => wc.wr_id,
        };
        let what = format!("work request {wr_id} ({opcode}) completed with {status_str} (status {})", wc.status);
        // A device event (port down, QP fatal, ...) is the cause of whatever completes in error
        // after it: report the event, not its consequence.
        self.check_events(true);
        if let Some(b @ Broken::DeviceEvent { .. }) = &self.broken {
            return b.clone();
        }
        self.check_peer(true);
        let gone = matches!(self.broken, Some(Broken::Disconnected(_) | Broken::Aborted(_)));
        if gone {
            return self.broken.clone().expect("set above");
        }
        if status::may_have_a_device_cause(wc.status) {
            if let Some(b) = self.device_cause(&what) {
                return b;
            }
        }
        match wc.status {
            status::RETRY_EXC_ERR | status::RNR_RETRY_EXC_ERR => {
                Broken::Disconnected(format!("{} stopped responding: {what}", self.peer))
            }
            status::WR_FLUSH_ERR => {
                Broken::Disconnected(format!("the queue pair to {} entered the error state: {what}", self.peer))
            }
            _ => Broken::Completion { wr_id, opcode, status: wc.status, status_str },
        }
    }

    /// Polls both CQs once (until empty); records completions and errors.
    fn poll_cqs(&mut self) -> Result<usize, TransportError> {
        let mut total = 0;
        let mut wcs = std::mem::take(&mut self.wcs);
        loop {
            wcs.clear();
            let n = self.send_cq.poll(&mut wcs).map_err(verbs_err)?;
            total += n;
            for wc in &wcs {
                if wc.ok() {
                    self.retire(wc.wr_id);
                } else if self.broken.is_none() {
                    let kind = self.sq.kind_of(wc.wr_id);
                    let b = self.classify(wc, kind);
                    self.set_broken(b);
                }
            }
            if n < 32 {
                break;
            }
        }
        loop {
            wcs.clear();
            let n = self.recv_cq.poll(&mut wcs).map_err(verbs_err)?;
            total += n;
            for wc in &wcs {
                if wc.ok() && wc.wr_id < self.recv_ring.count as u64 {
                    self.rx.arrived.push_back((wc.wr_id as u32, wc.byte_len));
                } else if self.broken.is_none() {
                    let b = self.classify(wc, None);
                    self.set_broken(b);
                }
            }
            if n < 32 {
                break;
            }
        }
        self.wcs = wcs;
        Ok(total)
    }

    /// Looks at the out-of-band socket without blocking: EOF or CLOSE means the peer is gone.
    fn check_peer(&mut self, force: bool) {
        if matches!(self.broken, Some(Broken::Disconnected(_) | Broken::Aborted(_))) {
            return;
        }
        if !force && self.last_peer_check.elapsed() < PEER_CHECK_EVERY {
            return;
        }
        self.last_peer_check = Instant::now();
        let mut b = [0u8; 1];
        // SAFETY: the socket is open; `b` is a valid 1-byte buffer; MSG_PEEK leaves the data.
        let n =
            unsafe { libc::recv(self.sock.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        let gone = match n {
            0 => Some(Broken::Disconnected(format!("{} closed the connection without CLOSE", self.peer))),
            n if n > 0 => match auth::read_frame(&mut self.sock) {
                Ok(Frame::Close { code, reason }) if code == close_code::NORMAL => Some(Broken::Disconnected(format!(
                    "{} closed the connection{}",
                    self.peer,
                    if reason.is_empty() { String::new() } else { format!(": {reason}") }
                ))),
                Ok(Frame::Close { reason, .. }) => Some(Broken::Aborted(reason)),
                Ok(other) => Some(Broken::Protocol(DecodeError::Unexpected { got: other.kind(), expected: "CLOSE" })),
                Err(HandshakeError::Protocol(d)) => Some(Broken::Protocol(d)),
                Err(e) => Some(Broken::Disconnected(format!("{}: {}", self.peer, error_chain(&e)))),
            },
            _ => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
                    _ => Some(Broken::Disconnected(format!("{}: {e}", self.peer))),
                }
            }
        };
        if let Some(g) = gone {
            // The peer being gone explains any error completion seen afterwards; but an error
            // completion recorded earlier keeps its precise status.
            self.set_broken(g);
        }
    }

    /// Reads the device's queued asynchronous events without blocking (each is acknowledged
    /// as it is read): one that concerns this connection breaks it, the others are logged.
    /// Rate-limited to one look per [`PEER_CHECK_EVERY`] unless `force`.
    fn check_events(&mut self, force: bool) {
        if !force && self.last_event_check.elapsed() < PEER_CHECK_EVERY {
            return;
        }
        self.last_event_check = Instant::now();
        let Some(qp) = self.qp.as_ref() else { return };
        let ctx = self.ctx.clone();
        let cqs = [(self.send_cq.handle(), "send"), (self.recv_cq.handle(), "receive")];
        let w = Watched { device: ctx.name(), port: ctx.port(), qp: (qp.handle(), qp.local().qpn), cqs: &cqs };
        loop {
            match ctx.next_async_event() {
                Ok(None) => break,
                Ok(Some(ev)) => match events::classify(&ev, &w) {
                    Verdict::Fatal(reason) => {
                        tracing::warn!(peer = %self.peer, event = ev.name(), %reason, "RDMA device event: connection broken");
                        self.set_broken(Broken::DeviceEvent { event: ev.name(), reason });
                    }
                    Verdict::Ignore(note) => {
                        tracing::debug!(peer = %self.peer, event = ev.name(), "RDMA device event ignored: {note}");
                    }
                },
                Err(e) => {
                    // Not EAGAIN: the event channel itself failed, the device is unusable.
                    let msg = format!("reading the asynchronous events of {}: {}", ctx.name(), error_chain(&e));
                    self.set_broken(Broken::Fatal(msg));
                    break;
                }
            }
        }
    }

    /// On an error completion that a local port or device failure may have caused: looks
    /// for that cause for up to [`DEVICE_GRACE`] — a fatal event, or our port no longer
    /// ACTIVE. The failure can show on the queue before its event is delivered: e.g. rxe on a
    /// netdev being set down fails sends once the routes are flushed, and only then do the
    /// netdev notifiers mark the port down and queue PORT_ERR. Blocks only on this terminal
    /// path.
    fn device_cause(&mut self, what: &str) -> Option<Broken> {
        let deadline = Instant::now() + DEVICE_GRACE;
        loop {
            self.check_events(true);
            if let Some(b @ Broken::DeviceEvent { .. }) = &self.broken {
                return Some(b.clone());
            }
            if let Ok(state) = self.ctx.port_state() {
                if state != device::PORT_ACTIVE {
                    let reason = format!(
                        "port {} of {} is {}; {what}",
                        self.ctx.port(),
                        self.ctx.name(),
                        device::port_state_str(state)
                    );
                    return Some(Broken::DeviceEvent {
                        event: events::event_name(events::event_type::PORT_ERR),
                        reason,
                    });
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(PEER_CHECK_EVERY);
        }
    }

    /// Makes progress without blocking.
    fn progress(&mut self) -> Result<(), TransportError> {
        self.check_events(false);
        self.poll_cqs()?;
        self.check_peer(false);
        Ok(())
    }

    /// Sleeps until a completion, socket activity or `deadline` (at most MAX_SLEEP).
    fn block(&mut self, deadline: Option<Instant>) -> Result<(), TransportError> {
        let Some(mut fds) = self.prepare_wait()? else { return Ok(()) };
        if fds.is_empty() {
            std::thread::yield_now();
            return Ok(());
        }
        let mut sleep = MAX_SLEEP;
        if let Some(d) = deadline {
            sleep = sleep.min(d.saturating_duration_since(Instant::now()));
        }
        poll_fds(&mut fds, sleep)?;
        self.after_wait(&fds)
    }

    /// Gets ready to sleep: in event mode arms both CQs and returns the descriptors to wait
    /// on (completion channel, out-of-band socket, async events; the caller may append its
    /// own), or `None` when completions arrived meanwhile (look again instead of sleeping).
    /// Busy-poll mode returns no descriptors (spin instead). The wait itself needs no access
    /// to the transport, so a caller may release a lock around it.
    fn prepare_wait(&mut self) -> Result<Option<Vec<libc::pollfd>>, TransportError> {
        match (self.cfg.completion, &self.channel) {
            (CompletionMode::Event, Some(ch)) => {
                let ch = ch.fd();
                self.send_cq.arm().map_err(verbs_err)?;
                self.recv_cq.arm().map_err(verbs_err)?;
                // A completion that arrived before arming raises no event: look once more.
                if self.poll_cqs()? > 0 {
                    return Ok(None);
                }
                Ok(Some(vec![
                    libc::pollfd { fd: ch, events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: self.ctx.async_fd(), events: libc::POLLIN, revents: 0 },
                ]))
            }
            _ => Ok(Some(Vec::new())),
        }
    }

    /// Handles what woke a wait prepared by [`Self::prepare_wait`] (its first three entries).
    fn after_wait(&mut self, fds: &[libc::pollfd]) -> Result<(), TransportError> {
        if fds.len() < 3 {
            return Ok(());
        }
        if fds[0].revents != 0 {
            if let Some(ch) = &self.channel {
                ch.drain_events().map_err(verbs_err)?;
            }
        }
        if fds[1].revents != 0 {
            self.check_peer(true);
        }
        if fds[2].revents != 0 {
            self.check_events(true);
        }
        Ok(())
    }

    /// Waits until every send-queue entry posted so far has completed (a signaled flush
    /// marker is added when the tail is unsignaled): a SEND that completed is in the peer's
    /// receive queue, so whatever the peer reads on another queue pair afterwards comes after it.
    fn settle_sends(&mut self) -> Result<(), TransportError> {
        self.post_batch()?;
        if self.sq.outstanding() == 0 {
            return Ok(());
        }
        if self.sq.last_signaled + 1 < self.sq.next {
            self.sq_room(1)?;
            let op = SendOp::Write { remote_addr: self.remote.credit_addr, rkey: self.remote.credit_rkey };
            self.push_wr(SqKind::Flush, op, &[], true, false);
            self.post_batch()?;
        }
        self.wait_until("send completions", |t| t.sq.outstanding() == 0)
    }

    /// Announces regions exposed after the handshake (one SEND, ordered before every later one).
    fn announce(&mut self, infos: &[RegionInfo]) -> Result<(), TransportError> {
        self.progress()?;
        self.usable()?;
        let payload = ctrl::encode_announcement(infos);
        if MSG_HEADER_LEN + payload.len() > self.remote.recv_buf.min(self.send_ring.slot) as usize {
            return Err(TransportError::TooLarge(format!(
                "announcing {} regions takes {} bytes, more than one message buffer",
                infos.len(),
                payload.len()
            )));
        }
        let hdr = MsgHeader {
            announce: true,
            more: false,
            len: payload.len() as u32,
            bytes_written: self.stats.bytes_posted,
        };
        self.send_fragment(hdr, &payload)
    }

    /// Adds regions the peer announced: new ids only (an id is never redefined), at most
    /// `wire::MAX_REGIONS` in all.
    fn add_peer_regions(&mut self, rs: Vec<RegionInfo>) -> Result<(), DecodeError> {
        let clash = rs
            .iter()
            .enumerate()
            .find(|(i, r)| self.peer_regions.iter().any(|p| p.id == r.id) || rs[..*i].iter().any(|o| o.id == r.id));
        if let Some((_, r)) = clash {
            return Err(DecodeError::Invalid { field: "announced region id (already exposed)", value: r.id as u64 });
        }
        if self.peer_regions.len() + rs.len() > wire::MAX_REGIONS as usize {
            return Err(DecodeError::TooLong {
                kind: FrameType::Regions,
                len: rs.len() as u64,
                max: wire::MAX_REGIONS as u64,
            });
        }
        self.peer_regions.extend(rs);
        Ok(())
    }

    /// Waits until `done` holds. Errors: the connection broke, or `what` did not happen within
    /// `io_timeout`.
    fn wait_until(
        &mut self,
        what: &'static str,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), TransportError> {
        let limit = self.cfg.io_timeout;
        let deadline = Instant::now() + limit;
        loop {
            self.progress()?;
            if done(self) {
                return Ok(());
            }
            self.usable()?;
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout(limit, what));
            }
            // Never sleep while owing the peer credits: it may be waiting for them.
            self.return_credits(true)?;
            self.block(Some(deadline))?;
        }
    }

    /// Waits for room for `n` more send-queue entries (posting the pending chain first).
    fn sq_room(&mut self, n: u64) -> Result<(), TransportError> {
        if self.sq.has_room(n) {
            return Ok(());
        }
        self.post_batch()?;
        self.wait_until("send queue space", |t| t.sq.has_room(n))
    }

    // ---- credits ----------------------------------------------------------------------

    /// Writes our consumed count into the peer's credit word when half the ring is owed
    /// (or any is owed and `force`).
    fn return_credits(&mut self, force: bool) -> Result<(), TransportError> {
        let owed = self.rx.consumed - self.rx.reported;
        let threshold = (self.recv_ring.count as u64 / 2).max(1);
        if owed == 0 || (!force && owed < threshold) || self.broken.is_some() || !self.sq.has_room(1) {
            return Ok(());
        }
        self.post_batch()?;
        let value = self.rx.consumed;
        let op = SendOp::Write { remote_addr: self.remote.credit_addr, rkey: self.remote.credit_rkey };
        let bytes = value.to_le_bytes();
        if self.max_inline >= 8 {
            let sge = Sge { addr: bytes.as_ptr() as u64, len: 8, lkey: 0 };
            self.push_wr(SqKind::Credit, op, &[sge], false, true);
        } else {
            // No inline support: send from the control page. Only a newer (larger) value can
            // replace it before the device reads it, which is still a valid credit count.
            let src = self.ctrl.ptr(0).wrapping_add(CREDIT_SRC as usize);
            // SAFETY: CREDIT_SRC..+8 lies inside the control page; aligned u64 store.
            unsafe { std::ptr::write_volatile(src as *mut u64, value) };
            let sge = Sge { addr: self.ctrl.addr(0) + CREDIT_SRC, len: 8, lkey: self.ctrl.mr.lkey() };
            self.push_wr(SqKind::Credit, op, &[sge], false, false);
        }
        // Post now: an inline source (`bytes`) must be alive during the post.
        self.post_batch()?;
        self.rx.reported = value;
        Ok(())
    }

    // ---- receive ----------------------------------------------------------------------

    fn repost(&mut self, slot: u32) -> Result<(), TransportError> {
        if self.broken.is_some() {
            return Ok(()); // the QP is in error; the buffer would be flushed at once
        }
        let (addr, len, lkey) = (self.recv_ring.addr(slot), self.recv_ring.slot, self.recv_ring.mr.lkey());
        // SAFETY: the slot lies inside the receive ring's registration (local write); the ring
        // outlives the QP (field order + Drop), and we do not touch the slot again until its
        // next receive completion.
        unsafe { self.qp().post_recv(slot as u64, addr, len, lkey) }.map_err(verbs_err)
    }

    /// Consumes arrived fragments; returns a whole message once its last fragment is in.
    fn try_assemble(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        while let Some((slot, len)) = self.rx.arrived.pop_front() {
            if len as usize > self.recv_ring.slot as usize {
                let d = DecodeError::Invalid { field: "verbs message size", value: len as u64 };
                self.set_broken(Broken::Protocol(d.clone()));
                return Err(TransportError::Protocol(d));
            }
            // SAFETY: the receive into `slot` completed (we polled its completion) and the slot
            // is re-posted only below, after the copy; `len` is within the slot (checked).
            let buf = unsafe { std::slice::from_raw_parts(self.recv_ring.ptr(slot), len as usize) };
            let h = match MsgHeader::decode(buf) {
                Ok(h) => h,
                Err(d) => {
                    self.set_broken(Broken::Protocol(d.clone()));
                    return Err(TransportError::Protocol(d));
                }
            };
            if h.announce {
                let res = if self.rx.partial.is_empty() {
                    ctrl::decode_announcement(&buf[MSG_HEADER_LEN..]).and_then(|rs| self.add_peer_regions(rs))
                } else {
                    Err(DecodeError::Invalid { field: "region announcement inside a message", value: h.len as u64 })
                };
                if let Err(d) = res {
                    self.set_broken(Broken::Protocol(d.clone()));
                    return Err(TransportError::Protocol(d));
                }
                self.repost(slot)?;
                self.rx.consumed += 1;
                self.stats.bytes_received = self.stats.bytes_received.max(h.bytes_written);
                self.return_credits(false)?;
                continue;
            }
            if self.rx.partial.len() + h.len as usize > wire::MAX_MESSAGE as usize {
                let d = DecodeError::TooLong {
                    kind: FrameType::Msg,
                    len: (self.rx.partial.len() + h.len as usize) as u64,
                    max: wire::MAX_MESSAGE as u64,
                };
                self.set_broken(Broken::Protocol(d.clone()));
                return Err(TransportError::Protocol(d));
            }
            self.rx.partial.extend_from_slice(&buf[MSG_HEADER_LEN..]);
            self.repost(slot)?;
            self.rx.consumed += 1;
            self.stats.bytes_received = self.stats.bytes_received.max(h.bytes_written);
            self.return_credits(false)?;
            if !h.more {
                self.stats.messages_received += 1;
                return Ok(Some(std::mem::take(&mut self.rx.partial)));
            }
        }
        Ok(None)
    }

    // ---- writes -----------------------------------------------------------------------

    fn post_writes_impl(&mut self, wrs: &[WriteRequest<'_>], check_peer_table: bool) -> Result<u64, TransportError> {
        self.progress()?;
        self.usable()?;
        // Validate and map everything before posting anything.
        let max_msg = self.ctx.limits().max_msg_sz as u64;
        let mut targets = Vec::with_capacity(wrs.len());
        let mut sges = std::mem::take(&mut self.sges);
        sges.clear();
        let mut ranges = Vec::with_capacity(wrs.len());
        let res = (|| {
            for w in wrs {
                let bytes = w.bytes();
                if max_msg != 0 && bytes > max_msg {
                    return Err(TransportError::TooLarge(format!(
                        "{bytes}-byte write exceeds the port's message limit {max_msg}"
                    )));
                }
                let (addr, rkey) = if check_peer_table {
                    let r = check_remote(&self.peer_regions, w.remote, w.remote_offset, bytes)?;
                    (r.addr + w.remote_offset, r.rkey)
                } else {
                    // Test-only: no bounds check, so the responder's access check is exercised.
                    let r = self.peer_regions.iter().find(|r| r.id == w.remote).ok_or(TransportError::RemoteRange {
                        region: w.remote,
                        offset: w.remote_offset,
                        len: bytes,
                    })?;
                    (r.addr.wrapping_add(w.remote_offset), r.rkey)
                };
                targets.push((addr, rkey));
                let start = sges.len();
                for s in w.segments {
                    self.cache.sges(w.local, *s, &mut sges)?;
                }
                let n = sges.len() - start;
                if n > self.max_sge as usize {
                    return Err(TransportError::TooLarge(format!(
                        "write needs {n} scatter-gather elements, the queue pair allows {} (use VerbsTransport::coalesce_config)",
                        self.max_sge
                    )));
                }
                ranges.push(start..sges.len());
            }
            Ok(())
        })();
        if let Err(e) = res {
            self.sges = sges;
            return Err(e);
        }
        let res = (|| {
            for (i, w) in wrs.iter().enumerate() {
                let bytes = w.bytes();
                if !self.window.can_post(bytes) || !self.sq.has_room(1) || self.batch.len() >= MAX_CHAIN {
                    self.post_batch()?;
                }
                if !self.window.can_post(bytes) || !self.sq.has_room(1) {
                    self.stats.window_stalls += 1;
                    self.wait_until("write completions (window full)", |t| {
                        t.window.can_post(bytes) && t.sq.has_room(1)
                    })?;
                }
                let (id, signaled) = self.window.on_post(bytes, self.sq.must_signal());
                let (remote_addr, rkey) = targets[i];
                self.push_wr(
                    SqKind::Write { id },
                    SendOp::Write { remote_addr, rkey },
                    &sges[ranges[i].clone()],
                    signaled,
                    false,
                );
                self.stats.writes_posted += 1;
                self.stats.bytes_posted += bytes;
            }
            self.post_batch()
        })();
        self.sges = sges;
        res?;
        Ok(self.window.last_posted())
    }

    /// Test-only: posts writes without checking the peer's region table, so that a bad remote
    /// range reaches the responder and fails there (remote access error).
    #[cfg(test)]
    pub(crate) fn post_writes_unchecked(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError> {
        self.post_writes_impl(wrs, false)
    }

    /// Test-only: sends `msg` untagged on the urgent queue pair (a hostile peer's message).
    #[cfg(test)]
    pub(crate) fn urgent_raw_for_test(&self, msg: &[u8]) -> Result<(), TransportError> {
        self.urgent.as_ref().expect("an urgent channel").send_raw_for_test(msg)
    }

    /// Test-only: announces `infos` as is (a peer redefining an id).
    #[cfg(test)]
    pub(crate) fn announce_for_test(&mut self, infos: &[RegionInfo]) -> Result<(), TransportError> {
        self.announce(infos)
    }

    /// Test-only: tampers with the peer's advertised table.
    #[cfg(test)]
    pub(crate) fn peer_regions_mut(&mut self) -> &mut Vec<RegionInfo> {
        &mut self.peer_regions
    }

    fn send_fragment(&mut self, hdr: MsgHeader, payload: &[u8]) -> Result<(), TransportError> {
        self.wait_until("a receive credit from the peer", |t| {
            t.credits_available() > 0
                && t.sq.has_room(1)
                && (MSG_HEADER_LEN + payload.len() <= t.max_inline as usize || !t.sq.free_slots.is_empty())
        })?;
        self.post_batch()?;
        let h = hdr.encode();
        if MSG_HEADER_LEN + payload.len() <= self.max_inline as usize {
            let mut sges = vec![Sge { addr: h.as_ptr() as u64, len: MSG_HEADER_LEN as u32, lkey: 0 }];
            if !payload.is_empty() {
                sges.push(Sge { addr: payload.as_ptr() as u64, len: payload.len() as u32, lkey: 0 });
            }
            self.push_wr(SqKind::Msg { slot: None }, SendOp::Send, &sges, false, true);
        } else {
            let slot = self.sq.free_slots.pop().expect("checked by the wait");
            let p = self.send_ring.ptr(slot);
            // SAFETY: a free slot is not referenced by any outstanding send; header + payload
            // fit the slot (fragments are sized to it), and the sources are separate buffers.
            unsafe {
                std::ptr::copy_nonoverlapping(h.as_ptr(), p, MSG_HEADER_LEN);
                std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(MSG_HEADER_LEN), payload.len());
            }
            let sge = Sge {
                addr: self.send_ring.addr(slot),
                len: (MSG_HEADER_LEN + payload.len()) as u32,
                lkey: self.send_ring.mr.lkey(),
            };
            self.push_wr(SqKind::Msg { slot: Some(slot) }, SendOp::Send, &[sge], true, false);
        }
        // Post now: inline sources (`h`, `payload`) are only borrowed for this call.
        self.post_batch()?;
        self.sends_posted += 1;
        Ok(())
    }
}

/// Device resources prepared before the handshake.
struct LocalSetup {
    qp: PreparedQueuePair,
    cache: MrCache,
    exposed: Vec<RegionInfo>,
    recv_ring: Ring,
    send_ring: Ring,
    ctrl: Ring,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    channel: Option<Arc<CompletionChannel>>,
    pd: Arc<ProtectionDomain>,
    ctx: Arc<Context>,
    sq_depth: u32,
    max_sge: u32,
}

impl LocalSetup {
    fn new(cfg: &VerbsConfig, regions: &RegionTable) -> Result<LocalSetup, TransportError> {
        let ctx = Context::open(&cfg.selection()).map_err(verbs_err)?;
        let lim = ctx.limits();
        let pd = ProtectionDomain::new(&ctx).map_err(verbs_err)?;
        let channel = match cfg.completion {
            CompletionMode::Event => Some(CompletionChannel::new(&ctx).map_err(verbs_err)?),
            CompletionMode::BusyPoll => None,
        };
        let recv_n = cfg.recv_buffers.get();
        let send_n = cfg.send_buffers.get();
        let buf = cfg.message_buffer.get().max(MSG_HEADER_LEN as u32 + 64);
        // Window writes + message slots + inline messages/credit returns/flush markers.
        let sq_depth = (cfg.window.max_wrs.get() as u64 + send_n as u64 + 32).min(u32::MAX as u64) as u32;
        if sq_depth > lim.max_qp_wr || recv_n > lim.max_qp_wr {
            return Err(TransportError::Device(format!(
                "window of {} WRs + {send_n} send buffers needs a send queue of {sq_depth} (receive queue {recv_n}); {} allows {}",
                cfg.window.max_wrs,
                ctx.name(),
                lim.max_qp_wr
            )));
        }
        let send_cq = CompletionQueue::new(&ctx, sq_depth, channel.as_ref()).map_err(verbs_err)?;
        let recv_cq = CompletionQueue::new(&ctx, recv_n, channel.as_ref()).map_err(verbs_err)?;
        let max_sge = cfg.max_sge.get().min(lim.max_sge).max(1);
        let caps = QpCaps {
            max_send_wr: sq_depth,
            max_recv_wr: recv_n,
            max_send_sge: max_sge,
            max_recv_sge: 1,
            max_inline: cfg.max_inline,
        };
        let qp = PreparedQueuePair::new(&pd, &send_cq, &recv_cq, caps).map_err(verbs_err)?;

        let mut cache = MrCache::new(pd.clone(), cfg.registration, regions.clone());
        let ring_bytes = |n: u32, s: u32| (n as u64 * s as u64).div_ceil(4096).max(1) * 4096;
        cache.account(ring_bytes(recv_n, buf) + ring_bytes(send_n, buf) + 4096)?;
        let exposed = cache.setup()?;
        let recv_ring = Ring::new(&pd, recv_n, buf, MrAccess::LocalWrite)?;
        let send_ring = Ring::new(&pd, send_n, buf, MrAccess::LocalRead)?;
        let ctrl = Ring::new(&pd, 1, 4096, MrAccess::RemoteWrite)?;
        for slot in 0..recv_n {
            // SAFETY: the slot lies inside the receive ring's registration (local write). The
            // ring is moved into the transport, which destroys the QP before dropping it, and
            // nothing reads the slot before its receive completes.
            unsafe { qp.post_recv(slot as u64, recv_ring.addr(slot), buf, recv_ring.mr.lkey()) }.map_err(verbs_err)?;
        }
        debug_assert!(ring_bytes(recv_n, buf) == recv_ring.bytes());
        Ok(LocalSetup {
            qp,
            cache,
            exposed,
            recv_ring,
            send_ring,
            ctrl,
            send_cq,
            recv_cq,
            channel,
            pd,
            ctx,
            sq_depth,
            max_sge,
        })
    }
}

impl Transport for VerbsTransport {
    fn shutdown(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        // A queue pair in the error state executes no more of the peer's writes.
        if let Some(qp) = &self.qp {
            let _ = qp.set_error();
        }
        if let Some(u) = &self.urgent {
            u.shutdown();
        }
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Verbs
    }

    fn peer_regions(&self) -> &[RegionInfo] {
        &self.peer_regions
    }

    fn post_writes(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError> {
        self.post_writes_impl(wrs, true)
    }

    fn send_message(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        self.progress()?;
        self.usable()?;
        if msg.len() > wire::MAX_MESSAGE as usize {
            return Err(TransportError::TooLarge(format!("{}-byte message exceeds {}", msg.len(), wire::MAX_MESSAGE)));
        }
        let frag = (self.remote.recv_buf.min(self.send_ring.slot) as usize - MSG_HEADER_LEN).max(1);
        let mut chunks: Vec<&[u8]> = msg.chunks(frag).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let hdr = MsgHeader {
                announce: false,
                more: i + 1 < n,
                len: c.len() as u32,
                bytes_written: self.stats.bytes_posted,
            };
            self.send_fragment(hdr, c)?;
        }
        self.stats.messages_sent += 1;
        Ok(())
    }

    fn recv_message(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(m) = self.try_assemble()? {
                return Ok(Some(m));
            }
            self.progress()?;
            if let Some(m) = self.try_assemble()? {
                return Ok(Some(m));
            }
            self.usable()?;
            self.return_credits(true)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            self.block(deadline)?;
        }
    }

    fn poll_completions(&mut self) -> Result<u64, TransportError> {
        self.progress()?;
        self.device_ok()?;
        if self.window.completed() < self.window.last_posted() {
            self.usable()?;
        }
        Ok(self.window.completed())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        let target = self.window.last_posted();
        self.progress()?;
        self.device_ok()?;
        if self.window.completed() >= target {
            return Ok(());
        }
        self.usable()?;
        self.post_batch()?;
        if self.window.unsignaled_tail() && self.sq.last_signaled < self.sq.last_write_seq {
            // Nothing outstanding will generate a completion: add a signaled zero-length WRITE
            // (to the peer's credit word, always a valid target) behind the tail.
            self.sq_room(1)?;
            let op = SendOp::Write { remote_addr: self.remote.credit_addr, rkey: self.remote.credit_rkey };
            self.push_wr(SqKind::Flush, op, &[], true, false);
            self.post_batch()?;
        }
        self.wait_until("write completions (flush)", |t| t.window.completed() >= target)
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }

    fn regions(&self) -> &RegionTable {
        &self.regions
    }

    fn expose(&mut self, region: Arc<Region>) -> Result<Registration, TransportError> {
        self.progress()?;
        self.usable()?;
        let reg = self.regions.register(region.clone()).map_err(TransportError::Register)?;
        let Some(info) = self.cache.expose(&region)? else {
            return Ok(reg); // local only: nothing to announce
        };
        // The urgent queue pair first, and settled: its announcement is in the peer's receive
        // queue before anything sent on this one after the call can be read.
        if let Some(u) = &self.urgent {
            u.expose(&region)?;
        }
        self.announce(&[info])?;
        Ok(reg)
    }

    fn byte_channel(&mut self, i: usize) -> Result<Box<dyn ByteChannel>, TransportError> {
        let missing = "this verbs session has no such byte-stream channel (VerbsConfig::byte_streams)";
        let t = crate::oob::take_channel(&mut self.byte_conns, i, missing)?;
        Ok(Box::new(bytes::VerbsByteChannel::start(t, i)?))
    }

    fn urgent(&self) -> Result<Arc<dyn UrgentChannel>, TransportError> {
        match &self.urgent {
            Some(u) => Ok(u.clone()),
            None => Err(TransportError::Unsupported(
                "this verbs session has no urgent channel (VerbsConfig::urgent_channel)",
            )),
        }
    }
}

/// `poll(2)` on `fds` for up to `wait` (EINTR is a wake-up like any other).
fn poll_fds(fds: &mut [libc::pollfd], wait: Duration) -> Result<(), TransportError> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd for the call.
    let rc =
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis().clamp(1, 60_000) as i32) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(TransportError::Io { op: "poll on the completion channel", source: e });
        }
    }
    Ok(())
}

impl Drop for VerbsTransport {
    fn drop(&mut self) {
        // 1. Let outstanding sends finish (bounded) so a last message reaches the peer.
        if self.broken.is_none() && self.post_batch().is_ok() && self.sq.outstanding() > 0 {
            let all_signaled = self.sq.last_signaled + 1 >= self.sq.next;
            let ok = all_signaled || {
                let op = SendOp::Write { remote_addr: self.remote.credit_addr, rkey: self.remote.credit_rkey };
                if self.sq.has_room(1) {
                    self.push_wr(SqKind::Flush, op, &[], true, false);
                    self.post_batch().is_ok()
                } else {
                    true // a signaled entry is outstanding (must_signal), wait for it
                }
            };
            if ok {
                let deadline = Instant::now() + DROP_DRAIN.min(self.cfg.io_timeout);
                while self.sq.outstanding() > 0 && self.broken.is_none() && Instant::now() < deadline {
                    if self.progress().is_err() || self.block(Some(deadline)).is_err() {
                        break;
                    }
                }
            }
        }
        // 2. Tell the peer (orderly close) and end the liveness channel.
        let _ = auth::write_frame(&mut self.sock, &Frame::Close { code: close_code::NORMAL, reason: String::new() });
        let _ = self.sock.shutdown(Shutdown::Both);
        // 3. Flush and destroy the QP before any memory registration or CQ goes away.
        if let Some(qp) = self.qp.take() {
            let _ = qp.set_error();
            drop(qp);
        }
        // The remaining fields drop in declaration order: MRs, rings, CQs, channel, PD, context.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_queue_accounting() {
        let mut q = SendQueue {
            depth: 8,
            next: 1,
            completed: 0,
            last_signaled: 0,
            last_write_seq: 0,
            entries: VecDeque::new(),
            free_slots: vec![],
        };
        let mut signaled = vec![];
        for i in 0..8 {
            let s = q.must_signal();
            signaled.push(s);
            q.push(SqKind::Write { id: i + 1 }, s);
        }
        assert!(!q.has_room(1));
        assert_eq!(signaled.iter().filter(|s| **s).count(), 2, "a signal every half queue: {signaled:?}");
        assert!(matches!(q.kind_of(3), Some(SqKind::Write { id: 3 })));
        assert_eq!(q.outstanding(), 8);
    }
}
