//! The byte formats of the verbs backend's own control path: the setup blob exchanged over
//! TCP and the header of every control-message fragment carried in an RDMA SEND. Both come
//! from the peer, so their decoders are pure (no FFI, no device) and fuzzed
//! (`fuzz/fuzz_targets/verbs_ctrl.rs`).
//!
//! # Setup blob
//!
//! The body of the one MSG frame each side sends over the out-of-band TCP socket once its
//! queue pair is in RTS (see [`crate::wire`]), 24 bytes, little endian:
//!
//! ```text
//!  0        4     5        8             16            20           24
//!  +--------+-----+--------+-------------+-------------+------------+
//!  | magic  | ver | 0      | credit_addr | credit_rkey | recv_buf   |
//!  | "LMVB" | u8  | u8[3]  | u64         | u32         | u32        |
//!  +--------+-----+--------+-------------+-------------+------------+
//! ```
//!
//! `ver` = [`SETUP_VERSION`]; `credit_addr`/`credit_rkey`: the 8-byte word the receiver of
//! the blob RDMA-writes its cumulative consumed-message count into (returned credits);
//! `recv_buf`: the size of each of the sender's posted receive buffers, which bounds a
//! fragment (header included) and must exceed [`MSG_HEADER_LEN`].
//!
//! # Message header
//!
//! Every SEND (every fragment of a control message) starts with 16 bytes, little endian,
//! followed by exactly `len` payload bytes (the receive completion's byte count is the
//! fragment's size):
//!
//! ```text
//!  0      1       2       4       8               16
//!  +------+-------+-------+-------+---------------+------------------+
//!  | kind | flags | 0     | len   | bytes_written | payload          |
//!  | u8   | u8    | u16   | u32   | u64           | (len bytes)      |
//!  +------+-------+-------+-------+---------------+------------------+
//! ```
//!
//! `kind` = [`KIND_MSG`] (a control-message fragment) or [`KIND_REGIONS`] (regions exposed
//! after the handshake: the payload is one whole `REGIONS` frame of [`crate::wire`], never
//! fragmented, see [`decode_announcement`]); `flags`: [`FLAG_MORE`] (more fragments of this
//! message follow; never on an announcement), every other bit 0; `bytes_written`: the
//! sender's cumulative bytes posted as RDMA WRITEs before this SEND (all of them placed when
//! the SEND arrives, RC ordering).
//!
//! Both formats are canonical: whatever decodes re-encodes to the same bytes. Decoders never
//! panic; they return a typed [`DecodeError`].

use crate::wire::{DecodeError, FrameType};

/// Magic of the setup blob.
pub const SETUP_MAGIC: [u8; 4] = *b"LMVB";
/// The setup blob version this build speaks (and the only one it accepts).
pub const SETUP_VERSION: u8 = 1;
/// Setup blob length.
pub const SETUP_LEN: usize = 24;
/// In-band message header length.
pub const MSG_HEADER_LEN: usize = 16;
/// Message header kind: a control-message fragment.
pub const KIND_MSG: u8 = 1;
/// Message header kind: a region announcement (regions exposed after the handshake).
pub const KIND_REGIONS: u8 = 2;
/// Message header flag: more fragments follow.
pub const FLAG_MORE: u8 = 1;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The setup blob: where the peer returns credits, and how large a fragment may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// Address of the sender's credit word (in its control MR).
    pub credit_addr: u64,
    /// rkey of the MR holding the credit word.
    pub credit_rkey: u32,
    /// Size of each of the sender's receive buffers (> [`MSG_HEADER_LEN`]).
    pub recv_buf: u32,
}

impl Setup {
    /// Encodes the blob.
    pub fn encode(&self) -> [u8; SETUP_LEN] {
        let mut b = [0u8; SETUP_LEN];
        b[0..4].copy_from_slice(&SETUP_MAGIC);
        b[4] = SETUP_VERSION;
        b[8..16].copy_from_slice(&self.credit_addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.credit_rkey.to_le_bytes());
        b[20..24].copy_from_slice(&self.recv_buf.to_le_bytes());
        b
    }

