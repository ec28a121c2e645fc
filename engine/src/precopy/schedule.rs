//! Which pages a pre-copy interval sends, and the figures the convergence policy sees about
//! them — a pure state machine (no I/O, no clock), shared by the source driver and the
//! scripted convergence tests.
//!
//! # Rules
//!
//! - **Round-robin cursor.** An interval takes dirty pages from where the previous one
//!   stopped, wrapping at the end of the region, so a window smaller than the dirty set still
//!   reaches every page (QEMU's RAM iteration does the same).
//! - **Zero pages are not data.** A never-sent page that turns out to be all zeros is
//!   announced as a flag. It counts in no figure the policy sees: not in `modified`, not in
//!   `pages_posted`, not in the retransmission history, not in the window budget. The only
//!   trace it leaves is `first_pass_done` becoming true once every page went out once.
//! - **The retransmission history starts after the first pass** (the paper, section 7: "we
//!   transfer once the whole memory space before enabling the convergence mechanisms"). The
//!   first interval that begins with every page sent once records what it sends; the one
//!   after it is the first that can count retransmissions. Without this, the first pass seeds
//!   the history with the whole region and the next interval's pages all count as
//!   retransmissions, so pattern c fires by construction.
//! - **How the cursor meets pattern c.** With one history bitmap (the paper's) and a
//!   round-robin cursor, two consecutive windows of `w` pages over a dirty set of `W ≥ w`
//!   pages that is re-dirtied every interval overlap by `2w − W` pages (the second window
//!   wraps past the end of the set into the first). The retransmission ratio is then
//!   `2 − W/w`: pattern c (≥ 90 %) fires when the re-dirtied dataset exceeds one interval's
//!   window by at most ~11 % — an iterative computation over a dataset the link very nearly
//!   drains each interval. A dataset well beyond the window shows disjoint windows, no
//!   retransmissions, and a stable modified count: pattern a. A dataset within the window
//!   drains early: pattern b. We keep this rather than restarting every interval at page 0,
//!   which would re-send the head of a large dirty set forever (starving its tail) and make
//!   pattern c fire where the paper's pattern a applies.

use livemig_transport::PageBitmap;

use super::proto::PageRun;
use crate::policy::RetransmitTracker;

/// What [`Schedule::pick`] selected for one batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Picked {
    /// Data pages selected (their bits are set in [`Schedule::batch`]).
    pub data: usize,
    /// Never-sent pages found to be zero, announced instead of sent.
    pub zero: usize,
    /// Those zero pages as runs, in the order found.
    pub zero_runs: Vec<PageRun>,
}

/// Interval-level figures for the convergence policy (see [`crate::policy::IntervalReport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntervalFigures {
    /// Dirty data pages at the sample that started the interval (zero pages found during
    /// the interval excluded).
    pub modified: usize,
    /// Data pages sent in the interval.
    pub posted: usize,
    /// Data pages sent in the interval that were also sent in the previous one (0 until the
    /// history has started, see the module doc).
    pub retransmitted: usize,
    /// Pending pages after the harvest.
    pub remaining: usize,
    /// Every page has been sent (or announced zero) once.
    pub first_pass_done: bool,
}

/// The pre-copy send schedule of one region.
#[derive(Debug, Clone)]
pub struct Schedule {
    pending: PageBitmap,
    never_sent: PageBitmap,
    never_sent_n: usize,
    batch: PageBitmap,
    cursor: usize,
    retx: RetransmitTracker,
    /// The current interval began with the first pass complete: record its pages.
    history_on: bool,
    /// Figures of the interval in progress.
    modified_at_start: usize,
    posted: usize,
    zero_found: usize,
}

