//! An NBD server for one export backed by a [`Disk`]: fixed newstyle negotiation
//! (EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT with
//! `base:allocation`), then READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS
//! and DISC, in simple or structured replies. One thread per connection; bad requests get NBD
//! errors, malformed framing a clean close, never a crash.

use std::io::{IoSlice, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use super::proto::{self, cflag, chunk, cmd, errno, info, opt, rep, tflag, Request, REQUEST_LEN};
use crate::chunks::Range;
use crate::disk::Disk;
use crate::mirror::DiskError;

/// What is served.
#[derive(Debug)]
pub struct Export {
    /// Export name ("" selects it too).
    pub name: String,
    /// Description sent on request.
    pub description: String,
    /// The disk.
    pub disk: Arc<dyn Disk>,
    /// Refuse writes.
    pub read_only: bool,
    /// Bound on negotiation and on reading a request's payload (an idle client between
    /// requests is allowed).
    pub io_timeout: Duration,
}

/// A connection the server can bound reads on.
pub trait Conn: Read + Write {
    /// Sets the read timeout.
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Sets the write timeout (a client that stops reading its replies).
    fn set_send_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_send_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_write_timeout(t)
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_send_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_write_timeout(t)
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The client broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

fn protocol(e: impl std::fmt::Display) -> ServeError {
    ServeError::Protocol(e.to_string())
}

/// Negotiated state.
#[derive(Debug, Default)]
struct Session {
    structured: bool,
    base_allocation: bool,
}

/// Transmission flags; DF only once structured replies are negotiated. FAST_ZERO is not
/// offered: zeroing a mirror's chunk may need a fetch from the base first.
fn tflags(e: &Export, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::CAN_MULTI_CONN | tflag::SEND_CACHE;
    if e.read_only {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}

/// Serves one connection until the client disconnects; `Ok` for a clean end (DISC, ABORT,
/// or the client closing between requests).
pub fn serve_connection<C: Conn>(mut c: C, e: &Export) -> Result<(), ServeError> {
    c.set_timeout(Some(e.io_timeout))?;
    c.set_send_timeout(Some(e.io_timeout))?;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    c.write_all(&hello)?;
    let mut cf = [0u8; 4];
    c.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !3 != 0 {
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & proto::FLAG_NO_ZEROES as u32 != 0;
    let mut s = Session::default();
    let size = e.disk.size();
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        let (o, len) = proto::decode_option_header(&h).map_err(protocol)?;
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        let reply = |c: &mut C, kind: u32, d: &[u8]| c.write_all(&proto::option_reply(o, kind, d));
        match o {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !name.is_empty() && name != e.name {
                    return Err(protocol(format!("unknown export {name:?}")));
                }
                let mut b = size.to_be_bytes().to_vec();
                b.extend_from_slice(&tflags(e, s.structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                c.write_all(&b)?;
                break;
            }
            opt::ABORT => {
                let _ = reply(&mut c, rep::ACK, &[]);
                return Ok(());
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(&mut c, rep::ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(e.name.as_bytes());
                d.extend_from_slice(e.description.as_bytes());
                reply(&mut c, rep::SERVER, &d)?;
                reply(&mut c, rep::ACK, &[])?;
            }
            opt::STARTTLS => reply(&mut c, rep::ERR_UNSUP, b"TLS is not offered")?,
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(&mut c, rep::ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                s.structured = true;
                reply(&mut c, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let Some(infos) = for_this_export(&mut c, o, proto::decode_info_request(&data), e)? else {
                    continue;
                };
                let mut d = info::EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&tflags(e, s.structured).to_be_bytes());
                reply(&mut c, rep::INFO, &d)?;
                let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, proto::MAX_REQUEST] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                reply(&mut c, rep::INFO, &d)?;
                if infos.contains(&info::NAME) {
                    let mut d = info::NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    reply(&mut c, rep::INFO, &d)?;
                }
                if infos.contains(&info::DESCRIPTION) {
                    let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(e.description.as_bytes());
                    reply(&mut c, rep::INFO, &d)?;
                }
                reply(&mut c, rep::ACK, &[])?;
                if o == opt::GO {
                    break;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if o == opt::SET_META_CONTEXT && !s.structured {
                    reply(&mut c, rep::ERR_INVALID, b"negotiate structured replies first")?;
                    continue;
                }
                let Some(queries) = for_this_export(&mut c, o, proto::decode_meta_request(&data), e)? else {
                    continue;
                };
                let wanted = if o == opt::LIST_META_CONTEXT {
                    queries.is_empty() || queries.iter().any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
                } else {
                    queries.iter().any(|q| q == proto::BASE_ALLOCATION)
                };
                if o == opt::SET_META_CONTEXT {
                    s.base_allocation = wanted;
                }
                if wanted {
                    let mut d = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    reply(&mut c, rep::META_CONTEXT, &d)?;
                }
                reply(&mut c, rep::ACK, &[])?;
            }
            _ => reply(&mut c, rep::ERR_UNSUP, b"unsupported option")?,
        }
    }
    transmission(c, e, &s)
}

/// The rest of an option payload naming an export, if it decoded and names ours (`""` too);
/// otherwise the error reply (ERR_INVALID or ERR_UNKNOWN) is sent and `None` returned.
fn for_this_export<C: Conn, T>(
    c: &mut C,
    option: u32,
    decoded: Result<(String, T), proto::ProtoError>,
    e: &Export,
) -> std::io::Result<Option<T>> {
    match decoded {
        Err(err) => {
            c.write_all(&proto::option_reply(option, rep::ERR_INVALID, err.to_string().as_bytes())).map(|_| None)
        }
        Ok((name, _)) if !name.is_empty() && name != e.name => c
            .write_all(&proto::option_reply(option, rep::ERR_UNKNOWN, format!("no export {name:?}").as_bytes()))
            .map(|_| None),
        Ok((_, rest)) => Ok(Some(rest)),
    }
}

fn errno_of(err: &DiskError) -> u32 {
    match err.errno() {
        libc::EINVAL => errno::EINVAL,
        libc::ENOSPC => errno::ENOSPC,
        libc::ESHUTDOWN => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

fn write_all_vectored(c: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = c.write_vectored(bufs)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

fn transmission<C: Conn>(mut c: C, e: &Export, s: &Session) -> Result<(), ServeError> {
    let size = e.disk.size();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Between requests the client may stay idle as long as it likes.
        c.set_timeout(None)?;
        let mut h = [0u8; REQUEST_LEN];
        match c.read_exact(&mut h) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        c.set_timeout(Some(e.io_timeout))?;
        let r = Request::decode(&h).map_err(protocol)?;
        let fail = |c: &mut C, code: u32, msg: &str| -> std::io::Result<()> {
            if s.structured {
                c.write_all(&proto::structured_error(r.handle, code, msg))
            } else {
                c.write_all(&proto::simple_reply(code, r.handle))
            }
        };
        let ok = |c: &mut C| -> std::io::Result<()> {
            if s.structured {
                c.write_all(&proto::structured_header(chunk::FLAG_DONE, chunk::NONE, r.handle, 0))
            } else {
                c.write_all(&proto::simple_reply(0, r.handle))
            }
        };
        let in_bounds = r.offset.checked_add(r.len as u64).is_some_and(|end| end <= size);
        let fua = r.flags & cflag::FUA != 0;
        match r.kind {
            cmd::READ => {
                if r.len > proto::MAX_REQUEST {
                    fail(&mut c, errno::EINVAL, "read longer than the maximum block size")?;
                    continue;
                }
                if !in_bounds {
                    fail(&mut c, errno::EINVAL, "read past the end of the export")?;
                    continue;
                }
                buf.resize(r.len as usize, 0);
                match e.disk.read(r.offset, &mut buf) {
                    Ok(()) if s.structured => {
                        let hdr = proto::structured_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, r.handle, 8 + r.len);
                        let off = r.offset.to_be_bytes();
                        write_all_vectored(&mut c, &mut [IoSlice::new(&hdr), IoSlice::new(&off), IoSlice::new(&buf)])?;
                    }
                    Ok(()) => {
                        let hdr = proto::simple_reply(0, r.handle);
                        write_all_vectored(&mut c, &mut [IoSlice::new(&hdr), IoSlice::new(&buf)])?;
                    }
                    Err(err) => fail(&mut c, errno_of(&err), &err.to_string())?,
                }
            }
            cmd::WRITE => {
                if r.len > proto::MAX_REQUEST {
                    // Its payload cannot be skipped safely: answer, then close.
                    fail(&mut c, errno::EINVAL, "write longer than the maximum block size")?;
                    return Err(protocol(format!("a {}-byte write", r.len)));
                }
                buf.resize(r.len as usize, 0);
                c.read_exact(&mut buf)?;
                if e.read_only {
                    fail(&mut c, errno::EPERM, "read-only export")?;
                } else if !in_bounds {
                    fail(&mut c, errno::ENOSPC, "write past the end of the export")?;
                } else {
                    match e.disk.write(r.offset, &buf, fua) {
                        Ok(()) => ok(&mut c)?,
                        Err(err) => fail(&mut c, errno_of(&err), &err.to_string())?,
                    }
                }
            }
            cmd::DISC => return Ok(()),
            cmd::FLUSH => match e.disk.flush() {
                Ok(()) => ok(&mut c)?,
                Err(err) => fail(&mut c, errno_of(&err), &err.to_string())?,
            },
            cmd::TRIM => {
                // Trimmed bytes may read back as anything; keeping them is allowed and keeps
                // a mirror's chunks as they are.
                if e.read_only {
                    fail(&mut c, errno::EPERM, "read-only export")?;
                } else if !in_bounds {
                    fail(&mut c, errno::EINVAL, "trim past the end of the export")?;
                } else {
                    ok(&mut c)?;
                }
            }
            cmd::WRITE_ZEROES => {
                if e.read_only {
                    fail(&mut c, errno::EPERM, "read-only export")?;
                } else if !in_bounds {
                    fail(&mut c, errno::ENOSPC, "write past the end of the export")?;
                } else {
                    let punch = r.flags & cflag::NO_HOLE == 0;
                    match e.disk.write_zeroes(r.offset, r.len as u64, fua, punch) {
                        Ok(()) => ok(&mut c)?,
                        Err(err) => fail(&mut c, errno_of(&err), &err.to_string())?,
                    }
                }
            }
            cmd::CACHE => {
                if !in_bounds {
                    fail(&mut c, errno::EINVAL, "cache past the end of the export")?;
                    continue;
                }
                // Prefetch: bring the range local.
                let mut at = r.offset;
                let end = r.offset + r.len as u64;
                let mut res = Ok(());
                while at < end && res.is_ok() {
                    let n = (end - at).min(1 << 20) as usize;
                    buf.resize(n, 0);
                    res = e.disk.read(at, &mut buf);
                    at += n as u64;
                }
                match res {
                    Ok(()) => ok(&mut c)?,
                    Err(err) => fail(&mut c, errno_of(&err), &err.to_string())?,
                }
            }
            cmd::BLOCK_STATUS => {
                if !s.structured || !s.base_allocation {
                    fail(&mut c, errno::EINVAL, "no metadata context negotiated")?;
                    continue;
                }
                if !in_bounds || r.len == 0 {
                    fail(&mut c, errno::EINVAL, "block status outside the export")?;
                    continue;
                }
                match e.disk.allocation(Range::new(r.offset, r.offset + r.len as u64)) {
                    Ok(runs) => {
                        let take = if r.flags & cflag::REQ_ONE != 0 { 1 } else { runs.len() };
                        let mut d = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        for (len, hole) in runs.into_iter().take(take) {
                            let len = len.min(u32::MAX as u64) as u32;
                            d.extend_from_slice(&len.to_be_bytes());
                            let st = if hole { proto::STATE_HOLE | proto::STATE_ZERO } else { 0 };
                            d.extend_from_slice(&st.to_be_bytes());
                        }
                        let hdr =
                            proto::structured_header(chunk::FLAG_DONE, chunk::BLOCK_STATUS, r.handle, d.len() as u32);
                        write_all_vectored(&mut c, &mut [IoSlice::new(&hdr), IoSlice::new(&d)])?;
                    }
                    Err(err) => fail(&mut c, errno_of(&err), &err.to_string())?,
                }
            }
            other => fail(&mut c, errno::EINVAL, &format!("unknown command {other}"))?,
        }
    }
}
