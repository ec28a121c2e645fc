//! Both sides of the switchover as pure state machines: which step the handover is at, what
//! each message means there, and — the decisions that keep the workload from running twice —
//! what becomes of the paused source copy when the session fails ([`SourceSwitchover`]), and
//! that the destination resumes only on `Commit` after a matching checksum
//! ([`DestSwitchover`]). No I/O: the drivers ([`source`](super::source),
//! [`dest`](super::dest)) feed them messages and carry out what they answer.
//!
//! Source:
//!
//! ```text
//!  Transferring ──checksum_sent──▶ AwaitingVerdict ──Verified ok──▶ Committed ──Resumed──▶ HandedOver
//!                                   │  Alive: wait                    (Commit is sent *after*
//!                                   └─ Verified mismatch → failure    entering this step)
//!
//!  failure in Transferring | AwaitingVerdict      → ResumeHere   (the destination never runs)
//!  failure in Committed, destination said Abort   → ResumeHere   (it said it does not run)
//!  failure in Committed, anything else            → HoldInDoubt  (it may run: never resume)
//!  failure in HandedOver                          → StayStopped  (it runs)
//! ```
//!
//! Destination (after `Final`):
//!
//! ```text
//!  Hashing ──hashed──▶ AwaitingSourceChecksum ──SourceChecksum──▶ answer Verified{ok}
//!                        ok:  ──▶ AwaitingCommit ──Commit──▶ Running (resume the workload)
//!                        not: ──▶ Refused (never runs)
//!  any failure before Running: the workload is not resumed here
//! ```

use super::proto::Msg;

/// Where the handover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// The workload is paused; the last pages, `Final` and `SourceChecksum` are going out.
    Transferring,
    /// Waiting for the destination's `Verified`.
    AwaitingVerdict,
    /// The checksums matched and `Commit` is (being) sent: the destination may run from now on.
    Committed,
    /// The destination said `Resumed`: it runs the workload.
    HandedOver,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Next {
    /// Keep waiting for the destination (an `Alive`).
    Wait,
    /// Send `Commit` (the state is already [`Step::Committed`]).
    SendCommit,
    /// The destination runs the workload; the switchover is complete.
    Done,
}

/// What becomes of the paused source copy when the session fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fate {
    /// The destination cannot be running the workload: resume it here.
    ResumeHere,
    /// The destination may be running it: keep the source copy paused, intact, and report.
    HoldInDoubt,
    /// The destination runs it: the source copy stays stopped.
    StayStopped,
}

/// A message the step does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The destination's checksum differs from ours.
    #[error("checksum mismatch")]
    Mismatch {
        /// The destination's checksum.
        theirs: [u8; 32],
    },
    /// A message out of turn.
    #[error("unexpected {got} while waiting for {expected}")]
    Unexpected {
        /// What the step waits for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
}

/// The source's switchover state machine.
#[derive(Debug, Clone)]
pub struct SourceSwitchover {
    step: Step,
    ours: [u8; 32],
}

impl SourceSwitchover {
    /// Our checksum.
    pub fn ours(&self) -> [u8; 32] {
        self.ours
    }

    /// A switchover whose source checksum is `ours`, starting in [`Step::Transferring`].
    pub fn new(ours: [u8; 32]) -> Self {
        SourceSwitchover { step: Step::Transferring, ours }
    }

    /// The current step.
    pub fn step(&self) -> Step {
        self.step
    }

