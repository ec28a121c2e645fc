//! Pieces both backends share: the listening TCP socket (TCP carries everything over it;
//! verbs uses it out of band for the handshake and QP setup) and I/O error context.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::TransportError;

/// Wraps an `io::Error` with the operation that failed.
pub(crate) fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}

/// A bound listening socket.
#[derive(Debug)]
pub(crate) struct BoundListener(std::net::TcpListener);

impl BoundListener {
    pub(crate) fn bind(addr: impl ToSocketAddrs) -> Result<Self, TransportError> {
        let l = std::net::TcpListener::bind(addr).map_err(io_err("binding the listening socket"))?;
        // The gate polls it: accepting never blocks.
        l.set_nonblocking(true).map_err(io_err("binding the listening socket"))?;
        // A deeper accept queue than std's 128, for bursts of connections (a hostile client's
        // among them) between two passes of the gate; the kernel caps it at somaxconn.
        // SAFETY: listen(2) on our own bound socket; calling it again only resizes the queue.
        unsafe {
            libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096);
        }
        Ok(BoundListener(l))
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.0.local_addr().map_err(io_err("reading the local address"))
    }

    /// One pending connection, or `None` if none is waiting.
    pub(crate) fn accept_nonblocking(&self) -> std::io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
        match self.0.accept() {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A gate admitting authenticated connections from this listener.
    pub(crate) fn gate(
        &self,
        secret: &crate::auth::Secret,
        cfg: &crate::GateConfig,
    ) -> Result<crate::Gate<'_>, TransportError> {
        crate::Gate::new(self, secret, cfg)
    }
}

impl std::os::fd::AsRawFd for BoundListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
