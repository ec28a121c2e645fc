//! The livemig wire protocol (version 3): the framing used by the TCP backend and by the
//! out-of-band connection setup of the verbs backend.
//!
//! Every frame starts with a 16-byte header, little endian:
//!
//! ```text
//!  0        4     5      6         8             12            16
//!  +--------+-----+------+---------+-------------+-------------+
//!  | magic  | ver | type | flags   | body_len    | aux         |
//!  | "LMIG" | u8  | u8   | u16     | u32         | u32         |
//!  +--------+-----+------+---------+-------------+-------------+
//!  | body (body_len bytes) ...                                  |
//! ```
//!
//! Bodies by type:
//!
//! ```text
//!  HELLO   (1): min_ver u8 | max_ver u8 | role u8 | stream u8 | streams u8 | hflags u8
//!               | byte_streams u8 | 0 u8 | session u64 | nonce [32]            (48 bytes)
//!               hflags bit 0 (HELLO_URGENT_STREAM): after the bulk streams comes the
//!               urgent channel (see below); other bits must be zero. byte_streams
//!               (≤ MAX_BYTE_STREAMS): the last that many connections are byte-stream
//!               channels, raw bytes after the handshake. At least one bulk stream remains.
//!  AUTH    (2): mac [32]  (HMAC-SHA256 key confirmation, see auth.rs)         (32 bytes)
//!  REGIONS (3): count u32 | count × { id u32 | access u8 | 0 u8[3] | len u64
//!               | addr u64 | rkey u32 | page_size u32 }               (4 + 32·count)
//!  WRITE   (4): wr_first u64 | 0 u64 | aux × { region u32 | len u32 | offset u64 }
//!               | payload (the entries' bytes, concatenated, Σ len = body_len − 16 − 16·aux)
//!               aux = entry count (1..=MAX_WRITE_ENTRIES); entry i is work request
//!               wr_first + i. Header flag SIGNALED (bit 0): acknowledge after placing.
//!               Header flag URGENT (bit 1): an urgent write (its own id space, never
//!               acknowledged); after placing, the receiver reports each entry's
//!               (region, offset, len) as an urgent event.
//!               The receiver checks every entry against its exposed regions, then reads
//!               the payload with one readv straight into the destination ranges.
//!  ACK     (5): upto u64   (every write with id ≤ upto is placed)                 (8)
//!  MSG     (6): opaque control message bytes (≤ MAX_MESSAGE)
//!  SYNC    (7): upto u64   (ask for an ACK of everything up to upto)              (8)
//!  CLOSE   (8): code u32 | reason utf-8 (≤ 1 KiB)
//!  VERBS   (9): qpn u32 | psn u32 | lid u16 | mtu u8 | gid_index u8 | gid [16]
//!               | max_sge u32 | credits u32                                      (36)
//!  URGENT (10): opaque urgent message bytes (≤ MAX_MESSAGE), delivered apart from MSG
//!  PAKE   (11): SPAKE2 message [33] (see auth.rs)                               (33)
//! ```
//!
//! The urgent channel: when the connector sets HELLO_URGENT_STREAM, its last connection
//! carries only URGENT messages and URGENT writes, in both directions, so a demand request
//! and the page that answers it never queue behind bulk writes. Urgent traffic is not
//! ordered with bulk traffic.
//!
//! Verbs setup: after the handshake each side sends VERBS, then one MSG whose 24-byte body is
//! `"LMVB" | version u8 = 1 | 0 u8[3] | credit_addr u64 | credit_rkey u32 | recv_buf u32`
//! (where the peer RDMA-writes returned message credits, and the receive buffer size); it also
//! signals "my queue pair is ready". The out-of-band TCP socket then stays open to detect a
//! vanished peer.
//!
//! `aux` must be 0 and `flags` 0 for every type but WRITE. Version 1 had no urgent channel
//! (HELLO byte 5 was reserved); version 2 authenticated with an HMAC over the shared secret
//! itself, which let an unauthenticated peer collect a proof to attack offline.
//!
//! Decoders never panic: they return a typed [`DecodeError`] for bad magic, an unsupported
//! version, an unknown type, a body that is too long, too short or inconsistent.

