//! The destination side of a pre-copy session as an I/O-free state machine (the mirror of
//! [`super::session::SourceSession`]): `handle_*` in, with `now`; [`DestSession::poll_action`]
//! and [`DestSession::poll_timeout`] out. It checks `Begin` against the local memory, checks
//! every page run against the source's layout, keeps the device state, paces `Alive` while
//! the digest is finished, answers the checksum through [`DestSwitchover`], and starts the
//! guest only on `Commit`. The driver ([`super::dest`]) places zero pages, hashes, and
//! starts the guest when asked.

use std::collections::VecDeque;
use std::time::Duration;

use super::proto::{Msg, PageRun, RegionDesc, MAX_STATE};
use super::switchover::{DestNext, DestSwitchover};
use super::{check_fit, Mismatch, Phase};
use crate::guest::PageLayout;

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestAction {
    /// Send this control message.
    Send(Msg),
    /// Make these pages zero (checked against the layout) and record their digest terms.
    PlaceZero(Vec<PageRun>),
    /// These pages hold their new content: hash them.
    HashPlaced(Vec<PageRun>),
    /// An interval was announced (for progress output).
    Progress {
        /// Interval.
        iter: u32,
        /// Pages it sent.
        pages: u64,
        /// Dirty pages left at the source.
        dirty: u64,
    },
    /// Finish the digest (every page is placed), then report [`DestSession::handle_digest`].
    FinishDigest,
    /// Start the guest with this device state, then report [`DestSession::handle_started`].
    StartGuest(Vec<u8>),
}

/// Why the destination session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestFailure {
    /// Region `index` of the source does not fit ours.
    Refused {
        /// Which region.
        index: usize,
        /// Why.
        why: Mismatch,
    },
    /// The source has a different number of regions.
    RegionCount {
        /// The source's.
        src: usize,
        /// Ours.
        dst: usize,
    },
    /// The source announced a strategy this session does not run.
    Strategy(super::proto::Strategy),
    /// The source gave up.
    SourceAborted(String),
    /// A message out of turn or out of range.
    Unexpected {
        /// What came (or what was wrong with it).
        got: &'static str,
    },
    /// Nothing in time.
    Timeout {
        /// What was expected.
        expected: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The digests differ; the guest does not start here.
    Mismatch {
        /// The source's.
        theirs: [u8; 32],
        /// Ours.
        ours: [u8; 32],
    },
    /// Starting the guest failed (the source was told and resumes).
    Start(String),
    /// The link or a driver operation failed (the driver holds the error).
    Driver,
}

/// How the destination session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestEnd {
    /// The guest runs here.
    Completed,
    /// Failed in `phase`; the guest does not run here.
    Failed {
        /// Where.
        phase: Phase,
        /// Why.
        why: DestFailure,
    },
    /// The digests matched but no `Commit` came; the guest does not run here.
    NotCommitted(DestFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AwaitBegin,
    Precopy,
    Hashing,
    AwaitChecksum,
    AwaitCommit,
    Starting,
    AwaitDone,
    Ended,
}

/// Settings: the waits.
#[derive(Debug, Clone, Copy)]
pub struct DestSessionConfig {
    /// How long to wait for `Begin`, each switchover message and `Done`; and how long
    /// pre-copy may go without any progress.
    pub reply_timeout: Duration,
    /// While the digest is finished, send `Alive` this often.
    pub alive_every: Duration,
}

