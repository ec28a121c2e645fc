//! Pre-copy convergence policies: when to stop iterating and switch to stop-and-copy.
//!
//! Three policies share one interface, [`ConvergencePolicy`]:
//!
//! - [`ibrahim`] (default): Algorithm 2 of Ibrahim et al., "Optimized Pre-Copy Live Migration
//!   for Memory Intensive Applications" (SC'11). A regression-driven window keeps every sampling
//!   interval close to a constant length (1 s), and the migration stops when the memory update
//!   pattern says waiting longer will not shrink the downtime: (a) the modified-page count is
//!   stable, (b) the dirty set drained in less than an interval, (c) ≥ 90 % of the pages sent
//!   were already sent in the previous interval.
//! - [`kvm`]: QEMU's rule (Algorithm 1): stop when the remaining dirty bytes could be sent at
//!   the measured bandwidth within the downtime limit.
//! - [`xen`]: Xen's `xc_domain_save` rule: an iteration cap, a small remainder, or too many
//!   pages sent in total.
//!
//! Policies are pure state machines (see STYLE.md): they never read the clock and never touch
//! the network. The driver passes `now` in every [`IntervalReport`] and the tests use a virtual
//! clock.
//!
//! # The driver contract
//!
//! The pre-copy driver works in *intervals*. For `kvm` and `xen` without a bandwidth cap an
//! interval is one pass over the dirty set (an "iteration"); for `ibrahim` it is one sampling
//! interval whose length the policy regulates through the window. One step:
//!
//! 1. Ask [`ConvergencePolicy::send_window`] how many pages it may post in this interval
//!    (`None` = the whole dirty set). `modified` is the dirty-set size at the start.
//! 2. Post up to that many dirty pages, clear their dirty bits, record them in a
//!    [`RetransmitTracker`], wait for the completions. Time spent posting goes to
//!    `post_time`, time spent waiting for completions to `wait_time`.
//! 3. Harvest the dirty log (this harvest is the *sample*) and fill in an [`IntervalReport`];
//!    `remaining` is the dirty-set size after the harvest, i.e. what a stop-and-copy started
//!    now would have to send. It is also the next interval's `modified`.
//! 4. Call [`ConvergencePolicy::handle_interval`] and obey the [`Decision`]. If
//!    [`ConvergencePolicy::pacing_period`] is `Some(p)` (a bandwidth cap is in force), do not
//!    start the next interval sooner than `p` after this one started; that idle time is
//!    reported in neither `post_time` nor `wait_time`.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use livemig_engine::policy::*;
//! # let clock = || Duration::ZERO;
//! # let pages = 1024;
//! let mut policy = build(&PolicyConfig::default(), RegionInfo::new(pages, 4096));
//! let mut tracker = RetransmitTracker::new(pages);
//! let mut never_sent = pages; // pages not yet sent once
//! loop {
//!     let budget: Option<usize> = policy.send_window(); // None = the whole dirty set
//!     // ... post up to `budget` dirty pages, `tracker.record_sent(page)` each,
//!     //     wait for completions, harvest the dirty log ...
//!     # let _ = budget;
//!     # let (modified, posted, remaining) = (0usize, 0usize, 0usize);
//!     let report = IntervalReport {
//!         now: clock(),
//!         pages_posted: posted,
//!         post_time: Duration::from_millis(400),
//!         wait_time: Duration::from_millis(600),
//!         modified,
//!         retransmitted: tracker.finish_interval(),
//!         remaining,
//!         bytes_sent: posted as u64 * 4096,
//!         first_pass_done: never_sent == 0,
//!     };
//!     match policy.handle_interval(&report) {
//!         Decision::Continue { .. } => continue,
//!         Decision::StopAndCopy(_reason) => { /* pause the guest, send the rest */ break }
//!         Decision::Abort(_reason) => { /* give up, the source keeps running */ break }
//!         _ => unreachable!("newer decision kinds"),
//!     }
//! }
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod ibrahim;
pub mod kvm;
pub mod regression;
pub mod retransmit;
pub mod xen;

pub use ibrahim::{IbrahimConfig, IbrahimPolicy};
pub use kvm::{KvmConfig, KvmPolicy};
pub use regression::LinearFit;
pub use retransmit::RetransmitTracker;
pub use xen::{XenConfig, XenPolicy};