    /// What the step waits for, for error messages.
    pub fn expected(&self) -> &'static str {
        match self.step {
            Step::Transferring => "nothing (still sending)",
            Step::AwaitingVerdict => "Verified",
            Step::Committed => "Resumed",
            Step::HandedOver => "WorkloadRate or nothing",
        }
    }

    /// `Final` and `SourceChecksum` are out: wait for the verdict.
    pub fn checksum_sent(&mut self) {
        if self.step == Step::Transferring {
            self.step = Step::AwaitingVerdict;
        }
    }

    /// A message from the destination (an `Abort` is a failure: see [`Self::fate`]).
    pub fn handle(&mut self, m: &Msg) -> Result<Next, Violation> {
        let unexpected = |s: &Self| Violation::Unexpected { expected: s.expected(), got: m.name() };
        match (self.step, m) {
            (Step::AwaitingVerdict, Msg::Alive) => Ok(Next::Wait),
            (Step::AwaitingVerdict, Msg::Verified { ok, checksum }) => {
                if *ok && *checksum == self.ours {
                    // Committed before Commit is written: a send that fails may still have
                    // delivered it.
                    self.step = Step::Committed;
                    Ok(Next::SendCommit)
                } else {
                    Err(Violation::Mismatch { theirs: *checksum })
                }
            }
            (Step::Committed, Msg::Resumed) => {
                self.step = Step::HandedOver;
                Ok(Next::Done)
            }
            _ => Err(unexpected(self)),
        }
    }

    /// What to do with the paused source copy when the session fails now. `peer_aborted`: the
    /// failure is the destination's own `Abort` (it says it does not run the workload).
    pub fn fate(&self, peer_aborted: bool) -> Fate {
        match self.step {
            Step::Transferring | Step::AwaitingVerdict => Fate::ResumeHere,
            Step::Committed if peer_aborted => Fate::ResumeHere,
            Step::Committed => Fate::HoldInDoubt,
            Step::HandedOver => Fate::StayStopped,
        }
    }
}

/// Where the destination's side of the handover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestStep {
    /// `Final` arrived: hashing our region.
    Hashing,
    /// Our checksum is known; waiting for the source's.
    AwaitingSourceChecksum,
    /// The checksums matched and `Verified{ok}` is (being) sent; waiting for `Commit`.
    AwaitingCommit,
    /// `Commit` arrived: the workload may run here.
    Running,
    /// The checksums differed: this copy never runs.
    Refused,
}

/// What the destination driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestNext {
    /// Send `Verified { ok, our checksum }` (and with `ok == false`, fail: never resume).
    Answer {
        /// The checksums match.
        ok: bool,
    },
    /// `Commit` arrived: resume the workload, then send `Resumed`.
    Resume,
}

/// The destination's switchover state machine.
#[derive(Debug, Clone)]
pub struct DestSwitchover {
    step: DestStep,
    ours: [u8; 32],
}

impl Default for DestSwitchover {
    fn default() -> Self {
        Self::new()
    }
}

impl DestSwitchover {
    /// `Final` arrived: the region is complete and is being hashed.
    pub fn new() -> Self {
        DestSwitchover { step: DestStep::Hashing, ours: [0; 32] }
    }

    /// The current step.
    pub fn step(&self) -> DestStep {
        self.step
    }

    /// Our checksum.
    pub fn ours(&self) -> [u8; 32] {
        self.ours
    }

