//! Scripted multi-interval runs of the real [`Schedule`] and the real policies on a virtual
//! clock, with a simulated link and a simulated dirtier: each of the ibrahim patterns fires in
//! its own regime and only there, and the regression window holds the interval at the
//! sampling period.

use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::schedule::Schedule;
use crate::policy::{self, Decision, IbrahimConfig, IntervalReport, PolicyConfig, Reason, RegionInfo};

/// Region pages; pages at and above `DATA` are zero (never written by any dirtier).
const PAGES: usize = 200_000;
const DATA: usize = 180_000;

/// A link: posting `x` pages costs `post.0 + post.1·x` ns, waiting `wait.0 + wait.1·x` ns,
/// each with ±3 % seeded jitter. 4 µs + 16 µs per page ≈ 50 000 pages/s.
struct Link {
    post: (f64, f64),
    wait: (f64, f64),
}

const LINK: Link = Link { post: (1e6, 4_000.0), wait: (2e6, 16_000.0) };

/// What the guest writes during `[t0, t1)`.
enum Dirtier {
    /// `rate` uniformly random writes per second over pages `0..wss`; from `drop_at` on, at
    /// `rate_after` per second.
    Random { wss: usize, rate: f64, drop_at: Option<(Duration, f64)> },
    /// An iterative computation: sweeps pages `0..wss` in order at `speed` pages/s.
    Sweep { wss: usize, speed: f64 },
}

impl Dirtier {
    fn write(&self, t0: Duration, t1: Duration, rng: &mut impl Rng, out: &mut livemig_transport::PageBitmap) {
        match *self {
            Dirtier::Random { wss, rate, drop_at } => {
                let rate = match drop_at {
                    Some((at, after)) if t0 >= at => after,
                    _ => rate,
                };
                let n = (rate * (t1 - t0).as_secs_f64()) as usize;
                for _ in 0..n {
                    out.set(rng.gen_range(0..wss));
                }
            }
            Dirtier::Sweep { wss, speed } => {
                let a = (t0.as_secs_f64() * speed) as usize;
                let b = (t1.as_secs_f64() * speed) as usize;
                if b - a >= wss {
                    out.set_range(0, wss);
                } else {
                    for i in a..b {
                        out.set(i % wss);
                    }
                }
            }
        }
    }
}

struct Run {
    /// The decision's reason; `None` when `max_intervals` passed without one.
    reason: Option<Reason>,
    /// Interval periods after the first pass.
    periods: Vec<f64>,
    intervals: u32,
}

fn run(cfg: PolicyConfig, dirtier: Dirtier, max_intervals: u32) -> Run {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5c11);
    let mut policy = policy::build(&cfg, RegionInfo::new(PAGES, 4096));
    let mut s = Schedule::new(PAGES);
    let mut now = Duration::ZERO;
    let mut periods = Vec::new();
    for i in 1..=max_intervals {
        let budget = policy.send_window().unwrap_or(usize::MAX).max(1);
        s.begin_interval();
        let first_pass_before = s.first_pass_done();
        let picked = s.pick(budget, &mut |p| p >= DATA);
        let x = picked.data as f64;
        let mut jitter = || rng.gen_range(0.97..1.03);
        let post = Duration::from_nanos(((LINK.post.0 + LINK.post.1 * x) * jitter()) as u64);
        let wait = Duration::from_nanos(((LINK.wait.0 + LINK.wait.1 * x) * jitter()) as u64);
        let t0 = now;
        now += post + wait;
        dirtier.write(t0, now, &mut rng, s.pending_mut());
        let f = s.end_interval();
        if first_pass_before {
            periods.push((post + wait).as_secs_f64());
        }
        let report = IntervalReport {
            now,
            pages_posted: f.posted,
            post_time: post,
            wait_time: wait,
            modified: f.modified,
            retransmitted: f.retransmitted,
            remaining: f.remaining,
            bytes_sent: f.posted as u64 * 4096,
            first_pass_done: f.first_pass_done,
        };
        match policy.handle_interval(&report) {
            Decision::Continue { .. } => {}
            Decision::StopAndCopy(reason) | Decision::Abort(reason) => {
                return Run { reason: Some(reason), periods, intervals: i }
            }
        }
    }
    Run { reason: None, periods, intervals: max_intervals }
}

fn ibrahim() -> PolicyConfig {
    PolicyConfig::Ibrahim(IbrahimConfig::default())
}

/// Regime a: the guest dirties a working set three times what the link drains per second.
/// Pattern a fires (not c, which the first pass used to trigger by construction, not b).
#[test]
fn pattern_a_when_dirtying_outruns_the_link() {
    let r = run(ibrahim(), Dirtier::Random { wss: 150_000, rate: 400_000.0, drop_at: None }, 60);
    assert!(matches!(r.reason, Some(Reason::PatternA { .. })), "{:?} after {} intervals", r.reason, r.intervals);
    assert!(r.intervals > 3, "{} intervals", r.intervals);
}

/// The regression window keeps every interval within 10 % of the 1 s sampling period once
/// it has two samples after the first pass (patterns a and c disabled so the run goes on).
#[test]
fn regression_window_holds_the_interval_within_ten_percent() {
    let cfg = PolicyConfig::Ibrahim(IbrahimConfig {
        stable_tolerance_percent: 0,
        retransmit_percent: 101,
        ..Default::default()
    });
    let r = run(cfg, Dirtier::Random { wss: 150_000, rate: 400_000.0, drop_at: None }, 30);
    assert_eq!(r.reason, None);
    let periods = r.periods;
    assert!(periods.len() >= 25, "{periods:?}");
    for (i, p) in periods.iter().enumerate().skip(2) {
        assert!((0.9..=1.1).contains(p), "interval {i} after the first pass lasted {p:.3} s: {periods:?}");
    }
}

/// Regime b: heavy dirtying during the first pass, then the activity drops (a barrier): the
/// backlog drains and pattern b fires.
#[test]
fn pattern_b_when_activity_drops() {
    let d = Dirtier::Random { wss: 150_000, rate: 400_000.0, drop_at: Some((Duration::from_secs(4), 1_000.0)) };
    let r = run(ibrahim(), d, 60);
    assert!(matches!(r.reason, Some(Reason::PatternB { .. })), "{:?} after {} intervals", r.reason, r.intervals);
}

/// Regime c: an iterative computation sweeps a dataset that the link very nearly drains in an
/// interval (4 % above one window), re-writing all of it many times a second.
#[test]
fn pattern_c_for_an_iterative_computation_the_link_nearly_drains() {
    let r = run(ibrahim(), Dirtier::Sweep { wss: 52_000, speed: 500_000.0 }, 60);
    assert!(matches!(r.reason, Some(Reason::PatternC { .. })), "{:?} after {} intervals", r.reason, r.intervals);
}

/// The same computation over a dataset three times larger is regime a, not c: consecutive
/// windows are disjoint.
#[test]
fn large_sweep_is_pattern_a_not_c() {
    let r = run(ibrahim(), Dirtier::Sweep { wss: 150_000, speed: 500_000.0 }, 60);
    assert!(matches!(r.reason, Some(Reason::PatternA { .. })), "{:?} after {} intervals", r.reason, r.intervals);
}

/// A small working set the link drains in a fraction of an interval is pattern b.
#[test]
fn small_working_set_is_pattern_b() {
    let r = run(ibrahim(), Dirtier::Random { wss: 8_000, rate: 400_000.0, drop_at: None }, 60);
    assert!(matches!(r.reason, Some(Reason::PatternB { .. })), "{:?} after {} intervals", r.reason, r.intervals);
}