/// What the driver measured in one interval. All counts are in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IntervalReport {
    /// Time since the migration started, at the end of this interval (virtual or monotonic).
    pub now: Duration,
    /// Pages posted in this interval (`migrated` in Algorithm 2); at most the window.
    pub pages_posted: usize,
    /// Time spent posting the pages (including copying/coalescing them).
    pub post_time: Duration,
    /// Time spent waiting for the posted transfers to complete.
    pub wait_time: Duration,
    /// Dirty-set size at the sample that started this interval: the set the driver posted
    /// from (`modified` in Algorithm 2). During the first pass it includes never-sent pages.
    pub modified: usize,
    /// Pages posted in this interval that were also posted in the previous interval
    /// (see [`RetransmitTracker`]).
    pub retransmitted: usize,
    /// Dirty pages still unsent when the interval ends, after harvesting the dirty log:
    /// the backlog `modified - pages_posted` plus the pages dirtied during the interval.
    /// This is what a stop-and-copy started now would send, and the next `modified`.
    pub remaining: usize,
    /// Bytes put on the wire in this interval (payload and framing).
    pub bytes_sent: u64,
    /// Every page of the region has been sent at least once (now or in an earlier interval).
    /// No convergence rule fires before this is true.
    pub first_pass_done: bool,
}

impl IntervalReport {
    /// `post_time + wait_time`: the interval's active length (`period` in Algorithm 2).
    pub fn period(&self) -> Duration {
        self.post_time.saturating_add(self.wait_time)
    }
}

/// The policy's answer to an [`IntervalReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Decision {
    /// Keep iterating; post at most `window` pages next interval (`None` = the whole dirty
    /// set). Always equal to [`ConvergencePolicy::send_window`] after this call.
    Continue {
        /// Page budget of the next interval.
        window: Option<usize>,
    },
    /// Pause the guest and send the remaining dirty pages.
    StopAndCopy(Reason),
    /// Give up: the migration does not converge. The source keeps running.
    Abort(Reason),
}

impl Decision {
    /// The reason of a stop or abort, `None` while continuing.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Decision::Continue { .. } => None,
            Decision::StopAndCopy(r) | Decision::Abort(r) => Some(*r),
        }
    }
}

/// Which rule ended the pre-copy phase. `Display` is short enough for a summary table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// Pattern a: the (moving-average) modified-page count is stable.
    PatternA {
        /// Latest moving average of `modified`, in pages.
        moving_average: usize,
    },
    /// Pattern b: the whole dirty set drained in less than a sampling interval.
    PatternB {
        /// Pages drained in that interval.
        drained: usize,
    },
    /// Pattern c: most pages sent were also sent in the previous interval.
    PatternC {
        /// Pages sent in the interval that were also sent in the previous one.
        retransmitted: usize,
        /// Pages sent in the interval.
        migrated: usize,
    },
    /// QEMU: the remaining bytes fit in the downtime limit at the measured bandwidth.
    KvmDowntime {
        /// `remaining bytes / bandwidth`.
        expected_downtime: Duration,
        /// The configured limit.
        limit: Duration,
    },
    /// Xen: the iteration cap was reached.
    XenIterationCap {
        /// Iterations done.
        iterations: u32,
    },
    /// Xen: few enough pages remain.
    XenSmallRemainder {
        /// Dirty pages left.
        remaining: usize,
        /// The configured bound (strict: `remaining < limit`).
        limit: usize,
    },
    /// Xen: the pages sent in total exceed a multiple of the memory size.
    XenTotalSent {
        /// Pages sent so far.
        sent: u64,
        /// `max_sent_factor × region pages`.
        limit: u64,
    },
    /// The policy's maximum migration time elapsed.
    Timeout {
        /// `now` at the decision.
        elapsed: Duration,
        /// The configured limit.
        limit: Duration,
    },
}

impl Reason {
    /// A short stable label for machine-readable output: `a`, `b`, `c`, `kvm-downtime`,
    /// `xen-iterations`, `xen-remainder`, `xen-sent`, `timeout`.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::PatternA { .. } => "a",
            Reason::PatternB { .. } => "b",
            Reason::PatternC { .. } => "c",
            Reason::KvmDowntime { .. } => "kvm-downtime",
            Reason::XenIterationCap { .. } => "xen-iterations",
            Reason::XenSmallRemainder { .. } => "xen-remainder",
            Reason::XenTotalSent { .. } => "xen-sent",
            Reason::Timeout { .. } => "timeout",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::PatternA { moving_average } => {
                write!(f, "pattern a: modified-page count stable (moving average {moving_average} pages)")
            }
            Reason::PatternB { drained } => {
                write!(f, "pattern b: the dirty set ({drained} pages) drained within one interval")
            }
            Reason::PatternC { retransmitted, migrated } => {
                write!(f, "pattern c: {retransmitted} of {migrated} pages sent were also sent in the previous interval")
            }
            Reason::KvmDowntime { expected_downtime, limit } => {
                write!(f, "kvm: expected downtime {} ms ≤ {} ms", expected_downtime.as_millis(), limit.as_millis())
            }
            Reason::XenIterationCap { iterations } => {
                write!(f, "xen: iteration cap ({iterations})")
            }
            Reason::XenSmallRemainder { remaining, limit } => {
                write!(f, "xen: {remaining} pages left < {limit}")
            }
            Reason::XenTotalSent { sent, limit } => {
                write!(f, "xen: {sent} pages sent > {limit}")
            }
            Reason::Timeout { limit, .. } => write!(f, "timeout ({} s)", limit.as_secs_f64()),
        }
    }
}

