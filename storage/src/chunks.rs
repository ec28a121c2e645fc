//! What a disk mirror holds locally, per chunk: one contiguous locally valid byte range (the
//! paper's second heuristic: no fragments), and whether the chunk was written (the
//! ModifiedSet). Pure: it plans which byte ranges must come from the base before a read or a
//! write can be served locally; the caller does the I/O and then records it.

use serde::{Deserialize, Serialize};

/// A byte range `[start, end)` on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Range {
    /// `[start, end)`.
    pub fn new(start: u64, end: u64) -> Range {
        debug_assert!(start <= end);
        Range { start, end }
    }
    /// Bytes in it.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// One chunk's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The locally valid bytes, relative to the chunk start (`None`: nothing local).
    pub valid: Option<(u32, u32)>,
    /// Written since the last commit (the ModifiedSet).
    pub modified: bool,
}

/// The state of every chunk of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMap {
    size: u64,
    chunk: u32,
    chunks: Vec<Chunk>,
}

/// A request outside the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bytes {offset}..{offset}+{len} are outside the {size}-byte disk")]
pub struct OutOfRange {
    /// Offset asked.
    pub offset: u64,
    /// Length asked.
    pub len: u64,
    /// Disk size.
    pub size: u64,
}

impl ChunkMap {
    /// A disk of `size` bytes in chunks of `chunk` bytes (the last may be shorter), nothing
    /// local yet.
    pub fn new(size: u64, chunk: u32) -> ChunkMap {
        assert!(chunk > 0, "chunk size must be positive");
        let n = size.div_ceil(chunk as u64) as usize;
        ChunkMap { size, chunk, chunks: vec![Chunk::default(); n] }
    }

