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
        std::net::TcpListener::bind(addr).map(BoundListener).map_err(io_err("binding the listening socket"))
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.0.local_addr().map_err(io_err("reading the local address"))
    }

    pub(crate) fn accept(&self) -> Result<(std::net::TcpStream, SocketAddr), TransportError> {
        self.0.accept().map_err(io_err("accepting a connection"))
    }
}