/// The size of the migrated memory, fixed when a policy is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Pages in the region (`xen` total-sent factor, upper bound of the `ibrahim` window).
    pub pages: usize,
    /// Bytes per page (`kvm` remaining bytes and bandwidth-cap window). At least 1.
    pub page_size: usize,
}

impl RegionInfo {
    /// `pages` pages of `page_size` bytes (a zero page size is taken as 1).
    pub fn new(pages: usize, page_size: usize) -> Self {
        Self { pages, page_size: page_size.max(1) }
    }
}

/// A pre-copy convergence policy: a pure state machine fed once per interval.
///
/// Once [`handle_interval`](Self::handle_interval) has returned
/// [`Decision::StopAndCopy`] or [`Decision::Abort`], the policy is finished and returns the
/// same decision for any further report.
pub trait ConvergencePolicy: fmt::Debug {
    /// Policy name as accepted by `--policy` (`ibrahim`, `kvm`, `xen`).
    fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Which policy this is.
    fn kind(&self) -> PolicyKind;

    /// Page budget for the next interval; `None` = unlimited (send the whole dirty set).
    fn send_window(&self) -> Option<usize>;

    /// Minimum interval length when rate limiting is in force: the driver must not start the
    /// next interval sooner than this after the current one started. `None` = start at once.
    fn pacing_period(&self) -> Option<Duration> {
        None
    }

    /// Consumes the measurements of the interval that just ended and decides.
    fn handle_interval(&mut self, report: &IntervalReport) -> Decision;
}

/// The policy names accepted on the command line (`--policy ibrahim|kvm|xen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PolicyKind {
    /// Algorithm 2 of Ibrahim et al. (pattern detection with a regression window).
    #[default]
    Ibrahim,
    /// QEMU/KVM: expected downtime against a limit.
    Kvm,
    /// Xen: iteration cap, small remainder, total sent.
    Xen,
}

impl PolicyKind {
    /// Every policy, in a stable order.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Ibrahim, PolicyKind::Kvm, PolicyKind::Xen];

    /// The lowercase name (`ibrahim`, `kvm`, `xen`).
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Ibrahim => "ibrahim",
            PolicyKind::Kvm => "kvm",
            PolicyKind::Xen => "xen",
        }
    }

    /// This policy with its default parameters.
    pub fn default_config(self) -> PolicyConfig {
        match self {
            PolicyKind::Ibrahim => PolicyConfig::Ibrahim(IbrahimConfig::default()),
            PolicyKind::Kvm => PolicyConfig::Kvm(KvmConfig::default()),
            PolicyKind::Xen => PolicyConfig::Xen(XenConfig::default()),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown `--policy` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown convergence policy `{input}` (expected ibrahim, kvm or xen)")]
pub struct ParsePolicyKindError {
    /// The rejected input.
    pub input: String,
}

impl FromStr for PolicyKind {
    type Err = ParsePolicyKindError;

    /// Parses `ibrahim`, `kvm` or `xen`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParsePolicyKindError { input: s.to_owned() })
    }
}

/// Policy selection and parameters, e.g. `{"kind": "kvm", "downtime_limit_ms": 100}`.
/// Omitted parameters take their defaults; unknown ones are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum PolicyConfig {
    /// Algorithm 2 of Ibrahim et al.
    Ibrahim(IbrahimConfig),
    /// QEMU/KVM expected-downtime rule.
    Kvm(KvmConfig),
    /// Xen iteration cap / small remainder / total sent.
    Xen(XenConfig),
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyKind::default().default_config()
    }
}

impl PolicyConfig {
    /// Which policy this configures.
    pub fn kind(&self) -> PolicyKind {
        match self {
            PolicyConfig::Ibrahim(_) => PolicyKind::Ibrahim,
            PolicyConfig::Kvm(_) => PolicyKind::Kvm,
            PolicyConfig::Xen(_) => PolicyKind::Xen,
        }
    }
}

