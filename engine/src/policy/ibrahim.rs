//! Algorithm 2 of Ibrahim, Hofmeyr, Iancu, Roman, "Optimized Pre-Copy Live Migration for
//! Memory Intensive Applications" (SC'11), section 7.
//!
//! Two parts:
//!
//! - **Window controller** (lines 25-37). RDMA posts are non-blocking, so the number of pages
//!   to post must be chosen before the interval starts. A least-squares regression of post
//!   and wait time against pages posted gives `time ≈ a + b·pages`; the window is sized so
//!   that an interval lasts one sampling period (1 s), which makes the modified-page counts
//!   comparable from one interval to the next.
//! - **Pattern detection** (lines 38-43 and the text). After the first full pass, switch to
//!   stop-and-copy when (a) the moving average of the modified-page count is stable,
//!   (b) the whole dirty set drained in less than a sampling period, or (c) at least 90 % of
//!   the pages sent were also sent in the previous interval.

use std::collections::VecDeque;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::regression::{LinearFit, TimingHistory};
use super::{nanos, ConvergencePolicy, Decision, IntervalReport, PolicyKind, Reason, RegionInfo};

/// Below this spread of page counts (fraction of the largest) the regression is considered
/// degenerate and the throughput estimate is used (see `TimingHistory::fit`).
const MIN_REGRESSION_SPREAD: f64 = 0.1;

/// Parameters of Algorithm 2. Defaults follow the paper where it gives a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IbrahimConfig {
    /// Sampling period (`sampl_period`) in milliseconds: the target length of an interval.
    /// The paper uses 1000; shorter periods make the modified counts noisier.
    pub sampling_period_ms: NonZeroU64,
    /// How many recent intervals the regression of post/wait time against pages posted uses.
    /// With 1 the regression is always degenerate and the throughput estimate is used.
    pub regression_history: NonZeroUsize,
    /// Window of the first interval, in pages. `None` (default) is the paper's "arbitrarily
    /// large" initial threshold: the first interval posts the whole dirty set, and the first
    /// measurement then sets the window directly (no low-pass filtering against infinity).
    pub initial_window: Option<NonZeroUsize>,
    /// Smallest window, in pages, so that a bad estimate can never stall the migration.
    pub min_window: NonZeroUsize,
    /// Largest window, in pages; `None` = the region size. `min_window` wins if larger.
    pub max_window: Option<NonZeroUsize>,
    /// `max_slack_pages`: when an interval overran the period with a backlog left, the window
    /// grows by at most this many pages, and at most to this many pages above the regression
    /// estimate of one period (see `IbrahimPolicy::target_window`).
    pub max_slack_pages: usize,
    /// Length, in intervals, of the moving average of the modified-page count (pattern a).
    pub moving_average_len: NonZeroUsize,
    /// How many consecutive moving-average values must agree for pattern a.
    pub stable_samples: NonZeroUsize,
    /// Pattern a tolerance in percent: the largest and the smallest of the last
    /// `stable_samples` moving averages differ by at most this percentage of their mean.
    pub stable_tolerance_percent: u32,
    /// Pattern c threshold in percent: retransmitted / migrated ≥ this (paper: 90). Values
    /// above 100 disable pattern c.
    pub retransmit_percent: u32,
    /// Force stop-and-copy (reason `Timeout`) once this many milliseconds have passed since
    /// the start; `None` (default) = rely on the patterns only.
    pub max_time_ms: Option<NonZeroU64>,
}

impl Default for IbrahimConfig {
    fn default() -> Self {
        Self {
            sampling_period_ms: NonZeroU64::new(1000).expect("non-zero"),
            regression_history: NonZeroUsize::new(8).expect("non-zero"),
            initial_window: None,
            min_window: NonZeroUsize::new(64).expect("non-zero"),
            max_window: None,
            max_slack_pages: 1024,
            moving_average_len: NonZeroUsize::new(3).expect("non-zero"),
            stable_samples: NonZeroUsize::new(3).expect("non-zero"),
            stable_tolerance_percent: 10,
            retransmit_percent: 90,
            max_time_ms: None,
        }
    }
}

/// Pattern a filter: a moving average of the modified-page count, stable when the last few
/// averages lie within a tolerance of each other (`max - min ≤ tolerance · mean`). A count
/// that keeps falling by more than about `tolerance / (needed - 1)` per interval is not
/// stable: waiting still shrinks the downtime.
#[derive(Debug, Clone)]
struct StabilityFilter {
    average_len: usize,
    needed: usize,
    tolerance: f64,
    raw: VecDeque<usize>,
    averages: VecDeque<f64>,
}

