//! NBD wire formats (fixed newstyle negotiation, simple and structured replies), pure:
//! decoders return typed errors for anything malformed and are fuzzed; encoders build bytes.
//! Everything is big-endian.

/// "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;

/// Transmission flags.
pub mod tflag {
    /// Flags are valid.
    pub const HAS_FLAGS: u16 = 1;
    /// Read-only export.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF (don't fragment) supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Options.
pub mod opt {
    /// Legacy export selection.
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS.
    pub const STARTTLS: u32 = 5;
    /// Export information.
    pub const INFO: u32 = 6;
    /// Select an export.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// An export (LIST).
    pub const SERVER: u32 = 2;
    /// Export information.
    pub const INFO: u32 = 3;
    /// A metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// TLS refused.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// Too big.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Info types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1;
    /// Write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail a write-zeroes that would be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// `base:allocation` states.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// NBD errno values.
pub mod errno {
    /// Not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Overflow.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down (or, here, handed the disk over).
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest option payload accepted.
pub const MAX_OPTION: u32 = 64 << 10;
/// Largest read or write a request may ask for (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Name of the one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// A malformed negotiation or request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Wrong magic.
    #[error("bad magic {0:#x}")]
    Magic(u64),
    /// An option longer than [`MAX_OPTION`].
    #[error("option payload of {0} bytes (at most {MAX_OPTION})")]
    OptionTooLong(u32),
    /// Inconsistent option payload.
    #[error("malformed option payload: {0}")]
    Option(&'static str),
    /// A string that is not UTF-8 or too long.
    #[error("bad string in option: {0}")]
    String(&'static str),
}

/// An option request header (after the 8-byte IHAVEOPT): `(option, payload length)`.
pub fn decode_option_header(b: &[u8; 16]) -> Result<(u32, u32), ProtoError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic(magic));
    }
    let o = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    if len > MAX_OPTION {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok((o, len))
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Option(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let n = self.u32(what)? as usize;
        if n > 4096 {
            return Err(ProtoError::String("longer than 4096 bytes"));
        }
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| ProtoError::String("not UTF-8"))
    }
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: export name and the info types asked for.
pub fn decode_info_request(b: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let mut c = Cursor(b);
    let name = c.string("export name")?;
    let n = c.u16("info count")? as usize;
    let mut infos = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        infos.push(c.u16("info type")?);
    }
    if !c.0.is_empty() {
        return Err(ProtoError::Option("trailing bytes after the info requests"));
    }
    Ok((name, infos))
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: export name and queries.
pub fn decode_meta_request(b: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut c = Cursor(b);
    let name = c.string("export name")?;
    let n = c.u32("query count")? as usize;
    let mut q = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        q.push(c.string("query")?);
    }
    if !c.0.is_empty() {
        return Err(ProtoError::Option("trailing bytes after the queries"));
    }
    Ok((name, q))
}

/// A transmission-phase request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// Client's handle (cookie).
    pub handle: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Decodes a request header (the payload of a WRITE follows it).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::Magic(magic as u64));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
            kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
            handle: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes it (for tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn structured_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (final).
pub fn structured_error(handle: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut v = structured_header(chunk::FLAG_DONE, chunk::ERROR, handle, 6 + msg.len() as u32).to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request { flags: cflag::FUA, kind: cmd::WRITE, handle: 7, offset: 4096, len: 512 };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert!(matches!(Request::decode(&b), Err(ProtoError::Magic(_))));
    }

    #[test]
    fn option_payloads() {
        let mut p = Vec::new();
        p.extend_from_slice(&3u32.to_be_bytes());
        p.extend_from_slice(b"foo");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(decode_info_request(&p), Ok(("foo".into(), vec![3, 1])));
        assert!(decode_info_request(&p[..p.len() - 1]).is_err());
        let mut extra = p.clone();
        extra.push(0);
        assert!(decode_info_request(&extra).is_err());
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(decode_meta_request(&m), Ok((String::new(), vec!["base:allocation".into()])));
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_request(&huge).is_err());
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        h[12..16].copy_from_slice(&(MAX_OPTION + 1).to_be_bytes());
        assert_eq!(decode_option_header(&h), Err(ProtoError::OptionTooLong(MAX_OPTION + 1)));
    }
}
