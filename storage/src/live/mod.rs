//! Live disk transfer over a livemig session: the drivers of the pure state machines in
//! [`crate::transfer`]. Chunks travel as control messages on the session's bulk stream
//! (pushes, background pulls, the handover, the final check) and on its urgent stream (pulls
//! for a read or a partial write that cannot wait), so a demand pull never queues behind the
//! background traffic.
//!
//! - [`source::SourceDisk`]: the disk as served at the source; its `migrate` runs a transfer.
//! - [`dest::receive`]: the destination: installs pushed chunks, takes over I/O at the
//!   handover ([`dest::DestDisk`] is then served), pulls the rest, and checks with the source
//!   that every chunk it holds equals the source's.

pub mod dest;
pub mod proto;
pub mod source;

use std::time::Duration;

use livemig_engine::connect::{TransportChoice, TransportOptions};
use livemig_transport::auth::Secret;
use livemig_transport::{RegionTable, TcpConfig, Transport, TransportError};

pub use proto::Strategy;

/// When the source hands I/O over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SwitchoverMode {
    /// Hybrid: once everything below the threshold is pushed. Pre-copy: once the rest fits
    /// the downtime.
    #[default]
    Auto,
    /// When asked (`switchover` on the control socket): what an orchestrator that moves the
    /// guest does.
    Command,
}

/// A live transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The session failed.
    #[error("the session failed")]
    Transport(#[source] TransportError),
    /// The peer sent a malformed message.
    #[error(transparent)]
    Decode(#[from] proto::DecodeError),
    /// The peer sent a message out of turn.
    #[error("protocol: {0}")]
    Unexpected(String),
    /// The peer said nothing for too long.
    #[error("no word from {0} within the I/O timeout")]
    Silent(&'static str),
    /// The destination refused the disk.
    #[error("refused: {0}")]
    Refused(String),
    /// The peer gave up.
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
    /// Cancelled on request before the handover.
    #[error("cancelled")]
    Cancelled,
    /// A transfer is already running for this disk.
    #[error("a transfer of this disk is already running")]
    Busy,
    /// A disk operation failed.
    #[error(transparent)]
    Disk(#[from] crate::mirror::DiskError),
    /// The final check found chunks that differ.
    #[error("{} chunk(s) differ between source and destination: {:?}", .0.len(), &.0[..(.0.len().min(16))])]
    Mismatch(Vec<u32>),
    /// Failed before the handover: the source still serves the disk, with every write.
    #[error("failed before the handover (the disk is still served here, intact)")]
    BeforeHandover(#[source] Box<Error>),
    /// The destination did not confirm the handover and did not refuse it either: it may be
    /// serving the disk, so this end does not serve it again.
    #[error("the handover is in doubt: the destination may be serving the disk, so it stays handed over here")]
    InDoubt(#[source] Box<Error>),
    /// Failed after the handover.
    #[error("failed after the handover (the disk stays handed over)")]
    AfterHandover(#[source] Box<Error>),
}

/// A progress report (one per second at most).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Progress {
    /// `pushing`, `pulled`, `pulling`.
    pub phase: &'static str,
    /// Since the request.
    pub elapsed_s: f64,
    /// Chunks pushed so far.
    pub chunks_pushed: u64,
    /// Bytes pushed so far.
    pub bytes_pushed: u64,
    /// Chunks waiting to be pushed (pre-copy) or pulled (destination).
    pub pending: u64,
    /// Pre-copy round.
    pub rounds: u32,
    /// Chunks pulled so far.
    pub chunks_pulled: u64,
    /// Source, before the handover: a handover now would stay within its bound (hybrid: the
    /// push is done; pre-copy: the rest fits the downtime at the measured rate).
    pub ready: bool,
}

/// A disk transfer's session settings: an urgent channel (on-demand pulls), on `choice`.
pub fn options(choice: TransportChoice, io_timeout: Duration) -> TransportOptions {
    let tcp = TcpConfig { io_timeout, urgent_stream: true, ..TcpConfig::default() };
    TransportOptions { choice, io_timeout, tcp, verbs: Default::default() }
}

/// Connects a session with an urgent channel to `to` over `choice` (`auto`: verbs when an
/// RDMA device is up). `to` is the address of a `disk receive`, or `NAME@ADDR`: a daemon at
/// ADDR that receives the disk under NAME.
pub fn connect(
    choice: TransportChoice,
    to: &str,
    secret: &Secret,
    io_timeout: Duration,
) -> Result<Box<dyn Transport>, Error> {
    let (name, addr) = match to.split_once('@') {
        Some((n, a)) => (Some(n), a),
        None => (None, to),
    };
    let (kind, _) = livemig_engine::connect::resolve(choice);
    let mut t = livemig_engine::connect::connect(kind, addr, &options(choice, io_timeout), secret, &RegionTable::new())
        .map_err(Error::Transport)?;
    if let Some(name) = name {
        let req = livemig_engine::open::OpenRequest {
            version: livemig_engine::open::OPEN_VERSION,
            service: livemig_engine::open::Service::DiskReceive,
            size: 0,
            page_size: 0,
            after_s: 0.0,
            disk: name.to_string(),
            request: None,
        };
        livemig_app::open::open(t.as_mut(), &req, io_timeout).map_err(|e| Error::Refused(format!("{e:#}")))?;
    }
    Ok(t)
}

/// Sends one transfer message on the bulk stream.
pub(crate) fn send(t: &mut dyn Transport, m: &proto::Msg) -> Result<(), Error> {
    t.send_message(&proto::encode(m)).map_err(Error::Transport)
}

/// Receives and decodes one transfer message; `what` names it in the silence error.
pub(crate) fn recv(t: &mut dyn Transport, timeout: Duration, what: &'static str) -> Result<proto::Msg, Error> {
    match t.recv_message(Some(timeout)).map_err(Error::Transport)? {
        Some(m) => Ok(proto::decode(&m)?),
        None => Err(Error::Silent(what)),
    }
}