impl StabilityFilter {
    fn new(average_len: usize, needed: usize, tolerance: f64) -> Self {
        Self {
            average_len,
            needed,
            tolerance,
            raw: VecDeque::with_capacity(average_len),
            averages: VecDeque::with_capacity(needed),
        }
    }

    /// Adds a sample; returns the current moving average when the count is stable.
    fn push(&mut self, modified: usize) -> Option<f64> {
        if self.raw.len() == self.average_len {
            self.raw.pop_front();
        }
        self.raw.push_back(modified);
        if self.raw.len() < self.average_len {
            return None;
        }
        let average = self.raw.iter().sum::<usize>() as f64 / self.average_len as f64;
        if self.averages.len() == self.needed {
            self.averages.pop_front();
        }
        self.averages.push_back(average);
        if self.averages.len() < self.needed {
            return None;
        }
        let mean = self.averages.iter().sum::<f64>() / self.needed as f64;
        let max = self.averages.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = self.averages.iter().copied().fold(f64::INFINITY, f64::min);
        (max - min <= self.tolerance * mean).then_some(average)
    }
}

/// Algorithm 2: regression window plus patterns a, b, c.
#[derive(Debug, Clone)]
pub struct IbrahimPolicy {
    cfg: IbrahimConfig,
    region: RegionInfo,
    /// `mig_threshold` in pages; `None` = unlimited.
    threshold: Option<f64>,
    timing: TimingHistory,
    stability: StabilityFilter,
    /// A previous report had `first_pass_done`: this interval lies wholly after the first
    /// pass, so its modified count is a dirty-rate sample (not never-sent pages).
    after_first_pass: bool,
    /// Last regression, for diagnostics.
    last_fit: Option<LinearFit>,
    finished: Option<Decision>,
}

