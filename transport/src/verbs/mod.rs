//! RDMA verbs backend: RDMA WRITE over RC queue pairs (rdma-core through `rdma-sys`).
//!
//! # Sessions: a queue pair per traffic class
//!
//! A session is one connection for bulk writes and control messages, plus, when the
//! connector asks ([`VerbsConfig::urgent_channel`], [`VerbsConfig::byte_streams`]), one for
//! the urgent channel and one per byte channel. Each connection is a queue pair of its own
//! with its own out-of-band TCP socket, device context, protection domain and registrations
//! (an exposed region is registered once per connection that may write it: the bulk and the
//! urgent one), authenticated like any other and bound to the session by the HELLO's session
//! id; the acceptor assembles the session ([`crate::SessionAssembler`]) before it sets up any
//! queue pair, then both ends set them up in the same order. So a demand request and its
//! page never wait behind bulk writes in a send queue — the device serves queue pairs
//! independently — and a byte stream never waits behind either.
//!
//! - **Urgent channel** (`transport/urgent.rs`): the queue pair behind a lock, usable from any
//!   thread. An urgent write is an RDMA WRITE followed on the same queue pair by a SEND
//!   naming the range ([`ctrl::UrgentMsg::Placed`]): RC executes the SEND only after the
//!   WRITE is placed, so when the receiver reads it the bytes are there. The receiver checks
//!   the named range against what it exposed. A thread waiting in
//!   [`crate::UrgentChannel::recv`] sleeps on the descriptors without holding the lock (in
//!   slices of a few ms, so a wake-up another thread consumed costs one slice at most), so
//!   other threads keep sending meanwhile.
//! - **Byte channels** (`transport/bytes.rs`): a pump thread moves bytes between the queue
//!   pair (SENDs of up to one 64 KiB receive buffer, with the backend's credit flow control
//!   as back-pressure) and one end of a unix socket pair; the caller gets the other end, so
//!   it can `splice` to and from it as with a TCP channel. End of stream is a message of its
//!   own ([`ctrl::BytesMsg::End`]), one direction at a time.
//! - **Regions exposed after the handshake** ([`crate::Transport::expose`]): registered on
//!   the bulk and urgent connections and announced on each (a [`ctrl::KIND_REGIONS`]
//!   fragment); the urgent announcement is settled (its SEND completed, so it sits in the
//!   peer's receive queue) before the bulk one is sent, and an urgent write to a region it
//!   does not know yet first reads what arrived on its queue pair. So once the peer has read
//!   a message sent after `expose`, both of its queue pairs can write the region.
//!
//! # Connection setup (out of band, over TCP)
//!
//! ```text
//!  connector                                        acceptor
//!   open device, PD, CQs, QP (INIT), register exposed regions (REMOTE_WRITE),
//!   post the receive ring                            (same)
//!   ── TCP: the authenticated handshake of `auth` (HELLO, AUTH, REGIONS with addr+rkey) ──
//!   VERBS(qpn, psn, lid, gid, mtu, max_sge, credits) ──►  ◄── VERBS(...)
//!   QP → RTR → RTS (path MTU = min of both ports' active MTU)          (same)
//!   MSG(setup: credit-word addr/rkey, receive buffer size) ──►  ◄── MSG(setup)
//! ```
//!
//! The byte formats of the setup blob and of the in-band message header are in [`ctrl`]
//! (pure, fuzzed decoders).
//!
//! The MSG(setup) frame doubles as a barrier: a side sends it only once its QP is in RTS, so
//! after reading the peer's, nothing we post can reach a QP that is not ready. The TCP socket
//! stays open for the life of the connection: its EOF (or CLOSE frame) is how a vanished peer
//! is noticed even when no work request is outstanding; `Drop` sends CLOSE(normal).
//!
//! # Data path
//!
//! - **Writes**: one `ibv_send_wr` (RDMA WRITE) per [`crate::WriteRequest`], its segments as
//!   the SG list (each mapped to its MR's lkey by the [`registration`] cache), chained into one
//!   `ibv_post_send` per batch. The [`crate::SendWindow`] bounds outstanding WRs and bytes and
//!   picks which WRs are signaled; completions are cumulative (an RC send queue completes in
//!   order), so one signaled completion retires every earlier WR. `flush` posts a signaled
//!   zero-length WRITE when the tail is unsignaled.
//! - **Batch completion marker**: the ordered SEND. RC executes a SEND at the responder only
//!   after every earlier WRITE of the QP is placed, so a control message (`send_message`)
//!   announces "everything posted before me is in your memory" with no extra work request;
//!   WRITE_WITH_IMM is not used (it would consume receive buffers per batch). Each message
//!   header carries the sender's cumulative written bytes, which is how the receiver's
//!   `bytes_received` counter is kept without seeing the writes.
//! - **Control messages**: SEND from a registered send-buffer ring (inline when the header and
//!   payload fit the QP's `max_inline`), fragmented when larger than the peer's receive
//!   buffers (up to [`crate::wire::MAX_MESSAGE`]). In-band header, 16 bytes, little endian:
//!   `kind u8 (1 = message) | flags u8 (bit 0 = more fragments follow) | 0 u16 | len u32 |
//!   bytes_written u64` ([`ctrl::MsgHeader`]).
//! - **Credits**: each side posts `recv_buffers` receives and grants that many credits (VERBS
//!   `credits`). A SEND needs a credit; a receiver re-posts a buffer as soon as its message is
//!   consumed and then returns credit by RDMA-WRITING its cumulative consumed count into the
//!   sender's 8-byte credit word (inline, no receive consumed on either side, so credit
//!   returns can never deadlock on credits). Returns are sent when half the ring is owed and
//!   before any blocking wait. The sender never has more SENDs outstanding than the peer has
//!   posted receives, so RNR never happens (rnr_retry 7 would retry forever on hardware).
//! - **Waiting**: busy-poll ([`CompletionMode::BusyPoll`]) or a completion channel
//!   ([`CompletionMode::Event`], `poll(2)` on the channel fd and the TCP socket). Every wait
//!   is bounded by `io_timeout` and watches the TCP socket.
//! - **Errors**: an error completion becomes [`crate::TransportError::Completion`] with the
//!   failing work request (`wr_id`: the id `post_writes` returned for a write; the backend's
//!   send-queue sequence number for its own SENDs, credit returns and flush markers, whose
//!   `opcode` says which), unless the peer is gone (TCP EOF,
//!   transport/RNR retries exhausted, flushed QP), which is
//!   [`crate::TransportError::Disconnected`]. Errors are sticky: the QP is in the error state.
//! - **Asynchronous device events**: every connection has its own device context, whose async
//!   event fd (non-blocking) is read by the transport itself, on the calling thread — no
//!   watcher thread: each `progress` reads it (every 5 ms at most in busy-poll mode), and the
//!   event-mode `poll(2)` waits on it next to the completion channel and the TCP socket, so a
//!   call blocked in a wait wakes up at once. Every event is acknowledged as soon as it is
//!   read. A port-down, QP or CQ error or device-fatal event for this connection's port, QP,
//!   CQs or device breaks the connection with [`crate::TransportError::DeviceEvent`] (sticky,
//!   like the others: `post_writes`, `send_message`, `recv_message`, `flush` and
//!   `poll_completions` fail from then on, the latter two even with nothing outstanding);
//!   informational events are logged and ignored (mapping: [`events`]). An error completion
//!   is reported as the fatal event that caused it when there is one: the event is the
//!   cause, the failed, flushed or retried work request the consequence. For the statuses a
//!   local failure produces (local QP operation, flush, retries exhausted, fatal, general)
//!   the backend waits up to 250 ms for that event — or for our port to leave ACTIVE — since
//!   a queue can fail before the kernel has delivered the event (rxe fails sends as soon as
//!   the netdev's routes are gone, before it marks the port down).
//!
//! # Teardown
//!
//! `Drop` waits (bounded) for outstanding sends so a last message is delivered, sends
//! CLOSE, moves the QP to ERR, destroys it, and only then deregisters memory and destroys
//! CQs, the PD and the context (see [`device`] for the ownership graph).