    /// Decodes a MSG body as a setup blob: exactly [`SETUP_LEN`] bytes, the magic, version
    /// [`SETUP_VERSION`], zero reserved bytes, `recv_buf` > [`MSG_HEADER_LEN`].
    pub fn decode(b: &[u8]) -> Result<Setup, DecodeError> {
        if b.len() != SETUP_LEN {
            return Err(DecodeError::BadLength {
                kind: FrameType::Msg,
                len: u32::try_from(b.len()).unwrap_or(u32::MAX),
                expected: SETUP_LEN as u32,
            });
        }
        if b[0..4] != SETUP_MAGIC {
            return Err(DecodeError::Invalid { field: "verbs setup magic", value: u32_at(b, 0) as u64 });
        }
        if b[4] != SETUP_VERSION {
            return Err(DecodeError::Invalid { field: "verbs setup version", value: b[4] as u64 });
        }
        if b[5..8] != [0; 3] {
            return Err(DecodeError::Reserved(u32::from_le_bytes([b[5], b[6], b[7], 0])));
        }
        let s = Setup { credit_addr: u64_at(b, 8), credit_rkey: u32_at(b, 16), recv_buf: u32_at(b, 20) };
        if s.recv_buf as usize <= MSG_HEADER_LEN {
            return Err(DecodeError::Invalid { field: "verbs receive buffer size", value: s.recv_buf as u64 });
        }
        Ok(s)
    }
}

/// The header of one control-message fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    /// The fragment is a region announcement ([`KIND_REGIONS`]), not a message fragment.
    pub announce: bool,
    /// More fragments of this message follow.
    pub more: bool,
    /// Payload bytes after the header.
    pub len: u32,
    /// The sender's cumulative bytes written (RDMA WRITE) before this SEND.
    pub bytes_written: u64,
}

impl MsgHeader {
    /// Encodes the header (the payload follows it in the same SEND).
    pub fn encode(&self) -> [u8; MSG_HEADER_LEN] {
        let mut b = [0u8; MSG_HEADER_LEN];
        b[0] = if self.announce { KIND_REGIONS } else { KIND_MSG };
        b[1] = if self.more { FLAG_MORE } else { 0 };
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.bytes_written.to_le_bytes());
        b
    }

    /// Decodes the header of a received fragment; `fragment` is the whole fragment (header
    /// and payload, as the receive completion reported it), so `len` must account for every
    /// byte after the header. The payload is `&fragment[MSG_HEADER_LEN..]`.
    pub fn decode(fragment: &[u8]) -> Result<MsgHeader, DecodeError> {
        let b = fragment;
        if b.len() < MSG_HEADER_LEN {
            return Err(DecodeError::Truncated { need: MSG_HEADER_LEN, have: b.len() });
        }
        if b[0] != KIND_MSG && b[0] != KIND_REGIONS {
            return Err(DecodeError::Invalid { field: "verbs message kind", value: b[0] as u64 });
        }
        let announce = b[0] == KIND_REGIONS;
        if b[1] & !FLAG_MORE != 0 || (announce && b[1] != 0) {
            return Err(DecodeError::Invalid { field: "verbs message flags", value: b[1] as u64 });
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(DecodeError::Reserved(u16::from_le_bytes([b[2], b[3]]) as u32));
        }
        let len = u32_at(b, 4);
        if len as usize != b.len() - MSG_HEADER_LEN {
            return Err(DecodeError::Invalid { field: "verbs message length", value: len as u64 });
        }
        Ok(MsgHeader { announce, more: b[1] & FLAG_MORE != 0, len, bytes_written: u64_at(b, 8) })
    }
}