use crate::region::{Access, RegionInfo};

/// Frame magic, "LMIG".
pub const MAGIC: [u8; 4] = *b"LMIG";
/// The protocol version this build speaks.
pub const VERSION: u8 = 3;
/// Oldest version this build accepts.
pub const MIN_VERSION: u8 = 3;
/// Header size in bytes.
pub const HEADER_LEN: usize = 16;
/// Fixed part of a WRITE body (before the entry table).
pub const WRITE_FIXED_LEN: usize = 16;
/// Size of one WRITE table entry.
pub const WRITE_ENTRY_LEN: usize = 16;
/// Maximum entries (work requests) in one WRITE frame.
pub const MAX_WRITE_ENTRIES: u32 = 1024;
/// Maximum payload of one WRITE frame.
pub const MAX_WRITE_PAYLOAD: u32 = 64 << 20;
/// Maximum control message size.
pub const MAX_MESSAGE: u32 = 4 << 20;
/// Maximum number of regions in a REGIONS frame.
pub const MAX_REGIONS: u32 = 4096;
/// Maximum CLOSE reason length.
pub const MAX_REASON: usize = 1024;
/// Header flag of a WRITE: acknowledge it.
pub const FLAG_SIGNALED: u16 = 1;
/// Header flag of a WRITE: an urgent write (report its placement, never acknowledge it).
pub const FLAG_URGENT: u16 = 2;
/// HELLO flag: the session's last stream is the urgent channel.
pub const HELLO_URGENT_STREAM: u8 = 1;
/// Size of a SPAKE2 message (Ed25519 group: a side byte and a compressed point).
pub const PAKE_LEN: usize = 33;
/// Most byte-stream channels a session opens.
pub const MAX_BYTE_STREAMS: u8 = 16;

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameType {
    /// Version range, nonce.
    Hello = 1,
    /// Challenge response.
    Auth = 2,
    /// Exposed regions.
    Regions = 3,
    /// Data write into an exposed region.
    Write = 4,
    /// Cumulative write acknowledgement.
    Ack = 5,
    /// Control message.
    Msg = 6,
    /// Acknowledgement request.
    Sync = 7,
    /// Orderly close or error report.
    Close = 8,
    /// Verbs queue-pair endpoint.
    Verbs = 9,
    /// Urgent control message.
    Urgent = 10,
    /// Password-authenticated key exchange message (SPAKE2).
    Pake = 11,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Auth,
            3 => Self::Regions,
            4 => Self::Write,
            5 => Self::Ack,
            6 => Self::Msg,
            7 => Self::Sync,
            8 => Self::Close,
            9 => Self::Verbs,
            10 => Self::Urgent,
            11 => Self::Pake,
            _ => return None,
        })
    }
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not a livemig frame.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version outside the supported range.
    #[error("unsupported protocol version {got} (supported {MIN_VERSION}..={VERSION})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u8,
    },
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Reserved bits set.
    #[error("reserved header field is {0:#x}, must be 0")]
    Reserved(u32),
    /// The body is larger than allowed for this type.
    #[error("{kind:?} body of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Frame type.
        kind: FrameType,
        /// Announced length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The body length does not match the type's layout.
    #[error("{kind:?} body of {len} bytes, expected {expected}")]
    BadLength {
        /// Frame type.
        kind: FrameType,
        /// Announced length.
        len: u32,
        /// Expected length (or minimum).
        expected: u32,
    },
    /// The input ended before the frame did.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A field has an invalid value.
    #[error("invalid {field}: {value}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A frame arrived that is not allowed in this state.
    #[error("unexpected {got:?} frame while expecting {expected}")]
    Unexpected {
        /// What arrived.
        got: FrameType,
        /// What the state machine expected.
        expected: &'static str,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Version of the sender.
    pub version: u8,
    /// Frame type.
    pub kind: FrameType,
    /// Flags.
    pub flags: u16,
    /// Body length.
    pub body_len: u32,
    /// WRITE: entry count; 0 otherwise.
    pub aux: u32,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.version;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.aux.to_le_bytes());
        b
    }

    /// Bytes of the body the frame decoder needs in memory: everything but WRITE payloads.
    pub fn control_len(&self) -> usize {
        if self.kind == FrameType::Write {
            WRITE_FIXED_LEN + WRITE_ENTRY_LEN * self.aux as usize
        } else {
            self.body_len as usize
        }
    }

    /// Decodes and validates a header, including the per-type body size cap.
    pub fn decode(b: &[u8]) -> Result<Header, DecodeError> {
        if b.len() < HEADER_LEN {
            return Err(DecodeError::Truncated { need: HEADER_LEN, have: b.len() });
        }
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = b[4];
        let kind = FrameType::from_u8(b[5]).ok_or(DecodeError::UnknownType(b[5]))?;
        // HELLO is decodable at any version so the handshake can report a mismatch.
        if kind != FrameType::Hello && !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion { got: version });
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let body_len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let aux = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if kind == FrameType::Write {
            if aux == 0 || aux > MAX_WRITE_ENTRIES {
                return Err(DecodeError::Invalid { field: "write entry count", value: aux as u64 });
            }
            if flags & !(FLAG_SIGNALED | FLAG_URGENT) != 0 || flags == FLAG_SIGNALED | FLAG_URGENT {
                return Err(DecodeError::Invalid { field: "write flags", value: flags as u64 });
            }
            let table = (WRITE_FIXED_LEN + WRITE_ENTRY_LEN * aux as usize) as u32;
            if body_len < table {
                return Err(DecodeError::BadLength { kind, len: body_len, expected: table });
            }
        } else if aux != 0 {
            return Err(DecodeError::Reserved(aux));
        } else if flags != 0 {
            return Err(DecodeError::Invalid { field: "frame flags", value: flags as u64 });
        }
        let h = Header { version, kind, flags, body_len, aux };
        let (min, max) = body_bounds(kind);
        if body_len as u64 > max {
            return Err(DecodeError::TooLong { kind, len: body_len as u64, max });
        }
        if body_len < min {
            return Err(DecodeError::BadLength { kind, len: body_len, expected: min });
        }
        Ok(h)
    }
}

