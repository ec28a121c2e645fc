//! The source's active-push order in post-copy: push-only, or bubbling around the
//! destination's faults (the prepaging paper, section 3.2). A pure scheduler over the guest's
//! page space; the driver asks it for the next run of pages to push and tells it of every
//! demand request.
//!
//! - **Push-only** ([`PushOrder::Linear`]): pages in order from the first; faults are served
//!   but do not move the push.
//! - **Bubbling** ([`PushOrder::Bubbling`]): each fault becomes a *pivot*, and a bubble grows
//!   around it — forward only, or in both directions ([`Expansion`]). With `pivots` > 1 the
//!   bubbles of the k most recent faults grow side by side (round robin over their edges); a
//!   new fault replaces the oldest pivot. An edge that meets a page already sent stops (the
//!   neighbourhood beyond it is another bubble's).
//! - **The sticky pivot** at page 0 is never replaced and never stops: its edge skips sent
//!   pages and moves on, so the push cannot stall however the other edges end.
//!
//! Every page is pushed at most once: a run handed out, and a demand answered, mark their
//! pages sent; a demand for a page already sent (in flight or placed) is ignored.

use std::collections::VecDeque;

use serde::Serialize;

use crate::PageBitmap;

/// Which way a bubble grows around its pivot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expansion {
    /// Pages after the pivot only.
    Forward,
    /// Pages after and before the pivot, alternately.
    Dual,
}

/// The active-push order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushOrder {
    /// Push-only: page order from the first page; faults do not move the push.
    Linear,
    /// Bubbling around the most recent faults.
    Bubbling {
        /// How many recent faults are pivots at once (1: single pivot; the paper found 7
        /// best). At least 1.
        pivots: usize,
        /// Forward-only or dual-direction expansion.
        expansion: Expansion,
    },
}

impl Default for PushOrder {
    fn default() -> Self {
        PushOrder::Bubbling { pivots: 7, expansion: Expansion::Dual }
    }
}

/// What to do with a demand request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// Not sent yet: send it now (it is marked sent).
    Send,
    /// Already sent (in flight or placed): the destination will have it without asking again.
    AlreadySent,
    /// No such page.
    OutOfRange,
}

/// Counters of the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrepageStats {
    /// Pages handed out by [`Prepager::next_run`].
    pub pushed: u64,
    /// Demands answered with [`Demand::Send`].
    pub demanded: u64,
    /// Demands for pages already sent.
    pub ignored: u64,
    /// Pivots replaced by newer faults.
    pub pivots_replaced: u64,
}

/// One bubble: its forward edge is the next page after the pivot not yet covered, its
/// backward edge the page just below the covered part (`back` pages below it are left).
#[derive(Debug, Clone, Copy)]
struct Bubble {
    fwd: usize,
    back: usize,
    fwd_open: bool,
    back_open: bool,
}

/// One edge of one bubble, in round-robin order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Sticky,
    Fwd(usize),
    Back(usize),
}

/// The pure push scheduler.
#[derive(Debug, Clone)]
pub struct Prepager {
    order: PushOrder,
    sent: PageBitmap,
    unsent: usize,
    /// The sticky pivot's edge: every page below it is sent.
    sticky: usize,
    /// Bubbles of the most recent faults, oldest first.
    bubbles: VecDeque<Bubble>,
    /// Position in the round robin over edges.
    turn: usize,
    stats: PrepageStats,
}

impl Prepager {
    /// A scheduler over `pages` pages, none sent.
    pub fn new(pages: usize, order: PushOrder) -> Self {
        let order = match order {
            PushOrder::Bubbling { pivots, expansion } => PushOrder::Bubbling { pivots: pivots.max(1), expansion },
            o => o,
        };
        Prepager {
            order,
            sent: PageBitmap::new(pages),
            unsent: pages,
            sticky: 0,
            bubbles: VecDeque::new(),
            turn: 0,
            stats: PrepageStats::default(),
        }
    }

    /// Pages of the page space.
    pub fn pages(&self) -> usize {
        self.sent.len()
    }

    /// Pages not sent yet.
    pub fn remaining(&self) -> usize {
        self.unsent
    }

    /// Whether `page` was sent (pushed, demanded or marked).
    pub fn is_sent(&self, page: usize) -> bool {
        page < self.pages() && self.sent.get(page)
    }

    /// Counters.
    pub fn stats(&self) -> PrepageStats {
        self.stats
    }