/// Decodes the payload of a [`KIND_REGIONS`] fragment: exactly one `REGIONS` frame of
/// [`crate::wire`] (its own decoder bounds the entry count), nothing after it.
pub fn decode_announcement(payload: &[u8]) -> Result<Vec<crate::RegionInfo>, DecodeError> {
    let (f, used) = crate::wire::Frame::decode(payload)?;
    if used != payload.len() {
        return Err(DecodeError::Invalid { field: "bytes after a region announcement", value: payload.len() as u64 });
    }
    match f {
        crate::wire::Frame::Regions(rs) => Ok(rs),
        other => Err(DecodeError::Unexpected { got: other.kind(), expected: "REGIONS" }),
    }
}

/// Encodes a region announcement's payload (the inverse of [`decode_announcement`]).
pub fn encode_announcement(regions: &[crate::RegionInfo]) -> Vec<u8> {
    crate::wire::Frame::Regions(regions.to_vec()).encode()
}

/// Urgent-channel message tag: a message of the channel's user follows.
pub const URGENT_MESSAGE: u8 = 0;
/// Urgent-channel message tag: an urgent write was placed (region, offset, length follow).
pub const URGENT_PLACED: u8 = 1;
/// Length of an [`URGENT_PLACED`] message: tag, region u32, offset u64, length u32.
pub const URGENT_PLACED_LEN: usize = 17;

/// One message of the urgent queue pair (the payload of a whole control message on it):
///
/// ```text
///  tag 0 (URGENT_MESSAGE): | 0 | the user's message (any length)                  |
///  tag 1 (URGENT_PLACED):  | 1 | region u32 | offset u64 | len u32 |  (17 bytes, LE)
/// ```
///
/// A PLACED message is SENT right after the RDMA WRITE it describes, on the same queue pair,
/// so it arrives only once those bytes are placed (RC ordering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrgentMsg<'a> {
    /// A message of the channel's user.
    Message(&'a [u8]),
    /// The sender's urgent write to `[offset, offset + len)` of our region `region` is placed.
    Placed {
        /// Our region.
        region: u32,
        /// Byte offset.
        offset: u64,
        /// Length (never 0).
        len: u32,
    },
}

impl UrgentMsg<'_> {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            UrgentMsg::Message(m) => [&[URGENT_MESSAGE][..], m].concat(),
            UrgentMsg::Placed { region, offset, len } => {
                let mut b = Vec::with_capacity(URGENT_PLACED_LEN);
                b.push(URGENT_PLACED);
                b.extend_from_slice(&region.to_le_bytes());
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
                b
            }
        }
    }

    /// Decodes a message of the urgent queue pair. The range of a PLACED message is not
    /// checked here (the receiver checks it against what it exposed); a zero length is
    /// refused.
    pub fn decode(b: &[u8]) -> Result<UrgentMsg<'_>, DecodeError> {
        match b.first() {
            None => Err(DecodeError::Truncated { need: 1, have: 0 }),
            Some(&URGENT_MESSAGE) => Ok(UrgentMsg::Message(&b[1..])),
            Some(&URGENT_PLACED) => {
                if b.len() != URGENT_PLACED_LEN {
                    return Err(DecodeError::Invalid { field: "urgent placement length", value: b.len() as u64 });
                }
                let len = u32_at(b, 13);
                if len == 0 {
                    return Err(DecodeError::Invalid { field: "urgent placement of 0 bytes", value: 0 });
                }
                Ok(UrgentMsg::Placed { region: u32_at(b, 1), offset: u64_at(b, 5), len })
            }
            Some(&t) => Err(DecodeError::Invalid { field: "urgent message tag", value: t as u64 }),
        }
    }
}

/// Byte-channel message tag: stream bytes follow.
pub const BYTES_DATA: u8 = 0;
/// Byte-channel message tag: the sender's direction has ended (nothing follows).
pub const BYTES_END: u8 = 1;

/// One message of a byte-channel queue pair: `| 0 | bytes |` (at least one byte) or `| 1 |`
/// (end of the sender's direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BytesMsg<'a> {
    /// Stream bytes (never empty).
    Data(&'a [u8]),
    /// End of stream.
    End,
}

