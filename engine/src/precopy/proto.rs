//! The pre-copy session's control messages, carried by [`Transport::send_message`]
//! (ordered after every write posted before them).
//!
//! Page data never travels in these messages: it is placed by transport writes. The messages
//! open the session, announce zero pages, mark rounds, and run the switchover.
//!
//! # Frame layout
//!
//! ```text
//! byte 0..4   magic  "LMPC"
//! byte 4      version (VERSION; decoders accept MIN_VERSION..=VERSION)
//! byte 5      message type (see `Msg`)
//! byte 6..    payload, little-endian, fixed layout per type:
//!   1 Begin          strategy u8 (0 pre-copy | 1 post-copy | 2 hybrid) | n u16 (1..=MAX_REGIONS) |
//!                    n × (region_len u64 | page_size u32)
//!   2 Accept         -
//!   3 Refuse         reason: text
//!   4 Zero           runs   (the destination makes these pages zero)
//!   5 IterationDone  iter u32 | pages u64 | dirty u64
//!   6 Final          -
//!   7 Verified       ok u8 (0|1) | destination checksum [32]
//!   8 Resumed        -
//!   9 DeviceState    last u8 (0|1) | len u32 (≤ MAX_STATE_CHUNK) | bytes
//!  10 Done           -
//!  11 Abort          reason: text
//!  12 SourceChecksum source checksum [32]
//!  13 Commit         -
//!  14 Alive          -   (destination → source while it hashes: it is not frozen)
//!  15 Placed         runs   (these pages were written before this message; hash them)
//!  16 IterationAck   iter u32 (destination → source: every message up to IterationDone{iter}
//!                    is processed, in particular its Zero runs)
//!  17 Demand         page u64 (post-copy, destination → source on the urgent channel: the
//!                    guest faulted on this page of the page space)
//!  18 Invalidate     runs   (hybrid, before Commit: these pages were written again after
//!                    they were sent; they will be sent again)
//!  19 Recoverable    id [16] (post-copy, before Commit: a session that presents `id` may take
//!                    over this migration if its link breaks after the hand-over)
//!  20 Reattach       id [16] (the first message of such a session)
//!  21 Missing        last u8 (0|1) | runs   (destination → source, after `Reattach`: the
//!                    pages that have not arrived; `last` ends the list)
//!  22 Installed      pages u64 (post-copy, destination → source after each `Placed`: pushed
//!                    pages installed in this session so far)
//!  23 Running        (post-copy, destination → source after `Resumed`, once the guest
//!                    actually runs: the push may start)
//! text = len u16 (≤ MAX_TEXT) | UTF-8 bytes
//! runs = n u32 (≤ MAX_RUNS) | n × (first_page u64 | pages u32 ≥ 1)
//! checksum = a region digest (`integrity::Digest::to_bytes`): sum u128 | pages u64 | 0 u64
//! ```
//!
//! A frame is at most [`MAX_FRAME`] bytes; trailing bytes are an error. Every decoder
//! returns a typed [`ProtoError`] and never panics (see the fuzz-style unit test).
//!
//! [`Transport::send_message`]: livemig_transport::Transport::send_message

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"LMPC";
/// Protocol version this build speaks.
pub const VERSION: u8 = 7;
/// Oldest version this build decodes. Version 6 pushed pages as soon as the guest was
/// handed over (no `Running`), competing with a VMM's device state; version 5 did not acknowledge pushed pages
/// (`Installed`), so a source could not bound the pages in flight; version 4 could not resume a post-copy migration
/// over a new session (`Recoverable`, `Reattach`, `Missing`); version 3 had no strategy in `Begin` (pre-copy
/// only); version 2 compared whole-region SHA-256 checksums and left zero pages unwritten
/// at the destination; version 1 had no `Commit`.
pub const MIN_VERSION: u8 = 7;
/// Most regions a migration carries.
pub const MAX_REGIONS: usize = 256;
/// Largest piece of device state in one `DeviceState` message.
pub const MAX_STATE_CHUNK: usize = 32 << 10;
/// Largest device state a destination accepts in total.
pub const MAX_STATE: usize = 64 << 20;
/// Longest reason text, in bytes.
pub const MAX_TEXT: usize = 512;
/// Most page runs in one `Zero` or `Placed` message.
pub const MAX_RUNS: usize = 4096;
/// Largest frame: a full `Missing` message (larger than a full `Begin` or `DeviceState`).
pub const MAX_FRAME: usize = 6 + 1 + 4 + MAX_RUNS * 12;
const _: () = assert!(6 + 3 + MAX_REGIONS * 12 <= MAX_FRAME && 6 + 5 + MAX_STATE_CHUNK <= MAX_FRAME);