    /// A disk whose every byte is local (a plain image, no base).
    pub fn all_local(size: u64, chunk: u32) -> ChunkMap {
        let mut m = ChunkMap::new(size, chunk);
        for i in 0..m.chunks.len() {
            let len = m.chunk_len(i);
            m.chunks[i].valid = Some((0, len));
        }
        m
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk
    }
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }
    /// Whether the disk has no chunks (size 0).
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
    /// Chunk `i`'s state.
    pub fn chunk(&self, i: usize) -> Chunk {
        self.chunks[i]
    }
    /// Where chunk `i` starts.
    pub fn chunk_start(&self, i: usize) -> u64 {
        i as u64 * self.chunk as u64
    }
    /// Chunk `i`'s length (the last chunk may be short).
    pub fn chunk_len(&self, i: usize) -> u32 {
        (self.size - self.chunk_start(i)).min(self.chunk as u64) as u32
    }

    /// Checks `[offset, offset + len)` against the disk.
    pub fn check(&self, offset: u64, len: u64) -> Result<Range, OutOfRange> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(Range::new(offset, end)),
            _ => Err(OutOfRange { offset, len, size: self.size }),
        }
    }

    /// The chunks `r` touches.
    pub fn chunks_of(&self, r: Range) -> std::ops::Range<usize> {
        if r.is_empty() {
            return 0..0;
        }
        let c = self.chunk as u64;
        (r.start / c) as usize..r.end.div_ceil(c) as usize
    }

    /// What must be fetched from the base before `r` can be read locally: for every chunk it
    /// touches that is not wholly local, the chunk's bytes outside its valid range (a read
    /// fetches at least the rest of the chunk: the paper's first heuristic). In disk order.
    pub fn plan_read(&self, r: Range) -> Vec<Range> {
        let mut out = Vec::new();
        for i in self.chunks_of(r) {
            let (s, len) = (self.chunk_start(i), self.chunk_len(i));
            match self.chunks[i].valid {
                Some((0, e)) if e == len => {}
                Some((lo, hi)) => {
                    if lo > 0 {
                        out.push(Range::new(s, s + lo as u64));
                    }
                    if hi < len {
                        out.push(Range::new(s + hi as u64, s + len as u64));
                    }
                }
                None => out.push(Range::new(s, s + len as u64)),
            }
        }
        out
    }

    /// What must be fetched from the base before `r` is written, so that each chunk keeps
    /// one contiguous valid range: the gap between a chunk's valid range and the part of
    /// `r` in it. A chunk with nothing local needs nothing (its valid range becomes the write).
    pub fn plan_write(&self, r: Range) -> Vec<Range> {
        let mut out = Vec::new();
        for i in self.chunks_of(r) {
            let s = self.chunk_start(i);
            let (wlo, whi) = ((r.start.max(s) - s) as u32, (r.end.min(s + self.chunk_len(i) as u64) - s) as u32);
            if let Some((lo, hi)) = self.chunks[i].valid {
                if whi < lo {
                    out.push(Range::new(s + whi as u64, s + lo as u64));
                } else if wlo > hi {
                    out.push(Range::new(s + hi as u64, s + wlo as u64));
                }
            }
        }
        out
    }

    /// Records that `r` now holds the base's bytes locally (after a fetch): merged into each
    /// chunk's valid range, which it must touch or overlap.
    pub fn fetched(&mut self, r: Range) {
        self.extend(r, false);
    }

    /// Records a write of `r` (after the gaps [`plan_write`](Self::plan_write) named were
    /// fetched): valid and modified.
    pub fn written(&mut self, r: Range) {
        self.extend(r, true);
    }

    fn extend(&mut self, r: Range, modified: bool) {
        for i in self.chunks_of(r) {
            let s = self.chunk_start(i);
            let (a, b) = ((r.start.max(s) - s) as u32, (r.end.min(s + self.chunk_len(i) as u64) - s) as u32);
            let c = &mut self.chunks[i];
            c.valid = Some(match c.valid {
                None => (a, b),
                Some((lo, hi)) => {
                    debug_assert!(b >= lo && a <= hi, "a range that leaves a gap in chunk {i}");
                    (lo.min(a), hi.max(b))
                }
            });
            c.modified |= modified;
        }
    }

    /// Whether every byte of `r` is local.
    pub fn is_local(&self, r: Range) -> bool {
        self.plan_read_exact(r).is_empty()
    }

    /// The parts of `r` itself (not whole chunks) that are not local.
    fn plan_read_exact(&self, r: Range) -> Vec<Range> {
        self.plan_read(r)
            .into_iter()
            .filter_map(|g| {
                let (a, b) = (g.start.max(r.start), g.end.min(r.end));
                (a < b).then(|| Range::new(a, b))
            })
            .collect()
    }

    /// Chunks written since the last commit (the ModifiedSet), in order.
    pub fn modified(&self) -> Vec<usize> {
        (0..self.chunks.len()).filter(|&i| self.chunks[i].modified).collect()
    }

    /// Clears the modified flags (after a commit).
    pub fn clear_modified(&mut self) {
        for c in &mut self.chunks {
            c.modified = false;
        }
    }

    /// Chunks with every byte local.
    pub fn local_chunks(&self) -> usize {
        (0..self.chunks.len()).filter(|&i| self.chunks[i].valid == Some((0, self.chunk_len(i)))).count()
    }

    /// Checks a map read back from disk against the disk it claims to describe.
    pub fn validate(&self) -> Result<(), String> {
        if self.chunk == 0 {
            return Err("chunk size 0".into());
        }
        if self.chunks.len() as u64 != self.size.div_ceil(self.chunk as u64) {
            return Err(format!(
                "{} chunks for a {}-byte disk in {}-byte chunks",
                self.chunks.len(),
                self.size,
                self.chunk
            ));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            if let Some((lo, hi)) = c.valid {
                if lo >= hi || hi > self.chunk_len(i) {
                    return Err(format!("chunk {i}: valid range {lo}..{hi} outside 0..{}", self.chunk_len(i)));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u32 = 1024;

    #[test]
    fn reads_fetch_whole_chunks_once() {
        let mut m = ChunkMap::new(10 * C as u64 + 100, C);
        assert_eq!(m.len(), 11);
        assert_eq!(m.chunk_len(10), 100);
        // A 10-byte read in chunk 2 fetches all of chunk 2.
        let r = Range::new(2 * 1024 + 5, 2 * 1024 + 15);
        assert_eq!(m.plan_read(r), [Range::new(2048, 3072)]);
        m.fetched(Range::new(2048, 3072));
        assert!(m.plan_read(r).is_empty(), "later reads in the chunk are local");
        assert!(m.is_local(r));
        // The short last chunk.
        assert_eq!(m.plan_read(Range::new(10 * 1024, 10 * 1024 + 1)), [Range::new(10240, 10340)]);
        assert!(m.modified().is_empty(), "reads modify nothing");
    }

    #[test]
    fn writes_keep_one_contiguous_range_per_chunk() {
        let mut m = ChunkMap::new(4 * C as u64, C);
        // First write into an empty chunk: nothing to fetch (not copy-on-reference).
        let w1 = Range::new(100, 200);
        assert!(m.plan_write(w1).is_empty());
        m.written(w1);
        assert_eq!(m.chunk(0).valid, Some((100, 200)));
        // A sequential write right after: still nothing to fetch.
        let w2 = Range::new(200, 300);
        assert!(m.plan_write(w2).is_empty());
        m.written(w2);
        assert_eq!(m.chunk(0).valid, Some((100, 300)));
        // A write that would leave a gap fetches the gap first.
        let w3 = Range::new(500, 600);
        assert_eq!(m.plan_write(w3), [Range::new(300, 500)]);
        m.fetched(Range::new(300, 500));
        m.written(w3);
        assert_eq!(m.chunk(0).valid, Some((100, 600)));
        // And before the range.
        assert_eq!(m.plan_write(Range::new(10, 20)), [Range::new(20, 100)]);
        // A read of the chunk fetches only what is missing around the valid range.
        assert_eq!(m.plan_read(Range::new(0, 10)), [Range::new(0, 100), Range::new(600, 1024)]);
        assert_eq!(m.modified(), [0]);
        m.clear_modified();
        assert!(m.modified().is_empty());
    }

    #[test]
    fn writes_across_chunks() {
        let mut m = ChunkMap::new(4 * C as u64, C);
        m.written(Range::new(1000, 1100)); // chunk 0 tail
        let w = Range::new(900, 2100);
        // chunk 0: write 900..1024 overlaps 1000..1024 — no gap; chunk 1: empty; chunk 2: empty.
        assert!(m.plan_write(w).is_empty());
        m.written(w);
        assert_eq!(m.chunk(0).valid, Some((900, 1024)));
        assert_eq!(m.chunk(1).valid, Some((0, 1024)));
        assert_eq!(m.chunk(2).valid, Some((0, 52)));
        assert_eq!(m.modified(), [0, 1, 2]);
        assert_eq!(m.local_chunks(), 1);
    }

    #[test]
    fn bounds_and_validation() {
        let m = ChunkMap::new(4096, C);
        assert!(m.check(4000, 96).is_ok());
        assert!(m.check(4000, 97).is_err());
        assert!(m.check(u64::MAX, 2).is_err());
        assert!(m.validate().is_ok());
        let mut bad = m.clone();
        bad.chunks[0].valid = Some((5, 2000));
        assert!(bad.validate().is_err());
        let all = ChunkMap::all_local(4096 + 10, C);
        assert!(all.plan_read(Range::new(0, 4106)).is_empty());
        assert_eq!(all.local_chunks(), 5);
    }
}