impl BytesMsg<'_> {
    /// Decodes a byte-channel message.
    pub fn decode(b: &[u8]) -> Result<BytesMsg<'_>, DecodeError> {
        match b {
            [] => Err(DecodeError::Truncated { need: 1, have: 0 }),
            [BYTES_DATA] => Err(DecodeError::Invalid { field: "empty byte-channel data", value: 0 }),
            [BYTES_DATA, rest @ ..] => Ok(BytesMsg::Data(rest)),
            [BYTES_END] => Ok(BytesMsg::End),
            [BYTES_END, ..] => Err(DecodeError::Invalid { field: "byte-channel end length", value: b.len() as u64 }),
            [t, ..] => Err(DecodeError::Invalid { field: "byte-channel message tag", value: *t as u64 }),
        }
    }

    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            BytesMsg::Data(d) => [&[BYTES_DATA][..], d].concat(),
            BytesMsg::End => vec![BYTES_END],
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn fragment(h: &MsgHeader, payload: &[u8]) -> Vec<u8> {
        let mut b = h.encode().to_vec();
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn message_header_round_trip() {
        for (h, payload) in [
            (MsgHeader { announce: false, more: true, len: 3, bytes_written: 1 << 40 }, &b"abc"[..]),
            (MsgHeader { announce: false, more: false, len: 0, bytes_written: 0 }, &b""[..]),
            (MsgHeader { announce: false, more: false, len: 5, bytes_written: u64::MAX }, &b"hello"[..]),
        ] {
            let b = fragment(&h, payload);
            assert_eq!(MsgHeader::decode(&b).unwrap(), h);
            assert_eq!(&b[MSG_HEADER_LEN..], payload);
        }
        // The layout of the module doc.
        let b =
            MsgHeader { announce: false, more: true, len: 0x0403_0201, bytes_written: 0x0807_0605_0403_0201 }.encode();
        assert_eq!(b, [1, 1, 0, 0, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn message_header_rejects() {
        let b = fragment(&MsgHeader { announce: false, more: true, len: 3, bytes_written: 1 << 40 }, b"abc");
        for n in 0..MSG_HEADER_LEN {
            assert_eq!(
                MsgHeader::decode(&b[..n]),
                Err(DecodeError::Truncated { need: MSG_HEADER_LEN, have: n }),
                "{n} bytes"
            );
        }
        let mut bad = b.clone();
        bad[0] = 9;
        let mut ann = b.clone();
        ann[0] = KIND_REGIONS;
        assert_eq!(
            MsgHeader::decode(&ann),
            Err(DecodeError::Invalid { field: "verbs message flags", value: 1 }),
            "an announcement is never fragmented"
        );
        ann[1] = 0;
        assert!(MsgHeader::decode(&ann).unwrap().announce);
        assert_eq!(MsgHeader::decode(&bad), Err(DecodeError::Invalid { field: "verbs message kind", value: 9 }));
        bad[0] = 0;
        assert_eq!(MsgHeader::decode(&bad), Err(DecodeError::Invalid { field: "verbs message kind", value: 0 }));
        let mut bad = b.clone();
        bad[1] = 3;
        assert_eq!(MsgHeader::decode(&bad), Err(DecodeError::Invalid { field: "verbs message flags", value: 3 }));
        let mut bad = b.clone();
        bad[3] = 1;
        assert_eq!(MsgHeader::decode(&bad), Err(DecodeError::Reserved(0x100)));
        let mut bad = b.clone();
        bad[2] = 2;
        assert_eq!(MsgHeader::decode(&bad), Err(DecodeError::Reserved(2)));
        // The payload is shorter or longer than `len` says.
        assert_eq!(
            MsgHeader::decode(&b[..MSG_HEADER_LEN + 2]),
            Err(DecodeError::Invalid { field: "verbs message length", value: 3 })
        );
        let mut long = b.clone();
        long.push(0);
        assert_eq!(MsgHeader::decode(&long), Err(DecodeError::Invalid { field: "verbs message length", value: 3 }));
        let mut huge = b.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            MsgHeader::decode(&huge),
            Err(DecodeError::Invalid { field: "verbs message length", value: u32::MAX as u64 })
        );
    }

    #[test]
    fn announcement_urgent_and_bytes_messages() {
        let info = crate::RegionInfo {
            id: 7,
            len: 1 << 20,
            page_size: 4096,
            access: crate::Access::REMOTE_WRITE,
            addr: 0x7f00_0000_0000,
            rkey: 0x42,
        };
        let a = encode_announcement(&[info]);
        assert_eq!(decode_announcement(&a).unwrap(), vec![info]);
        assert!(decode_announcement(&a[..a.len() - 1]).is_err(), "truncated");
        assert!(decode_announcement(&[&a[..], &[0]].concat()).is_err(), "trailing bytes");
        let msg = crate::wire::Frame::Msg(b"x".to_vec()).encode();
        assert!(matches!(decode_announcement(&msg), Err(DecodeError::Unexpected { .. })));

        for m in [
            UrgentMsg::Message(b"page 9"),
            UrgentMsg::Message(b""),
            UrgentMsg::Placed { region: 2, offset: 1 << 33, len: 4096 },
        ] {
            assert_eq!(UrgentMsg::decode(&m.encode()).unwrap(), m);
        }
        let p = UrgentMsg::Placed { region: 2, offset: 8192, len: 4096 }.encode();
        assert_eq!(p.len(), URGENT_PLACED_LEN);
        assert!(UrgentMsg::decode(&p[..16]).is_err());
        assert!(UrgentMsg::decode(&UrgentMsg::Placed { region: 2, offset: 0, len: 0 }.encode()).is_err());
        assert!(UrgentMsg::decode(&[9]).is_err());
        assert!(UrgentMsg::decode(&[]).is_err());

        assert_eq!(BytesMsg::decode(&BytesMsg::Data(b"abc").encode()).unwrap(), BytesMsg::Data(b"abc"));
        assert_eq!(BytesMsg::decode(&BytesMsg::End.encode()).unwrap(), BytesMsg::End);
        for bad in [&[][..], &[BYTES_DATA], &[BYTES_END, 0], &[2, 1]] {
            assert!(BytesMsg::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn setup_round_trip() {
        for s in [
            Setup { credit_addr: 0x7f00_0000_1000, credit_rkey: 0x1234, recv_buf: 16 << 10 },
            Setup { credit_addr: 0, credit_rkey: 0, recv_buf: MSG_HEADER_LEN as u32 + 1 },
            Setup { credit_addr: u64::MAX, credit_rkey: u32::MAX, recv_buf: u32::MAX },
        ] {
            let b = s.encode();
            assert_eq!(Setup::decode(&b).unwrap(), s);
        }
        let b = Setup { credit_addr: 0x0807_0605_0403_0201, credit_rkey: 0x0c0b_0a09, recv_buf: 0x100f_0e0d }.encode();
        assert_eq!(b, *b"LMVB\x01\0\0\0\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10");
    }

    #[test]
    fn setup_rejects() {
        let b = Setup { credit_addr: 0x7f00_0000_1000, credit_rkey: 0x1234, recv_buf: 16 << 10 }.encode();
        for n in [0, 4, 20, 23] {
            assert_eq!(
                Setup::decode(&b[..n]),
                Err(DecodeError::BadLength { kind: FrameType::Msg, len: n as u32, expected: 24 })
            );
        }
        let long = [&b[..], &[0]].concat();
        assert_eq!(Setup::decode(&long), Err(DecodeError::BadLength { kind: FrameType::Msg, len: 25, expected: 24 }));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(
            Setup::decode(&bad),
            Err(DecodeError::Invalid { field: "verbs setup magic", value: u32::from_le_bytes(*b"XMVB") as u64 })
        );
        let mut bad = b;
        bad[4] = 2;
        assert_eq!(Setup::decode(&bad), Err(DecodeError::Invalid { field: "verbs setup version", value: 2 }));
        bad[4] = 0;
        assert_eq!(Setup::decode(&bad), Err(DecodeError::Invalid { field: "verbs setup version", value: 0 }));
        for (i, want) in [(5, 0x80), (6, 0x8000), (7, 0x80_0000)] {
            let mut bad = b;
            bad[i] = 0x80;
            assert_eq!(Setup::decode(&bad), Err(DecodeError::Reserved(want)), "byte {i}");
        }
        for recv_buf in [0, 1, MSG_HEADER_LEN as u32] {
            let s = Setup { credit_addr: 1, credit_rkey: 1, recv_buf };
            assert_eq!(
                Setup::decode(&s.encode()),
                Err(DecodeError::Invalid { field: "verbs receive buffer size", value: recv_buf as u64 }),
                "a receive buffer no larger than a header"
            );
        }
    }

    /// Random and mutated inputs: the decoders return, never panic, and whatever they accept
    /// re-encodes to the same bytes.
    #[test]
    fn fuzz_random_and_mutated() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf0bb);
        let seeds: Vec<Vec<u8>> = vec![
            Setup { credit_addr: 0x7f00_0000_1000, credit_rkey: 0x1234, recv_buf: 16 << 10 }.encode().to_vec(),
            Setup { credit_addr: 0, credit_rkey: 0, recv_buf: 17 }.encode().to_vec(),
            fragment(&MsgHeader { announce: false, more: true, len: 3, bytes_written: 1 << 40 }, b"abc"),
            fragment(&MsgHeader { announce: false, more: false, len: 0, bytes_written: 7 }, b""),
            fragment(&MsgHeader { announce: false, more: false, len: 40, bytes_written: 0 }, &[0x5a; 40]),
        ];
        let (mut setups, mut headers) = (0, 0);
        for i in 0..200_000 {
            let b: Vec<u8> = if i % 2 == 0 {
                let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    match rng.gen_range(0..4) {
                        0 if !b.is_empty() => {
                            let j = rng.gen_range(0..b.len());
                            b[j] = rng.gen();
                        }
                        1 if !b.is_empty() => {
                            // Flip one bit: the small changes a decoder is most likely to miss.
                            let j = rng.gen_range(0..b.len());
                            b[j] ^= 1 << rng.gen_range(0..8);
                        }
                        2 => b.truncate(rng.gen_range(0..=b.len())),
                        _ => b.push(rng.gen()),
                    }
                }
                b
            } else {
                let n = rng.gen_range(0..64);
                let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                if n >= 8 && rng.gen_bool(0.5) {
                    if rng.gen_bool(0.5) {
                        b[..4].copy_from_slice(&SETUP_MAGIC);
                        b[4] = SETUP_VERSION;
                        b[5..8].fill(0);
                    } else {
                        b[0] = if rng.gen_bool(0.8) { KIND_MSG } else { KIND_REGIONS };
                        b[1] &= FLAG_MORE;
                        b[2..4].fill(0);
                        b[4..8].copy_from_slice(&((n as u32).saturating_sub(MSG_HEADER_LEN as u32)).to_le_bytes());
                    }
                }
                b
            };
            if let Ok(s) = Setup::decode(&b) {
                assert_eq!(s.encode()[..], b[..], "{s:?}");
                setups += 1;
            }
            if let Ok(h) = MsgHeader::decode(&b) {
                assert_eq!(fragment(&h, &b[MSG_HEADER_LEN..]), b, "{h:?}");
                headers += 1;
            }
        }
        // The generator must reach the accepting paths, or the test proves little.
        assert!(setups > 1000 && headers > 1000, "accepted: {setups} setups, {headers} headers");
    }
}