const HEADER: usize = 6;

/// One region of the source's memory, as announced in `Begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// Bytes.
    pub len: u64,
    /// Page size (a power of two).
    pub page_size: u32,
}

/// How the source moves the memory, announced in `Begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Rounds while the guest runs at the source, then stop-and-copy.
    Precopy,
    /// The guest moves first; its pages follow, pushed and demanded.
    Postcopy,
    /// One pre-copy pass while the guest runs at the source, then post-copy for the pages
    /// written since.
    Hybrid,
}

impl Strategy {
    fn code(self) -> u8 {
        match self {
            Strategy::Precopy => 0,
            Strategy::Postcopy => 1,
            Strategy::Hybrid => 2,
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Precopy => "pre-copy",
            Strategy::Postcopy => "post-copy",
            Strategy::Hybrid => "hybrid",
        })
    }
}

/// A run of pages: `pages` pages starting at `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First page index.
    pub first: u64,
    /// Number of pages (≥ 1).
    pub pages: u32,
}

/// A pre-copy control message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Msg {
    /// Source → destination: opens the migration with the guest's memory layout.
    Begin {
        /// How the memory will move.
        strategy: Strategy,
        /// The source's regions, in page-space order (1 to [`MAX_REGIONS`]).
        regions: Vec<RegionDesc>,
    },
    /// Destination → source: the region fits.
    Accept,
    /// Destination → source: the migration is refused.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Source → destination: these pages are all zeros (sent as a flag, not as data). The
    /// destination makes them zero; the source writes none of them before the
    /// destination's `IterationAck` for the interval that announced them.
    Zero {
        /// Runs of zero pages (at most [`MAX_RUNS`]).
        runs: Vec<PageRun>,
    },
    /// Source → destination: these pages were written (by writes posted before this
    /// message) and hold their new content; the destination hashes them.
    Placed {
        /// Runs of pages (at most [`MAX_RUNS`]).
        runs: Vec<PageRun>,
    },
    /// Destination → source: every message up to `IterationDone{iter}` was processed.
    IterationAck {
        /// The interval.
        iter: u32,
    },
    /// Source → destination: one pre-copy interval is complete.
    IterationDone {
        /// Interval number, from 1; 0 (post-copy's hybrid strategies, before the pause):
        /// not an interval, only asks for the acknowledgement that everything sent so far
        /// was processed.
        iter: u32,
        /// Data pages written in it.
        pages: u64,
        /// Dirty pages left after it.
        dirty: u64,
    },
    /// Source → destination: stop-and-copy is over, every page is placed and the device
    /// state sent; finish the digest.
    Final,
    /// Source → destination: a piece of the guest's device state (sent while paused).
    DeviceState {
        /// The last piece.
        last: bool,
        /// At most [`MAX_STATE_CHUNK`] bytes.
        bytes: Vec<u8>,
    },
    /// Source → destination: the source's region digest (`integrity::Digest`), complete once
    /// the last pages are posted.
    SourceChecksum {
        /// The checksum.
        checksum: [u8; 32],
    },
    /// Destination → source: checksum verdict.
    Verified {
        /// The destination's checksum equals the source's.
        ok: bool,
        /// The destination's checksum.
        checksum: [u8; 32],
    },
    /// Source → destination: hand over. Sent only after a matching `Verified`; from then on
    /// the source never resumes its copy, so at most one side runs the workload.
    Commit,
    /// Destination → source: still working on the switchover (sent periodically while it
    /// hashes), so a source waiting for `Verified` can tell a slow destination from a frozen one.
    Alive,
    /// Destination → source: the workload runs at the destination (downtime ends).
    Resumed,
    /// Source → destination: the session is over.
    Done,
    /// Destination → source on the urgent channel (post-copy): the guest faulted on `page`
    /// (of the page space); send it now unless it is on its way.
    Demand {
        /// The page.
        page: u64,
    },
    /// Source → destination (hybrid, before `Commit`): these pages changed after they were
    /// sent in the pre-copy pass; they will be sent again.
    Invalidate {
        /// Runs of pages (at most [`MAX_RUNS`]).
        runs: Vec<PageRun>,
    },
    /// Source → destination (post-copy, before `Commit`): if the link breaks after the
    /// hand-over, a new session that presents `id` first may take the migration over.
    Recoverable {
        /// The migration's random identity.
        id: [u8; 16],
    },
    /// Source → destination: the first message of a session that takes over the migration
    /// announced `Recoverable { id }`.
    Reattach {
        /// That identity.
        id: [u8; 16],
    },
    /// Destination → source, after `Reattach`: pages that have not arrived (to be sent
    /// again), in one or more messages, the last with `last` set.
    Missing {
        /// Ends the list.
        last: bool,
        /// Runs of pages (at most [`MAX_RUNS`]).
        runs: Vec<PageRun>,
    },
    /// Destination → source (post-copy, after `Commit`), once a `Placed` message is
    /// processed: the pushed pages installed in this session so far. The source keeps the
    /// pages it pushed and this count does not cover within its push window.
    Installed {
        /// Pushed pages installed in this session.
        pages: u64,
    },
    /// Destination → source (post-copy, right after `Resumed`, in that session only): the
    /// guest runs here now (a VMM may load its device state after `Resumed`), or the
    /// destination stopped waiting for it; the source pushes from here on and, until then,
    /// only answers demands. A session that takes over after a broken link has none.
    Running,
    /// Either way: the migration is abandoned.
    Abort {
        /// Why.
        reason: String,
    },
}

