//! QEMU/KVM's convergence rule (Algorithm 1 of the paper, `ram_save_live` in QEMU-KVM 0.14,
//! and still the core of `migration_iteration_run` in current QEMU):
//!
//! ```text
//! bandwidth         = bytes sent in the interval / time spent sending them
//! expected_downtime = remaining dirty bytes / bandwidth
//! switch to stop-and-copy when expected_downtime ≤ downtime_limit
//! ```
//!
//! The paper's point is that a static limit is either reached quickly or never: when the
//! guest dirties memory faster than the link drains it, the remaining set never shrinks and
//! QEMU iterates forever. `max_time_ms` turns that into an [`Decision::Abort`] so a benchmark
//! can show it.
//!
//! An optional bandwidth cap (QEMU `max-bandwidth`) is enforced the way QEMU does: at most
//! `max_bandwidth × rate_period` bytes per rate period (QEMU's 100 ms `BUFFER_DELAY`). The
//! policy exposes it as the window (pages per interval) and the pacing period. As in
//! Algorithm 1, the bandwidth estimate covers only the time spent sending, not the idle time
//! of the rate limiter.

use std::num::NonZeroU64;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConvergencePolicy, Decision, IntervalReport, PolicyKind, Reason, RegionInfo};

/// Parameters of the QEMU rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvmConfig {
    /// Downtime limit in milliseconds (QEMU `downtime-limit`, default 300; QEMU-KVM 0.14
    /// used 30). Stop-and-copy starts once the expected downtime is at most this.
    pub downtime_limit_ms: u64,
    /// Bandwidth cap in bytes per second (QEMU `max-bandwidth`); `None` (default) = no cap,
    /// every interval is a full pass over the dirty set.
    pub max_bandwidth: Option<NonZeroU64>,
    /// Period over which the cap is enforced, in milliseconds (QEMU's `BUFFER_DELAY`, 100).
    /// With a cap, one interval is one rate period. Ignored without a cap.
    pub rate_period_ms: NonZeroU64,
    /// Abort once this many milliseconds have passed without converging; `None` (default,
    /// like QEMU) = iterate forever.
    pub max_time_ms: Option<NonZeroU64>,
}

impl Default for KvmConfig {
    fn default() -> Self {
        Self {
            downtime_limit_ms: 300,
            max_bandwidth: None,
            rate_period_ms: NonZeroU64::new(100).expect("non-zero"),
            max_time_ms: None,
        }
    }
}

/// Bytes moved in some time: a bandwidth kept as a ratio so comparisons stay exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rate {
    bytes: u64,
    time: Duration,
}

/// The QEMU expected-downtime rule.
#[derive(Debug, Clone)]
pub struct KvmPolicy {
    cfg: KvmConfig,
    region: RegionInfo,
    /// Latest interval with bytes sent over a non-zero time.
    bandwidth: Option<Rate>,
    expected_downtime: Option<Duration>,
    finished: Option<Decision>,
}

impl KvmPolicy {
    /// A policy for `region` (its page size converts pages to bytes).
    pub fn new(cfg: KvmConfig, region: RegionInfo) -> Self {
        Self { cfg, region, bandwidth: None, expected_downtime: None, finished: None }
    }

    /// The configuration in use.
    pub fn config(&self) -> &KvmConfig {
        &self.cfg
    }

    /// Latest bandwidth estimate in bytes per second.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth.map(|r| r.bytes as f64 * 1e9 / r.time.as_nanos() as f64)
    }

    /// Expected downtime computed at the last interval (after the first pass).
    pub fn expected_downtime(&self) -> Option<Duration> {
        self.expected_downtime
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.cfg.downtime_limit_ms)
    }

    /// `remaining_bytes / bandwidth`, exactly (u128 nanoseconds), saturating.
    fn expected(remaining_bytes: u64, rate: Rate) -> Duration {
        let ns = u128::from(remaining_bytes) * rate.time.as_nanos() / u128::from(rate.bytes);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn finish(&mut self, d: Decision) -> Decision {
        tracing::debug!(policy = "kvm", decision = ?d, "pre-copy finished");
        self.finished = Some(d);
        d
    }
}

