//! Messages of a live disk transfer, carried as control messages of a livemig session (bulk:
//! pushes, background pulls, the handover; urgent: demand pulls and their answers). Pure
//! codec: every length and count is checked against the frame before anything is allocated.
//!
//! ```text
//!  tag  message       body (little endian)
//!   1   Begin         version u16, strategy u8, chunk_size u32, disk_size u64, base u64
//!   2   Accept        —
//!   3   Refuse        reason (UTF-8)
//!   4   Chunk         index u32, lo u32, hash u64, data (hi = lo + len)
//!   5   Remaining     n u32, n × (index u32, write_count u32)
//!   6   Control       entries u32 (the number of Remaining entries sent before it)
//!   7   Pull          index u32
//!   8   Unavailable   index u32
//!   9   Held          n u32, n × (index u32, lo u32, hi u32, hash u64)
//!  10   Cancelled     n u32, n × index u32
//!  11   Done          held u32, cancelled u32 (entries sent before it)
//!  12   Verified      checked u32, bad n u32, n × index u32
//!  13   Abort         reason (UTF-8)
//!  14   Taken         — (the destination serves I/O from now on)
//!  15   Alive         — (either side, at least every second while it has nothing else to say)
//!  16   Installed     n u64 (destination: pushed chunks installed so far; the source keeps
//!                     at most a window of pushes beyond it)
//! ```

/// Protocol version.
pub const VERSION: u16 = 2;
/// Pushed bytes the source may have beyond what the destination reported installed, by
/// default.
pub const PUSH_WINDOW: u64 = 64 << 20;
/// The destination reports installed pushes at least every this many.
pub const INSTALLED_EVERY: u64 = 16;
/// Most entries in one Remaining/Held/Cancelled message (keeps each under 4 MiB).
pub const MAX_ENTRIES: usize = 1 << 16;
/// Largest chunk a transfer carries (one chunk per message).
pub const MAX_CHUNK: u32 = 2 << 20;

/// Which strategy the source runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Active push of the ModifiedSet, then handover and prioritized pulls (the paper's).
    Hybrid,
    /// Iterative rounds of dirty chunks until the rest fits the downtime, then a final round
    /// with I/O stopped (QEMU's block migration and drive-mirror).
    Precopy,
}

impl Strategy {
    /// `hybrid` or `precopy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Hybrid => "hybrid",
            Strategy::Precopy => "precopy",
        }
    }
}

/// A held chunk at the end: the range the destination installed last and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldChunk {
    /// Chunk index.
    pub index: u32,
    /// Start of the installed range within the chunk.
    pub lo: u32,
    /// End of it.
    pub hi: u32,
    /// XXH3-64 of the bytes now in the destination's file there.
    pub hash: u64,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Source → destination: the disk to migrate.
    Begin {
        /// Protocol version.
        version: u16,
        /// Strategy.
        strategy: Strategy,
        /// Chunk size.
        chunk_size: u32,
        /// Disk size.
        disk_size: u64,
        /// Base fingerprint (0: plain disk).
        base: u64,
    },
    /// Destination → source: ready.
    Accept,
    /// Destination → source: cannot take it.
    Refuse(String),
    /// A chunk's locally valid bytes `[lo, lo + data.len())`.
    Chunk {
        /// Index.
        index: u32,
        /// Start within the chunk.
        lo: u32,
        /// XXH3-64 of `data`.
        hash: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Part of the RemainingSet with write counts.
    Remaining(Vec<(u32, u32)>),
    /// `TRANSFER_IO_CONTROL`: the destination serves I/O from now on.
    Control {
        /// Remaining entries sent before it.
        entries: u32,
    },
    /// Destination → source: send chunk `index`.
    Pull(u32),
    /// Source → destination: chunk `index` cannot be sent.
    Unavailable(u32),
    /// Destination → source: chunks held, for the final check.
    Held(Vec<HeldChunk>),
    /// Destination → source: chunks whose pull a whole-chunk write cancelled.
    Cancelled(Vec<u32>),
    /// Destination → source: every chunk is here; check and release.
    Done {
        /// Held entries sent before it.
        held: u32,
        /// Cancelled entries sent before it.
        cancelled: u32,
    },
    /// Source → destination: the check: how many chunks compared, and the ones that differ
    /// or never arrived.
    Verified {
        /// Chunks compared.
        checked: u32,
        /// Chunks that differ from the source's, or that the destination does not have.
        bad: Vec<u32>,
    },
    /// Either side: giving up.
    Abort(String),
    /// Destination → source: control taken; it serves I/O from now on.
    Taken,
    /// Either side: still here (sent while there is nothing else to say, so the peer's
    /// silence bound only catches a peer that is really gone).
    Alive,
    /// Destination → source: pushed chunks installed so far (flow control of the push).
    Installed(u64),
}

