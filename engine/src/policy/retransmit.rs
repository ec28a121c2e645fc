//! Retransmission counting for pattern c: one history bitmap of the pages sent in the previous
//! interval, as in the paper ("we maintain only one history bitmap for the previous
//! iteration").

use livemig_transport::PageBitmap;

/// Counts, per interval, the pages sent that were also sent in the previous interval.
///
/// Either mark pages as they are posted ([`record_sent`](Self::record_sent),
/// [`record_sent_range`](Self::record_sent_range)) and call
/// [`finish_interval`](Self::finish_interval), or hand a finished bitmap of the interval's
/// sent pages to [`finish_with`](Self::finish_with).
#[derive(Debug, Clone)]
pub struct RetransmitTracker {
    previous: PageBitmap,
    current: PageBitmap,
}

impl RetransmitTracker {
    /// A tracker for a region of `pages` pages, with an empty history.
    pub fn new(pages: usize) -> Self {
        Self { previous: PageBitmap::new(pages), current: PageBitmap::new(pages) }
    }

    /// Marks `page` as sent in the current interval.
    pub fn record_sent(&mut self, page: usize) {
        self.current.set(page);
    }

    /// Marks pages `start..start + n` as sent in the current interval.
    pub fn record_sent_range(&mut self, start: usize, n: usize) {
        self.current.set_range(start, n);
    }

    /// Pages sent so far in the current interval.
    pub fn current(&self) -> &PageBitmap {
        &self.current
    }

    /// Pages sent in the previous interval.
    pub fn previous(&self) -> &PageBitmap {
        &self.previous
    }

    /// Ends the interval: returns how many of its pages were also sent in the previous
    /// interval, then makes it the previous one. No allocation.
    pub fn finish_interval(&mut self) -> usize {
        let retransmitted = self.current.count_and(&self.previous);
        std::mem::swap(&mut self.previous, &mut self.current);
        self.current.clear_all();
        retransmitted
    }

    /// Ends an interval whose sent pages the driver tracked itself in `sent` (same length as
    /// the region); anything recorded with `record_sent*` is merged in first.
    pub fn finish_with(&mut self, sent: &PageBitmap) -> usize {
        self.current.or_assign(sent);
        self.finish_interval()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_overlap_with_previous_interval_only() {
        let mut t = RetransmitTracker::new(256);
        t.record_sent_range(0, 100);
        assert_eq!(t.finish_interval(), 0, "nothing sent before");

        t.record_sent_range(50, 100); // 50..150: 50 overlap with 0..100
        assert_eq!(t.current().count_ones(), 100);
        assert_eq!(t.finish_interval(), 50);

        // Only the immediately previous interval counts: 0..50 was sent two intervals ago.
        t.record_sent_range(0, 50);
        assert_eq!(t.finish_interval(), 0);

        let mut sent = PageBitmap::new(256);
        sent.set_range(0, 10);
        t.record_sent(200);
        assert_eq!(t.finish_with(&sent), 10);
        assert_eq!(t.previous().count_ones(), 11);
        assert_eq!(t.current().count_ones(), 0);
    }
}
