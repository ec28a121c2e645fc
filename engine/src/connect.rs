//! Choosing and connecting a transport backend (`--transport tcp|verbs|auto`).

use std::time::Duration;

use livemig_transport::auth::Secret;
use livemig_transport::{RegionTable, TcpConfig, TcpListener, TcpTransport, Transport, TransportError, TransportKind};

/// The `--transport` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// TCP sockets.
    Tcp,
    /// RDMA verbs (RC queue pairs).
    Verbs,
    /// Verbs when an active RDMA device exists, TCP otherwise.
    Auto,
}

impl TransportChoice {
    /// `tcp`, `verbs` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportChoice::Tcp => "tcp",
            TransportChoice::Verbs => "verbs",
            TransportChoice::Auto => "auto",
        }
    }
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(TransportChoice::Tcp),
            "verbs" => Ok(TransportChoice::Verbs),
            "auto" => Ok(TransportChoice::Auto),
            _ => Err(format!("unknown transport `{s}` (expected tcp, verbs or auto)")),
        }
    }
}

/// Backend settings shared by both ends.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Requested backend.
    pub choice: TransportChoice,
    /// TCP settings (streams, socket buffers, frame size, and `tcp.io_timeout` for TCP). Its
    /// `window` is also the verbs send window.
    pub tcp: TcpConfig,
    /// How long a silent peer is tolerated on verbs (TCP reads `tcp.io_timeout`: set both).
    pub io_timeout: Duration,
    /// Verbs device selection and modes (perftest-style flags).
    pub verbs: VerbsOptions,
}

/// Verbs flags: `--device`, `--ib-port`, `--gid-index`, `--busy-poll`, `--reg-chunk`.
#[derive(Debug, Clone, Default)]
pub struct VerbsOptions {
    /// Device name (default: the first device with an active port).
    pub device: Option<String>,
    /// Port (default: the first active one).
    pub ib_port: Option<u8>,
    /// GID index (default: the first RoCE v2 IPv4-mapped GID).
    pub gid_index: Option<u8>,
    /// Busy-poll completions instead of waiting on the completion channel.
    pub busy_poll: bool,
    /// Register memory on demand in chunks of this many bytes (default: pin everything).
    pub reg_chunk: Option<u64>,
}

/// Resolves `auto`; returns the backend and a sentence explaining the choice.
pub fn resolve(choice: TransportChoice) -> (TransportKind, String) {
    match choice {
        TransportChoice::Tcp => (TransportKind::Tcp, "transport: tcp (requested)".into()),
        TransportChoice::Verbs => (TransportKind::Verbs, "transport: verbs (requested)".into()),
        TransportChoice::Auto => {
            if verbs_available() {
                (TransportKind::Verbs, "transport: verbs (auto: an active RDMA device was found)".into())
            } else {
                (TransportKind::Tcp, "transport: tcp (auto: no active RDMA device on this host)".into())
            }
        }
    }
}

#[cfg(feature = "verbs")]
fn verbs_available() -> bool {
    livemig_transport::verbs::active_device_present()
}
#[cfg(not(feature = "verbs"))]
fn verbs_available() -> bool {
    false
}

/// A listening endpoint of either backend.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Verbs (out-of-band TCP listener for the QP exchange).
    #[cfg(feature = "verbs")]
    Verbs(livemig_transport::verbs::VerbsListener),
}

impl Listener {
    /// Binds `addr` for `kind`.
    pub fn bind(kind: TransportKind, addr: &str) -> Result<Listener, TransportError> {
        match kind {
            TransportKind::Tcp => Ok(Listener::Tcp(TcpListener::bind(addr)?)),
            #[cfg(feature = "verbs")]
            TransportKind::Verbs => Ok(Listener::Verbs(livemig_transport::verbs::VerbsListener::bind(addr)?)),
            #[cfg(not(feature = "verbs"))]
            TransportKind::Verbs => Err(TransportError::Device("this build has no verbs support".into())),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr, TransportError> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            #[cfg(feature = "verbs")]
            Listener::Verbs(l) => l.local_addr(),
        }
    }

    /// Accepts one authenticated session exposing `regions`.
    pub fn accept(
        &self,
        opts: &TransportOptions,
        secret: &Secret,
        regions: &RegionTable,
    ) -> Result<Box<dyn Transport>, TransportError> {
        self.accept_until(opts, secret, regions, None)
    }

    /// [`accept`](Self::accept), giving up with [`TransportError::Timeout`] at `until`.
    pub fn accept_until(
        &self,
        opts: &TransportOptions,
        secret: &Secret,
        regions: &RegionTable,
        until: Option<std::time::Instant>,
    ) -> Result<Box<dyn Transport>, TransportError> {
        let _span = tracing::info_span!("accept", local = ?self.local_addr().ok()).entered();
        let t: Box<dyn Transport> = match self {
            Listener::Tcp(l) => Box::new(l.accept_until(&opts.tcp, secret, regions, until)?),
            #[cfg(feature = "verbs")]
            Listener::Verbs(l) => Box::new(l.accept_until(&verbs_config(opts), secret, regions, until)?),
        };
        tracing::info!(transport = %t.kind(), peer_regions = t.peer_regions().len(), "accepted and authenticated");
        Ok(t)
    }
}

#[cfg(feature = "verbs")]
fn verbs_config(opts: &TransportOptions) -> livemig_transport::verbs::VerbsConfig {
    use livemig_transport::verbs::{CompletionMode, RegistrationMode, VerbsConfig};
    let v = &opts.verbs;
    VerbsConfig {
        window: opts.tcp.window,
        io_timeout: opts.io_timeout,
        device: v.device.clone(),
        ib_port: v.ib_port.and_then(std::num::NonZeroU8::new),
        gid_index: v.gid_index,
        completion: if v.busy_poll { CompletionMode::BusyPoll } else { CompletionMode::Event },
        registration: match v.reg_chunk {
            Some(c) => match std::num::NonZeroU64::new(c) {
                Some(chunk_size) => RegistrationMode::OnDemand { chunk_size },
                None => RegistrationMode::PinAll,
            },
            None => RegistrationMode::PinAll,
        },
        // The session's shape follows the TCP settings: an urgent channel and byte channels
        // are a queue pair each on verbs.
        urgent_channel: opts.tcp.urgent_stream,
        byte_streams: opts.tcp.byte_streams,
        // Handshake limits and TLS on the out-of-band sockets, as on TCP.
        gate: opts.tcp.gate.clone(),
        ..Default::default()
    }
}

/// Connects to `addr` with `kind`.
pub fn connect(
    kind: TransportKind,
    addr: &str,
    opts: &TransportOptions,
    secret: &Secret,
    regions: &RegionTable,
) -> Result<Box<dyn Transport>, TransportError> {
    let _span = tracing::info_span!("connect", peer = addr, transport = %kind).entered();
    let t: Box<dyn Transport> = match kind {
        TransportKind::Tcp => Box::new(TcpTransport::connect(addr, &opts.tcp, secret, regions)?),
        #[cfg(feature = "verbs")]
        TransportKind::Verbs => {
            Box::new(livemig_transport::verbs::VerbsTransport::connect(addr, &verbs_config(opts), secret, regions)?)
        }
        #[cfg(not(feature = "verbs"))]
        TransportKind::Verbs => return Err(TransportError::Device("this build has no verbs support".into())),
    };
    tracing::info!(peer_regions = t.peer_regions().len(), "connected and authenticated");
    Ok(t)
}