/// A control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Fewer bytes than the layout needs.
    #[error("message truncated: {need} bytes needed, {got} present")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// Larger than [`MAX_FRAME`].
    #[error("message of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Wrong magic.
    #[error("not a pre-copy message (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// Unsupported version.
    #[error("pre-copy protocol version {0} is not supported (this build speaks {MIN_VERSION}..={VERSION})")]
    Version(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A field is out of range.
    #[error("invalid {field}: {value}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// Text is not UTF-8.
    #[error("reason text is not UTF-8")]
    Utf8,
    /// Bytes after the payload.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(ProtoError::Truncated { need: self.pos.saturating_add(n), got: self.b.len() })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn sum(&mut self) -> Result<[u8; 32], ProtoError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn id(&mut self) -> Result<[u8; 16], ProtoError> {
        Ok(self.take(16)?.try_into().expect("16 bytes"))
    }
    fn flag(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::Invalid { field, value: v as u64 }),
        }
    }
    fn runs(&mut self) -> Result<Vec<PageRun>, ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_RUNS {
            return Err(ProtoError::Invalid { field: "run count", value: n as u64 });
        }
        let mut runs = Vec::with_capacity(n);
        for _ in 0..n {
            let first = self.u64()?;
            let pages = self.u32()?;
            if pages == 0 {
                return Err(ProtoError::Invalid { field: "run length", value: 0 });
            }
            runs.push(PageRun { first, pages });
        }
        Ok(runs)
    }
    fn text(&mut self) -> Result<String, ProtoError> {
        let n = self.u16()? as usize;
        if n > MAX_TEXT {
            return Err(ProtoError::Invalid { field: "text length", value: n as u64 });
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| ProtoError::Utf8)
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Truncate at a char boundary so the encoder never produces what the decoder refuses.
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl Msg {
    fn code(&self) -> u8 {
        match self {
            Msg::Begin { .. } => 1,
            Msg::Accept => 2,
            Msg::Refuse { .. } => 3,
            Msg::Zero { .. } => 4,
            Msg::IterationDone { .. } => 5,
            Msg::Final => 6,
            Msg::Verified { .. } => 7,
            Msg::Resumed => 8,
            Msg::DeviceState { .. } => 9,
            Msg::Done => 10,
            Msg::Abort { .. } => 11,
            Msg::SourceChecksum { .. } => 12,
            Msg::Commit => 13,
            Msg::Alive => 14,
            Msg::Placed { .. } => 15,
            Msg::IterationAck { .. } => 16,
            Msg::Demand { .. } => 17,
            Msg::Invalidate { .. } => 18,
            Msg::Recoverable { .. } => 19,
            Msg::Reattach { .. } => 20,
            Msg::Missing { .. } => 21,
            Msg::Installed { .. } => 22,
            Msg::Running => 23,
        }
    }

    /// A short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Begin { .. } => "Begin",
            Msg::Accept => "Accept",
            Msg::Refuse { .. } => "Refuse",
            Msg::Zero { .. } => "Zero",
            Msg::IterationDone { .. } => "IterationDone",
            Msg::Final => "Final",
            Msg::Verified { .. } => "Verified",
            Msg::Resumed => "Resumed",
            Msg::DeviceState { .. } => "DeviceState",
            Msg::Done => "Done",
            Msg::Abort { .. } => "Abort",
            Msg::SourceChecksum { .. } => "SourceChecksum",
            Msg::Commit => "Commit",
            Msg::Alive => "Alive",
            Msg::Placed { .. } => "Placed",
            Msg::IterationAck { .. } => "IterationAck",
            Msg::Demand { .. } => "Demand",
            Msg::Invalidate { .. } => "Invalidate",
            Msg::Recoverable { .. } => "Recoverable",
            Msg::Reattach { .. } => "Reattach",
            Msg::Missing { .. } => "Missing",
            Msg::Installed { .. } => "Installed",
            Msg::Running => "Running",
        }
    }

    /// Encodes the message. Texts longer than [`MAX_TEXT`] are truncated; a `Zero` message
    /// must hold at most [`MAX_RUNS`] runs of at least one page (debug-asserted; the
    /// source builds them in bounded batches).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.code());
        match self {
            Msg::Begin { strategy, regions } => {
                debug_assert!((1..=MAX_REGIONS).contains(&regions.len()));
                out.push(strategy.code());
                out.extend_from_slice(&(regions.len() as u16).to_le_bytes());
                for r in regions {
                    out.extend_from_slice(&r.len.to_le_bytes());
                    out.extend_from_slice(&r.page_size.to_le_bytes());
                }
            }
            Msg::Accept | Msg::Resumed | Msg::Done | Msg::Commit | Msg::Alive | Msg::Final | Msg::Running => {}
            Msg::DeviceState { last, bytes } => {
                debug_assert!(bytes.len() <= MAX_STATE_CHUNK);
                out.push(*last as u8);
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Msg::Refuse { reason } | Msg::Abort { reason } => put_text(&mut out, reason),
            Msg::Zero { runs } | Msg::Placed { runs } | Msg::Invalidate { runs } => {
                debug_assert!(runs.len() <= MAX_RUNS && runs.iter().all(|r| r.pages > 0));
                out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                for r in runs {
                    out.extend_from_slice(&r.first.to_le_bytes());
                    out.extend_from_slice(&r.pages.to_le_bytes());
                }
            }
            Msg::Missing { last, runs } => {
                debug_assert!(runs.len() <= MAX_RUNS && runs.iter().all(|r| r.pages > 0));
                out.push(*last as u8);
                out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                for r in runs {
                    out.extend_from_slice(&r.first.to_le_bytes());
                    out.extend_from_slice(&r.pages.to_le_bytes());
                }
            }
            Msg::Recoverable { id } | Msg::Reattach { id } => out.extend_from_slice(id),
            Msg::IterationAck { iter } => out.extend_from_slice(&iter.to_le_bytes()),
            Msg::Demand { page } | Msg::Installed { pages: page } => out.extend_from_slice(&page.to_le_bytes()),
            Msg::IterationDone { iter, pages, dirty } => {
                out.extend_from_slice(&iter.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
                out.extend_from_slice(&dirty.to_le_bytes());
            }
            Msg::SourceChecksum { checksum } => out.extend_from_slice(checksum),
            Msg::Verified { ok, checksum } => {
                out.push(*ok as u8);
                out.extend_from_slice(checksum);
            }
        }
        out
    }
}