impl IbrahimPolicy {
    /// A policy for `region` (its page count bounds the window).
    pub fn new(cfg: IbrahimConfig, region: RegionInfo) -> Self {
        let threshold = cfg.initial_window.map(|w| w.get() as f64);
        Self {
            timing: TimingHistory::new(cfg.regression_history.get()),
            stability: StabilityFilter::new(
                cfg.moving_average_len.get(),
                cfg.stable_samples.get(),
                f64::from(cfg.stable_tolerance_percent) / 100.0,
            ),
            cfg,
            region,
            threshold,
            after_first_pass: false,
            last_fit: None,
            finished: None,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &IbrahimConfig {
        &self.cfg
    }

    /// The unrounded `mig_threshold` (pages), `None` while unlimited.
    pub fn threshold(&self) -> Option<f64> {
        self.threshold
    }

    /// The last regression `time_ns ≈ a + b·pages` (`a = ap + aw`, `b = bp + bw`), if the
    /// history was not degenerate.
    pub fn last_fit(&self) -> Option<LinearFit> {
        self.last_fit
    }

    fn sampling_period(&self) -> Duration {
        Duration::from_millis(self.cfg.sampling_period_ms.get())
    }

    /// Pages that fit in one sampling period: `(sampl_period - a) / b` from the regression,
    /// or, when the regression is degenerate (too few distinct page counts, `b ≤ 0`), the
    /// measured throughput `Σ pages / Σ time` times the period. `None` without any data.
    fn pages_per_period(&mut self) -> Option<f64> {
        let sampl = nanos(self.sampling_period());
        self.last_fit = self.timing.fit(MIN_REGRESSION_SPREAD);
        match self.last_fit {
            Some(f) if f.slope > 0.0 && f.slope.is_finite() => Some((sampl - f.intercept) / f.slope),
            _ => self.timing.pages_in(sampl),
        }
    }

    fn clamp(&self, pages: f64) -> f64 {
        let max = self.cfg.max_window.map_or(self.region.pages, NonZeroUsize::get);
        pages.min(max as f64).max(self.cfg.min_window.get() as f64)
    }

    /// `new_mig_threshold` of Algorithm 2, lines 28-36, or `None` when there is no
    /// information yet (the threshold is then left alone).
    ///
    /// - `period < sampl_period`: `(sampl_period - a) / b`, the pages that fit in a period.
    /// - else, with a backlog (`migrated < modified`): `mig_threshold + extra`, with
    ///   `extra = min(max_slack_pages, modified - migrated)` (lines 32-35).
    ///
    ///   Line 33 computes `max_pages = (sampl_period - period - a) / b` and never uses it.
    ///   In this branch `period ≥ sampl_period`, so `max_pages ≤ -a/b ≤ 0`: it cannot be the
    ///   cap it looks like. Taken literally, the branch grows the window by up to
    ///   `max_slack_pages` every interval for as long as the dirty rate outruns the network,
    ///   and the interval never comes back under the period (the first branch is never taken
    ///   again). We read the intent as "allow at most `max_slack_pages` of slack beyond one
    ///   period" and cap the result at `(sampl_period - a) / b + max_slack_pages`.
    /// - else (the interval overran but the dirty set was drained, so the window was not
    ///   binding) the pseudo-code assigns nothing; we use `(sampl_period - a) / b` as in the
    ///   first branch, so an oversized window (e.g. the unlimited initial one) shrinks to
    ///   what fits in a period.
    fn target_window(&mut self, r: &IntervalReport) -> Option<f64> {
        let fits = self.pages_per_period();
        if r.period() < self.sampling_period() || r.pages_posted >= r.modified {
            return fits;
        }
        let slack = self.cfg.max_slack_pages as f64;
        let extra = ((r.modified - r.pages_posted) as f64).min(slack);
        let current = self.threshold.unwrap_or(r.pages_posted as f64);
        let grown = current + extra;
        Some(fits.map_or(grown, |fits| grown.min(fits + slack)))
    }

    /// Line 37: `mig_threshold = (mig_threshold + 3·new_mig_threshold) / 4`.
    fn low_pass(threshold: f64, new: f64) -> f64 {
        (threshold + 3.0 * new) / 4.0
    }

    fn update_window(&mut self, r: &IntervalReport) {
        let Some(new) = self.target_window(r) else { return };
        let new = self.clamp(new);
        self.threshold = Some(match self.threshold {
            // The "arbitrarily large" initial threshold is replaced, not averaged.
            None => new,
            Some(t) => self.clamp(Self::low_pass(t, new)),
        });
    }

    /// Patterns b, c, a, in that order. `None` while no pattern matches.
    fn detect(&mut self, r: &IntervalReport) -> Option<Reason> {
        if !r.first_pass_done {
            return None;
        }
        // b: the whole dirty set found at the sample was sent, in less than a period. (Not
        // `remaining == 0`: that would also need no page written during the interval.)
        if r.pages_posted >= r.modified && r.period() < self.sampling_period() {
            return Some(Reason::PatternB { drained: r.pages_posted });
        }
        // c: retransmitted / migrated ≥ 90 %. The division is correctly rounded, so an exact
        // 90/100 compares equal to 0.90.
        if r.pages_posted > 0 {
            let ratio = r.retransmitted as f64 / r.pages_posted as f64;
            if ratio >= f64::from(self.cfg.retransmit_percent) / 100.0 {
                return Some(Reason::PatternC { retransmitted: r.retransmitted, migrated: r.pages_posted });
            }
        }
        // a: only samples from intervals wholly after the first pass.
        if self.after_first_pass {
            if let Some(average) = self.stability.push(r.modified) {
                return Some(Reason::PatternA { moving_average: average.round() as usize });
            }
        }
        None
    }

    fn finish(&mut self, d: Decision) -> Decision {
        tracing::debug!(policy = "ibrahim", decision = ?d, "pre-copy ends");
        self.finished = Some(d);
        d
    }
}

impl ConvergencePolicy for IbrahimPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Ibrahim
    }

    fn send_window(&self) -> Option<usize> {
        // Truncation, like the integer threshold of the original; the clamp keeps it ≥ 1.
        self.threshold.map(|t| t as usize)
    }