    /// Marks pages the destination already holds (e.g. zero pages announced, or pages
    /// pre-copied and clean since): they are never pushed. Out-of-range pages are ignored.
    pub fn mark_sent(&mut self, first: usize, n: usize) {
        let end = first.saturating_add(n).min(self.pages());
        for p in first.min(end)..end {
            self.take(p);
        }
    }

    /// Pages the destination reports missing after a broken session (their sends were
    /// lost): unsent again, so the push sends them once more. Pages not sent yet and
    /// out-of-range pages are left as they are. Returns how many pages were unsent again.
    pub fn resend(&mut self, first: usize, n: usize) -> usize {
        let end = first.saturating_add(n).min(self.pages());
        let mut k = 0;
        for p in first.min(end)..end {
            if self.sent.get(p) {
                self.sent.clear(p);
                self.unsent += 1;
                k += 1;
            }
        }
        // The sticky edge walks up from here again; the bubbles' edges stay where they are.
        self.sticky = self.sticky.min(first);
        k
    }

    fn take(&mut self, page: usize) -> bool {
        if self.sent.get(page) {
            return false;
        }
        self.sent.set(page);
        self.unsent -= 1;
        true
    }

    /// A demand request for `page` from the destination.
    pub fn demand(&mut self, page: usize) -> Demand {
        if page >= self.pages() {
            return Demand::OutOfRange;
        }
        if !self.take(page) {
            self.stats.ignored += 1;
            return Demand::AlreadySent;
        }
        self.stats.demanded += 1;
        if let PushOrder::Bubbling { pivots, .. } = self.order {
            if self.bubbles.len() == pivots {
                self.bubbles.pop_front();
                self.stats.pivots_replaced += 1;
            }
            self.bubbles.push_back(Bubble { fwd: page + 1, back: page, fwd_open: true, back_open: true });
            // The newest fault's neighbourhood goes next.
            self.turn = (self.bubbles.len() - 1) * self.edges_per_bubble();
        }
        Demand::Send
    }

    fn edges_per_bubble(&self) -> usize {
        match self.order {
            PushOrder::Bubbling { expansion: Expansion::Dual, .. } => 2,
            _ => 1,
        }
    }

    /// The edges in round-robin order: the bubbles', oldest first, then the sticky one.
    fn edges(&self) -> Vec<Edge> {
        let mut e = Vec::with_capacity(self.bubbles.len() * 2 + 1);
        let dual = self.edges_per_bubble() == 2;
        for i in 0..self.bubbles.len() {
            e.push(Edge::Fwd(i));
            if dual {
                e.push(Edge::Back(i));
            }
        }
        e.push(Edge::Sticky);
        e
    }

    /// The next run of pages to push, at most `max` (≥ 1) of them, consecutive: `(first,
    /// n)`, marked sent. `None` once every page is sent.
    pub fn next_run(&mut self, max: usize) -> Option<(usize, usize)> {
        let max = max.max(1);
        if self.unsent == 0 {
            return None;
        }
        loop {
            let edges = self.edges();
            let i = self.turn % edges.len();
            self.turn = i + 1;
            if let Some(run) = self.advance(edges[i], max) {
                self.stats.pushed += run.1 as u64;
                return Some(run);
            }
            // The edge closed; the sticky edge always yields while pages are unsent, so
            // this loop ends.
        }
    }

    /// Takes a run from one edge, or closes it.
    fn advance(&mut self, edge: Edge, max: usize) -> Option<(usize, usize)> {
        let pages = self.pages();
        match edge {
            Edge::Sticky => {
                let first = self.sent.next_zero(self.sticky);
                if first >= pages {
                    return None;
                }
                let n = self.forward_run(first, max);
                self.sticky = first + n;
                Some((first, n))
            }
            Edge::Fwd(b) => {
                let bub = self.bubbles[b];
                if !bub.fwd_open || bub.fwd >= pages || self.sent.get(bub.fwd) {
                    self.bubbles[b].fwd_open = false;
                    return None;
                }
                let n = self.forward_run(bub.fwd, max);
                self.bubbles[b].fwd += n;
                Some((bub.fwd, n))
            }
            Edge::Back(b) => {
                let bub = self.bubbles[b];
                if !bub.back_open || bub.back == 0 || self.sent.get(bub.back - 1) {
                    self.bubbles[b].back_open = false;
                    return None;
                }
                let mut first = bub.back;
                while first > 0 && bub.back - first < max && !self.sent.get(first - 1) {
                    first -= 1;
                    self.take(first);
                }
                self.bubbles[b].back = first;
                Some((first, bub.back - first))
            }
        }
    }