pub mod ctrl;
pub mod device;
pub mod events;
pub mod registration;
mod transport;

#[cfg(test)]
mod tests;

use std::num::{NonZeroU32, NonZeroU8};
use std::time::Duration;

pub use device::{active_device_present, device_names, DeviceSelection, Endpoint, VerbsError};
pub use registration::RegistrationMode;
pub use transport::{VerbsListener, VerbsTransport};

use crate::window::WindowConfig;

/// How the backend waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompletionMode {
    /// Sleep on a completion channel (low CPU).
    #[default]
    Event,
    /// Spin on the completion queues (lowest latency, one core busy while waiting).
    BusyPoll,
}

/// Verbs backend settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerbsConfig {
    /// RDMA device name (`ibv_devices`); default: the first device with an ACTIVE port.
    pub device: Option<String>,
    /// Port number (1-based); default: the device's first ACTIVE port.
    pub ib_port: Option<NonZeroU8>,
    /// GID index; default: the first RoCE v2 IPv4-mapped GID (index 0 on InfiniBand).
    pub gid_index: Option<u8>,
    /// Pin every region up front, or register source chunks on first use.
    pub registration: RegistrationMode,
    /// Outstanding-work window and signaling interval.
    pub window: WindowConfig,
    /// Event-driven or busy-polling completion handling.
    pub completion: CompletionMode,
    /// Posted receive buffers = message credits granted to the peer.
    pub recv_buffers: NonZeroU32,
    /// Send buffers for non-inline control messages.
    pub send_buffers: NonZeroU32,
    /// Bytes per send/receive buffer (a larger message is sent in fragments).
    pub message_buffer: NonZeroU32,
    /// Inline data requested per send WR (small messages and credit returns go inline).
    pub max_inline: u32,
    /// Scatter-gather elements per write WR (clamped to the device limit).
    pub max_sge: NonZeroU32,
    /// Any wait (window, credits, flush, setup) longer than this fails.
    pub io_timeout: Duration,
    /// Limits on connections that have not authenticated yet (listener side), and the
    /// handshake deadline (both sides).
    pub gate: crate::GateConfig,
    /// Connector: open the session's urgent channel, a queue pair of its own (the acceptor
    /// follows the connector).
    pub urgent_channel: bool,
    /// Connector: byte-stream channels to open, a queue pair each (at most
    /// `wire::MAX_BYTE_STREAMS`; the acceptor follows the connector).
    pub byte_streams: u8,
}

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            device: None,
            ib_port: None,
            gid_index: None,
            registration: RegistrationMode::PinAll,
            window: WindowConfig::default(),
            completion: CompletionMode::Event,
            recv_buffers: NonZeroU32::new(32).expect("non-zero"),
            send_buffers: NonZeroU32::new(16).expect("non-zero"),
            message_buffer: NonZeroU32::new(16 << 10).expect("non-zero"),
            max_inline: 128,
            max_sge: NonZeroU32::new(32).expect("non-zero"),
            io_timeout: Duration::from_secs(20),
            gate: crate::GateConfig::default(),
            urgent_channel: false,
            byte_streams: 0,
        }
    }
}