/// The destination side of a pre-copy session.
#[derive(Debug)]
pub struct DestSession {
    cfg: DestSessionConfig,
    local: Vec<RegionDesc>,
    layout: Option<PageLayout>,
    step: Step,
    sw: DestSwitchover,
    state: Vec<u8>,
    state_bytes: usize,
    state_done: bool,
    /// Messages that arrived while the digest was being finished.
    held: VecDeque<Msg>,
    out: VecDeque<DestAction>,
    deadline: Option<(Duration, &'static str, Duration)>,
    /// Intervals announced.
    pub iterations: u32,
    /// Zero pages announced.
    pub zero_pages: u64,
    /// Pages announced as placed.
    pub placed_pages: u64,
    /// When `Final` arrived, the digest was verified, and the guest started (session time).
    pub final_at: Option<Duration>,
    /// When the verdict was sent.
    pub verified_at: Option<Duration>,
    /// When the guest started.
    pub started_at: Option<Duration>,
    end: Option<DestEnd>,
}

impl DestSession {
    /// A session receiving into memory made of `local` regions.
    pub fn new(local: Vec<RegionDesc>, cfg: DestSessionConfig) -> Self {
        Self {
            cfg,
            local,
            layout: None,
            step: Step::AwaitBegin,
            sw: DestSwitchover::new(),
            state: Vec::new(),
            state_bytes: 0,
            state_done: false,
            held: VecDeque::new(),
            out: VecDeque::new(),
            deadline: Some((cfg.reply_timeout, "Begin", cfg.reply_timeout)),
            iterations: 0,
            zero_pages: 0,
            placed_pages: 0,
            final_at: None,
            verified_at: None,
            started_at: None,
            end: None,
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<DestAction> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadline.map(|(at, _, _)| at)
    }

    /// Whether the driver is to wait for the digest (rather than for a message).
    pub fn finishing_digest(&self) -> bool {
        self.step == Step::Hashing
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<&DestEnd> {
        self.end.as_ref()
    }

    /// The source's page layout, once `Begin` is accepted.
    pub fn layout(&self) -> Option<&PageLayout> {
        self.layout.as_ref()
    }

    /// Bytes of device state received.
    pub fn state_len(&self) -> usize {
        self.state_bytes
    }

    /// The phase (for errors).
    pub fn phase(&self) -> Phase {
        match self.step {
            Step::AwaitBegin => Phase::Handshake,
            Step::Precopy => Phase::Precopy,
            Step::Hashing | Step::AwaitChecksum | Step::AwaitCommit | Step::Starting => Phase::StopAndCopy,
            Step::AwaitDone | Step::Ended => Phase::Resumed,
        }
    }

    fn expect(&mut self, now: Duration, what: &'static str, timeout: Duration) {
        self.deadline = Some((now + timeout, what, timeout));
    }

    fn check_runs(&self, runs: &[PageRun]) -> bool {
        let pages = self.layout.as_ref().map_or(0, |l| l.pages()) as u64;
        runs.iter().all(|r| matches!(r.first.checked_add(r.pages as u64), Some(end) if end <= pages))
    }

    /// A control message from the source.
    pub fn handle_message(&mut self, now: Duration, m: Msg) {
        if self.end.is_some() {
            return;
        }
        if let Msg::Abort { reason } = m {
            return self.fail(DestFailure::SourceAborted(reason));
        }
        if self.step == Step::Hashing {
            self.held.push_back(m);
            return;
        }
        match (self.step, m) {
            (Step::AwaitBegin, Msg::Begin { strategy, regions }) => {
                let refuse = |s: &mut Self, why: DestFailure| {
                    s.out.push_back(DestAction::Send(Msg::Refuse { reason: describe(&why) }));
                    s.fail(why)
                };
                if strategy != super::proto::Strategy::Precopy {
                    return refuse(self, DestFailure::Strategy(strategy));
                }
                if regions.len() != self.local.len() {
                    let why = DestFailure::RegionCount { src: regions.len(), dst: self.local.len() };
                    return refuse(self, why);
                }
                for (index, (s, d)) in regions.iter().zip(&self.local).enumerate() {
                    if let Err(why) = check_fit(s.len, s.page_size, d.len, d.page_size) {
                        return refuse(self, DestFailure::Refused { index, why });
                    }
                }
                self.layout = Some(PageLayout::new(regions.iter().map(|r| (r.len / r.page_size as u64) as usize)));
                self.out.push_back(DestAction::Send(Msg::Accept));
                self.step = Step::Precopy;
                self.expect(now, "pre-copy progress", self.cfg.reply_timeout);
            }
            (Step::Precopy, Msg::IterationDone { iter, pages, dirty }) => {
                self.iterations = iter;
                self.out.push_back(DestAction::Progress { iter, pages, dirty });
                // Every message before it is processed (Zero runs placed): the source may
                // now write those pages again.
                self.out.push_back(DestAction::Send(Msg::IterationAck { iter }));
                self.expect(now, "pre-copy progress", self.cfg.reply_timeout);
            }
            (Step::Precopy, Msg::Zero { runs }) => {
                if !self.check_runs(&runs) {
                    return self.fail(DestFailure::Unexpected { got: "Zero (page run out of range)" });
                }
                self.zero_pages += runs.iter().map(|r| r.pages as u64).sum::<u64>();
                self.out.push_back(DestAction::PlaceZero(runs));
                self.expect(now, "pre-copy progress", self.cfg.reply_timeout);
            }
            (Step::Precopy, Msg::Placed { runs }) => {
                if !self.check_runs(&runs) {
                    return self.fail(DestFailure::Unexpected { got: "Placed (page run out of range)" });
                }
                self.placed_pages += runs.iter().map(|r| r.pages as u64).sum::<u64>();
                self.out.push_back(DestAction::HashPlaced(runs));
                self.expect(now, "pre-copy progress", self.cfg.reply_timeout);
            }
            (Step::Precopy, Msg::DeviceState { last, bytes }) => {
                if self.state_done || self.state.len() + bytes.len() > MAX_STATE {
                    return self.fail(DestFailure::Unexpected { got: "DeviceState (too much or after the last)" });
                }
                self.state.extend_from_slice(&bytes);
                self.state_bytes = self.state.len();
                self.state_done = last;
                self.expect(now, "pre-copy progress", self.cfg.reply_timeout);
            }
            (Step::Precopy, Msg::Final) if self.state_done => {
                self.final_at = Some(now);
                self.step = Step::Hashing;
                self.out.push_back(DestAction::FinishDigest);
                self.expect(now, "the digest", self.cfg.alive_every);
            }
            (Step::Precopy, Msg::Final) => self.fail(DestFailure::Unexpected { got: "Final before the device state" }),
            (Step::AwaitChecksum | Step::AwaitCommit, m) => match self.sw.handle(&m) {
                Ok(DestNext::Answer { ok }) => {
                    self.out.push_back(DestAction::Send(Msg::Verified { ok, checksum: self.sw.ours() }));
                    self.verified_at = Some(now);
                    if !ok {
                        let Msg::SourceChecksum { checksum } = m else { unreachable!("answered a SourceChecksum") };
                        return self.fail(DestFailure::Mismatch { theirs: checksum, ours: self.sw.ours() });
                    }
                    self.step = Step::AwaitCommit;
                    self.expect(now, "Commit", self.cfg.reply_timeout);
                }
                Ok(DestNext::Resume) => {
                    self.step = Step::Starting;
                    self.deadline = None;
                    self.out.push_back(DestAction::StartGuest(std::mem::take(&mut self.state)));
                }
                _ => self.fail(DestFailure::Unexpected { got: m.name() }),
            },
            (Step::AwaitDone, Msg::Done) => self.finish(DestEnd::Completed),
            (_, m) => self.fail(DestFailure::Unexpected { got: m.name() }),
        }
    }

    /// Page bytes arrived (pre-copy progress without a message).
    pub fn handle_progress(&mut self, now: Duration) {
        if self.step == Step::Precopy {
            self.expect(now, "pre-copy progress", self.cfg.reply_timeout);
        }
    }

    /// The digest of every page as it landed.
    pub fn handle_digest(&mut self, now: Duration, ours: [u8; 32]) {
        if self.step != Step::Hashing {
            return;
        }
        self.sw.hashed(ours);
        self.step = Step::AwaitChecksum;
        self.expect(now, self.sw.expected(), self.cfg.reply_timeout);
        while let Some(m) = self.held.pop_front() {
            self.handle_message(now, m);
        }
    }

    /// The guest was started (or not: `Err(reason)`).
    pub fn handle_started(&mut self, now: Duration, result: Result<(), String>) {
        if self.step != Step::Starting {
            return;
        }
        match result {
            Ok(()) => {
                self.started_at = Some(now);
                self.out.push_back(DestAction::Send(Msg::Resumed));
                self.step = Step::AwaitDone;
                self.expect(now, "Done", self.cfg.reply_timeout);
            }
            Err(reason) => {
                self.out
                    .push_back(DestAction::Send(Msg::Abort { reason: format!("starting the guest failed: {reason}") }));
                self.fail(DestFailure::Start(reason));
            }
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Duration) {
        let Some((at, what, timeout)) = self.deadline else { return };
        if now < at {
            return;
        }
        if self.step == Step::Hashing {
            // Still finishing the digest: tell the source we are alive.
            self.out.push_back(DestAction::Send(Msg::Alive));
            self.expect(now, "the digest", self.cfg.alive_every);
            return;
        }
        self.fail(DestFailure::Timeout { expected: what, timeout });
    }

    /// The link or a driver operation failed.
    pub fn handle_failure(&mut self, _now: Duration) {
        self.fail(DestFailure::Driver);
    }

    fn fail(&mut self, why: DestFailure) {
        if self.end.is_some() {
            return;
        }
        let end = match self.step {
            // The guest runs here already: a lost Done does not undo the migration.
            Step::AwaitDone => DestEnd::Completed,
            // Verified but the source never said Commit: it kept the guest (or holds it).
            Step::AwaitCommit if matches!(why, DestFailure::Timeout { .. } | DestFailure::Driver) => {
                DestEnd::NotCommitted(why)
            }
            _ => DestEnd::Failed { phase: self.phase(), why },
        };
        self.finish(end);
    }

    fn finish(&mut self, end: DestEnd) {
        self.deadline = None;
        self.step = Step::Ended;
        self.end = Some(end);
    }
}

/// A sentence for `Refuse`/`Abort` messages.
pub fn describe(f: &DestFailure) -> String {
    match f {
        DestFailure::Refused { index, why } => format!("region {index} does not fit: {why}"),
        DestFailure::RegionCount { src, dst } => format!("the source has {src} regions, this memory {dst}"),
        DestFailure::Strategy(st) => format!("this destination receives pre-copy only, not {st}"),
        DestFailure::SourceAborted(r) => format!("the source aborted: {r}"),
        DestFailure::Unexpected { got } => format!("unexpected {got}"),
        DestFailure::Timeout { expected, timeout } => format!("no {expected} within {timeout:?}"),
        DestFailure::Mismatch { .. } => "digest mismatch".into(),
        DestFailure::Start(r) => format!("starting the guest failed: {r}"),
        DestFailure::Driver => "the destination failed".into(),
    }
}
