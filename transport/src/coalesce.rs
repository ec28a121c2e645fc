//! Page coalescing: dirty pages (a bitmap) become write work requests.
//!
//! Each run of contiguous dirty pages is contiguous in both the source and the destination
//! region, so it becomes one write (one remote address). A run is split when it would exceed
//! `max_write_bytes` (QEMU merges up to 2 MiB) or need more than `max_sges` scatter-gather
//! elements; elements are cut at `sge_boundary` (the registration chunk size when memory is
//! registered on demand chunk by chunk: one element cannot span two memory registrations)
//! and at `max_sge_bytes`. The coalescing ratio is pages per work request.
//!
//! Pure code: no I/O, no clock.

use crate::bitmap::PageBitmap;
use crate::Segment;

/// Coalescer limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalesceConfig {
    /// Page size in bytes (power of two).
    pub page_size: u32,
    /// Maximum bytes of one work request (≥ page_size).
    pub max_write_bytes: u64,
    /// Maximum scatter-gather elements in one work request (≥ 1).
    pub max_sges: u32,
    /// Scatter-gather elements never cross a multiple of this (0 = no boundary).
    pub sge_boundary: u64,
    /// Maximum bytes of one scatter-gather element (0 = no limit).
    pub max_sge_bytes: u64,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig { page_size: 4096, max_write_bytes: 2 << 20, max_sges: 16, sge_boundary: 0, max_sge_bytes: 0 }
    }
}

impl CoalesceConfig {
    /// No coalescing at all: one page per work request (the baseline for comparisons).
    pub fn per_page(page_size: u32) -> Self {
        CoalesceConfig { page_size, max_write_bytes: page_size as u64, max_sges: 1, sge_boundary: 0, max_sge_bytes: 0 }
    }
}

/// One coalesced write: `len` bytes at `offset` (same offset in the source and destination
/// region), gathered from `segments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkRequest {
    /// Byte offset in the region (source and destination).
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// First page index.
    pub first_page: usize,
    /// Pages covered.
    pub pages: usize,
    /// Scatter-gather list (local offsets).
    pub segments: Vec<Segment>,
}

/// Totals of a coalescing pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoalesceStats {
    /// Pages covered.
    pub pages: u64,
    /// Work requests produced.
    pub wrs: u64,
    /// Scatter-gather elements produced.
    pub sges: u64,
}

impl CoalesceStats {
    /// Pages per work request (0 when empty).
    pub fn ratio(&self) -> f64 {
        if self.wrs == 0 {
            0.0
        } else {
            self.pages as f64 / self.wrs as f64
        }
    }
}

/// Turns bitmaps into work requests.
#[derive(Debug, Clone)]
pub struct Coalescer {
    cfg: CoalesceConfig,
}

