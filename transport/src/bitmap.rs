//! A dense page bitmap: the dirty set shared by every migration strategy and the input of
//! the coalescer. One bit per page, 64 pages per word.

use serde::{Deserialize, Serialize};

/// One bit per page of a region.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl std::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBitmap({} of {} pages set)", self.count_ones(), self.pages)
    }
}

impl PageBitmap {
    /// An empty bitmap of `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self { words: vec![0; pages.div_ceil(64)], pages }
    }

    /// A bitmap with every page set.
    pub fn full(pages: usize) -> Self {
        let mut b = Self::new(pages);
        b.set_range(0, pages);
        b
    }

    /// Number of pages covered.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// True when the bitmap covers no page at all.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Marks `page`. Panics if `page` is out of range (a caller bug, never wire input).
    pub fn set(&mut self, page: usize) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[page / 64] |= 1 << (page % 64);
    }

    /// Clears `page`.
    pub fn clear(&mut self, page: usize) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[page / 64] &= !(1 << (page % 64));
    }

    /// Tests `page` (false when out of range).
    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Marks pages `start..start+n` (clamped to the bitmap).
    pub fn set_range(&mut self, start: usize, n: usize) {
        let end = start.saturating_add(n).min(self.pages);
        let mut p = start;
        while p < end {
            if p % 64 == 0 && end - p >= 64 {
                self.words[p / 64] = u64::MAX;
                p += 64;
            } else {
                self.words[p / 64] |= 1 << (p % 64);
                p += 1;
            }
        }
    }

    /// Clears every page.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of pages set.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of pages set in both `self` and `other` (e.g. retransmitted pages).
    pub fn count_and(&self, other: &PageBitmap) -> usize {
        self.words.iter().zip(&other.words).map(|(a, b)| (a & b).count_ones() as usize).sum()
    }

    /// `self |= other`.
    pub fn or_assign(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// `self &= !other`.
    pub fn and_not_assign(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// Iterates the set pages in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }

    /// Iterates maximal runs of set pages as `(first_page, page_count)`.
    pub fn runs(&self) -> Runs<'_> {
        Runs { bm: self, pos: 0 }
    }

    /// First set page at or after `from`.
    pub fn next_one(&self, from: usize) -> Option<usize> {
        if from >= self.pages {
            return None;
        }
        let mut wi = from / 64;
        let mut w = self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let p = wi * 64 + w.trailing_zeros() as usize;
                return (p < self.pages).then_some(p);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    /// First clear page at or after `from` (or `len()` if none).
    pub fn next_zero(&self, from: usize) -> usize {
        if from >= self.pages {
            return self.pages;
        }
        let mut wi = from / 64;
        let mut w = !self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return (wi * 64 + w.trailing_zeros() as usize).min(self.pages);
            }
            wi += 1;
            if wi >= self.words.len() {
                return self.pages;
            }
            w = !self.words[wi];
        }
    }

    /// Raw words (bit `i` of word `w` is page `w*64+i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

/// Iterator over runs of set pages.
#[derive(Debug)]
pub struct Runs<'a> {
    bm: &'a PageBitmap,
    pos: usize,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        let start = self.bm.next_one(self.pos)?;
        let end = self.bm.next_zero(start);
        self.pos = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_counts() {
        let mut b = PageBitmap::new(200);
        b.set_range(3, 5);
        b.set(63);
        b.set(64);
        b.set_range(120, 80);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(3, 5), (63, 2), (120, 80)]);
        assert_eq!(b.count_ones(), 87);
        assert_eq!(b.iter_ones().count(), 87);
        assert!(b.get(199) && !b.get(200) && !b.get(8));
        let full = PageBitmap::full(130);
        assert_eq!(full.runs().collect::<Vec<_>>(), vec![(0, 130)]);
        assert_eq!(PageBitmap::new(0).runs().count(), 0);
        assert_eq!(b.count_and(&PageBitmap::full(200)), 87);
        let mut c = b.clone();
        c.and_not_assign(&b);
        assert_eq!(c.count_ones(), 0);
    }
}