fn body_bounds(kind: FrameType) -> (u32, u64) {
    match kind {
        FrameType::Hello => (48, 48),
        FrameType::Auth => (32, 32),
        FrameType::Regions => (4, 4 + 32 * MAX_REGIONS as u64),
        FrameType::Write => (
            (WRITE_FIXED_LEN + WRITE_ENTRY_LEN) as u32,
            (WRITE_FIXED_LEN + WRITE_ENTRY_LEN * MAX_WRITE_ENTRIES as usize) as u64 + MAX_WRITE_PAYLOAD as u64,
        ),
        FrameType::Ack | FrameType::Sync => (8, 8),
        FrameType::Msg | FrameType::Urgent => (0, MAX_MESSAGE as u64),
        FrameType::Close => (4, 4 + MAX_REASON as u64),
        FrameType::Verbs => (36, 36),
        FrameType::Pake => (PAKE_LEN as u32, PAKE_LEN as u64),
    }
}

/// Which side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The side that connected.
    Connector = 0,
    /// The side that accepted.
    Acceptor = 1,
}

/// HELLO body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest version the sender speaks.
    pub min_version: u8,
    /// Newest version the sender speaks.
    pub max_version: u8,
    /// Sender's role.
    pub role: Role,
    /// Index of this stream among `streams` parallel streams.
    pub stream: u8,
    /// Number of parallel streams of the session (the urgent channel included).
    pub streams: u8,
    /// `HELLO_URGENT_STREAM` or 0.
    pub flags: u8,
    /// Byte-stream channels among the `streams` connections (the last ones).
    pub byte_streams: u8,
    /// Session id chosen by the connector (groups parallel streams).
    pub session: u64,
    /// Random challenge.
    pub nonce: [u8; 32],
}

/// One work request of a WRITE frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteEntry {
    /// Destination region.
    pub region: u32,
    /// Payload bytes.
    pub len: u32,
    /// Destination offset.
    pub offset: u64,
}

