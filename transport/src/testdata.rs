//! Deterministic page contents for benchmarks and tests.

use crate::{PageBitmap, Region};

/// Fills the pages of `bm` in `r` with pseudo-random bytes (seeded).
pub fn fill_pages(r: &Region, bm: &PageBitmap, seed: u64) {
    let ps = r.page_size() as usize;
    let mut x = seed | 1;
    let mut page = vec![0u8; ps];
    for p in bm.iter_ones() {
        for c in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        r.write_at((p * ps) as u64, &page);
    }
}
