//! livemig-transport: a zero-copy transport for memory pages and storage chunks.
//!
//! Layers (arrows point down):
//! - [`Transport`]: the one API every backend implements — connect/accept with an
//!   authenticated handshake, post writes of local scatter-gather lists into the peer's
//!   exposed regions, post small control messages, poll completions, a bounded window of
//!   outstanding work requests with selective signaling.
//! - Backends: [`tcp`] (Ethernet fallback: vectored writes straight from registered memory,
//!   reads straight into exposed regions) and `verbs` (RDMA WRITE on rdma-core).
//! - Pure parts, no I/O: [`bitmap`], [`coalesce`] (dirty pages to work requests), [`window`]
//!   (back-pressure), [`wire`] (frame codec), [`auth`] (challenge-response).
//!
//! Ordering contract shared by all backends (it is what RC queue pairs give): a control
//! message is delivered to the peer only after every write posted before it has been placed
//! in the peer's memory. Migration engines rely on this to announce "round done".

pub mod auth;
pub mod bitmap;
pub mod coalesce;
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod deadline;
pub mod gate;
mod oob;
pub mod region;
pub mod tcp;
pub mod testdata;
pub mod tls;
#[cfg(feature = "verbs")]
pub mod verbs;
pub mod window;
pub mod wire;

use std::time::Duration;

/// Formats an error with its chain of sources ("a: b: c").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub use bitmap::PageBitmap;
pub use coalesce::{CoalesceConfig, Coalescer, WorkRequest};
pub use deadline::SessionDeadline;
pub use gate::{Admitted, Gate, GateConfig};
pub use region::{Access, Backing, Region, RegionError, RegionId, RegionInfo, RegionTable, Registration, WriteGuard};
pub use window::{SendWindow, WindowConfig};

/// Which backend carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransportKind {
    /// TCP sockets.
    Tcp,
    /// RDMA verbs (RC queue pairs).
    Verbs,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Verbs => "verbs",
        })
    }
}

/// A piece of a local registered region, one scatter-gather element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset in the local region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// One write work request: gather `segments` of local region `local` (in order) and place
/// them contiguously at `remote_offset` of the peer's exposed region `remote`.
#[derive(Debug, Clone, Copy)]
pub struct WriteRequest<'a> {
    /// Local region the segments refer to.
    pub local: RegionId,
    /// The scatter-gather list.
    pub segments: &'a [Segment],
    /// Peer region id (from the peer's exposed table).
    pub remote: RegionId,
    /// Destination offset in the peer region.
    pub remote_offset: u64,
}

impl WriteRequest<'_> {
    /// Total bytes of the request.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len as u64).sum()
    }
}

/// Counters every backend keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    /// Write work requests posted.
    pub writes_posted: u64,
    /// Write work requests completed.
    pub writes_completed: u64,
    /// Payload bytes posted in writes.
    pub bytes_posted: u64,
    /// Signaled requests (completions generated).
    pub signaled: u64,
    /// Control messages sent.
    pub messages_sent: u64,
    /// Control messages received.
    pub messages_received: u64,
    /// Payload bytes the peer wrote into our exposed regions.
    pub bytes_received: u64,
    /// Times a post had to wait for the window.
    pub window_stalls: u64,
}