/// A message that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed disk-transfer message: {0}")]
pub struct DecodeError(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(why.into()))
}

struct Rd<'a>(&'a [u8]);

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return bad(format!("truncated: {} bytes left, {n} needed", self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count of `each`-byte entries that must fit what is left (and `MAX_ENTRIES`).
    fn count(&mut self, each: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_ENTRIES || n * each != self.0.len() {
            return bad(format!("{n} entries of {each} bytes do not match the {} bytes left", self.0.len()));
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            bad(format!("{} trailing bytes", self.0.len()))
        }
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let t = std::mem::take(&mut self.0);
        match std::str::from_utf8(t) {
            Ok(s) if s.len() <= 4096 => Ok(s.to_owned()),
            _ => bad("reason is not short UTF-8"),
        }
    }
}

/// Decodes one message.
pub fn decode(b: &[u8]) -> Result<Msg, DecodeError> {
    let (&tag, rest) = b.split_first().ok_or(DecodeError("empty message".into()))?;
    let mut r = Rd(rest);
    let m = match tag {
        1 => {
            let version = r.u16()?;
            let strategy = match r.take(1)?[0] {
                0 => Strategy::Hybrid,
                1 => Strategy::Precopy,
                s => return bad(format!("unknown strategy {s}")),
            };
            let chunk_size = r.u32()?;
            let disk_size = r.u64()?;
            let base = r.u64()?;
            Msg::Begin { version, strategy, chunk_size, disk_size, base }
        }
        2 => Msg::Accept,
        3 => Msg::Refuse(r.text()?),
        4 => {
            let index = r.u32()?;
            let lo = r.u32()?;
            let hash = r.u64()?;
            let data = std::mem::take(&mut r.0);
            if data.len() > MAX_CHUNK as usize {
                return bad(format!("a {}-byte chunk is larger than {MAX_CHUNK}", data.len()));
            }
            Msg::Chunk { index, lo, hash, data: data.to_vec() }
        }
        5 => {
            let n = r.count(8)?;
            Msg::Remaining((0..n).map(|_| Ok((r.u32()?, r.u32()?))).collect::<Result<_, DecodeError>>()?)
        }
        6 => Msg::Control { entries: r.u32()? },
        7 => Msg::Pull(r.u32()?),
        8 => Msg::Unavailable(r.u32()?),
        9 => {
            let n = r.count(20)?;
            Msg::Held(
                (0..n)
                    .map(|_| Ok(HeldChunk { index: r.u32()?, lo: r.u32()?, hi: r.u32()?, hash: r.u64()? }))
                    .collect::<Result<_, DecodeError>>()?,
            )
        }
        10 => {
            let n = r.count(4)?;
            Msg::Cancelled((0..n).map(|_| r.u32()).collect::<Result<_, _>>()?)
        }
        11 => Msg::Done { held: r.u32()?, cancelled: r.u32()? },
        12 => {
            let checked = r.u32()?;
            let n = r.count(4)?;
            Msg::Verified { checked, bad: (0..n).map(|_| r.u32()).collect::<Result<_, _>>()? }
        }
        13 => Msg::Abort(r.text()?),
        14 => Msg::Taken,
        15 => Msg::Alive,
        16 => Msg::Installed(r.u64()?),
        t => return bad(format!("unknown message type {t}")),
    };
    r.end()?;
    Ok(m)
}

/// Encodes one message.
pub fn encode(m: &Msg) -> Vec<u8> {
    let mut b = Vec::new();
    match m {
        Msg::Begin { version, strategy, chunk_size, disk_size, base } => {
            b.push(1);
            b.extend_from_slice(&version.to_le_bytes());
            b.push(match strategy {
                Strategy::Hybrid => 0,
                Strategy::Precopy => 1,
            });
            b.extend_from_slice(&chunk_size.to_le_bytes());
            b.extend_from_slice(&disk_size.to_le_bytes());
            b.extend_from_slice(&base.to_le_bytes());
        }
        Msg::Accept => b.push(2),
        Msg::Refuse(s) => {
            b.push(3);
            b.extend_from_slice(short(s).as_bytes());
        }
        Msg::Chunk { index, lo, hash, data } => return encode_chunk(*index, *lo, *hash, data),
        Msg::Remaining(v) => {
            b.push(5);
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for (i, c) in v {
                b.extend_from_slice(&i.to_le_bytes());
                b.extend_from_slice(&c.to_le_bytes());
            }
        }
        Msg::Control { entries } => {
            b.push(6);
            b.extend_from_slice(&entries.to_le_bytes());
        }
        Msg::Pull(i) => {
            b.push(7);
            b.extend_from_slice(&i.to_le_bytes());
        }
        Msg::Unavailable(i) => {
            b.push(8);
            b.extend_from_slice(&i.to_le_bytes());
        }
        Msg::Held(v) => {
            b.push(9);
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for h in v {
                b.extend_from_slice(&h.index.to_le_bytes());
                b.extend_from_slice(&h.lo.to_le_bytes());
                b.extend_from_slice(&h.hi.to_le_bytes());
                b.extend_from_slice(&h.hash.to_le_bytes());
            }
        }
        Msg::Cancelled(v) => {
            b.push(10);
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for i in v {
                b.extend_from_slice(&i.to_le_bytes());
            }
        }
        Msg::Done { held, cancelled } => {
            b.push(11);
            b.extend_from_slice(&held.to_le_bytes());
            b.extend_from_slice(&cancelled.to_le_bytes());
        }
        Msg::Verified { checked, bad } => {
            b.push(12);
            b.extend_from_slice(&checked.to_le_bytes());
            b.extend_from_slice(&(bad.len() as u32).to_le_bytes());
            for i in bad {
                b.extend_from_slice(&i.to_le_bytes());
            }
        }
        Msg::Abort(s) => {
            b.push(13);
            b.extend_from_slice(short(s).as_bytes());
        }
        Msg::Taken => b.push(14),
        Msg::Alive => b.push(15),
        Msg::Installed(n) => {
            b.push(16);
            b.extend_from_slice(&n.to_le_bytes());
        }
    }
    b
}

/// At most 4096 bytes of `s`, cut at a character boundary.
fn short(s: &str) -> &str {
    let mut n = s.len().min(4096);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// Encodes a Chunk message straight from the bytes (no intermediate copy).
pub fn encode_chunk(index: u32, lo: u32, hash: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + data.len());
    b.push(4);
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&lo.to_le_bytes());
    b.extend_from_slice(&hash.to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// XXH3-64 of a chunk's bytes.
pub fn hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            Msg::Begin {
                version: VERSION,
                strategy: Strategy::Precopy,
                chunk_size: 1 << 18,
                disk_size: 1 << 30,
                base: 7,
            },
            Msg::Accept,
            Msg::Refuse("no".into()),
            Msg::Chunk { index: 3, lo: 512, hash: hash(b"abc"), data: b"abc".to_vec() },
            Msg::Remaining(vec![(1, 2), (9, 0)]),
            Msg::Control { entries: 2 },
            Msg::Pull(5),
            Msg::Unavailable(5),
            Msg::Held(vec![HeldChunk { index: 1, lo: 0, hi: 4096, hash: 99 }]),
            Msg::Cancelled(vec![4, 8]),
            Msg::Done { held: 1, cancelled: 2 },
            Msg::Verified { checked: 3, bad: vec![2] },
            Msg::Abort("gone".into()),
            Msg::Taken,
            Msg::Alive,
            Msg::Installed(1 << 40),
        ];
        for m in msgs {
            assert_eq!(decode(&encode(&m)), Ok(m.clone()));
        }
    }

    #[test]
    fn counts_that_do_not_match_the_frame_are_refused() {
        let mut b = encode(&Msg::Remaining(vec![(1, 2)]));
        b[1] = 2; // claims two entries, carries one
        assert!(decode(&b).is_err());
        let mut b = encode(&Msg::Cancelled(vec![]));
        b[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&b).is_err(), "a huge count is refused before any allocation");
        assert!(decode(&[6, 1, 0]).is_err(), "truncated");
        assert!(decode(&[2, 0]).is_err(), "trailing bytes");
        assert!(decode(&[99]).is_err());
        assert!(decode(&[]).is_err());
        assert!(
            decode(&[1, 1, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "strategy 7"
        );
    }
}