/// The control part of a WRITE frame (its payload follows in the stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFrame {
    /// Id of the first work request; entry i has id `wr_first + i`.
    pub wr_first: u64,
    /// Acknowledge after placing.
    pub signaled: bool,
    /// An urgent write: report each entry's placement, never acknowledge.
    pub urgent: bool,
    /// The work requests.
    pub entries: Vec<WriteEntry>,
}

impl WriteFrame {
    /// Total payload bytes.
    pub fn payload_len(&self) -> u64 {
        self.entries.iter().map(|e| e.len as u64).sum()
    }
    /// Id of the last work request.
    pub fn wr_last(&self) -> u64 {
        self.wr_first + self.entries.len() as u64 - 1
    }
}

/// Verbs endpoint description (out-of-band QP exchange).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerbsInfo {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// LID (InfiniBand) or 0 (RoCE).
    pub lid: u16,
    /// Path MTU enum value (1..=5).
    pub mtu: u8,
    /// GID index used by the sender.
    pub gid_index: u8,
    /// GID.
    pub gid: [u8; 16],
    /// Max SGEs per send WR the sender's QP supports.
    pub max_sge: u32,
    /// Receive credits the sender granted (posted receive buffers).
    pub credits: u32,
}

/// A decoded control-plane frame (everything but WRITE payloads, which are streamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// Challenge response MAC.
    Auth([u8; 32]),
    /// Exposed regions.
    Regions(Vec<RegionInfo>),
    /// WRITE control part; its payload follows in the stream.
    Write(WriteFrame),
    /// Cumulative acknowledgement.
    Ack(u64),
    /// Control message.
    Msg(Vec<u8>),
    /// Acknowledgement request.
    Sync(u64),
    /// Close with a code and a reason.
    Close {
        /// Code (see `close_code`).
        code: u32,
        /// Human-readable reason.
        reason: String,
    },
    /// Verbs endpoint.
    Verbs(VerbsInfo),
    /// Urgent control message.
    Urgent(Vec<u8>),
    /// SPAKE2 message.
    Pake([u8; PAKE_LEN]),
}

/// Close codes.
pub mod close_code {
    /// Normal end.
    pub const NORMAL: u32 = 0;
    /// Authentication failed.
    pub const AUTH: u32 = 1;
    /// Version mismatch.
    pub const VERSION: u32 = 2;
    /// Protocol violation.
    pub const PROTOCOL: u32 = 3;
    /// Request refused (bounds, regions).
    pub const REFUSED: u32 = 4;
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("bounds checked by caller"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("bounds checked by caller"))
}

