//! The source side of a pre-copy session as an I/O-free state machine, in the shape of
//! quinn-proto: the driver feeds it what happened (`handle_*`, with `now` — time since the
//! session started — passed in) and carries out what it asks for ([`poll_action`]); it never
//! reads a clock, touches a socket or guest memory. The message sequence, the interval loop
//! with its policy, the waits and their deadlines, and what becomes of the guest when
//! anything fails all live here, so whole migrations run in tests with virtual time and a
//! simulated link (`sim_tests`), and the real driver ([`super::source`]) is a loop over
//! actions.
//!
//! [`poll_action`]: SourceSession::poll_action

use std::collections::VecDeque;
use std::time::Duration;

use livemig_transport::PageBitmap;

use super::proto::{Msg, PageRun, RegionDesc, MAX_RUNS, MAX_STATE_CHUNK};
use super::schedule::Schedule;
use super::switchover::{Fate, Next, SourceSwitchover, Violation};
use super::{IterationLine, Phase};
use crate::policy::{self, ConvergencePolicy, Decision, IntervalReport, PolicyConfig, Reason};

/// Session settings (the protocol's waits).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long to wait for `Accept` and each `IterationAck`.
    pub reply_timeout: Duration,
    /// While the guest is paused, how long the destination may send nothing at all.
    pub switchover_idle: Duration,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Send this control message.
    Send(Msg),
    /// Arm dirty tracking, then report the pages known to be zero
    /// ([`SourceSession::handle_tracking_started`]).
    StartTracking,
    /// These never-sent pages are zero (their `Zero` messages are queued as `Send`s): record
    /// their digest terms.
    ZeroPages(Vec<PageRun>),
    /// Pick up to `budget` data pages from the schedule ([`SourceSession::pick`]), post them
    /// (with their `Zero` and `Placed` messages), hash them, wait for their completion, then
    /// report [`SourceSession::handle_batch_done`].
    SendBatch {
        /// Page budget (`usize::MAX`: everything pending).
        budget: usize,
    },
    /// Harvest the dirty log into [`SourceSession::pending_mut`], then report
    /// [`SourceSession::handle_collected`].
    CollectDirty,
    /// One interval is over (for progress output).
    Interval(IterationLine),
    /// Do nothing before `until` (the policy paces intervals): call
    /// [`SourceSession::handle_timeout`] then.
    Wait {
        /// Session time to wait for.
        until: Duration,
    },
    /// Pause the guest (downtime starts), then report [`SourceSession::handle_paused`].
    PauseGuest,
    /// Save the guest's device state, then report [`SourceSession::handle_state`].
    SaveState,
    /// Compute the digest of everything sent, then report [`SourceSession::handle_digest`].
    Digest,
    /// Let the paused guest run again (the destination did not take over).
    ResumeGuest,
    /// The destination runs the guest: this copy never runs again.
    HandedOver,
    /// Disarm dirty tracking.
    StopTracking,
}