    /// What the step waits for, for error messages.
    pub fn expected(&self) -> &'static str {
        match self.step {
            DestStep::Hashing => "nothing (still hashing)",
            DestStep::AwaitingSourceChecksum => "SourceChecksum",
            DestStep::AwaitingCommit => "Commit",
            DestStep::Running | DestStep::Refused => "Done",
        }
    }

    /// Our region's checksum is `ours`.
    pub fn hashed(&mut self, ours: [u8; 32]) {
        if self.step == DestStep::Hashing {
            self.ours = ours;
            self.step = DestStep::AwaitingSourceChecksum;
        }
    }

    /// A message from the source (an `Abort` is a failure: nothing is resumed).
    pub fn handle(&mut self, m: &Msg) -> Result<DestNext, Violation> {
        match (self.step, m) {
            (DestStep::AwaitingSourceChecksum, Msg::SourceChecksum { checksum }) => {
                let ok = *checksum == self.ours;
                self.step = if ok { DestStep::AwaitingCommit } else { DestStep::Refused };
                Ok(DestNext::Answer { ok })
            }
            (DestStep::AwaitingCommit, Msg::Commit) => {
                self.step = DestStep::Running;
                Ok(DestNext::Resume)
            }
            _ => Err(Violation::Unexpected { expected: self.expected(), got: m.name() }),
        }
    }

    /// Whether the workload may run here (only after `Commit`).
    pub fn may_run(&self) -> bool {
        self.step == DestStep::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: [u8; 32] = [7; 32];

    fn every_message() -> Vec<Msg> {
        vec![
            Msg::Begin {
                strategy: super::super::proto::Strategy::Precopy,
                regions: vec![super::super::proto::RegionDesc { len: 1, page_size: 4096 }],
            },
            Msg::Accept,
            Msg::Refuse { reason: "x".into() },
            Msg::Zero { runs: vec![] },
            Msg::IterationDone { iter: 1, pages: 1, dirty: 1 },
            Msg::Final,
            Msg::DeviceState { last: true, bytes: vec![1] },
            Msg::Placed { runs: vec![] },
            Msg::IterationAck { iter: 1 },
            Msg::SourceChecksum { checksum: OURS },
            Msg::Verified { ok: true, checksum: OURS },
            Msg::Verified { ok: false, checksum: OURS },
            Msg::Verified { ok: true, checksum: [8; 32] },
            Msg::Commit,
            Msg::Alive,
            Msg::Resumed,
            Msg::Done,
            Msg::Abort { reason: "x".into() },
        ]
    }

    fn at(step: Step) -> SourceSwitchover {
        let mut s = SourceSwitchover::new(OURS);
        if step == Step::Transferring {
            return s;
        }
        s.checksum_sent();
        if step == Step::AwaitingVerdict {
            return s;
        }
        assert_eq!(s.handle(&Msg::Verified { ok: true, checksum: OURS }), Ok(Next::SendCommit));
        if step == Step::Committed {
            return s;
        }
        assert_eq!(s.handle(&Msg::Resumed), Ok(Next::Done));
        s
    }

    #[test]
    fn the_happy_path() {
        let mut s = SourceSwitchover::new(OURS);
        assert_eq!(s.fate(false), Fate::ResumeHere);
        s.checksum_sent();
        assert_eq!(s.handle(&Msg::Alive), Ok(Next::Wait));
        assert_eq!(s.handle(&Msg::Alive), Ok(Next::Wait));
        assert_eq!(s.step(), Step::AwaitingVerdict);
        assert_eq!(s.handle(&Msg::Verified { ok: true, checksum: OURS }), Ok(Next::SendCommit));
        assert_eq!(s.step(), Step::Committed);
        assert_eq!(s.handle(&Msg::Resumed), Ok(Next::Done));
        assert_eq!(s.step(), Step::HandedOver);
        assert_eq!(s.fate(false), Fate::StayStopped);
    }

    #[test]
    fn a_mismatch_or_a_false_verdict_never_commits() {
        for m in [Msg::Verified { ok: false, checksum: OURS }, Msg::Verified { ok: true, checksum: [8; 32] }] {
            let mut s = at(Step::AwaitingVerdict);
            assert!(matches!(s.handle(&m), Err(Violation::Mismatch { .. })), "{m:?}");
            assert_eq!(s.step(), Step::AwaitingVerdict);
            assert_eq!(s.fate(false), Fate::ResumeHere);
        }
    }

    /// Every message in every step: only the listed transitions move the state, and from the
    /// moment Commit may be out, no failure resumes the source — unless the destination
    /// itself aborted.
    #[test]
    fn every_message_in_every_step() {
        let steps = [Step::Transferring, Step::AwaitingVerdict, Step::Committed, Step::HandedOver];
        for step in steps {
            for m in every_message() {
                let mut s = at(step);
                let r = s.handle(&m);
                let allowed = matches!(
                    (step, &m),
                    (Step::AwaitingVerdict, Msg::Alive)
                        | (Step::AwaitingVerdict, Msg::Verified { ok: true, checksum: OURS })
                        | (Step::Committed, Msg::Resumed)
                );
                assert_eq!(r.is_ok(), allowed, "{step:?} {m:?}: {r:?}");
                if !allowed {
                    assert_eq!(s.step(), step, "{step:?} {m:?} moved the state");
                }
                for aborted in [false, true] {
                    let f = s.fate(aborted);
                    match s.step() {
                        Step::Transferring | Step::AwaitingVerdict => assert_eq!(f, Fate::ResumeHere),
                        Step::Committed => {
                            assert_eq!(f, if aborted { Fate::ResumeHere } else { Fate::HoldInDoubt })
                        }
                        Step::HandedOver => assert_eq!(f, Fate::StayStopped),
                    }
                }
            }
        }
    }

    #[test]
    fn checksum_sent_only_moves_forward() {
        let mut s = at(Step::Committed);
        s.checksum_sent();
        assert_eq!(s.step(), Step::Committed);
    }
}