impl Schedule {
    /// A schedule for `pages` pages, all pending and never sent (the first pass).
    pub fn new(pages: usize) -> Self {
        Self {
            pending: PageBitmap::full(pages),
            never_sent: PageBitmap::full(pages),
            never_sent_n: pages,
            batch: PageBitmap::new(pages),
            cursor: 0,
            retx: RetransmitTracker::new(pages),
            history_on: false,
            modified_at_start: 0,
            posted: 0,
            zero_found: 0,
        }
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.pending.len()
    }

    /// The pending (dirty, unsent) set; the driver ORs each harvest of the dirty log into it.
    pub fn pending_mut(&mut self) -> &mut PageBitmap {
        &mut self.pending
    }

    /// Pending pages.
    pub fn pending_count(&self) -> usize {
        self.pending.count_ones()
    }

    /// Every page has been sent or announced zero at least once.
    pub fn first_pass_done(&self) -> bool {
        self.never_sent_n == 0
    }

    /// Pages never sent yet.
    pub fn never_sent(&self) -> usize {
        self.never_sent_n
    }

    /// Whether `page` was never sent (its content is still unknown to the destination).
    pub fn is_never_sent(&self, page: usize) -> bool {
        self.never_sent.get(page)
    }

    /// Takes pages known to be zero without reading them (never populated) out of the first
    /// pass before it starts: they are announced, never sent, and count in no figure.
    /// Returns them as runs. Pages already sent are left alone.
    pub fn take_known_zero(&mut self, known_zero: &PageBitmap) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for (start, n) in known_zero.runs() {
            for p in start..start + n {
                if !self.never_sent.get(p) {
                    continue;
                }
                self.never_sent.clear(p);
                self.never_sent_n -= 1;
                self.pending.clear(p);
                push_run(&mut runs, p);
            }
        }
        runs
    }

    /// Starts an interval: samples `modified` and arms the retransmission history if the
    /// first pass is complete.
    pub fn begin_interval(&mut self) {
        self.history_on = self.first_pass_done();
        self.modified_at_start = self.pending.count_ones();
        self.posted = 0;
        self.zero_found = 0;
    }

    /// Selects up to `budget` data pages into [`batch`](Self::batch) (cleared first) and
    /// takes them out of the pending set. Never-sent pages for which `is_zero` says true are
    /// announced instead (returned as runs) and do not count against the budget.
    pub fn pick(&mut self, budget: usize, is_zero: &mut dyn FnMut(usize) -> bool) -> Picked {
        let mut out = Picked::default();
        self.batch.clear_all();
        while out.data < budget {
            let Some(p) = self.pending.next_one(self.cursor).or_else(|| self.pending.next_one(0)) else { break };
            self.pending.clear(p);
            self.cursor = p + 1;
            if self.never_sent.get(p) {
                self.never_sent.clear(p);
                self.never_sent_n -= 1;
                if is_zero(p) {
                    out.zero += 1;
                    push_run(&mut out.zero_runs, p);
                    continue;
                }
            }
            if self.history_on {
                self.retx.record_sent(p);
            }
            self.batch.set(p);
            out.data += 1;
        }
        self.posted += out.data;
        self.zero_found += out.zero;
        out
    }

    /// The data pages of the last [`pick`](Self::pick).
    pub fn batch(&self) -> &PageBitmap {
        &self.batch
    }

    /// The data pages of the last [`pick`](Self::pick) in pages `[from, to)`, as runs.
    pub fn batch_runs_in(&self, from: usize, to: usize) -> Vec<PageRun> {
        let mut out = Vec::new();
        let to = to.min(self.batch.len());
        let mut p = from;
        while let Some(start) = self.batch.next_one(p).filter(|&s| s < to) {
            let end = self.batch.next_zero(start).min(to);
            let mut first = start as u64;
            let mut left = (end - start) as u64;
            while left > 0 {
                let take = left.min(u32::MAX as u64);
                out.push(PageRun { first, pages: take as u32 });
                first += take;
                left -= take;
            }
            p = end;
        }
        out
    }

    /// Ends the interval after the harvest: the figures for the policy.
    pub fn end_interval(&mut self) -> IntervalFigures {
        let retransmitted = self.retx.finish_interval();
        IntervalFigures {
            modified: self.modified_at_start.saturating_sub(self.zero_found),
            posted: self.posted,
            retransmitted,
            remaining: self.pending.count_ones(),
            first_pass_done: self.first_pass_done(),
        }
    }
}