/// The configuration is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid coalescer configuration: {0}")]
pub struct CoalesceConfigError(&'static str);

impl Coalescer {
    /// Validates `cfg`.
    pub fn new(cfg: CoalesceConfig) -> Result<Self, CoalesceConfigError> {
        if cfg.page_size == 0 || !cfg.page_size.is_power_of_two() {
            return Err(CoalesceConfigError("page size must be a power of two"));
        }
        if cfg.max_write_bytes < cfg.page_size as u64 {
            return Err(CoalesceConfigError("max write size is smaller than a page"));
        }
        if cfg.max_sges == 0 {
            return Err(CoalesceConfigError("max_sges must be at least 1"));
        }
        if cfg.max_sge_bytes != 0 && cfg.max_sge_bytes < cfg.page_size as u64 {
            return Err(CoalesceConfigError("max SGE size is smaller than a page"));
        }
        if cfg.sge_boundary != 0 && cfg.sge_boundary % cfg.page_size as u64 != 0 {
            return Err(CoalesceConfigError("SGE boundary must be a multiple of the page size"));
        }
        Ok(Coalescer { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &CoalesceConfig {
        &self.cfg
    }

    /// Coalesces every set page of `bm`.
    pub fn coalesce(&self, bm: &PageBitmap, out: &mut Vec<WorkRequest>) -> CoalesceStats {
        self.coalesce_from(bm, 0, usize::MAX, out).1
    }

    /// Coalesces set pages starting at page `from`, stopping once `page_budget` pages are
    /// covered. Returns the page to resume from (`bm.len()` when done) and the totals.
    pub fn coalesce_from(
        &self,
        bm: &PageBitmap,
        from: usize,
        page_budget: usize,
        out: &mut Vec<WorkRequest>,
    ) -> (usize, CoalesceStats) {
        let ps = self.cfg.page_size as u64;
        let mut st = CoalesceStats::default();
        let mut budget = page_budget;
        let mut pos = from;
        while budget > 0 {
            let Some(start) = bm.next_one(pos) else {
                return (bm.len(), st);
            };
            let run_end = bm.next_zero(start);
            let end = run_end.min(start.saturating_add(budget));
            let mut p = start;
            while p < end {
                let wr = self.one_wr(p, end);
                st.pages += wr.pages as u64;
                st.wrs += 1;
                st.sges += wr.segments.len() as u64;
                p += wr.pages;
                out.push(wr);
            }
            budget -= end - start;
            pos = end;
            debug_assert!(ps > 0);
        }
        (pos, st)
    }

    /// Builds the longest work request starting at page `p` within `[p, end)`.
    fn one_wr(&self, p: usize, end: usize) -> WorkRequest {
        let ps = self.cfg.page_size as u64;
        let offset = p as u64 * ps;
        let max_end_bytes = (end as u64 * ps).min(offset + self.cfg.max_write_bytes);
        let mut segments = Vec::new();
        let mut cur = offset;
        while cur < max_end_bytes && (segments.len() as u32) < self.cfg.max_sges {
            let mut seg_end = max_end_bytes;
            if let Some(chunk) = cur.checked_div(self.cfg.sge_boundary) {
                seg_end = seg_end.min((chunk + 1) * self.cfg.sge_boundary);
            }
            if self.cfg.max_sge_bytes != 0 {
                seg_end = seg_end.min(cur + self.cfg.max_sge_bytes);
            }
            // whole pages only
            seg_end = (seg_end / ps * ps).max(cur + ps);
            let len = seg_end - cur;
            // a segment length must fit u32; split very large ones
            let len = len.min(u32::MAX as u64 / ps * ps);
            segments.push(Segment { offset: cur, len: len as u32 });
            cur += len;
        }
        let len = cur - offset;
        WorkRequest { offset, len, first_page: p, pages: (len / ps) as usize, segments }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn co(max_write: u64, sges: u32, boundary: u64) -> Coalescer {
        Coalescer::new(CoalesceConfig {
            page_size: 4096,
            max_write_bytes: max_write,
            max_sges: sges,
            sge_boundary: boundary,
            max_sge_bytes: 0,
        })
        .unwrap()
    }

    fn check_cover(bm: &PageBitmap, wrs: &[WorkRequest]) {
        let mut seen = PageBitmap::new(bm.len());
        for w in wrs {
            assert_eq!(w.len, w.segments.iter().map(|s| s.len as u64).sum::<u64>());
            let mut off = w.offset;
            for s in &w.segments {
                assert_eq!(s.offset, off, "segments are contiguous");
                off += s.len as u64;
            }
            for p in w.first_page..w.first_page + w.pages {
                assert!(bm.get(p), "page {p} not dirty");
                assert!(!seen.get(p), "page {p} twice");
                seen.set(p);
            }
        }
        assert_eq!(&seen, bm);
    }

    #[test]
    fn runs_become_single_writes() {
        let mut bm = PageBitmap::new(1000);
        bm.set_range(10, 5);
        bm.set(100);
        bm.set_range(500, 300);
        let mut out = vec![];
        let st = co(2 << 20, 16, 0).coalesce(&bm, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].offset, out[0].len), (10 * 4096, 5 * 4096));
        assert_eq!(st.pages, 306);
        assert!((st.ratio() - 102.0).abs() < 1e-9);
        check_cover(&bm, &out);
    }

    #[test]
    fn merge_limit_splits_long_runs() {
        let bm = PageBitmap::full(1024); // 4 MiB
        let mut out = vec![];
        co(1 << 20, 16, 0).coalesce(&bm, &mut out);
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|w| w.len == 1 << 20 && w.segments.len() == 1));
        check_cover(&bm, &out);
    }

    #[test]
    fn sge_boundary_and_sge_limit() {
        let bm = PageBitmap::full(64); // 256 KiB
        let mut out = vec![];
        // 16 KiB registration chunks, at most 4 SGEs → 64 KiB per WR
        co(2 << 20, 4, 16 << 10).coalesce(&bm, &mut out);
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|w| w.segments.len() == 4 && w.len == 64 << 10));
        check_cover(&bm, &out);
        // unaligned start: first segment ends at the boundary
        let mut bm = PageBitmap::new(64);
        bm.set_range(3, 10);
        out.clear();
        co(2 << 20, 8, 16 << 10).coalesce(&bm, &mut out);
        assert_eq!(out[0].segments[0].len, 4096);
        assert_eq!(out[0].segments[1].offset, 16 << 10);
        check_cover(&bm, &out);
    }

    #[test]
    fn empty_and_full() {
        let mut out = vec![];
        let st = co(2 << 20, 16, 0).coalesce(&PageBitmap::new(4096), &mut out);
        assert_eq!((out.len(), st.pages, st.ratio()), (0, 0, 0.0));
        let st = co(2 << 20, 16, 0).coalesce(&PageBitmap::full(4096), &mut out);
        assert_eq!((st.wrs, st.pages), (8, 4096));
        let st0 = Coalescer::new(CoalesceConfig::per_page(4096)).unwrap().coalesce(&PageBitmap::full(100), &mut out);
        assert_eq!((st0.wrs, st0.ratio()), (100, 1.0));
    }

    #[test]
    fn budget_resumes() {
        let mut bm = PageBitmap::new(100);
        bm.set_range(0, 30);
        bm.set_range(50, 30);
        let c = co(2 << 20, 16, 0);
        let mut out = vec![];
        let (next, st) = c.coalesce_from(&bm, 0, 40, &mut out);
        assert_eq!((next, st.pages), (60, 40));
        let (next, st) = c.coalesce_from(&bm, next, 40, &mut out);
        assert_eq!((next, st.pages), (100, 20));
        check_cover(&bm, &out);
    }

    #[test]
    fn random_bitmaps_are_covered_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let n = rng.gen_range(1..3000);
            let mut bm = PageBitmap::new(n);
            for p in 0..n {
                if rng.gen_bool(0.6) {
                    bm.set(p);
                }
            }
            let c = co(4096 * rng.gen_range(1..40), rng.gen_range(1..5), 4096 * rng.gen_range(0..8));
            let mut out = vec![];
            c.coalesce(&bm, &mut out);
            assert!(out.iter().all(|w| w.segments.len() as u32 <= c.config().max_sges));
            assert!(out.iter().all(|w| w.len <= c.config().max_write_bytes));
            check_cover(&bm, &out);
        }
    }

    #[test]
    fn bad_config() {
        assert!(Coalescer::new(CoalesceConfig { page_size: 3000, ..Default::default() }).is_err());
        assert!(Coalescer::new(CoalesceConfig { max_sges: 0, ..Default::default() }).is_err());
        assert!(Coalescer::new(CoalesceConfig { max_write_bytes: 100, ..Default::default() }).is_err());
    }
}