#[cfg(test)]
mod dest_tests {
    use super::*;

    const OURS: [u8; 32] = [7; 32];

    fn every_message() -> Vec<Msg> {
        vec![
            Msg::Begin {
                strategy: super::super::proto::Strategy::Precopy,
                regions: vec![super::super::proto::RegionDesc { len: 1, page_size: 4096 }],
            },
            Msg::Accept,
            Msg::Zero { runs: vec![] },
            Msg::IterationDone { iter: 1, pages: 1, dirty: 1 },
            Msg::Final,
            Msg::DeviceState { last: true, bytes: vec![1] },
            Msg::Placed { runs: vec![] },
            Msg::IterationAck { iter: 1 },
            Msg::SourceChecksum { checksum: OURS },
            Msg::SourceChecksum { checksum: [8; 32] },
            Msg::Verified { ok: true, checksum: OURS },
            Msg::Commit,
            Msg::Alive,
            Msg::Resumed,
            Msg::Done,
            Msg::Abort { reason: "x".into() },
        ]
    }

    fn at(step: DestStep) -> DestSwitchover {
        let mut d = DestSwitchover::new();
        match step {
            DestStep::Hashing => return d,
            _ => d.hashed(OURS),
        }
        match step {
            DestStep::AwaitingSourceChecksum => d,
            DestStep::Refused => {
                assert_eq!(d.handle(&Msg::SourceChecksum { checksum: [8; 32] }), Ok(DestNext::Answer { ok: false }));
                d
            }
            _ => {
                assert_eq!(d.handle(&Msg::SourceChecksum { checksum: OURS }), Ok(DestNext::Answer { ok: true }));
                if step == DestStep::Running {
                    assert_eq!(d.handle(&Msg::Commit), Ok(DestNext::Resume));
                }
                d
            }
        }
    }

    #[test]
    fn the_happy_path_resumes_only_on_commit() {
        let mut d = DestSwitchover::new();
        assert!(!d.may_run());
        d.hashed(OURS);
        assert_eq!(d.ours(), OURS);
        assert_eq!(d.handle(&Msg::SourceChecksum { checksum: OURS }), Ok(DestNext::Answer { ok: true }));
        assert!(!d.may_run(), "a matching checksum alone does not hand over");
        assert_eq!(d.handle(&Msg::Commit), Ok(DestNext::Resume));
        assert!(d.may_run());
    }

    /// Every message in every step: `Resume` comes only from `Commit` after a matching
    /// checksum, and a refused copy never runs.
    #[test]
    fn every_message_in_every_step() {
        let steps = [
            DestStep::Hashing,
            DestStep::AwaitingSourceChecksum,
            DestStep::AwaitingCommit,
            DestStep::Running,
            DestStep::Refused,
        ];
        for step in steps {
            for m in every_message() {
                let mut d = at(step);
                let r = d.handle(&m);
                match (step, &m) {
                    (DestStep::AwaitingSourceChecksum, Msg::SourceChecksum { checksum }) => {
                        assert_eq!(r, Ok(DestNext::Answer { ok: *checksum == OURS }));
                        assert!(!d.may_run());
                    }
                    (DestStep::AwaitingCommit, Msg::Commit) => {
                        assert_eq!(r, Ok(DestNext::Resume));
                        assert!(d.may_run());
                    }
                    _ => {
                        assert!(matches!(r, Err(Violation::Unexpected { .. })), "{step:?} {m:?}: {r:?}");
                        assert_eq!(d.step(), step, "{step:?} {m:?} moved the state");
                        assert_eq!(d.may_run(), step == DestStep::Running);
                    }
                }
            }
        }
    }
}