/// Why the session failed (the driver maps these to its error type).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The destination refused `Begin`.
    Refused(String),
    /// The destination aborted.
    PeerAborted(String),
    /// A message out of turn.
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// Nothing in time.
    Timeout {
        /// What was expected.
        expected: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The digests differ.
    Mismatch {
        /// Ours.
        ours: [u8; 32],
        /// Theirs.
        theirs: [u8; 32],
    },
    /// The link or an operation the driver ran failed (the driver holds the error).
    Driver {
        /// What to tell the destination, when the link still works.
        abort: Option<String>,
    },
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum End {
    /// The destination runs the guest.
    Completed(Reason),
    /// The policy gave up; the guest keeps running here.
    Aborted(Reason),
    /// The session failed in `phase`; the guest runs here (resumed if it was paused).
    Failed {
        /// Where.
        phase: Phase,
        /// Why.
        why: Failure,
    },
    /// The session failed at or after `Commit`: the destination may run the guest, so this
    /// copy stays paused.
    InDoubt {
        /// Why.
        why: Failure,
    },
    /// Failed after the destination said it runs the guest; this copy stays stopped.
    FailedAfterHandover {
        /// Why.
        why: Failure,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AwaitAccept,
    Tracking,
    Batch,
    Collect,
    AwaitAck { iter: u32, decision: Decision },
    Pacing,
    Pausing(Reason),
    FinalCollect(Reason),
    FinalBatch(Reason),
    Saving(Reason),
    Digesting(Reason),
    Switchover(Reason),
    Ended,
}

/// Figures of one batch the driver sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchDone {
    /// Data pages posted.
    pub data: usize,
    /// Zero pages announced.
    pub zero: usize,
    /// Time spent posting (and hashing).
    pub post_time: Duration,
    /// Time spent waiting for completions.
    pub wait_time: Duration,
    /// Payload bytes posted.
    pub bytes: u64,
}

/// Totals the session keeps for the summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Intervals run.
    pub iterations: u32,
    /// Data pages sent.
    pub pages_sent: u64,
    /// Zero pages announced.
    pub zero_pages: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// When the guest was paused (session time).
    pub paused_at: Option<Duration>,
    /// When the final batch was out.
    pub final_sent_at: Option<Duration>,
    /// Pages of the final batch.
    pub final_pages: Option<u64>,
    /// When the destination said it runs the guest.
    pub resumed_at: Option<Duration>,
    /// Device state bytes.
    pub state_bytes: Option<u64>,
    /// The agreed digest.
    pub digest: Option<[u8; 32]>,
}

/// The source side of a pre-copy session.
pub struct SourceSession {
    cfg: SessionConfig,
    sched: Schedule,
    policy: Box<dyn ConvergencePolicy + Send>,
    step: Step,
    sw: Option<SourceSwitchover>,
    out: VecDeque<Action>,
    /// A reply expected by this session time.
    deadline: Option<(Duration, &'static str, Duration)>,
    iter: u32,
    interval_started: Duration,
    last_batch: BatchDone,
    line: Option<IterationLine>,
    totals: Totals,
    end: Option<End>,
}

impl std::fmt::Debug for SourceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSession").field("step", &self.step).field("iter", &self.iter).finish()
    }
}