impl VerbsConfig {
    /// The device/port/GID part.
    pub fn selection(&self) -> DeviceSelection {
        DeviceSelection { device: self.device.clone(), ib_port: self.ib_port, gid_index: self.gid_index }
    }

    /// The SGE boundary the coalescer must use with this configuration (0 = none).
    pub fn sge_boundary(&self) -> u64 {
        self.registration.sge_boundary()
    }
}

pub(crate) use crate::error_chain;

/// Skips a device test on a host without RDMA (with a visible message), unless
/// `RXE_REQUIRED=1` (set by `tests/rxe/run-verbs-tests.sh` in the Soft-RoCE guest), in which
/// case a missing device fails the test. Returns true when the test should run.
#[cfg(any(test, feature = "test-support"))]
pub fn device_test_guard(test: &str) -> bool {
    if active_device_present() {
        return true;
    }
    if std::env::var("RXE_REQUIRED").as_deref() == Ok("1") {
        panic!("{test}: RXE_REQUIRED=1 but no RDMA device with an ACTIVE port (devices: {:?})", device_names());
    }
    // Straight to fd 2, not eprintln!: the test harness captures the print macros, and a
    // skip must stay visible in a normal `cargo test` run.
    use std::io::Write;
    let _ =
        writeln!(std::io::stderr(), "SKIPPED {test}: no RDMA device (run tests/rxe/run-verbs-tests.sh for Soft-RoCE)");
    false
}