impl From<PolicyKind> for PolicyConfig {
    fn from(kind: PolicyKind) -> Self {
        kind.default_config()
    }
}

/// Builds the configured policy for a region. Every configuration value is valid (the types
/// rule out the meaningless ones), so this cannot fail.
pub fn build(cfg: &PolicyConfig, region: RegionInfo) -> Box<dyn ConvergencePolicy + Send> {
    match cfg {
        PolicyConfig::Ibrahim(c) => Box::new(IbrahimPolicy::new(c.clone(), region)),
        PolicyConfig::Kvm(c) => Box::new(KvmPolicy::new(c.clone(), region)),
        PolicyConfig::Xen(c) => Box::new(XenPolicy::new(c.clone(), region)),
    }
}

/// Duration as `f64` nanoseconds (exact below 2^53 ns ≈ 104 days).
pub(crate) fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parses_and_prints() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
            assert_eq!(PolicyConfig::from(k).kind(), k);
        }
        assert_eq!("KVM".parse::<PolicyKind>(), Ok(PolicyKind::Kvm));
        let err = "vmware".parse::<PolicyKind>().unwrap_err();
        assert_eq!(err.to_string(), "unknown convergence policy `vmware` (expected ibrahim, kvm or xen)");
        assert_eq!(PolicyKind::default(), PolicyKind::Ibrahim);
    }

    #[test]
    fn config_serde_defaults_and_rejects_unknown() {
        let c: PolicyConfig = serde_json::from_str(r#"{"kind":"kvm","downtime_limit_ms":100}"#).unwrap();
        let PolicyConfig::Kvm(k) = &c else { panic!("{c:?}") };
        assert_eq!(k.downtime_limit_ms, 100);
        assert_eq!(k.max_bandwidth, None);

        let c: PolicyConfig = serde_json::from_str(r#"{"kind":"ibrahim"}"#).unwrap();
        assert_eq!(c, PolicyConfig::default());

        assert!(serde_json::from_str::<PolicyConfig>(r#"{"kind":"xen","max_iters":3}"#).is_err());
        assert!(serde_json::from_str::<PolicyConfig>(r#"{"kind":"vmware"}"#).is_err());
        assert!(serde_json::from_str::<PolicyConfig>(r#"{"kind":"xen","max_iterations":0}"#).is_err());

        for k in PolicyKind::ALL {
            let c = k.default_config();
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<PolicyConfig>(&json).unwrap(), c, "{json}");
        }
    }

    #[test]
    fn build_gives_named_policies() {
        let region = RegionInfo::new(1 << 18, 4096);
        for k in PolicyKind::ALL {
            let p = build(&k.default_config(), region);
            assert_eq!(p.name(), k.as_str());
            assert_eq!(p.kind(), k);
        }
        // Defaults: ibrahim starts unlimited (the paper's "arbitrarily large" threshold),
        // kvm and xen send whole passes.
        assert_eq!(build(&PolicyConfig::default(), region).send_window(), None);
    }

    #[test]
    fn reason_display_for_tables() {
        let a = Reason::PatternA { moving_average: 5 };
        assert_eq!(
            (a.label(), a.to_string().as_str()),
            ("a", "pattern a: modified-page count stable (moving average 5 pages)")
        );
        let b = Reason::PatternB { drained: 5 };
        assert_eq!(
            (b.label(), b.to_string().as_str()),
            ("b", "pattern b: the dirty set (5 pages) drained within one interval")
        );
        let c = Reason::PatternC { retransmitted: 9, migrated: 10 };
        assert_eq!(c.to_string(), "pattern c: 9 of 10 pages sent were also sent in the previous interval");
        let r =
            Reason::KvmDowntime { expected_downtime: Duration::from_millis(120), limit: Duration::from_millis(300) };
        assert_eq!(r.to_string(), "kvm: expected downtime 120 ms ≤ 300 ms");
        assert_eq!(r.label(), "kvm-downtime");
        assert_eq!(Reason::XenIterationCap { iterations: 30 }.to_string(), "xen: iteration cap (30)");
        let t = Reason::Timeout { elapsed: Duration::from_secs(121), limit: Duration::from_secs(120) };
        assert_eq!(t.to_string(), "timeout (120 s)");
        assert_eq!(Decision::Abort(t).reason(), Some(t));
        assert_eq!(Decision::Continue { window: None }.reason(), None);
    }
}
