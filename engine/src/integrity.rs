//! Proof that the destination's memory equals the source's, kept off the downtime path.
//!
//! Each page contributes one term, `H(page index, H(page bytes))` (XXH3-128 both times), and
//! the region's digest is the sum of its pages' terms modulo 2¹²⁸. The sum is
//! order-independent and incremental: when a page is sent again its old term is subtracted
//! and the new one added, so each side keeps the digest up to date as pages go out or land,
//! and at switchover only the last pages are hashed — not the whole region.
//!
//! - The **source** hashes each data page right after posting it (it is read again from its
//!   memory, not from the wire). A page written after that harvest is dirty and is sent —
//!   and hashed — again, so once the guest is paused and the last pages are out, the digest
//!   is that of the frozen memory.
//! - The **destination** hashes each page it is told has landed (a `Placed` message,
//!   ordered after the writes it covers), reading its own memory. A newer copy of the page
//!   landing meanwhile is announced again and re-hashed, so the last term of every page is
//!   that of its last placement.
//! - **Zero pages** have the constant inner hash of a zero page: their term costs no read.
//!
//! A page corrupted on the way (a bad transfer, a wrong offset, a flipped bit) changes the
//! destination's term for that page and the digests differ. The terms are not a MAC (the
//! peer is already authenticated); XXH3-128 makes an accidental collision negligible.

use livemig_transport::{PageBitmap, Region};
use xxhash_rust::xxh3::{xxh3_128, xxh3_128_with_seed};

/// A region digest: the sum of page terms and how many pages contributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest {
    /// Sum of the page terms modulo 2¹²⁸.
    pub sum: u128,
    /// Pages with a term (all of them once the first pass is over).
    pub pages: u64,
}

impl Digest {
    /// The 32-byte wire form: `sum` (16, little-endian) | `pages` (8) | 8 zero bytes.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&self.sum.to_le_bytes());
        b[16..24].copy_from_slice(&self.pages.to_le_bytes());
        b
    }

    /// Inverse of [`to_bytes`](Self::to_bytes) (the reserved bytes are ignored).
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        Digest {
            sum: u128::from_le_bytes(b[..16].try_into().expect("16 bytes")),
            pages: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        }
    }

    /// Hex of the wire form (for reports).
    pub fn hex(self) -> String {
        format!("{:032x}/{}", self.sum, self.pages)
    }
}

/// The incremental digest of one region (page-indexed).
#[derive(Debug, Clone)]
pub struct PageDigests {
    page_size: usize,
    terms: Vec<u128>,
    have: PageBitmap,
    sum: u128,
    zero_inner: u128,
    buf: Vec<u8>,
}

impl PageDigests {
    /// Digests for `pages` pages of `page_size` bytes, none known yet.
    pub fn new(pages: usize, page_size: u32) -> Self {
        let page_size = page_size as usize;
        Self {
            page_size,
            terms: vec![0; pages],
            have: PageBitmap::new(pages),
            sum: 0,
            zero_inner: xxh3_128(&vec![0u8; page_size]),
            buf: vec![0u8; page_size],
        }
    }

    fn term(page: usize, inner: u128) -> u128 {
        xxh3_128_with_seed(&inner.to_le_bytes(), page as u64)
    }

    fn set(&mut self, page: usize, term: u128) {
        self.sum = self.sum.wrapping_sub(self.terms[page]).wrapping_add(term);
        self.terms[page] = term;
        self.have.set(page);
    }

    /// Records `bytes` as the content of `page` (`bytes.len()` is the page size). False,
    /// and nothing recorded, if `page` is out of range.
    pub fn record_bytes(&mut self, page: usize, bytes: &[u8]) -> bool {
        debug_assert_eq!(bytes.len(), self.page_size);
        if page >= self.terms.len() {
            return false;
        }
        self.set(page, Self::term(page, xxh3_128(bytes)));
        true
    }

    /// The term `bytes` would give `page` (no state touched: hash outside a lock, record
    /// with [`record_term`](Self::record_term) under it).
    pub fn page_term(page: usize, bytes: &[u8]) -> u128 {
        Self::term(page, xxh3_128(bytes))
    }

    /// Records a term computed by [`page_term`](Self::page_term). False if `page` is out of
    /// range.
    pub fn record_term(&mut self, page: usize, term: u128) -> bool {
        if page >= self.terms.len() {
            return false;
        }
        self.set(page, term);
        true
    }