    /// Takes unsent pages from `first` on, at most `max`, stopping at the first sent page.
    fn forward_run(&mut self, first: usize, max: usize) -> usize {
        let mut n = 0;
        while n < max && first + n < self.pages() && self.take(first + n) {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bubbling(pivots: usize, expansion: Expansion) -> PushOrder {
        PushOrder::Bubbling { pivots, expansion }
    }

    /// Drains the scheduler, checking that no page comes twice; returns the runs.
    fn drain(p: &mut Prepager, max: usize, seen: &mut [bool]) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        while let Some((f, n)) = p.next_run(max) {
            assert!(n >= 1 && n <= max);
            for (q, s) in seen.iter_mut().enumerate().skip(f).take(n) {
                assert!(!*s, "page {q} pushed twice");
                *s = true;
            }
            runs.push((f, n));
        }
        runs
    }

    #[test]
    fn linear_pushes_in_order_and_faults_do_not_move_it() {
        let mut p = Prepager::new(100, PushOrder::Linear);
        assert_eq!(p.next_run(10), Some((0, 10)));
        assert_eq!(p.demand(50), Demand::Send);
        assert_eq!(p.next_run(10), Some((10, 10)));
        let mut seen = vec![false; 100];
        (0..20).for_each(|i| seen[i] = true);
        seen[50] = true;
        let runs = drain(&mut p, 10, &mut seen);
        assert!(runs.windows(2).all(|w| w[0].0 < w[1].0), "in page order: {runs:?}");
        assert!(runs.iter().any(|&(f, _)| f == 51), "skips the demanded page: {runs:?}");
        assert!(seen.iter().all(|&s| s));
        assert_eq!(p.remaining(), 0);
    }

    #[test]
    fn single_pivot_dual_bubble_grows_both_ways_around_the_fault() {
        let mut p = Prepager::new(1000, bubbling(1, Expansion::Dual));
        assert_eq!(p.next_run(4), Some((0, 4)), "before any fault: the sticky pivot at page 0");
        assert_eq!(p.demand(500), Demand::Send);
        assert_eq!(p.next_run(4), Some((501, 4)));
        assert_eq!(p.next_run(4), Some((496, 4)));
        assert_eq!(p.next_run(4), Some((4, 4)), "the sticky pivot takes its turn");
        assert_eq!(p.next_run(4), Some((505, 4)));
        assert_eq!(p.next_run(4), Some((492, 4)));
        // A new fault replaces the pivot (k = 1).
        assert_eq!(p.demand(800), Demand::Send);
        assert_eq!(p.stats().pivots_replaced, 1);
        assert_eq!(p.next_run(4), Some((801, 4)));
        assert_eq!(p.next_run(4), Some((796, 4)));
    }

    #[test]
    fn forward_expansion_never_goes_backward() {
        let mut p = Prepager::new(1000, bubbling(1, Expansion::Forward));
        p.demand(500);
        assert_eq!(p.next_run(8), Some((501, 8)));
        assert_eq!(p.next_run(8), Some((0, 8)));
        assert_eq!(p.next_run(8), Some((509, 8)));
        let mut seen = vec![false; 1000];
        for q in (0..8).chain(500..517) {
            seen[q] = true;
        }
        let runs = drain(&mut p, 8, &mut seen);
        assert!(seen.iter().all(|&s| s), "the sticky pivot finishes the rest");
        // Page 499, just below the pivot, is left to the sticky pivot: it comes after every
        // page below it.
        let at = |q: usize| runs.iter().position(|&(f, n)| f <= q && q < f + n).unwrap();
        assert!((8..499).all(|q| at(q) <= at(499)), "{runs:?}");
    }

    #[test]
    fn multiple_pivots_replace_the_oldest_and_edges_stop_where_bubbles_meet() {
        let mut p = Prepager::new(10_000, bubbling(2, Expansion::Dual));
        p.demand(1000);
        p.demand(1010);
        // Newest first: pivot 1010's edges, then the sticky, then pivot 1000's.
        assert_eq!(p.next_run(100), Some((1011, 100)));
        assert_eq!(p.next_run(100), Some((1001, 9)), "1010's backward edge stops at 1000's pivot");
        assert_eq!(p.next_run(100), Some((0, 100)));
        // Pivot 1000: forward edge meets the pages 1001.. already sent and closes; backward grows.
        assert_eq!(p.next_run(100), Some((900, 100)));
        p.demand(5000);
        assert_eq!(p.stats().pivots_replaced, 1, "k = 2: pivot 1000 replaced");
        assert_eq!(p.next_run(10), Some((5001, 10)));
        assert_eq!(p.next_run(10), Some((4990, 10)));
    }

    #[test]
    fn sticky_pivot_keeps_the_push_going_when_every_bubble_edge_stops() {
        // Forward-only pivots right behind sent pages: every bubble edge closes at once.
        let mut p = Prepager::new(64, bubbling(3, Expansion::Forward));
        p.mark_sent(10, 5);
        p.demand(9);
        p.demand(30);
        p.mark_sent(31, 1);
        let mut seen = vec![false; 64];
        (9..15).chain(30..32).for_each(|q| seen[q] = true);
        drain(&mut p, 4, &mut seen);
        assert!(seen.iter().all(|&s| s));
        assert_eq!(p.remaining(), 0);
        assert_eq!(p.next_run(4), None);
    }

    #[test]
    fn demands_for_sent_pages_are_ignored_and_do_not_move_the_pivot() {
        let mut p = Prepager::new(100, bubbling(1, Expansion::Dual));
        assert_eq!(p.next_run(10), Some((0, 10)));
        assert_eq!(p.demand(5), Demand::AlreadySent);
        assert_eq!(p.demand(100), Demand::OutOfRange);
        assert_eq!(p.stats().ignored, 1);
        assert_eq!(p.next_run(10), Some((10, 10)), "no pivot was created");
        assert_eq!(p.demand(40), Demand::Send);
        assert_eq!(p.demand(40), Demand::AlreadySent, "a page crosses at most once");
    }

    #[test]
    fn every_order_sends_every_page_exactly_once_under_random_faults() {
        use rand::{Rng, SeedableRng};
        let orders = [
            PushOrder::Linear,
            bubbling(1, Expansion::Forward),
            bubbling(1, Expansion::Dual),
            bubbling(7, Expansion::Forward),
            bubbling(7, Expansion::Dual),
        ];
        for (seed, order) in orders.into_iter().enumerate() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
            let pages = 5000;
            let mut p = Prepager::new(pages, order);
            let mut count = vec![0u32; pages];
            loop {
                if rng.gen_bool(0.3) {
                    let q = rng.gen_range(0..pages);
                    if p.demand(q) == Demand::Send {
                        count[q] += 1;
                    }
                }
                match p.next_run(rng.gen_range(1..64)) {
                    Some((f, n)) => (f..f + n).for_each(|q| count[q] += 1),
                    None => break,
                }
            }
            assert!(count.iter().all(|&c| c == 1), "{order:?}: a page sent twice or never");
            let s = p.stats();
            assert_eq!(s.pushed + s.demanded, pages as u64, "{order:?}");
        }
    }