fn push_run(runs: &mut Vec<PageRun>, p: usize) {
    match runs.last_mut() {
        Some(r) if r.first + r.pages as u64 == p as u64 && r.pages < u32::MAX => r.pages += 1,
        _ => runs.push(PageRun { first: p as u64, pages: 1 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pass_does_not_seed_the_history() {
        let mut s = Schedule::new(100);
        // First pass in one interval: pages 50.. are zero.
        s.begin_interval();
        let p = s.pick(usize::MAX, &mut |p| p >= 50);
        assert_eq!((p.data, p.zero), (50, 50));
        assert_eq!(p.zero_runs, vec![PageRun { first: 50, pages: 50 }]);
        // Everything is re-dirtied.
        s.pending_mut().set_range(0, 100);
        let f = s.end_interval();
        assert_eq!(
            f,
            IntervalFigures { modified: 50, posted: 50, retransmitted: 0, remaining: 100, first_pass_done: true }
        );
        // Interval 2 re-sends everything; the history only starts now: no retransmission.
        s.begin_interval();
        let p = s.pick(usize::MAX, &mut |_| panic!("no zero check after the first pass"));
        assert_eq!(p.data, 100);
        s.pending_mut().set_range(0, 100);
        assert_eq!(s.end_interval().retransmitted, 0);
        // Interval 3: every page was also sent in interval 2.
        s.begin_interval();
        assert_eq!(s.pick(usize::MAX, &mut |_| false).data, 100);
        assert_eq!(s.end_interval().retransmitted, 100);
    }

    #[test]
    fn round_robin_overlap_is_two_minus_ratio() {
        // W = 120 dirty pages re-dirtied every interval, window 100: overlap 2·100 − 120 = 80.
        let mut s = Schedule::new(200);
        s.take_known_zero(&{
            let mut z = PageBitmap::new(200);
            z.set_range(120, 80);
            z
        });
        for i in 0..4 {
            s.begin_interval();
            s.pick(100, &mut |_| false);
            s.pending_mut().set_range(0, 120);
            let f = s.end_interval();
            if i >= 3 {
                assert_eq!(f.retransmitted, 80, "interval {i}");
            }
        }
    }

    #[test]
    fn batch_runs_by_range() {
        let mut s = Schedule::new(300);
        s.begin_interval();
        s.pick(usize::MAX, &mut |p| (10..20).contains(&p) || p >= 250);
        assert_eq!(s.batch_runs_in(0, 300), vec![PageRun { first: 0, pages: 10 }, PageRun { first: 20, pages: 230 }]);
        assert_eq!(s.batch_runs_in(5, 25), vec![PageRun { first: 5, pages: 5 }, PageRun { first: 20, pages: 5 }]);
        assert_eq!(s.batch_runs_in(250, 300), vec![]);
    }

    #[test]
    fn known_zero_pages_leave_the_first_pass() {
        let mut s = Schedule::new(64);
        let mut z = PageBitmap::new(64);
        z.set_range(8, 16);
        z.set(40);
        let runs = s.take_known_zero(&z);
        assert_eq!(runs, vec![PageRun { first: 8, pages: 16 }, PageRun { first: 40, pages: 1 }]);
        assert_eq!(s.never_sent(), 64 - 17);
        s.begin_interval();
        let p = s.pick(usize::MAX, &mut |_| false);
        assert_eq!((p.data, p.zero), (47, 0));
        let f = s.end_interval();
        assert_eq!((f.modified, f.posted, f.first_pass_done), (47, 47, true));
    }
}