    fn handle_interval(&mut self, r: &IntervalReport) -> Decision {
        if let Some(d) = self.finished {
            return d;
        }
        self.timing.push(r.pages_posted, r.post_time, r.wait_time);
        self.update_window(r);
        let pattern = self.detect(r);
        self.after_first_pass |= r.first_pass_done;
        if let Some(reason) = pattern {
            return self.finish(Decision::StopAndCopy(reason));
        }
        if let Some(limit) = self.cfg.max_time_ms {
            let limit = Duration::from_millis(limit.get());
            if r.now >= limit {
                return self.finish(Decision::StopAndCopy(Reason::Timeout { elapsed: r.now, limit }));
            }
        }
        tracing::debug!(policy = "ibrahim", window = ?self.send_window(), fit = ?self.last_fit);
        Decision::Continue { window: self.send_window() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: usize = 1 << 20;

    fn region() -> RegionInfo {
        RegionInfo::new(PAGES, 4096)
    }

    fn policy(cfg: IbrahimConfig) -> IbrahimPolicy {
        IbrahimPolicy::new(cfg, region())
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A report after the first pass that matches no pattern by itself: window-limited
    /// (backlog), one full period, no retransmission.
    fn steady(now_s: u64, modified: usize) -> IntervalReport {
        IntervalReport {
            now: Duration::from_secs(now_s),
            pages_posted: 1000,
            post_time: ms(400),
            wait_time: ms(600),
            modified,
            retransmitted: 0,
            remaining: modified,
            bytes_sent: 1000 * 4096,
            first_pass_done: true,
        }
    }

    /// A virtual machine and network: posting `x` pages costs `post_a + post_b·x` and
    /// waiting `wait_a + wait_b·x` (nanoseconds); the guest dirties `dirty_per_s` pages per
    /// second, up to the region size.
    struct Sim {
        post: (u64, u64),
        wait: (u64, u64),
        dirty_per_s: usize,
        now: Duration,
        dirty: usize,
        never_sent: usize,
    }

    impl Sim {
        fn step(&mut self, window: Option<usize>) -> IntervalReport {
            let modified = self.dirty;
            let posted = window.map_or(modified, |w| w.min(modified));
            let post = Duration::from_nanos(self.post.0 + self.post.1 * posted as u64);
            let wait = Duration::from_nanos(self.wait.0 + self.wait.1 * posted as u64);
            let period = post + wait;
            self.now += period;
            self.never_sent = self.never_sent.saturating_sub(posted);
            let dirtied = (self.dirty_per_s as f64 * period.as_secs_f64()) as usize;
            self.dirty = (modified - posted + dirtied).min(PAGES);
            IntervalReport {
                now: self.now,
                pages_posted: posted,
                post_time: post,
                wait_time: wait,
                modified,
                retransmitted: 0,
                remaining: self.dirty,
                bytes_sent: posted as u64 * 4096,
                first_pass_done: self.never_sent == 0,
            }
        }
    }

    #[test]
    fn low_pass_filter_arithmetic() {
        assert_eq!(IbrahimPolicy::low_pass(1000.0, 2000.0), 1750.0);
        assert_eq!(IbrahimPolicy::low_pass(2000.0, 1000.0), 1250.0);
        assert_eq!(IbrahimPolicy::low_pass(800.0, 800.0), 800.0);

        // Through the policy: window 1000 pages took 0.5 s, one sample so the throughput
        // estimate applies: 2000 pages/s → new = 2000 → (1000 + 3·2000)/4 = 1750.
        let cfg = IbrahimConfig { initial_window: NonZeroUsize::new(1000), ..Default::default() };
        let mut p = policy(cfg);
        assert_eq!(p.send_window(), Some(1000));
        let r = IntervalReport {
            pages_posted: 1000,
            post_time: ms(100),
            wait_time: ms(400),
            modified: 50_000,
            ..steady(0, 50_000)
        };
        assert_eq!(p.handle_interval(&r), Decision::Continue { window: Some(1750) });
        assert_eq!(p.threshold(), Some(1750.0));
    }

    #[test]
    fn regression_sets_window_to_fill_the_period() {
        // Samples on time = 4 ms + 10 µs·pages: (1 s - 4 ms) / 10 µs = 99 600 pages.
        let cfg = IbrahimConfig { initial_window: NonZeroUsize::new(20_000), ..Default::default() };
        let mut p = policy(cfg);
        for x in [20_000usize, 40_000] {
            let r = IntervalReport {
                pages_posted: x,
                post_time: Duration::from_nanos(1_000_000 + 2_000 * x as u64),
                wait_time: Duration::from_nanos(3_000_000 + 8_000 * x as u64),
                modified: 500_000,
                ..steady(0, 500_000)
            };
            let _ = p.handle_interval(&r);
        }
        let fit = p.last_fit().unwrap();
        assert_eq!((fit.intercept, fit.slope), (4_000_000.0, 10_000.0));
        // First interval (throughput fallback): 20 000 / 0.204 s ≈ 98 039 → filtered from
        // 20 000. Second: (t + 3·99 600)/4.
        let t1 = IbrahimPolicy::low_pass(20_000.0, 20_000.0 / 0.204);
        let t2 = IbrahimPolicy::low_pass(t1, 99_600.0);
        let t = p.threshold().unwrap();
        assert!((t - t2).abs() < 1e-6, "{t} vs {t2}");
    }

    #[test]
    fn window_converges_to_sampling_period() {
        for initial in [None, NonZeroUsize::new(1000), NonZeroUsize::new(900_000)] {
            let cfg = IbrahimConfig { initial_window: initial, ..Default::default() };
            let mut p = policy(cfg);
            // 4 ms + 10 µs/page; dirtying 150 000 pages/s > 100 000 pages/s drain rate, so a
            // backlog always remains (the hard case for the controller).
            let mut sim = Sim {
                post: (1_000_000, 2_000),
                wait: (3_000_000, 8_000),
                dirty_per_s: 150_000,
                now: Duration::ZERO,
                dirty: 300_000,
                never_sent: 300_000,
            };
            let mut last = IntervalReport::default();
            for _ in 0..40 {
                last = sim.step(p.send_window());
                // Feed everything but the patterns: first_pass_done false keeps them off.
                let r = IntervalReport { first_pass_done: false, ..last };
                assert!(matches!(p.handle_interval(&r), Decision::Continue { .. }));
            }
            let period = last.period().as_secs_f64();
            assert!((0.99..=1.02).contains(&period), "{initial:?}: period {period}");
            let w = p.send_window().unwrap();
            assert!((99_000..=100_700).contains(&w), "{initial:?}: window {w}");
        }
    }

    #[test]
    fn window_stays_in_bounds_and_survives_degenerate_input() {
        let cfg = IbrahimConfig {
            initial_window: NonZeroUsize::new(500),
            max_window: NonZeroUsize::new(10_000),
            ..Default::default()
        };
        let mut p = policy(cfg.clone());
        // Nothing posted, no time measured: no information, window unchanged.
        let idle = IntervalReport::default();
        assert_eq!(p.handle_interval(&idle), Decision::Continue { window: Some(500) });
        // Very fast network: 500 pages in 2 ms → 250 000 pages per period, clamped to
        // max_window, then filtered: (500 + 3·10 000)/4.
        let fast = IntervalReport {
            pages_posted: 500,
            post_time: ms(1),
            wait_time: ms(1),
            modified: 500,
            ..Default::default()
        };
        assert_eq!(p.handle_interval(&fast), Decision::Continue { window: Some(7625) });
        // From the unlimited initial window the clamped estimate is taken as is.
        let mut p = policy(IbrahimConfig { initial_window: None, ..cfg });
        assert_eq!(p.handle_interval(&fast), Decision::Continue { window: Some(10_000) });

        // Fixed cost above the period (a = 2 s > sampl_period): the estimate is negative and
        // the window settles at min_window.
        let mut p = policy(IbrahimConfig::default());
        for i in 0..20u64 {
            let x = 100 + 100 * (i % 3);
            let r = IntervalReport {
                pages_posted: x as usize,
                post_time: Duration::from_secs(2) + ms(x),
                modified: 10_000,
                ..Default::default()
            };
            let _ = p.handle_interval(&r);
        }
        assert_eq!(p.send_window(), Some(64));
    }

    #[test]
    fn pattern_a_fires_on_stable_modified_count() {
        let mut p = policy(IbrahimConfig::default());
        let _ = p.handle_interval(&steady(1, 80_000)); // completes the first pass
        let counts = [50_000, 50_500, 49_800, 50_200];
        for (i, m) in counts.into_iter().enumerate() {
            assert!(matches!(p.handle_interval(&steady(2 + i as u64, m)), Decision::Continue { .. }));
        }
        // 5th sample: three moving averages of three, all within ±10 %.
        let d = p.handle_interval(&steady(6, 50_100));
        assert_eq!(d, Decision::StopAndCopy(Reason::PatternA { moving_average: 50_033 }));
        assert_eq!(d.reason().unwrap().label(), "a");
        // Finished: the same decision again.
        assert_eq!(p.handle_interval(&steady(7, 1)), d);
    }

    #[test]
    fn pattern_a_not_on_decreasing_count() {
        let mut p = policy(IbrahimConfig::default());
        let _ = p.handle_interval(&steady(1, 100_000));
        for i in 0..18u64 {
            let m = 100_000 - 5_000 * i as usize;
            let d = p.handle_interval(&steady(2 + i, m));
            assert!(matches!(d, Decision::Continue { .. }), "step {i}: {d:?}");
        }
    }

    #[test]
    fn no_pattern_before_first_pass() {
        let mut p = policy(IbrahimConfig::default());
        for i in 0..20 {
            // Stable counts, early drain and full retransmission all at once.
            let r = IntervalReport {
                pages_posted: 1000,
                modified: 1000,
                retransmitted: 1000,
                first_pass_done: false,
                ..steady(i, 1000)
            };
            assert!(matches!(p.handle_interval(&r), Decision::Continue { .. }));
        }
        // Pattern a needs five samples from intervals wholly after the first pass.
        let mut p = policy(IbrahimConfig::default());
        for i in 0..10 {
            let r = IntervalReport { first_pass_done: false, ..steady(i, 50_000) };
            let _ = p.handle_interval(&r);
        }
        for i in 0..5 {
            assert!(matches!(p.handle_interval(&steady(10 + i, 50_000)), Decision::Continue { .. }));
        }
        assert_eq!(
            p.handle_interval(&steady(15, 50_000)),
            Decision::StopAndCopy(Reason::PatternA { moving_average: 50_000 })
        );
    }

    #[test]
    fn pattern_b_on_early_drain() {
        let mut p = policy(IbrahimConfig::default());
        let drained_late = IntervalReport { pages_posted: 3000, modified: 3000, ..steady(1, 3000) };
        assert!(matches!(p.handle_interval(&drained_late), Decision::Continue { .. }), "1 s");
        let backlog = IntervalReport {
            pages_posted: 3000,
            modified: 3001,
            post_time: ms(50),
            wait_time: ms(150),
            ..steady(2, 3001)
        };
        assert!(matches!(p.handle_interval(&backlog), Decision::Continue { .. }));
        let early = IntervalReport { modified: 3000, ..backlog };
        assert_eq!(p.handle_interval(&early), Decision::StopAndCopy(Reason::PatternB { drained: 3000 }));
    }

    #[test]
    fn pattern_c_at_ninety_percent() {
        let mut p = policy(IbrahimConfig::default());
        let r = |retransmitted| IntervalReport { retransmitted, ..steady(1, 50_000) };
        assert!(matches!(p.handle_interval(&r(890)), Decision::Continue { .. }), "89 %");
        assert!(matches!(p.handle_interval(&r(899)), Decision::Continue { .. }), "89.9 %");
        assert_eq!(
            p.handle_interval(&r(900)),
            Decision::StopAndCopy(Reason::PatternC { retransmitted: 900, migrated: 1000 })
        );
        // Nothing migrated: no ratio, no pattern c.
        let mut p = policy(IbrahimConfig::default());
        let none = IntervalReport { pages_posted: 0, ..r(0) };
        assert!(matches!(p.handle_interval(&none), Decision::Continue { .. }));
    }

    #[test]
    fn timeout_forces_stop_and_copy() {
        let cfg = IbrahimConfig { max_time_ms: NonZeroU64::new(10_000), ..Default::default() };
        let mut p = policy(cfg);
        let r = |s, m| IntervalReport { first_pass_done: false, ..steady(s, m) };
        assert!(matches!(p.handle_interval(&r(9, 1000)), Decision::Continue { .. }));
        assert_eq!(
            p.handle_interval(&r(10, 1000)),
            Decision::StopAndCopy(Reason::Timeout { elapsed: Duration::from_secs(10), limit: Duration::from_secs(10) })
        );
    }

    #[test]
    fn stability_filter_tolerance_edges() {
        // Averages 95, 105, 100 (mean 100): spread exactly 10 % → stable; 11 % → not.
        let mut f = StabilityFilter::new(1, 3, 0.10);
        assert_eq!(f.push(95), None);
        assert_eq!(f.push(105), None);
        assert_eq!(f.push(100), Some(100.0));
        let mut f = StabilityFilter::new(1, 3, 0.10);
        for m in [94, 105, 101] {
            assert_eq!(f.push(m), None);
        }
        // Moving average of two: samples 10, 30, 20, 20 → averages 20, 25, 20.
        let mut f = StabilityFilter::new(2, 3, 0.25);
        assert_eq!([10, 30, 20].map(|m| f.push(m)), [None; 3]);
        assert_eq!(f.push(20), Some(20.0));
    }
}