    #[test]
    fn pages_reported_missing_are_sent_once_more_and_only_they() {
        for order in [PushOrder::Linear, bubbling(7, Expansion::Dual)] {
            let pages = 1000;
            let mut p = Prepager::new(pages, order);
            p.demand(700);
            let mut first = vec![false; pages];
            first[700] = true;
            // Half the push went out before the link broke.
            for _ in 0..8 {
                let (f, n) = p.next_run(64).unwrap();
                (f..f + n).for_each(|q| first[q] = true);
            }
            let unsent_before = p.remaining();
            // The destination lost pages 100..110 and 700 (sent), and never saw 990.. (not sent).
            assert_eq!(p.resend(100, 10), 10);
            assert_eq!(p.resend(700, 1), 1);
            assert_eq!(p.resend(990, 10), 0);
            assert_eq!(p.resend(pages + 5, 3), 0);
            assert_eq!(p.remaining(), unsent_before + 11, "{order:?}");
            let mut again = vec![0u32; pages];
            drain_counting(&mut p, &mut again);
            for q in 0..pages {
                let want = u32::from(!first[q] || (100..110).contains(&q) || q == 700);
                assert_eq!(again[q], want, "{order:?}: page {q}");
            }
        }
    }

    fn drain_counting(p: &mut Prepager, count: &mut [u32]) {
        while let Some((f, n)) = p.next_run(32) {
            (f..f + n).for_each(|q| count[q] += 1);
        }
    }
}