impl ConvergencePolicy for KvmPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Kvm
    }

    /// `max_bandwidth × rate_period / page_size` pages (at least 1), or unlimited.
    fn send_window(&self) -> Option<usize> {
        let bw = self.cfg.max_bandwidth?;
        let bytes = u128::from(bw.get()) * u128::from(self.cfg.rate_period_ms.get()) / 1000;
        let pages = bytes / self.region.page_size as u128;
        Some(usize::try_from(pages).unwrap_or(usize::MAX).max(1))
    }

    fn pacing_period(&self) -> Option<Duration> {
        self.cfg.max_bandwidth.map(|_| Duration::from_millis(self.cfg.rate_period_ms.get()))
    }

    fn handle_interval(&mut self, r: &IntervalReport) -> Decision {
        if let Some(d) = self.finished {
            return d;
        }
        let time = r.period();
        if r.bytes_sent > 0 && !time.is_zero() {
            self.bandwidth = Some(Rate { bytes: r.bytes_sent, time });
        }
        if r.first_pass_done {
            let remaining_bytes = (r.remaining as u64).saturating_mul(self.region.page_size as u64);
            // Nothing left converges at any bandwidth; otherwise we need a measurement.
            self.expected_downtime = match (remaining_bytes, self.bandwidth) {
                (0, _) => Some(Duration::ZERO),
                (bytes, Some(rate)) => Some(Self::expected(bytes, rate)),
                (_, None) => None,
            };
            // `expected ≤ limit` in exact integers: remaining·time ≤ limit·bytes.
            let converged = match (remaining_bytes, self.bandwidth) {
                (0, _) => true,
                (bytes, Some(rate)) => {
                    u128::from(bytes) * rate.time.as_nanos() <= self.limit().as_nanos() * u128::from(rate.bytes)
                }
                (_, None) => false,
            };
            if converged {
                let expected_downtime = self.expected_downtime.unwrap_or_default();
                return self
                    .finish(Decision::StopAndCopy(Reason::KvmDowntime { expected_downtime, limit: self.limit() }));
            }
        }
        if let Some(limit) = self.cfg.max_time_ms {
            let limit = Duration::from_millis(limit.get());
            if r.now >= limit {
                return self.finish(Decision::Abort(Reason::Timeout { elapsed: r.now, limit }));
            }
        }
        Decision::Continue { window: self.send_window() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn policy(cfg: KvmConfig) -> KvmPolicy {
        KvmPolicy::new(cfg, RegionInfo::new(1 << 20, PAGE))
    }

    /// One pass after the first: 25 000 pages = 102.4 MB sent in 1 s → 102.4 MB/s, so
    /// 300 ms is exactly 7 500 pages.
    fn pass(now_s: u64, remaining: usize) -> IntervalReport {
        IntervalReport {
            now: Duration::from_secs(now_s),
            pages_posted: 25_000,
            post_time: Duration::from_millis(250),
            wait_time: Duration::from_millis(750),
            modified: 25_000,
            retransmitted: 0,
            remaining,
            bytes_sent: 25_000 * PAGE as u64,
            first_pass_done: true,
        }
    }

    #[test]
    fn switches_exactly_at_the_limit() {
        let mut p = policy(KvmConfig::default());
        assert_eq!(p.send_window(), None);
        assert_eq!(p.pacing_period(), None);
        assert_eq!(p.handle_interval(&pass(1, 7_501)), Decision::Continue { window: None });
        assert_eq!(p.expected_downtime(), Some(Duration::from_nanos(300_040_000)));
        assert_eq!(p.bandwidth(), Some(102_400_000.0));
        let d = p.handle_interval(&pass(2, 7_500));
        let reason =
            Reason::KvmDowntime { expected_downtime: Duration::from_millis(300), limit: Duration::from_millis(300) };
        assert_eq!(d, Decision::StopAndCopy(reason));
        assert_eq!(reason.to_string(), "kvm: expected downtime 300 ms ≤ 300 ms");
        assert_eq!(p.handle_interval(&pass(3, 90_000)), d, "finished");
    }

    #[test]
    fn not_before_first_pass() {
        let mut p = policy(KvmConfig::default());
        let r = IntervalReport { first_pass_done: false, remaining: 0, ..pass(1, 0) };
        assert_eq!(p.handle_interval(&r), Decision::Continue { window: None });
        assert_eq!(p.expected_downtime(), None);
        // Idle guest after the first pass: nothing remaining converges at once.
        let idle = IntervalReport { first_pass_done: true, bytes_sent: 0, ..r };
        assert!(matches!(p.handle_interval(&idle), Decision::StopAndCopy(_)));
    }

    #[test]
    fn never_switches_when_dirty_rate_exceeds_bandwidth_then_aborts() {
        let cfg = KvmConfig { max_time_ms: NonZeroU64::new(120_000), ..Default::default() };
        let mut p = policy(cfg);
        // Link: 25 000 pages/s. Guest: dirties 40 000 pages/s. Each pass sends what the
        // previous left and finds more: the remaining set grows until it saturates.
        let mut now = Duration::ZERO;
        let mut dirty = 1usize << 20;
        let mut first = true;
        loop {
            let posted = dirty;
            let secs = posted as f64 / 25_000.0;
            now += Duration::from_secs_f64(secs);
            dirty = ((40_000.0 * secs) as usize).min(1 << 20);
            let r = IntervalReport {
                now,
                pages_posted: posted,
                post_time: Duration::from_secs_f64(secs * 0.25),
                wait_time: Duration::from_secs_f64(secs * 0.75),
                modified: posted,
                remaining: dirty,
                bytes_sent: (posted * PAGE) as u64,
                first_pass_done: true,
                ..Default::default()
            };
            match p.handle_interval(&r) {
                Decision::Continue { .. } => {
                    assert!(now < Duration::from_secs(120));
                    assert!(p.expected_downtime().unwrap() > Duration::from_secs(1));
                }
                Decision::Abort(reason) => {
                    assert!(now >= Duration::from_secs(120));
                    assert!(!first);
                    assert_eq!(reason.to_string(), "timeout (120 s)");
                    break;
                }
                d => panic!("{d:?}"),
            }
            first = false;
        }
    }

    #[test]
    fn bandwidth_cap_is_a_paced_window() {
        // 100 MB/s over 100 ms = 10 MB = 2441 pages of 4 KiB.
        let cfg = KvmConfig { max_bandwidth: NonZeroU64::new(100_000_000), ..Default::default() };
        let mut p = policy(cfg);
        assert_eq!(p.send_window(), Some(2441));
        assert_eq!(p.pacing_period(), Some(Duration::from_millis(100)));
        // Within a rate period the link sends the 2441 pages in 10 ms: the estimate is the
        // link speed (idle time excluded), as in Algorithm 1.
        let r = IntervalReport {
            now: Duration::from_millis(100),
            pages_posted: 2441,
            post_time: Duration::from_millis(2),
            wait_time: Duration::from_millis(8),
            modified: 100_000,
            remaining: 97_559,
            bytes_sent: 2441 * PAGE as u64,
            first_pass_done: false,
            ..Default::default()
        };
        assert_eq!(p.handle_interval(&r), Decision::Continue { window: Some(2441) });
        assert_eq!(p.bandwidth(), Some(999_833_600.0));
        // A tiny cap still allows one page per period.
        let tiny = KvmConfig { max_bandwidth: NonZeroU64::new(1), ..Default::default() };
        assert_eq!(policy(tiny).send_window(), Some(1));
    }

    #[test]
    fn bandwidth_survives_an_empty_interval() {
        let mut p = policy(KvmConfig::default());
        let _ = p.handle_interval(&pass(1, 20_000));
        // No bytes sent this time: the previous estimate still applies.
        let empty = IntervalReport { bytes_sent: 0, post_time: Duration::ZERO, ..pass(2, 7_000) };
        assert!(matches!(p.handle_interval(&empty), Decision::StopAndCopy(_)));
    }
}