impl Frame {
    /// The frame type.
    pub fn kind(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Auth(_) => FrameType::Auth,
            Frame::Regions(_) => FrameType::Regions,
            Frame::Write(_) => FrameType::Write,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Msg(_) => FrameType::Msg,
            Frame::Sync(_) => FrameType::Sync,
            Frame::Close { .. } => FrameType::Close,
            Frame::Verbs(_) => FrameType::Verbs,
            Frame::Urgent(_) => FrameType::Urgent,
            Frame::Pake(_) => FrameType::Pake,
        }
    }

    /// Encodes header and body. For WRITE only the header, fixed part and entry table are
    /// produced (the payload is sent from registered memory right after).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut flags = 0u16;
        let mut body_len_override = None;
        let mut aux = 0u32;
        match self {
            Frame::Hello(h) => {
                body.extend_from_slice(&[
                    h.min_version,
                    h.max_version,
                    h.role as u8,
                    h.stream,
                    h.streams,
                    h.flags,
                    h.byte_streams,
                    0,
                ]);
                body.extend_from_slice(&h.session.to_le_bytes());
                body.extend_from_slice(&h.nonce);
            }
            Frame::Auth(mac) => body.extend_from_slice(mac),
            Frame::Pake(m) => body.extend_from_slice(m),
            Frame::Regions(rs) => {
                body.extend_from_slice(&(rs.len() as u32).to_le_bytes());
                for r in rs {
                    body.extend_from_slice(&r.id.to_le_bytes());
                    body.extend_from_slice(&[r.access.bits(), 0, 0, 0]);
                    body.extend_from_slice(&r.len.to_le_bytes());
                    body.extend_from_slice(&r.addr.to_le_bytes());
                    body.extend_from_slice(&r.rkey.to_le_bytes());
                    body.extend_from_slice(&r.page_size.to_le_bytes());
                }
            }
            Frame::Write(w) => {
                body.extend_from_slice(&w.wr_first.to_le_bytes());
                body.extend_from_slice(&0u64.to_le_bytes());
                for e in &w.entries {
                    body.extend_from_slice(&e.region.to_le_bytes());
                    body.extend_from_slice(&e.len.to_le_bytes());
                    body.extend_from_slice(&e.offset.to_le_bytes());
                }
                if w.signaled {
                    flags |= FLAG_SIGNALED;
                }
                if w.urgent {
                    flags |= FLAG_URGENT;
                }
                aux = w.entries.len() as u32;
                body_len_override = Some((body.len() as u64 + w.payload_len()).min(u32::MAX as u64) as u32);
            }
            Frame::Ack(u) | Frame::Sync(u) => body.extend_from_slice(&u.to_le_bytes()),
            Frame::Msg(m) | Frame::Urgent(m) => body.extend_from_slice(m),
            Frame::Close { code, reason } => {
                body.extend_from_slice(&code.to_le_bytes());
                let mut r = reason.as_bytes();
                if r.len() > MAX_REASON {
                    let mut cut = MAX_REASON;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    r = &r[..cut];
                }
                body.extend_from_slice(r);
            }
            Frame::Verbs(v) => {
                body.extend_from_slice(&v.qpn.to_le_bytes());
                body.extend_from_slice(&v.psn.to_le_bytes());
                body.extend_from_slice(&v.lid.to_le_bytes());
                body.extend_from_slice(&[v.mtu, v.gid_index]);
                body.extend_from_slice(&v.gid);
                body.extend_from_slice(&v.max_sge.to_le_bytes());
                body.extend_from_slice(&v.credits.to_le_bytes());
            }
        }
        let version = match self {
            Frame::Hello(h) => h.max_version,
            _ => VERSION,
        };
        let h =
            Header { version, kind: self.kind(), flags, body_len: body_len_override.unwrap_or(body.len() as u32), aux };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a body for a validated header. For WRITE, `body` is the fixed part and the
    /// entry table ([`Header::control_len`] bytes).
    pub fn decode_body(h: &Header, body: &[u8]) -> Result<Frame, DecodeError> {
        // Reserved bytes must be zero, so every accepted frame has exactly one encoding.
        fn reserved_zero(r: &[u8]) -> Result<(), DecodeError> {
            match r.iter().fold(0u32, |acc, &x| acc << 8 | x as u32) {
                0 => Ok(()),
                v => Err(DecodeError::Reserved(v)),
            }
        }
        let need = h.control_len();
        if body.len() < need {
            return Err(DecodeError::Truncated { need, have: body.len() });
        }
        let b = &body[..need];
        let len = h.body_len;
        Ok(match h.kind {
            FrameType::Hello => {
                let role = match b[2] {
                    0 => Role::Connector,
                    1 => Role::Acceptor,
                    v => return Err(DecodeError::Invalid { field: "role", value: v as u64 }),
                };
                if b[0] > b[1] {
                    return Err(DecodeError::Invalid { field: "version range", value: b[0] as u64 });
                }
                if b[4] == 0 || b[3] >= b[4] {
                    return Err(DecodeError::Invalid { field: "stream index", value: b[3] as u64 });
                }
                if b[5] & !HELLO_URGENT_STREAM != 0 {
                    return Err(DecodeError::Invalid { field: "hello flags", value: b[5] as u64 });
                }
                let special = (b[5] & HELLO_URGENT_STREAM) as u16 + b[6] as u16;
                if b[6] > MAX_BYTE_STREAMS || special >= b[4] as u16 {
                    return Err(DecodeError::Invalid { field: "byte stream count", value: b[6] as u64 });
                }
                reserved_zero(&b[7..8])?;
                Frame::Hello(Hello {
                    min_version: b[0],
                    max_version: b[1],
                    role,
                    stream: b[3],
                    streams: b[4],
                    flags: b[5],
                    byte_streams: b[6],
                    session: u64_at(b, 8),
                    nonce: b[16..48].try_into().expect("48-byte body"),
                })
            }
            FrameType::Auth => Frame::Auth(b.try_into().expect("32-byte body")),
            FrameType::Pake => Frame::Pake(b.try_into().expect("33-byte body")),
            FrameType::Regions => {
                let count = u32_at(b, 0);
                if count > MAX_REGIONS {
                    return Err(DecodeError::TooLong { kind: h.kind, len: count as u64, max: MAX_REGIONS as u64 });
                }
                let expected = 4 + 32 * count;
                if len != expected {
                    return Err(DecodeError::BadLength { kind: h.kind, len, expected });
                }
                let mut rs = Vec::with_capacity(count as usize);
                for i in 0..count as usize {
                    let e = &b[4 + 32 * i..4 + 32 * (i + 1)];
                    let access = e[4];
                    reserved_zero(&e[5..8])?;
                    if access & !7 != 0 {
                        return Err(DecodeError::Invalid { field: "access", value: access as u64 });
                    }
                    let page_size = u32_at(e, 28);
                    if page_size == 0 || !page_size.is_power_of_two() {
                        return Err(DecodeError::Invalid { field: "page size", value: page_size as u64 });
                    }
                    rs.push(RegionInfo {
                        id: u32_at(e, 0),
                        access: Access::from_bits(access),
                        len: u64_at(e, 8),
                        addr: u64_at(e, 16),
                        rkey: u32_at(e, 24),
                        page_size,
                    });
                }
                Frame::Regions(rs)
            }
            FrameType::Write => {
                if u64_at(b, 8) != 0 {
                    return Err(DecodeError::Reserved(u32_at(b, 8) | u32_at(b, 12)));
                }
                let wr_first = u64_at(b, 0);
                if wr_first == 0 || wr_first.checked_add(h.aux as u64).is_none() {
                    return Err(DecodeError::Invalid { field: "work request id", value: wr_first });
                }
                let mut entries = Vec::with_capacity(h.aux as usize);
                let mut total = 0u64;
                for i in 0..h.aux as usize {
                    let e = &b[WRITE_FIXED_LEN + WRITE_ENTRY_LEN * i..WRITE_FIXED_LEN + WRITE_ENTRY_LEN * (i + 1)];
                    let entry = WriteEntry { region: u32_at(e, 0), len: u32_at(e, 4), offset: u64_at(e, 8) };
                    if entry.offset.checked_add(entry.len as u64).is_none() {
                        return Err(DecodeError::Invalid { field: "write offset+len", value: entry.offset });
                    }
                    total += entry.len as u64;
                    entries.push(entry);
                }
                let payload = len as u64 - need as u64;
                if total != payload {
                    return Err(DecodeError::BadLength {
                        kind: h.kind,
                        len,
                        expected: (need as u64 + total).min(u32::MAX as u64) as u32,
                    });
                }
                Frame::Write(WriteFrame {
                    wr_first,
                    signaled: h.flags & FLAG_SIGNALED != 0,
                    urgent: h.flags & FLAG_URGENT != 0,
                    entries,
                })
            }
            FrameType::Ack => Frame::Ack(u64_at(b, 0)),
            FrameType::Sync => Frame::Sync(u64_at(b, 0)),
            FrameType::Msg => Frame::Msg(b.to_vec()),
            FrameType::Urgent => Frame::Urgent(b.to_vec()),
            FrameType::Close => {
                Frame::Close { code: u32_at(b, 0), reason: String::from_utf8_lossy(&b[4..]).into_owned() }
            }
            FrameType::Verbs => {
                let mtu = b[10];
                if !(1..=5).contains(&mtu) {
                    return Err(DecodeError::Invalid { field: "path mtu", value: mtu as u64 });
                }
                Frame::Verbs(VerbsInfo {
                    qpn: u32_at(b, 0),
                    psn: u32_at(b, 4),
                    lid: u16::from_le_bytes([b[8], b[9]]),
                    mtu,
                    gid_index: b[11],
                    gid: b[12..28].try_into().expect("36-byte body"),
                    max_sge: u32_at(b, 28),
                    credits: u32_at(b, 32),
                })
            }
        })
    }

    /// Decodes one complete frame from the front of `buf`; returns it and the bytes used.
    /// WRITE frames are returned without payload but consume header + payload.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        let h = Header::decode(buf)?;
        let total = HEADER_LEN + h.body_len as usize;
        if buf.len() < total {
            return Err(DecodeError::Truncated { need: total, have: buf.len() });
        }
        let f = Frame::decode_body(&h, &buf[HEADER_LEN..total])?;
        Ok((f, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
                role: Role::Acceptor,
                stream: 1,
                streams: 4,
                flags: HELLO_URGENT_STREAM,
                byte_streams: 2,
                session: 0xdead_beef,
                nonce: [7; 32],
            }),
            Frame::Auth([9; 32]),
            Frame::Pake([5; PAKE_LEN]),
            Frame::Urgent(b"fault at page 7".to_vec()),
            Frame::Regions(vec![
                RegionInfo {
                    id: 1,
                    len: 1 << 30,
                    page_size: 4096,
                    access: Access::REMOTE_WRITE,
                    addr: 0x7f00,
                    rkey: 42,
                },
                RegionInfo { id: 2, len: 4096, page_size: 2 << 20, access: Access::LOCAL, addr: 0, rkey: 0 },
            ]),
            Frame::Regions(vec![]),
            Frame::Ack(77),
            Frame::Sync(78),
            Frame::Msg(b"round 3 done".to_vec()),
            Frame::Msg(vec![]),
            Frame::Close { code: close_code::AUTH, reason: "bad secret ü".into() },
            Frame::Verbs(VerbsInfo {
                qpn: 17,
                psn: 0x123456,
                lid: 0,
                mtu: 3,
                gid_index: 1,
                gid: [1; 16],
                max_sge: 32,
                credits: 64,
            }),
        ]
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let all = samples();
        let hello = all.iter().find(|f| matches!(f, Frame::Hello(_))).expect("a HELLO sample").encode();
        let regions = all.iter().find(|f| matches!(f, Frame::Regions(r) if !r.is_empty())).expect("a REGIONS sample");
        let regions = regions.encode();
        assert!(Frame::decode(&hello).is_ok() && Frame::decode(&regions).is_ok());
        for (frame, at) in [(&hello, HEADER_LEN + 7), (&regions, HEADER_LEN + 4 + 5)] {
            let mut b = frame.clone();
            b[at] = 0x40;
            assert!(matches!(Frame::decode(&b), Err(DecodeError::Reserved(v)) if v != 0), "byte {at}");
        }
        // Unknown HELLO flags, and flags on a frame that has none.
        let mut b = hello.clone();
        b[HEADER_LEN + 5] = 0x80;
        assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid { field: "hello flags", .. })));
        // Byte streams: at most MAX_BYTE_STREAMS, and a bulk stream must remain.
        let mut b = hello.clone();
        b[HEADER_LEN + 6] = 3; // 4 streams: urgent + 3 byte streams leaves no bulk stream
        assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid { field: "byte stream count", .. })));
        let mut m = Frame::Msg(vec![1]).encode();
        m[6] = 1;
        assert!(matches!(Frame::decode(&m), Err(DecodeError::Invalid { field: "frame flags", .. })));
    }

    #[test]
    fn round_trips() {
        for f in samples() {
            let bytes = f.encode();
            let (g, used) = Frame::decode(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(f, g);
        }
        let u = WriteFrame {
            wr_first: 9,
            signaled: false,
            urgent: true,
            entries: vec![WriteEntry { region: 1, len: 4, offset: 8 }],
        };
        let mut ub = Frame::Write(u.clone()).encode();
        ub.extend_from_slice(&[1; 4]);
        assert_eq!(Frame::decode(&ub).unwrap().0, Frame::Write(u));
        // Signaled and urgent together is not a valid write.
        ub[6] = (FLAG_SIGNALED | FLAG_URGENT) as u8;
        assert!(matches!(Frame::decode(&ub), Err(DecodeError::Invalid { field: "write flags", .. })));
        let w = WriteFrame {
            wr_first: 5,
            signaled: true,
            urgent: false,
            entries: vec![
                WriteEntry { region: 3, len: 4096, offset: 8192 },
                WriteEntry { region: 4, len: 100, offset: 0 },
            ],
        };
        let mut bytes = Frame::Write(w.clone()).encode();
        assert_eq!(bytes.len(), HEADER_LEN + WRITE_FIXED_LEN + 2 * WRITE_ENTRY_LEN);
        bytes.extend_from_slice(&[0xaa; 4196]);
        let (g, used) = Frame::decode(&bytes).unwrap();
        assert_eq!((g, used), (Frame::Write(w.clone()), bytes.len()));
        assert_eq!(w.wr_last(), 6);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(Header::decode(b"short"), Err(DecodeError::Truncated { .. })));
        assert!(matches!(Header::decode(&[0u8; 16]), Err(DecodeError::BadMagic(_))));
        let mut b = Frame::Ack(1).encode();
        b[4] = 9;
        assert_eq!(Header::decode(&b), Err(DecodeError::UnsupportedVersion { got: 9 }));
        let mut b = Frame::Ack(1).encode();
        b[5] = 200;
        assert_eq!(Header::decode(&b), Err(DecodeError::UnknownType(200)));
        let mut b = Frame::Ack(1).encode();
        b[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(DecodeError::TooLong { .. })));
        let mut b = Frame::Msg(vec![]).encode();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(DecodeError::TooLong { .. })));
        let mut b = Frame::Ack(1).encode();
        b[12] = 1;
        assert!(matches!(Header::decode(&b), Err(DecodeError::Reserved(1))));
        let mut b = Frame::Ack(1).encode();
        b[4] = 0;
        assert_eq!(Header::decode(&b), Err(DecodeError::UnsupportedVersion { got: 0 }));
        // truncated body
        let b = Frame::Auth([1; 32]).encode();
        assert!(matches!(Frame::decode(&b[..30]), Err(DecodeError::Truncated { .. })));
        // inconsistent region count
        let mut b = Frame::Regions(vec![]).encode();
        b[16..20].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(Frame::decode(&b), Err(DecodeError::BadLength { .. })));
        // write payload length overflow / inconsistency / offset overflow / entry count
        let wf = WriteFrame {
            wr_first: 1,
            signaled: false,
            urgent: false,
            entries: vec![WriteEntry { region: 1, len: 8, offset: 0 }],
        };
        let mut b = Frame::Write(wf.clone()).encode();
        b[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(DecodeError::TooLong { .. })));
        let mut b = Frame::Write(wf.clone()).encode();
        b.extend_from_slice(&[0; 8]);
        b[8..12].copy_from_slice(&(32u32 + 9).to_le_bytes());
        b.push(0);
        assert!(matches!(Frame::decode(&b), Err(DecodeError::BadLength { .. })));
        let mut b = Frame::Write(WriteFrame {
            entries: vec![WriteEntry { region: 1, len: 8, offset: u64::MAX - 2 }],
            ..wf.clone()
        })
        .encode();
        b.extend_from_slice(&[0; 8]);
        assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid { field: "write offset+len", .. })));
        let mut b = Frame::Write(wf.clone()).encode();
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(DecodeError::Invalid { .. })));
        // bad hello role
        let mut b = samples()[0].encode();
        b[16 + 2] = 5;
        assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid { field: "role", .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for f in samples() {
            let good = f.encode();
            for _ in 0..2000 {
                let mut b = good.clone();
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
                if rng.gen_bool(0.2) {
                    b.truncate(rng.gen_range(0..b.len()));
                }
                let _ = Frame::decode(&b);
            }
        }
    }
}
