//! Full-duplex byte relay between two stream sockets with `splice(2)` through a pipe: the
//! bytes never enter user space, and each direction runs on its own thread, off QEMU's.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Pipe capacity asked for (the kernel may cap it at `/proc/sys/fs/pipe-max-size`).
pub const PIPE_BYTES: usize = 1 << 20;

/// A pipe whose two ends close when it is dropped.
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let p = unsafe { Pipe { rd: OwnedFd::from_raw_fd(fds[0]), wr: OwnedFd::from_raw_fd(fds[1]) } };
        // A bigger pipe moves more per call; failing to grow it only costs calls.
        // SAFETY: fcntl on our own descriptor; no memory is passed.
        unsafe { libc::fcntl(p.wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as libc::c_int) };
        Ok(p)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    loop {
        // SAFETY: splice between descriptors the caller keeps open; no memory is passed.
        let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Moves every byte from `from` to `to` until `from` ends, then shuts down `to`'s write side
/// (the peer reads end of stream). Returns the bytes moved. Both descriptors must be
/// blocking stream sockets the caller keeps open.
pub fn pump(from: RawFd, to: RawFd) -> std::io::Result<u64> {
    let p = Pipe::new()?;
    let mut total = 0u64;
    let res = loop {
        let n = match splice(from, p.wr.as_raw_fd(), PIPE_BYTES) {
            Ok(0) => break Ok(total),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        let mut left = n;
        while left > 0 {
            match splice(p.rd.as_raw_fd(), to, left) {
                Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the receiving side closed")),
                Ok(m) => left -= m,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    };
    // SAFETY: shutdown(2) on a descriptor the caller keeps open.
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
    res
}

/// What a relay moved, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Relays `a` ⇄ `b` until both directions have ended; the first error (if any) is returned
/// after both stop (an error in one direction shuts both sockets down so the other ends).
pub fn relay(a: RawFd, b: RawFd) -> std::io::Result<Moved> {
    std::thread::scope(|s| {
        let back = s.spawn(move || {
            let r = pump(b, a);
            if r.is_err() {
                // SAFETY: shutdown(2) on descriptors the caller keeps open for this call.
                unsafe {
                    libc::shutdown(a, libc::SHUT_RDWR);
                    libc::shutdown(b, libc::SHUT_RDWR);
                }
            }
            r
        });
        let fwd = pump(a, b);
        if fwd.is_err() {
            // SAFETY: as above.
            unsafe {
                libc::shutdown(a, libc::SHUT_RDWR);
                libc::shutdown(b, libc::SHUT_RDWR);
            }
        }
        let back = back.join().unwrap_or_else(|_| Err(std::io::Error::other("relay thread panicked")));
        Ok(Moved { a_to_b: fwd?, b_to_a: back? })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn bytes_cross_both_ways_and_end_of_stream_follows() {
        let (mut qemu, a) = UnixStream::pair().unwrap();
        let (b, mut peer) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(a.as_raw_fd(), b.as_raw_fd()).map(|m| (m, a, b)));
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let d2 = data.clone();
        let w = std::thread::spawn(move || {
            qemu.write_all(&d2).unwrap();
            qemu.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            qemu.read_to_end(&mut back).unwrap();
            back
        });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert!(got == data, "forward bytes intact");
        peer.write_all(b"return path").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(w.join().unwrap(), b"return path");
        let (m, _, _) = t.join().unwrap().unwrap();
        assert_eq!(m, Moved { a_to_b: 3 << 20, b_to_a: 11 });
    }
}
