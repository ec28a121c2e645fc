//! Pieces both backends share: the listening TCP socket (TCP carries everything over it;
//! verbs uses it out of band for the handshake and QP setup), socket options and I/O error
//! context.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::TransportError;

/// Wraps an `io::Error` with the operation that failed.
pub(crate) fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}

/// Sets an integer socket option on `s`.
pub(crate) fn set_int_option(s: &impl AsRawFd, level: i32, opt: i32, val: i32) -> std::io::Result<()> {
    // SAFETY: `s` keeps its descriptor open for the call; the option value is a live i32
    // whose size is passed alongside, and setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&val as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Keepalive on `s` so that a vanished host shows within about `timeout` even with nothing
/// outstanding: probes after `timeout / 3` idle (1 s to 2 h), every `timeout / 3`, 3 of them.
pub(crate) fn keepalive(s: &TcpStream, timeout: Duration) -> Result<(), TransportError> {
    let idle = (timeout.as_secs() / 3).clamp(1, 7200) as i32;
    set_int_option(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).map_err(io_err("setting SO_KEEPALIVE"))?;
    set_int_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle).map_err(io_err("setting TCP_KEEPIDLE"))?;
    set_int_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle).map_err(io_err("setting TCP_KEEPINTVL"))?;
    set_int_option(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3).map_err(io_err("setting TCP_KEEPCNT"))
}

/// Takes channel `i` out of `slots` (each can be taken once); `missing` says why there is no
/// such channel.
pub(crate) fn take_channel<T>(slots: &mut [Option<T>], i: usize, missing: &'static str) -> Result<T, TransportError> {
    match slots.get_mut(i) {
        Some(slot) => slot.take().ok_or(TransportError::Unsupported("this byte-stream channel was already taken")),
        None => Err(TransportError::Unsupported(missing)),
    }
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
