//! Byte-stream channels of a verbs session: a pump thread between a queue pair and a unix
//! socket pair (see the module doc of [`crate::verbs`]).

use std::io::{Read, Write};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{poll_fds, Broken, VerbsTransport};
use crate::verbs::ctrl::{BytesMsg, MSG_HEADER_LEN};
use crate::verbs::VerbsConfig;
use crate::{Transport, TransportError};

/// Receive buffer size of a byte-channel queue pair: the most stream bytes one SEND carries.
const BUFFER: u32 = 64 << 10;
/// How long the pump sleeps at most before looking at everything again.
const PUMP_SLEEP: Duration = Duration::from_millis(100);

/// The configuration of a byte channel's queue pair: larger message buffers than the bulk
/// connection's control path, nothing registered but the rings.
pub(super) fn channel_config(cfg: &VerbsConfig) -> VerbsConfig {
    VerbsConfig {
        recv_buffers: NonZeroU32::new(64).expect("non-zero"),
        send_buffers: NonZeroU32::new(32).expect("non-zero"),
        message_buffer: NonZeroU32::new(BUFFER).expect("non-zero"),
        urgent_channel: false,
        byte_streams: 0,
        ..cfg.clone()
    }
}

/// The caller's end of a verbs byte channel.
#[derive(Debug)]
pub(super) struct VerbsByteChannel {
    sock: UnixStream,
}

impl VerbsByteChannel {
    /// Starts the pump of channel `index` over `t`.
    pub(super) fn start(t: VerbsTransport, index: usize) -> Result<Self, TransportError> {
        let (mine, theirs) = UnixStream::pair().map_err(|e| TransportError::Io { op: "socketpair", source: e })?;
        theirs.set_nonblocking(true).map_err(|e| TransportError::Io { op: "a non-blocking socket pair", source: e })?;
        let peer = t.peer.clone();
        std::thread::Builder::new()
            .name(format!("verbs-bytes-{index}"))
            .spawn(move || {
                let mut t = t;
                match pump(&mut t, &theirs) {
                    Ok(()) => tracing::debug!(%peer, channel = index, "verbs byte channel ended"),
                    Err(e) => {
                        tracing::warn!(%peer, channel = index, error = %crate::error_chain(&e), "verbs byte channel failed");
                        // The caller sees the stream end where it broke.
                        let _ = theirs.shutdown(std::net::Shutdown::Both);
                    }
                }
                // Dropping `t` tells the peer (CLOSE) and releases the queue pair.
            })
            .map_err(|e| TransportError::Io { op: "starting a byte-channel thread", source: e })?;
        Ok(VerbsByteChannel { sock: mine })
    }
}

impl Read for VerbsByteChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.read(buf)
    }
}

impl Write for VerbsByteChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::ByteChannel for VerbsByteChannel {
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.sock.as_raw_fd())
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.sock.shutdown(std::net::Shutdown::Write)
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
}

/// Moves bytes both ways until both directions have ended (or the caller's end is gone).
/// Never blocks on the queue pair: it reads from the caller only when a SEND can go at once
/// (a credit, send-queue room and a send buffer), so two pumps sending at each other always
/// keep draining each other's messages.
fn pump(t: &mut VerbsTransport, sock: &UnixStream) -> Result<(), TransportError> {
    let io = |op: &'static str| move |source: std::io::Error| TransportError::Io { op, source };
    let chunk = (t.remote.recv_buf.min(t.send_ring.slot) as usize).saturating_sub(MSG_HEADER_LEN + 1).max(1);
    let mut inbuf = vec![0u8; chunk + 1];
    let mut out: Vec<u8> = Vec::new();
    let mut out_at = 0;
    let (mut local_done, mut peer_done) = (false, false);
    // Set once the connection broke while received bytes still wait for the caller.
    let mut deliver_until: Option<std::time::Instant> = None;
    loop {
        t.progress()?;
        // Peer → caller.
        loop {
            if out_at < out.len() {
                match (&*sock).write(&out[out_at..]) {
                    Ok(n) => out_at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if gone(&e) => return end_early(t, local_done),
                    Err(e) => return Err(io("writing to the byte channel's socket")(e)),
                }
                continue;
            }
            if peer_done {
                break;
            }
            let Some(m) = t.try_assemble()? else { break };
            match BytesMsg::decode(&m) {
                Ok(BytesMsg::Data(_)) => {
                    out = m;
                    out_at = 1; // after the tag
                }
                Ok(BytesMsg::End) => {
                    peer_done = true;
                    let _ = sock.shutdown(std::net::Shutdown::Write);
                }
                Err(d) => {
                    t.set_broken(Broken::Protocol(d.clone()));
                    return Err(TransportError::Protocol(d));
                }
            }
        }
        // Caller → peer, while a SEND can go without waiting.
        let can_send = |t: &VerbsTransport| {
            t.credits_available() > 0 && t.sq.has_room(2) && !t.sq.free_slots.is_empty() && t.broken.is_none()
        };
        while !local_done && can_send(t) {
            match (&*sock).read(&mut inbuf[1..]) {
                Ok(0) => {
                    t.send_message(&BytesMsg::End.encode())?;
                    local_done = true;
                }
                Ok(n) => {
                    inbuf[0] = crate::verbs::ctrl::BYTES_DATA;
                    t.send_message(&inbuf[..=n])?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if gone(&e) => return end_early(t, local_done),
                Err(e) => return Err(io("reading from the byte channel's socket")(e)),
            }
        }
        if local_done && peer_done && out_at >= out.len() {
            // The peer has both directions' ends: a failure to confirm ours now is its exit.
            let _ = t.settle_sends();
            return Ok(());
        }
        if let Err(e) = t.usable() {
            // The peer may have ended its direction and closed while its last messages still
            // wait here for a slow caller: deliver them first (within the I/O timeout).
            let pending = out_at < out.len() || !t.rx.arrived.is_empty();
            let until = *deliver_until.get_or_insert_with(|| std::time::Instant::now() + t.cfg.io_timeout);
            if !peer_done && pending && std::time::Instant::now() < until {
                let mut fds = [libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 }];
                poll_fds(&mut fds, Duration::from_millis(100))?;
                continue;
            }
            return Err(match e {
                TransportError::Disconnected(why) if !peer_done => TransportError::Disconnected(format!(
                    "the byte channel's peer went away before ending its stream: {why}"
                )),
                e => e,
            });
        }
        t.return_credits(true)?;
        let Some(mut fds) = t.prepare_wait()? else { continue };
        if fds.is_empty() {
            std::thread::yield_now(); // busy-poll mode: spin
            continue;
        }
        let mut events = 0;
        if !local_done && can_send(t) {
            events |= libc::POLLIN;
        }
        if out_at < out.len() {
            events |= libc::POLLOUT;
        }
        fds.push(libc::pollfd { fd: sock.as_raw_fd(), events, revents: 0 });
        // Credit returns raise no completion here: while the caller has bytes for us and
        // the peer owes credits, look again soon.
        let starved = !local_done && !can_send(t);
        poll_fds(&mut fds, if starved { Duration::from_millis(1) } else { PUMP_SLEEP })?;
        t.after_wait(&fds)?;
    }
}

/// Whether an I/O error on the caller's socket means the caller closed its end.
fn gone(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
}

/// The caller dropped its end: end our direction if it has not ended, then stop.
fn end_early(t: &mut VerbsTransport, local_done: bool) -> Result<(), TransportError> {
    if !local_done {
        t.send_message(&BytesMsg::End.encode())?;
    }
    t.settle_sends()
}