    /// Reads page `local` of `region` (volatile copy) and records it as page `index` of the
    /// page space. False if either is out of range.
    pub fn record_from(&mut self, index: usize, region: &Region, local: usize) -> bool {
        if index >= self.terms.len() {
            return false;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let ok = region.read_at((local * self.page_size) as u64, &mut buf);
        let ok = ok && self.record_bytes(index, &buf);
        self.buf = buf;
        ok
    }

    /// Records `n` pages from `first` as zero pages (no read). False, and nothing recorded,
    /// if the run leaves the page space.
    pub fn record_zero(&mut self, first: usize, n: usize) -> bool {
        if first.checked_add(n).is_none_or(|end| end > self.terms.len()) {
            return false;
        }
        for p in first..first + n {
            self.set(p, Self::term(p, self.zero_inner));
        }
        true
    }

    /// The current digest.
    pub fn digest(&self) -> Digest {
        Digest { sum: self.sum, pages: self.have.count_ones() as u64 }
    }

    /// The first page without a term, if any.
    pub fn first_missing(&self) -> Option<usize> {
        let z = self.have.next_zero(0);
        (z < self.terms.len()).then_some(z)
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.terms.len()
    }
}

/// The digest of the first `len` bytes of `region`, read in full (for tests and tools that
/// check a migration independently of the digests the session kept).
pub fn region_digest(region: &Region, len: u64) -> Digest {
    let pages = (len.min(region.len()) / region.page_size() as u64) as usize;
    let mut d = PageDigests::new(pages, region.page_size());
    for p in 0..pages {
        d.record_from(p, region, p);
    }
    d.digest()
}

/// The digest of a whole [`GuestMemory`](crate::guest::GuestMemory), read in full.
pub fn memory_digest(memory: &crate::guest::GuestMemory) -> Digest {
    let mut d = PageDigests::new(memory.pages(), memory.page_size());
    for (i, r) in memory.regions().iter().enumerate() {
        for p in 0..r.pages() {
            d.record_from(memory.base(i) + p, r, p);
        }
    }
    d.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_transport::Access;

    #[test]
    fn order_independent_and_incremental() {
        let ps = 4096;
        let page = |v: u8| vec![v; ps];
        let mut a = PageDigests::new(4, ps as u32);
        let mut b = PageDigests::new(4, ps as u32);
        // a: pages in order; b: reverse order, with page 2 first recorded stale then fixed.
        for (i, v) in [1u8, 2, 3, 0].into_iter().enumerate() {
            if v == 0 {
                a.record_zero(i, 1);
            } else {
                a.record_bytes(i, &page(v));
            }
        }
        b.record_zero(3, 1);
        b.record_bytes(2, &page(99));
        assert_ne!(b.digest().sum, 0);
        b.record_bytes(2, &page(3));
        b.record_bytes(1, &page(2));
        assert_ne!(a.digest(), b.digest(), "page 0 missing");
        assert_eq!(b.first_missing(), Some(0));
        b.record_bytes(0, &page(1));
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest().pages, 4);
        // Zero page recorded by bytes equals the no-read form.
        let mut c = b.clone();
        c.record_bytes(3, &page(0));
        // Out of range: refused, nothing changes.
        assert!(!c.record_bytes(4, &page(1)) && !c.record_zero(3, 2) && !c.record_zero(usize::MAX, 2));
        assert_eq!(c.digest(), b.digest());
        // Swapping two pages' contents changes the digest; so does one flipped bit.
        let mut d = a.clone();
        d.record_bytes(0, &page(2));
        d.record_bytes(1, &page(1));
        assert_ne!(d.digest(), a.digest());
        let mut e = a.clone();
        let mut p = page(1);
        p[100] ^= 1;
        e.record_bytes(0, &p);
        assert_ne!(e.digest(), a.digest());
        assert_eq!(Digest::from_bytes(&a.digest().to_bytes()), a.digest());
    }

    #[test]
    fn reads_regions() {
        let r = Region::anonymous(1, 8 * 4096, 4096, Access::LOCAL).unwrap();
        r.write_at(4096 * 3, &[7; 10]);
        let mut a = PageDigests::new(8, 4096);
        for p in 0..8 {
            assert!(a.record_from(p, &r, p));
        }
        assert!(!a.record_from(8, &r, 0));
        assert!(!a.record_from(0, &r, 8));
        let mut b = PageDigests::new(8, 4096);
        b.record_zero(0, 3);
        b.record_zero(4, 4);
        let mut p3 = vec![0u8; 4096];
        p3[..10].fill(7);
        b.record_bytes(3, &p3);
        assert_eq!(a.digest(), b.digest());
    }
}