impl SourceSession {
    /// A session migrating memory with these regions (one page size) under `policy`;
    /// `Begin` is queued.
    pub fn new(regions: Vec<RegionDesc>, policy: &PolicyConfig, cfg: SessionConfig) -> Self {
        let ps = regions.first().map_or(4096, |r| r.page_size);
        let pages: usize = regions.iter().map(|r| (r.len / ps as u64) as usize).sum();
        let mut s = Self {
            sched: Schedule::new(pages),
            policy: policy::build(policy, policy::RegionInfo::new(pages, ps as usize)),
            step: Step::AwaitAccept,
            sw: None,
            out: VecDeque::new(),
            deadline: None,
            iter: 0,
            interval_started: Duration::ZERO,
            last_batch: BatchDone::default(),
            line: None,
            totals: Totals::default(),
            end: None,
            cfg,
        };
        s.out.push_back(Action::Send(Msg::Begin { strategy: super::proto::Strategy::Precopy, regions }));
        s.expect(Duration::ZERO, "Accept", s.cfg.reply_timeout);
        s
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// The session time at which [`handle_timeout`](Self::handle_timeout) is due, while the
    /// session waits for the destination.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadline.map(|(at, _, _)| at)
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Totals so far.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The phase the session is in (for error messages).
    pub fn phase(&self) -> Phase {
        match self.step {
            Step::AwaitAccept => Phase::Handshake,
            Step::Tracking | Step::Batch | Step::Collect | Step::AwaitAck { .. } | Step::Pacing => Phase::Precopy,
            Step::Pausing(_)
            | Step::FinalCollect(_)
            | Step::FinalBatch(_)
            | Step::Saving(_)
            | Step::Digesting(_)
            | Step::Switchover(_) => Phase::StopAndCopy,
            Step::Ended => {
                if self.totals.resumed_at.is_some() {
                    Phase::Resumed
                } else {
                    Phase::StopAndCopy
                }
            }
        }
    }

    /// The pending (dirty, unsent) set, for the driver's dirty-log harvest.
    pub fn pending_mut(&mut self) -> &mut PageBitmap {
        self.sched.pending_mut()
    }

    /// Picks the batch for a `SendBatch`: see [`Schedule::pick`]. The zero runs it returns
    /// are for the driver to announce (`Zero` messages) and record.
    pub fn pick(&mut self, budget: usize, is_zero: &mut dyn FnMut(usize) -> bool) -> super::schedule::Picked {
        self.sched.pick(budget, is_zero)
    }

    /// The schedule (batch bitmap and runs for posting).
    pub fn schedule(&self) -> &Schedule {
        &self.sched
    }

    fn expect(&mut self, now: Duration, what: &'static str, timeout: Duration) {
        self.deadline = Some((now + timeout, what, timeout));
    }

    // ---- inputs ------------------------------------------------------------------------

    /// A control message from the destination.
    pub fn handle_message(&mut self, now: Duration, m: Msg) {
        if self.end.is_some() {
            return;
        }
        if let Msg::Abort { reason } = m {
            return self.fail(now, Failure::PeerAborted(reason));
        }
        match (self.step, m) {
            (Step::AwaitAccept, Msg::Accept) => {
                self.deadline = None;
                self.step = Step::Tracking;
                self.out.push_back(Action::StartTracking);
            }
            (Step::AwaitAccept, Msg::Refuse { reason }) => self.fail(now, Failure::Refused(reason)),
            (Step::AwaitAck { iter, decision }, Msg::IterationAck { iter: i }) if i == iter => {
                self.deadline = None;
                if let Some(line) = self.line.take() {
                    self.out.push_back(Action::Interval(line));
                }
                self.after_interval(now, decision);
            }
            (Step::Switchover(reason), m) => {
                let Some(sw) = self.sw.as_mut() else { return self.fail(now, Failure::Driver { abort: None }) };
                let (next, expected, ours) = (sw.handle(&m), sw.expected(), sw.ours());
                match next {
                    Ok(Next::Wait) => self.expect(now, expected, self.cfg.switchover_idle),
                    Ok(Next::SendCommit) => {
                        self.out.push_back(Action::Send(Msg::Commit));
                        self.expect(now, expected, self.cfg.switchover_idle);
                    }
                    Ok(Next::Done) => {
                        self.deadline = None;
                        self.totals.resumed_at = Some(now);
                        self.totals.digest = Some(ours);
                        self.out.push_back(Action::HandedOver);
                        self.out.push_back(Action::Send(Msg::Done));
                        self.finish(End::Completed(reason));
                    }
                    Err(Violation::Mismatch { theirs }) => self.fail(now, Failure::Mismatch { ours, theirs }),
                    Err(Violation::Unexpected { expected, got }) => {
                        self.fail(now, Failure::Unexpected { expected, got })
                    }
                }
            }
            (_, m) => {
                let expected = self.deadline.map_or("nothing", |(_, w, _)| w);
                self.fail(now, Failure::Unexpected { expected, got: m.name() })
            }
        }
    }

    /// Tracking is armed; `known_zero` are pages known to be zero without reading them.
    pub fn handle_tracking_started(&mut self, now: Duration, known_zero: &PageBitmap) {
        if self.step != Step::Tracking {
            return;
        }
        let runs = self.sched.take_known_zero(known_zero);
        self.announce_zero(runs);
        self.begin_interval(now);
    }

    /// Queues `Zero` messages and the digest action for zero runs the driver found while
    /// picking (or the session found up front).
    pub fn announce_zero(&mut self, runs: Vec<PageRun>) {
        if runs.is_empty() {
            return;
        }
        self.totals.zero_pages += runs.iter().map(|r| r.pages as u64).sum::<u64>();
        for chunk in runs.chunks(MAX_RUNS) {
            self.out.push_back(Action::Send(Msg::Zero { runs: chunk.to_vec() }));
        }
        self.out.push_back(Action::ZeroPages(runs));
    }

    fn begin_interval(&mut self, now: Duration) {
        self.iter += 1;
        self.interval_started = now;
        self.sched.begin_interval();
        self.step = Step::Batch;
        let budget = self.policy.send_window().unwrap_or(usize::MAX).max(1);
        self.out.push_back(Action::SendBatch { budget });
    }

    /// The batch of the last `SendBatch` is posted, hashed and complete.
    pub fn handle_batch_done(&mut self, now: Duration, b: BatchDone) {
        self.totals.pages_sent += b.data as u64;
        self.totals.bytes += b.bytes;
        self.last_batch = b;
        match self.step {
            Step::Batch => {
                self.step = Step::Collect;
                self.out.push_back(Action::CollectDirty);
            }
            Step::FinalBatch(reason) => {
                self.totals.final_pages = Some((b.data + b.zero) as u64);
                self.totals.final_sent_at = Some(now);
                self.step = Step::Saving(reason);
                self.out.push_back(Action::SaveState);
            }
            _ => {}
        }
    }

    /// The dirty log was harvested into the pending set.
    pub fn handle_collected(&mut self, now: Duration) {
        match self.step {
            Step::Collect => {
                let f = self.sched.end_interval();
                let b = self.last_batch;
                let report = IntervalReport {
                    now,
                    pages_posted: f.posted,
                    post_time: b.post_time,
                    wait_time: b.wait_time,
                    modified: f.modified,
                    retransmitted: f.retransmitted,
                    remaining: f.remaining,
                    bytes_sent: b.bytes,
                    first_pass_done: f.first_pass_done,
                };
                let decision = self.policy.handle_interval(&report);
                self.totals.iterations = self.iter;
                self.line = Some(IterationLine {
                    iter: self.iter,
                    at_ms: now.as_millis() as u64,
                    sent: b.data as u64,
                    zero: b.zero as u64,
                    dirty: f.remaining as u64,
                    retransmitted: f.retransmitted as u64,
                    interval_ms: report.period().as_secs_f64() * 1e3,
                    window: match decision {
                        Decision::Continue { window } => window.map(|w| w as u64),
                        _ => None,
                    },
                    guest_rate: None,
                });
                let iter = self.iter;
                self.out.push_back(Action::Send(Msg::IterationDone {
                    iter,
                    pages: b.data as u64,
                    dirty: f.remaining as u64,
                }));
                self.step = Step::AwaitAck { iter, decision };
                self.expect(now, "IterationAck", self.cfg.reply_timeout);
            }
            Step::FinalCollect(reason) => {
                self.step = Step::FinalBatch(reason);
                self.out.push_back(Action::SendBatch { budget: usize::MAX });
            }
            _ => {}
        }
    }

    fn after_interval(&mut self, now: Duration, decision: Decision) {
        match decision {
            Decision::Continue { .. } => match self.policy.pacing_period() {
                Some(p) if self.interval_started + p > now => {
                    self.step = Step::Pacing;
                    let until = self.interval_started + p;
                    self.deadline = Some((until, "pacing", p));
                    self.out.push_back(Action::Wait { until });
                }
                _ => self.begin_interval(now),
            },
            Decision::StopAndCopy(r) => {
                self.step = Step::Pausing(r);
                self.out.push_back(Action::PauseGuest);
            }
            Decision::Abort(r) => {
                self.out.push_back(Action::StopTracking);
                self.out.push_back(Action::Send(Msg::Abort { reason: format!("pre-copy did not converge: {r}") }));
                self.finish(End::Aborted(r));
            }
        }
    }

    /// The guest is paused (downtime starts).
    pub fn handle_paused(&mut self, now: Duration) {
        if let Step::Pausing(r) = self.step {
            self.totals.paused_at = Some(now);
            self.step = Step::FinalCollect(r);
            self.out.push_back(Action::CollectDirty);
        }
    }

    /// The guest's device state, taken while paused.
    pub fn handle_state(&mut self, _now: Duration, state: &[u8]) {
        let Step::Saving(r) = self.step else { return };
        self.totals.state_bytes = Some(state.len() as u64);
        let mut chunks = state.chunks(MAX_STATE_CHUNK).peekable();
        if chunks.peek().is_none() {
            self.out.push_back(Action::Send(Msg::DeviceState { last: true, bytes: Vec::new() }));
        }
        while let Some(c) = chunks.next() {
            self.out.push_back(Action::Send(Msg::DeviceState { last: chunks.peek().is_none(), bytes: c.to_vec() }));
        }
        self.step = Step::Digesting(r);
        self.out.push_back(Action::Digest);
    }

    /// The digest of everything sent (the frozen memory's).
    pub fn handle_digest(&mut self, now: Duration, sum: [u8; 32]) {
        let Step::Digesting(r) = self.step else { return };
        let mut sw = SourceSwitchover::new(sum);
        self.out.push_back(Action::Send(Msg::Final));
        self.out.push_back(Action::Send(Msg::SourceChecksum { checksum: sum }));
        sw.checksum_sent();
        self.expect(now, sw.expected(), self.cfg.switchover_idle);
        self.sw = Some(sw);
        self.step = Step::Switchover(r);
    }

    /// Time passed: a wait may have run out, or pacing is over.
    pub fn handle_timeout(&mut self, now: Duration) {
        let Some((at, what, timeout)) = self.deadline else { return };
        if now < at {
            return;
        }
        self.deadline = None;
        if self.step == Step::Pacing {
            return self.begin_interval(now);
        }
        self.fail(now, Failure::Timeout { expected: what, timeout });
    }

    /// The link or a driver operation failed: the guest's fate is decided here. `abort` is
    /// what to tell the destination when the link still works (`None`: it does not).
    pub fn handle_failure(&mut self, now: Duration, abort: Option<String>) {
        self.fail(now, Failure::Driver { abort });
    }

    fn fail(&mut self, _now: Duration, why: Failure) {
        if self.end.is_some() {
            return;
        }
        self.deadline = None;
        let phase = self.phase();
        let paused = self.totals.paused_at.is_some();
        let peer_aborted = matches!(why, Failure::PeerAborted(_));
        let fate = self.sw.as_ref().map_or(Fate::ResumeHere, |sw| sw.fate(peer_aborted));
        match fate {
            Fate::HoldInDoubt => {
                self.out.push_back(Action::StopTracking);
                return self.finish(End::InDoubt { why });
            }
            Fate::StayStopped => {
                self.out.push_back(Action::StopTracking);
                return self.finish(End::FailedAfterHandover { why });
            }
            _ => {}
        }
        if phase != Phase::Handshake {
            self.out.push_back(Action::StopTracking);
        }
        if paused {
            self.out.push_back(Action::ResumeGuest);
        }
        // Tell the destination, unless the link is gone.
        match &why {
            Failure::Driver { abort: None } => {}
            Failure::Driver { abort: Some(reason) } => {
                self.out.push_back(Action::Send(Msg::Abort { reason: reason.clone() }))
            }
            w => self.out.push_back(Action::Send(Msg::Abort { reason: describe(w) })),
        }
        self.finish(End::Failed { phase, why });
    }

    fn finish(&mut self, end: End) {
        self.deadline = None;
        self.step = Step::Ended;
        self.end = Some(end);
    }
}

/// A sentence for `Abort` messages and logs.
pub fn describe(f: &Failure) -> String {
    match f {
        Failure::Refused(r) => format!("the destination refused the migration: {r}"),
        Failure::PeerAborted(r) => format!("the destination aborted: {r}"),
        Failure::Unexpected { expected, got } => format!("unexpected {got} while waiting for {expected}"),
        Failure::Timeout { expected, timeout } => format!("no {expected} within {timeout:?}"),
        Failure::Mismatch { .. } => "digest mismatch".into(),
        Failure::Driver { abort } => abort.clone().unwrap_or_else(|| "the source failed".into()),
    }
}