/// Decodes one control message. Never panics, whatever the input.
pub fn decode(b: &[u8]) -> Result<Msg, ProtoError> {
    if b.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(b.len()));
    }
    if b.len() < HEADER {
        return Err(ProtoError::Truncated { need: HEADER, got: b.len() });
    }
    let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    if !(MIN_VERSION..=VERSION).contains(&b[4]) {
        return Err(ProtoError::Version(b[4]));
    }
    let mut r = Reader { b, pos: HEADER };
    let msg = match b[5] {
        1 => {
            let strategy = match r.u8()? {
                0 => Strategy::Precopy,
                1 => Strategy::Postcopy,
                2 => Strategy::Hybrid,
                v => return Err(ProtoError::Invalid { field: "strategy", value: v as u64 }),
            };
            let n = r.u16()? as usize;
            if !(1..=MAX_REGIONS).contains(&n) {
                return Err(ProtoError::Invalid { field: "region count", value: n as u64 });
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.u64()?;
                let page_size = r.u32()?;
                if page_size == 0 || !page_size.is_power_of_two() {
                    return Err(ProtoError::Invalid { field: "page size", value: page_size as u64 });
                }
                regions.push(RegionDesc { len, page_size });
            }
            Msg::Begin { strategy, regions }
        }
        2 => Msg::Accept,
        3 => Msg::Refuse { reason: r.text()? },
        4 => Msg::Zero { runs: r.runs()? },
        5 => Msg::IterationDone { iter: r.u32()?, pages: r.u64()?, dirty: r.u64()? },
        6 => Msg::Final,
        7 => {
            let ok = r.flag("verdict")?;
            Msg::Verified { ok, checksum: r.sum()? }
        }
        8 => Msg::Resumed,
        9 => {
            let last = r.flag("last flag")?;
            let n = r.u32()? as usize;
            if n > MAX_STATE_CHUNK {
                return Err(ProtoError::Invalid { field: "device state length", value: n as u64 });
            }
            Msg::DeviceState { last, bytes: r.take(n)?.to_vec() }
        }
        10 => Msg::Done,
        11 => Msg::Abort { reason: r.text()? },
        12 => Msg::SourceChecksum { checksum: r.sum()? },
        13 => Msg::Commit,
        14 => Msg::Alive,
        15 => Msg::Placed { runs: r.runs()? },
        16 => Msg::IterationAck { iter: r.u32()? },
        17 => Msg::Demand { page: r.u64()? },
        18 => Msg::Invalidate { runs: r.runs()? },
        19 => Msg::Recoverable { id: r.id()? },
        20 => Msg::Reattach { id: r.id()? },
        21 => {
            let last = r.flag("last flag")?;
            Msg::Missing { last, runs: r.runs()? }
        }
        22 => Msg::Installed { pages: r.u64()? },
        23 => Msg::Running,
        t => return Err(ProtoError::UnknownType(t)),
    };
    if r.pos != b.len() {
        return Err(ProtoError::Trailing(b.len() - r.pos));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Begin { strategy: Strategy::Precopy, regions: vec![RegionDesc { len: 64 << 20, page_size: 4096 }] },
            Msg::Begin {
                strategy: Strategy::Postcopy,
                regions: vec![RegionDesc { len: 1, page_size: 1 }; MAX_REGIONS],
            },
            Msg::Demand { page: u64::MAX },
            Msg::Installed { pages: 64 },
            Msg::Running,
            Msg::Invalidate { runs: vec![PageRun { first: 3, pages: 2 }] },
            Msg::Recoverable { id: [7; 16] },
            Msg::Reattach { id: [9; 16] },
            Msg::Missing { last: true, runs: vec![PageRun { first: 0, pages: 1 }; MAX_RUNS] },
            Msg::Missing { last: false, runs: vec![] },
            Msg::Begin { strategy: Strategy::Hybrid, regions: vec![RegionDesc { len: 8192, page_size: 4096 }] },
            Msg::DeviceState { last: true, bytes: vec![1, 2, 3] },
            Msg::DeviceState { last: false, bytes: vec![] },
            Msg::Accept,
            Msg::Refuse { reason: "destination region is smaller".into() },
            Msg::Zero { runs: vec![PageRun { first: 1, pages: 3 }, PageRun { first: 100, pages: 1 }] },
            Msg::Zero { runs: vec![] },
            Msg::Placed { runs: vec![PageRun { first: 0, pages: 1 }, PageRun { first: 9, pages: 70 }] },
            Msg::IterationAck { iter: 7 },
            Msg::IterationDone { iter: 3, pages: 1234, dirty: 99 },
            Msg::Final,
            Msg::SourceChecksum { checksum: [7; 32] },
            Msg::Commit,
            Msg::Alive,
            Msg::Verified { ok: false, checksum: [9; 32] },
            Msg::Resumed,
            Msg::Done,
            Msg::Abort { reason: "kvm: timeout (120 s) — ünïcode".into() },
        ]
    }

    #[test]
    fn round_trips() {
        for m in samples() {
            assert_eq!(decode(&m.encode()), Ok(m.clone()), "{}", m.name());
        }
        let full = Msg::Missing { last: false, runs: vec![PageRun { first: u64::MAX, pages: u32::MAX }; MAX_RUNS] };
        let enc = full.encode();
        assert_eq!(enc.len(), MAX_FRAME);
        assert_eq!(decode(&enc), Ok(full));
    }

    #[test]
    fn long_text_is_truncated_on_a_char_boundary() {
        let m = Msg::Abort { reason: "é".repeat(MAX_TEXT) };
        let Ok(Msg::Abort { reason }) = decode(&m.encode()) else { panic!() };
        assert!(reason.len() <= MAX_TEXT && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn typed_errors() {
        let good =
            Msg::Begin { strategy: Strategy::Precopy, regions: vec![RegionDesc { len: 1, page_size: 4096 }] }.encode();
        assert!(matches!(decode(&good[..3]), Err(ProtoError::Truncated { .. })));
        assert!(matches!(decode(&good[..good.len() - 1]), Err(ProtoError::Truncated { .. })));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(ProtoError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 9;
        assert_eq!(decode(&b), Err(ProtoError::Version(9)));
        // Version 1's switchover (checksum inside Final, no Commit) is not spoken any more.
        b[4] = 1;
        assert_eq!(decode(&b), Err(ProtoError::Version(1)));
        b[4] = 2;
        assert_eq!(decode(&b), Err(ProtoError::Version(2)));
        b[4] = 3;
        assert_eq!(decode(&b), Err(ProtoError::Version(3)));
        let mut b = good.clone();
        b[5] = 200;
        assert_eq!(decode(&b), Err(ProtoError::UnknownType(200)));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(decode(&b), Err(ProtoError::Trailing(1)));
        let mut b = good.clone();
        b[17..21].copy_from_slice(&3000u32.to_le_bytes());
        assert!(matches!(decode(&b), Err(ProtoError::Invalid { field: "page size", .. })));
        let mut b = good.clone();
        b[7..9].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(decode(&b), Err(ProtoError::Invalid { field: "region count", .. })));
        let mut b = good;
        b[6] = 7;
        assert!(matches!(decode(&b), Err(ProtoError::Invalid { field: "strategy", .. })));
        let mut d = Msg::DeviceState { last: true, bytes: vec![] }.encode();
        d[6] = 2;
        assert!(matches!(decode(&d), Err(ProtoError::Invalid { field: "last flag", .. })));
        d[6] = 1;
        d[7..11].copy_from_slice(&(MAX_STATE_CHUNK as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&d), Err(ProtoError::Invalid { field: "device state length", .. })));
        let mut z = Msg::Zero { runs: vec![] }.encode();
        z[6..10].copy_from_slice(&(MAX_RUNS as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&z), Err(ProtoError::Invalid { .. })));
        assert!(matches!(decode(&vec![0; MAX_FRAME + 1]), Err(ProtoError::TooLarge(_))));
        let mut t = Msg::Refuse { reason: String::new() }.encode();
        t[6..8].copy_from_slice(&(MAX_TEXT as u16 + 1).to_le_bytes());
        assert!(matches!(decode(&t), Err(ProtoError::Invalid { field: "text length", .. })));
    }

    /// Random and mutated inputs: the decoder returns, never panics, and whatever it accepts
    /// re-encodes to the same bytes.
    #[test]
    fn fuzz_random_and_mutated() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xf022);
        let seeds: Vec<Vec<u8>> = samples().iter().map(Msg::encode).collect();
        for i in 0..200_000 {
            let b: Vec<u8> = if i % 2 == 0 {
                let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    match rng.gen_range(0..3) {
                        0 if !b.is_empty() => {
                            let j = rng.gen_range(0..b.len());
                            b[j] = rng.gen();
                        }
                        1 => b.truncate(rng.gen_range(0..=b.len())),
                        _ => b.push(rng.gen()),
                    }
                }
                b
            } else {
                let n = rng.gen_range(0..64);
                let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                if n >= 6 && rng.gen_bool(0.5) {
                    b[..4].copy_from_slice(&MAGIC);
                    b[4] = VERSION;
                    b[5] = rng.gen_range(0..26);
                }
                b
            };
            if let Ok(m) = decode(&b) {
                assert_eq!(m.encode(), b, "{m:?}");
            }
        }
    }
}
