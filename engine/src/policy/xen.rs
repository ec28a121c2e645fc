//! Xen's convergence rule (`xc_domain_save` in libxc, see section 9 of the paper): after each
//! iteration, start the last (stop-and-copy) iteration when
//!
//! - the iteration cap is reached (`max_iters`), or
//! - few pages remain (`< 50`), or
//! - more than `max_factor` times the memory size has been sent in total.
//!
//! Xen's own small-remainder test uses the pages sent in the iteration; we use `remaining`
//! (the dirty set a stop-and-copy would send now), which is the same quantity one iteration
//! later. Xen's adaptive rate limit (a low bandwidth raised additively per iteration up to a
//! high one) is not modelled: the paper shows it amounts to the same termination rules.
//! One interval is one iteration (a full pass over the dirty set; the window is unlimited).

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use super::{ConvergencePolicy, Decision, IntervalReport, PolicyKind, Reason, RegionInfo};

/// Parameters of the Xen rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XenConfig {
    /// Stop-and-copy after this many iterations, the first full pass included (default 30).
    pub max_iterations: NonZeroU32,
    /// Stop-and-copy when fewer than this many dirty pages remain after the first pass
    /// (default 50, Xen's constant).
    pub min_remaining: usize,
    /// Stop-and-copy once the pages sent in total exceed this multiple of the region size
    /// (Xen's `max_factor`, default 3); `None` disables the rule.
    pub max_sent_factor: Option<NonZeroU32>,
}

impl Default for XenConfig {
    fn default() -> Self {
        Self {
            max_iterations: NonZeroU32::new(30).expect("non-zero"),
            min_remaining: 50,
            max_sent_factor: NonZeroU32::new(3),
        }
    }
}

/// The Xen iteration-cap / small-remainder / total-sent rule.
#[derive(Debug, Clone)]
pub struct XenPolicy {
    cfg: XenConfig,
    region: RegionInfo,
    iterations: u32,
    total_sent: u64,
    finished: Option<Decision>,
}

impl XenPolicy {
    /// A policy for `region` (its page count scales `max_sent_factor`).
    pub fn new(cfg: XenConfig, region: RegionInfo) -> Self {
        Self { cfg, region, iterations: 0, total_sent: 0, finished: None }
    }

    /// The configuration in use.
    pub fn config(&self) -> &XenConfig {
        &self.cfg
    }

    /// Iterations reported so far.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Pages sent so far.
    pub fn total_sent(&self) -> u64 {
        self.total_sent
    }

    fn check(&self, r: &IntervalReport) -> Option<Reason> {
        if r.first_pass_done && r.remaining < self.cfg.min_remaining {
            return Some(Reason::XenSmallRemainder { remaining: r.remaining, limit: self.cfg.min_remaining });
        }
        if let Some(factor) = self.cfg.max_sent_factor {
            let limit = u64::from(factor.get()).saturating_mul(self.region.pages as u64);
            if self.total_sent > limit {
                return Some(Reason::XenTotalSent { sent: self.total_sent, limit });
            }
        }
        if self.iterations >= self.cfg.max_iterations.get() {
            return Some(Reason::XenIterationCap { iterations: self.iterations });
        }
        None
    }
}

impl ConvergencePolicy for XenPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Xen
    }

    fn send_window(&self) -> Option<usize> {
        None
    }

    fn handle_interval(&mut self, r: &IntervalReport) -> Decision {
        if let Some(d) = self.finished {
            return d;
        }
        self.iterations = self.iterations.saturating_add(1);
        self.total_sent = self.total_sent.saturating_add(r.pages_posted as u64);
        match self.check(r) {
            Some(reason) => {
                let d = Decision::StopAndCopy(reason);
                tracing::debug!(policy = "xen", decision = ?d, "pre-copy finished");
                self.finished = Some(d);
                d
            }
            None => Decision::Continue { window: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: usize = 10_000;

    fn policy(cfg: XenConfig) -> XenPolicy {
        XenPolicy::new(cfg, RegionInfo::new(PAGES, 4096))
    }

    fn iteration(remaining: usize, posted: usize) -> IntervalReport {
        IntervalReport {
            pages_posted: posted,
            modified: posted,
            remaining,
            bytes_sent: posted as u64 * 4096,
            first_pass_done: true,
            ..Default::default()
        }
    }

    #[test]
    fn iteration_cap() {
        let cfg = XenConfig { max_sent_factor: None, ..Default::default() };
        let mut p = policy(cfg);
        for i in 1..30 {
            assert_eq!(p.handle_interval(&iteration(5_000, 5_000)), Decision::Continue { window: None }, "{i}");
        }
        let d = p.handle_interval(&iteration(5_000, 5_000));
        assert_eq!(d, Decision::StopAndCopy(Reason::XenIterationCap { iterations: 30 }));
        assert_eq!(p.handle_interval(&iteration(0, 0)), d, "finished");
    }

    #[test]
    fn small_remainder() {
        let mut p = policy(XenConfig::default());
        // Not during the first pass.
        let first = IntervalReport { first_pass_done: false, ..iteration(10, 100) };
        assert!(matches!(p.handle_interval(&first), Decision::Continue { .. }));
        assert!(matches!(p.handle_interval(&iteration(50, 100)), Decision::Continue { .. }));
        let d = p.handle_interval(&iteration(49, 100));
        assert_eq!(d, Decision::StopAndCopy(Reason::XenSmallRemainder { remaining: 49, limit: 50 }));
        assert_eq!(d.reason().unwrap().to_string(), "xen: 49 pages left < 50");
    }

    #[test]
    fn total_sent_factor() {
        let mut p = policy(XenConfig::default());
        // 3 × 10 000 pages may be sent; one more page crosses the limit.
        for _ in 0..3 {
            assert!(matches!(p.handle_interval(&iteration(9_000, 10_000)), Decision::Continue { .. }));
        }
        assert_eq!(p.total_sent(), 30_000);
        assert_eq!(
            p.handle_interval(&iteration(9_000, 1)),
            Decision::StopAndCopy(Reason::XenTotalSent { sent: 30_001, limit: 30_000 })
        );
        assert_eq!(p.iterations(), 4);
    }
}
