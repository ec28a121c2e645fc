//! Ordinary least squares `y = a + b·x` over a sliding history, for the window controller of
//! Algorithm 2 (lines 25-27): the post and wait times of an interval against its page count.

use std::collections::VecDeque;
use std::time::Duration;

use super::nanos;

/// A fitted line `y = intercept + slope · x`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearFit {
    /// `a`: the fixed cost of an interval (nanoseconds for interval timings).
    pub intercept: f64,
    /// `b`: the cost per page (nanoseconds per page for interval timings).
    pub slope: f64,
}

impl LinearFit {
    /// Least-squares fit of the points; `None` with fewer than two distinct `x` or with
    /// non-finite input. Centred sums keep integral inputs exact.
    pub fn fit(points: impl IntoIterator<Item = (f64, f64)> + Clone) -> Option<Self> {
        let (mut n, mut sx, mut sy) = (0usize, 0.0, 0.0);
        for (x, y) in points.clone() {
            n += 1;
            sx += x;
            sy += y;
        }
        if n < 2 {
            return None;
        }
        let (mx, my) = (sx / n as f64, sy / n as f64);
        let (mut sxx, mut sxy) = (0.0, 0.0);
        for (x, y) in points {
            sxx += (x - mx) * (x - mx);
            sxy += (x - mx) * (y - my);
        }
        if !sxx.is_finite() || sxx <= 0.0 || !sxy.is_finite() || !my.is_finite() {
            return None;
        }
        let slope = sxy / sxx;
        Some(Self { intercept: my - slope * mx, slope })
    }

    /// `y` at `x`.
    pub fn at(&self, x: f64) -> f64 {
        self.intercept + self.slope * x
    }

    /// Sum of two lines over the same `x` (`a = ap + aw`, `b = bp + bw`).
    pub fn plus(self, other: Self) -> Self {
        Self { intercept: self.intercept + other.intercept, slope: self.slope + other.slope }
    }
}

/// One interval's timing sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    pages: f64,
    post_ns: f64,
    wait_ns: f64,
}

/// The last `capacity` intervals' (pages posted, post time, wait time).
#[derive(Debug, Clone)]
pub(crate) struct TimingHistory {
    capacity: usize,
    samples: VecDeque<Sample>,
}

impl TimingHistory {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { capacity, samples: VecDeque::with_capacity(capacity) }
    }

    pub(crate) fn push(&mut self, pages: usize, post: Duration, wait: Duration) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { pages: pages as f64, post_ns: nanos(post), wait_ns: nanos(wait) });
    }

    /// `(ap + aw, bp + bw)` in ns and ns/page, or `None` when degenerate: fewer than two
    /// distinct page counts, or page counts spanning less than `min_spread` (a fraction of
    /// the largest). Near-equal `x` (a settled window) make the slope mostly noise, and a
    /// tiny positive slope would blow the window up; the caller falls back to
    /// [`pages_in`](Self::pages_in), which has the same fixed point.
    pub(crate) fn fit(&self, min_spread: f64) -> Option<LinearFit> {
        let xs = self.samples.iter().map(|s| s.pages);
        let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
        let min = xs.fold(f64::INFINITY, f64::min);
        if self.samples.len() < 2 || max - min <= min_spread * max {
            return None;
        }
        let post = LinearFit::fit(self.samples.iter().map(|s| (s.pages, s.post_ns)))?;
        let wait = LinearFit::fit(self.samples.iter().map(|s| (s.pages, s.wait_ns)))?;
        Some(post.plus(wait))
    }

    /// Pages that the measured throughput (`Σ pages / Σ time` over the history) moves in
    /// `period_ns`, or `None` when nothing was sent or no time was measured.
    pub(crate) fn pages_in(&self, period_ns: f64) -> Option<f64> {
        let pages: f64 = self.samples.iter().map(|s| s.pages).sum();
        let ns: f64 = self.samples.iter().map(|s| s.post_ns + s.wait_ns).sum();
        // Multiply first: integral inputs give exact results.
        (pages > 0.0 && ns > 0.0).then(|| pages * period_ns / ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_exact_line() {
        // Post: 1 ms + 2 µs/page, wait: 3 ms + 8 µs/page.
        let mut h = TimingHistory::new(8);
        for x in [1000usize, 5000, 2000, 9000, 4000] {
            let post = Duration::from_nanos(1_000_000 + 2_000 * x as u64);
            let wait = Duration::from_nanos(3_000_000 + 8_000 * x as u64);
            h.push(x, post, wait);
        }
        let f = h.fit(0.0).unwrap();
        assert_eq!(f.intercept, 4_000_000.0);
        assert_eq!(f.slope, 10_000.0);
        assert_eq!(f.at(100.0), 5_000_000.0);
    }

    #[test]
    fn sliding_history_forgets_old_samples() {
        let mut h = TimingHistory::new(3);
        for x in [10usize, 20, 30] {
            h.push(x, Duration::from_nanos(999 * x as u64), Duration::ZERO);
        }
        // Three new samples on a different line replace the old ones entirely.
        for x in [40usize, 50, 60] {
            h.push(x, Duration::from_nanos(100 + 7 * x as u64), Duration::from_nanos(5));
        }
        let f = h.fit(0.0).unwrap();
        assert_eq!((f.intercept, f.slope), (105.0, 7.0));
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(LinearFit::fit([(1.0, 2.0)]), None);
        assert_eq!(LinearFit::fit([(3.0, 2.0), (3.0, 5.0)]), None, "one distinct x");
        assert_eq!(LinearFit::fit([(1.0, f64::NAN), (2.0, 1.0)]), None);

        let mut h = TimingHistory::new(8);
        assert_eq!(h.fit(0.0), None);
        assert_eq!(h.pages_in(1e9), None);
        h.push(0, Duration::ZERO, Duration::ZERO);
        assert_eq!(h.pages_in(1e9), None);
        h.push(500, Duration::from_millis(200), Duration::from_millis(300));
        h.push(500, Duration::from_millis(200), Duration::from_millis(300));
        assert_eq!(h.pages_in(1e9), Some(1000.0));

        // 1000..1050 spans 4.8 % of the largest x: a fit at 0, none at a 10 % floor.
        let mut h = TimingHistory::new(8);
        for x in [1000usize, 1050, 1020] {
            h.push(x, Duration::from_nanos(10 * x as u64), Duration::ZERO);
        }
        assert!(h.fit(0.0).is_some());
        assert_eq!(h.fit(0.1), None);
    }
}