/// Transport errors shared by all backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Socket or device I/O failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed (auth, version, regions).
    #[error("handshake with {peer} failed")]
    Handshake {
        /// Peer address.
        peer: String,
        /// Why.
        #[source]
        source: auth::HandshakeError,
    },
    /// The peer sent something the protocol forbids.
    #[error("peer sent an invalid frame")]
    Protocol(#[from] wire::DecodeError),
    /// The peer broke the connection or closed it.
    #[error("peer disconnected: {0}")]
    Disconnected(String),
    /// The peer reported an error and closed.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// A local request names a region or range that is not registered.
    #[error("local region {region} has no range [{offset}, +{len})")]
    LocalRange {
        /// Region id.
        region: RegionId,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A request names a remote range the peer did not expose for writing.
    #[error("peer region {region} does not expose [{offset}, +{len}) for writing")]
    RemoteRange {
        /// Region id.
        region: RegionId,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A request exceeds a protocol or device limit.
    #[error("request too large: {0}")]
    TooLarge(String),
    /// Nothing arrived within the time limit.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// TLS could not be set up (settings, certificates, the TLS handshake).
    #[error("TLS: {0}")]
    Tls(String),
    /// A work request completed with an error status (verbs).
    #[error("work request {wr_id} ({opcode}) completed with status {status}: {status_str}")]
    Completion {
        /// The failing work request id.
        wr_id: u64,
        /// Opcode name.
        opcode: &'static str,
        /// Numeric status.
        status: u32,
        /// Status string from the provider.
        status_str: String,
    },
    /// Registering a region with this endpoint failed (e.g. its id is taken).
    #[error("registering a region failed")]
    Register(#[source] RegionError),
    /// The session or backend does not offer this.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// A verbs device problem (no device, port down, memlock).
    #[error("RDMA device: {0}")]
    Device(String),
    /// The RDMA device reported an asynchronous error event that concerns this connection
    /// (its port went down, its queue pair or a completion queue failed, the device failed):
    /// the connection is unusable (verbs). Also used for an error completion that arrived
    /// while the connection's port was no longer ACTIVE, before its `IBV_EVENT_PORT_ERR`.
    #[error("RDMA device event: {reason} ({event})")]
    DeviceEvent {
        /// The event (`IBV_EVENT_PORT_ERR`, `IBV_EVENT_QP_FATAL`, ...).
        event: &'static str,
        /// What happened, naming the device and the port or queue.
        reason: String,
    },
}

/// A completion event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// All writes with ids `<= upto` are complete (placed in the peer's memory).
    pub upto: u64,
}

/// What arrives on the urgent channel ([`UrgentChannel::recv`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrgentEvent {
    /// An urgent message from the peer.
    Message(Vec<u8>),
    /// An urgent write of the peer was placed in our exposed region `region` at
    /// `[offset, offset + len)`: those bytes hold the new content now.
    Placed {
        /// Our region.
        region: RegionId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
}

/// The urgent channel of a session: demand requests and the pages that answer them, which
/// never wait behind bulk writes (their own connection on TCP). Usable from any thread,
/// concurrently with the bulk transport and with other users of the channel: a fault
/// handler may send requests while a responder thread serves the peer's.
///
/// Urgent traffic is not ordered with bulk traffic. An urgent write completes when the peer
/// reports nothing more: the receiver learns of it through [`UrgentEvent::Placed`], which is
/// what a post-copy destination waits for before installing the page.
pub trait UrgentChannel: Send + Sync + std::fmt::Debug {
    /// Sends an urgent message (at most `wire::MAX_MESSAGE` bytes).
    fn send_message(&self, msg: &[u8]) -> Result<(), TransportError>;
    /// Writes `segments` of local region `local` to `(remote, remote_offset)` of the peer,
    /// as one urgent write. Returns once the bytes are handed to the network (the source
    /// must not change them until the peer confirms, e.g. by its next request).
    fn post_write(&self, w: &WriteRequest<'_>) -> Result<(), TransportError>;
    /// The next urgent event; `None` on timeout.
    fn recv(&self, timeout: Option<Duration>) -> Result<Option<UrgentEvent>, TransportError>;
}

/// A byte-stream channel of a session: raw bytes in both directions, authenticated with the
/// session, with no message size cap and the backend's own back-pressure — what carries
/// another program's stream (a QEMU migration connection) through livemig. On TCP it is a
/// connection of its own, and [`raw_fd`](Self::raw_fd) lets the caller `splice` to and from
/// it without copying.
pub trait ByteChannel: std::io::Read + std::io::Write + Send + std::fmt::Debug {
    /// The descriptor to splice to and from, when the backend has one.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd>;
    /// Ends our direction (the peer reads end of stream); the other stays open.
    fn shutdown_write(&self) -> std::io::Result<()>;
    /// Bounds every later read (`None`: wait indefinitely).
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

/// The transport API. One connected endpoint; both ends may write and message.
pub trait Transport: Send {
    /// Which backend this is.
    fn kind(&self) -> TransportKind;

    /// The regions the peer exposed (from the handshake).
    fn peer_regions(&self) -> &[RegionInfo];

    /// Posts write work requests in order. Returns the id of the last one (ids increase by
    /// one per request from 1). Blocks for back-pressure while the window is full.
    ///
    /// As with an RDMA WRITE, the source bytes may be read at any time until the request
    /// completes (verbs: when the NIC fetches them; TCP with zero copy: when the socket sends
    /// them). A source modified before completion may be sent old, new or mixed.
    fn post_writes(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError>;

    /// Sends a small control message, ordered after all writes posted before it.
    fn send_message(&mut self, msg: &[u8]) -> Result<(), TransportError>;

    /// Receives the next control message; `None` on timeout.
    fn recv_message(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, TransportError>;

    /// Drains available completions without blocking; returns the highest completed id.
    fn poll_completions(&mut self) -> Result<u64, TransportError>;

    /// Waits until every posted write has completed.
    fn flush(&mut self) -> Result<(), TransportError>;

    /// Counters.
    fn stats(&self) -> TransportStats;

    /// Local registration cache (regions that may be sent from or are exposed).
    fn regions(&self) -> &RegionTable;

    /// Registers `region` with this endpoint after the handshake and, if it is exposed
    /// (remote write or read), announces it to the peer: a disk, or a second guest region,
    /// added mid-session. The announcement is ordered before every later message, so a peer
    /// that has received a message sent after this call can write the region. The region
    /// stays registered while the returned guard lives (withdrawing it from a running peer
    /// is not supported).
    fn expose(&mut self, region: std::sync::Arc<Region>) -> Result<Registration, TransportError> {
        let _ = region;
        Err(TransportError::Unsupported("exposing regions after the handshake"))
    }

    /// Takes byte-stream channel `i` of the session (each can be taken once). An error when
    /// the session has no such channel or the backend has none yet.
    fn byte_channel(&mut self, i: usize) -> Result<Box<dyn ByteChannel>, TransportError> {
        let _ = i;
        Err(TransportError::Unsupported("this session has no byte-stream channels"))
    }

    /// Ends a broken session at once, without a goodbye (the link may be dead): every
    /// connection is shut down, and once this returns nothing more the peer sent through
    /// this session lands in exposed memory. For a session about to be replaced by a new one
    /// (a post-copy migration taken over). Byte channels already taken are not affected.
    fn shutdown(&mut self) {}

    /// The session's urgent channel, shared (every call returns a handle to the same one).
    /// An error when the session was set up without one or the backend has none yet.
    fn urgent(&self) -> Result<std::sync::Arc<dyn UrgentChannel>, TransportError> {
        Err(TransportError::Unsupported("this session has no urgent channel"))
    }
}

/// Checks a write request against the peer's exposed table (shared by backends).
pub fn check_remote(
    peer: &[RegionInfo],
    remote: RegionId,
    offset: u64,
    len: u64,
) -> Result<&RegionInfo, TransportError> {
    let r = peer
        .iter()
        .find(|r| r.id == remote)
        .filter(|r| r.access.remote_write)
        .ok_or(TransportError::RemoteRange { region: remote, offset, len })?;
    match offset.checked_add(len) {
        Some(end) if end <= r.len => Ok(r),
        _ => Err(TransportError::RemoteRange { region: remote, offset, len }),
    }
}
pub use tcp::{SessionAssembler, TcpConfig, TcpListener, TcpTransport};
#[cfg(feature = "verbs")]
pub use verbs::{VerbsConfig, VerbsListener, VerbsTransport};
