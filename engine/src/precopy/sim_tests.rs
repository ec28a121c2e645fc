//! Whole migrations of the two I/O-free sessions, [`SourceSession`] and [`DestSession`],
//! against each other in virtual time: a simulated guest (page versions, a dirtier), a
//! simulated link (bandwidth, latency, a cut or a freeze at any message) and simulated
//! memory on both ends. The session's decisions — when to stop, what becomes of the guest on
//! every failure — are checked without sockets or clocks; the same rules are tested over
//! real sockets in `tests/tests/precopy_switchover.rs`.

use std::collections::VecDeque;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::dest_session::{DestAction, DestEnd, DestSession, DestSessionConfig};
use super::proto::{Msg, RegionDesc};
use super::session::{Action, BatchDone, End, SessionConfig, SourceSession};
use crate::integrity::PageDigests;
use crate::policy::{IbrahimConfig, PolicyConfig};
use livemig_transport::PageBitmap;

const PAGES: usize = 4096;
/// Pages the guest ever writes (the rest stay zero, known without reading).
const WSS: usize = 1024;
/// Link: pages per second and one-way latency.
const BANDWIDTH: f64 = 20_000.0;
const LATENCY: Duration = Duration::from_micros(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The link dies instead of carrying the n-th message (both directions counted).
    Cut(usize),
    /// The destination stops answering from its n-th message on (the link stays up).
    Freeze(usize),
}

/// The destination: its session and simulated memory.
#[derive(Debug)]
struct Dest {
    sess: DestSession,
    mem: Vec<u64>,
    runs: bool,
    state: Vec<u8>,
    frozen: bool,
}

struct Sim {
    now: Duration,
    rng: rand::rngs::StdRng,
    src: Vec<u64>,
    dirty: PageBitmap,
    dirty_rate: f64,
    paused: bool,
    guest_running_here: bool,
    digests: PageDigests,
    dest: Dest,
    /// Messages to the source: (arrival time, message).
    inbox: VecDeque<(Duration, Msg)>,
    sent: usize,
    fault: Fault,
    cut: bool,
}

fn bytes(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

impl Sim {
    fn new(fault: Fault, dirty_rate: f64) -> Self {
        let mut src = vec![0u64; PAGES];
        for (p, v) in src.iter_mut().enumerate().take(WSS) {
            *v = p as u64 + 1;
        }
        Sim {
            now: Duration::ZERO,
            rng: rand::rngs::StdRng::seed_from_u64(0x51),
            src,
            dirty: PageBitmap::new(PAGES),
            dirty_rate,
            paused: false,
            guest_running_here: true,
            digests: PageDigests::new(PAGES, 8),
            // The destination's memory starts with garbage: zero pages must be placed.
            dest: Dest {
                sess: DestSession::new(
                    vec![RegionDesc { len: (PAGES * 8) as u64, page_size: 8 }],
                    DestSessionConfig {
                        reply_timeout: Duration::from_secs(5),
                        alive_every: Duration::from_millis(250),
                    },
                ),
                mem: vec![u64::MAX; PAGES],
                runs: false,
                state: Vec::new(),
                frozen: false,
            },
            inbox: VecDeque::new(),
            sent: 0,
            fault,
            cut: false,
        }
    }

    /// The guest runs for `d` (unless paused).
    fn run_guest(&mut self, d: Duration) {
        if self.paused || !self.guest_running_here {
            return;
        }
        let n = (self.dirty_rate * d.as_secs_f64()) as usize;
        for _ in 0..n {
            let p = self.rng.gen_range(0..WSS);
            self.src[p] += 1;
            self.dirty.set(p);
        }
    }

    /// Counts a message against the fault plan; false if it must not get through.
    fn passes(&mut self) -> bool {
        self.sent += 1;
        match self.fault {
            Fault::Cut(n) if self.sent >= n => self.cut = true,
            Fault::Freeze(n) if self.sent >= n => self.dest.frozen = true,
            _ => {}
        }
        !self.cut
    }

    /// Source → destination.
    fn deliver(&mut self, m: Msg) -> bool {
        if !self.passes() {
            return false;
        }
        if self.dest.frozen {
            return true;
        }
        let at = self.now + LATENCY;
        self.dest.sess.handle_message(at, m);
        self.run_dest(at);
        true
    }

    /// Carries out the destination session's actions at time `at`.
    fn run_dest(&mut self, at: Duration) {
        while let Some(a) = self.dest.sess.poll_action() {
            match a {
                DestAction::Send(r) => {
                    if self.passes() && !self.dest.frozen {
                        self.inbox.push_back((at + LATENCY, r));
                    }
                }
                DestAction::PlaceZero(runs) => {
                    for r in runs {
                        for p in r.first..r.first + r.pages as u64 {
                            self.dest.mem[p as usize] = 0;
                        }
                    }
                }
                DestAction::HashPlaced(_) | DestAction::Progress { .. } => {}
                DestAction::FinishDigest => {
                    let mut d = PageDigests::new(PAGES, 8);
                    for (p, v) in self.dest.mem.iter().enumerate() {
                        d.record_bytes(p, &bytes(*v));
                    }
                    self.dest.sess.handle_digest(at, d.digest().to_bytes());
                }
                DestAction::StartGuest(state) => {
                    self.dest.state = state;
                    self.dest.runs = true;
                    self.dest.sess.handle_started(at, Ok(()));
                }
            }
        }
    }
}

/// Runs one migration to its end; returns the session's end and the simulation.
fn migrate(fault: Fault, dirty_rate: f64) -> (End, Sim) {
    let cfg = SessionConfig { reply_timeout: Duration::from_secs(5), switchover_idle: Duration::from_secs(2) };
    let regions = vec![RegionDesc { len: (PAGES * 8) as u64, page_size: 8 }];
    let policy = PolicyConfig::Ibrahim(IbrahimConfig {
        sampling_period_ms: std::num::NonZeroU64::new(200).expect("non-zero"),
        ..Default::default()
    });
    let mut s = SourceSession::new(regions, &policy, cfg);
    let mut sim = Sim::new(fault, dirty_rate);
    for _ in 0..100_000 {
        while let Some(a) = s.poll_action() {
            match a {
                Action::Send(m) => {
                    if !sim.deliver(m) {
                        s.handle_failure(sim.now, None);
                    }
                }
                Action::StartTracking => {
                    let mut zero = PageBitmap::new(PAGES);
                    for p in 0..PAGES {
                        if sim.src[p] == 0 {
                            zero.set(p);
                        }
                    }
                    s.handle_tracking_started(sim.now, &zero);
                }
                Action::ZeroPages(runs) => {
                    for r in runs {
                        sim.digests.record_zero(r.first as usize, r.pages as usize);
                    }
                }
                Action::SendBatch { budget } => {
                    let src = sim.src.clone();
                    let picked = s.pick(budget, &mut |p| src[p] == 0);
                    s.announce_zero(picked.zero_runs);
                    let pages: Vec<usize> = s.schedule().batch().iter_ones().collect();
                    let d = Duration::from_secs_f64(pages.len() as f64 / BANDWIDTH);
                    if !sim.cut {
                        for &p in &pages {
                            sim.dest.mem[p] = sim.src[p];
                            sim.digests.record_bytes(p, &bytes(sim.src[p]));
                        }
                    }
                    sim.run_guest(d + LATENCY);
                    sim.now += d + LATENCY;
                    let b = BatchDone {
                        data: picked.data,
                        zero: picked.zero,
                        post_time: d,
                        wait_time: LATENCY,
                        bytes: pages.len() as u64 * 8,
                    };
                    if sim.cut {
                        s.handle_failure(sim.now, None);
                    } else {
                        s.handle_batch_done(sim.now, b);
                    }
                }
                Action::CollectDirty => {
                    let d = std::mem::replace(&mut sim.dirty, PageBitmap::new(PAGES));
                    s.pending_mut().or_assign(&d);
                    s.handle_collected(sim.now);
                }
                Action::Interval(_) => {}
                Action::Wait { until } => {
                    sim.run_guest(until.saturating_sub(sim.now));
                    sim.now = sim.now.max(until);
                    s.handle_timeout(sim.now);
                }
                Action::PauseGuest => {
                    sim.paused = true;
                    s.handle_paused(sim.now);
                }
                Action::SaveState => s.handle_state(sim.now, b"vcpu registers"),
                Action::Digest => s.handle_digest(sim.now, sim.digests.digest().to_bytes()),
                Action::ResumeGuest => sim.paused = false,
                Action::HandedOver => sim.guest_running_here = false,
                Action::StopTracking => {}
            }
        }
        if let Some(e) = s.end() {
            return (e.clone(), sim);
        }
        // Wait for the destination: the next reply, or the session's deadline.
        let deadline = s.poll_timeout().expect("a session that waits has a deadline");
        match sim.inbox.front() {
            Some(&(at, _)) if at <= deadline && !sim.cut => {
                let (at, m) = sim.inbox.pop_front().expect("front exists");
                sim.run_guest(at.saturating_sub(sim.now));
                sim.now = sim.now.max(at);
                s.handle_message(sim.now, m);
            }
            _ if sim.cut => {
                // The closed connection is noticed on the next wait.
                s.handle_failure(sim.now, None);
            }
            _ => {
                sim.run_guest(deadline.saturating_sub(sim.now));
                sim.now = sim.now.max(deadline);
                s.handle_timeout(sim.now);
            }
        }
    }
    panic!("the session did not end");
}

#[test]
fn a_migration_completes_in_virtual_time_and_the_copy_is_exact() {
    let (end, sim) = migrate(Fault::None, 50_000.0);
    assert!(matches!(end, End::Completed(_)), "{end:?}");
    assert!(sim.dest.runs && !sim.guest_running_here);
    assert_eq!(sim.dest.mem, sim.src, "the destination equals the frozen source");
    assert_eq!(sim.dest.state, b"vcpu registers");
    assert_eq!(sim.dest.sess.end(), Some(&DestEnd::Completed));
}

/// The link dies at every message of the session in turn: the guest never runs twice and
/// never nowhere — before `Commit` the source resumes; once `Commit` may be out, the source
/// holds its copy paused (in doubt) whatever the destination did; after `Resumed` it stays
/// stopped.
#[test]
fn a_cut_at_any_message_never_runs_the_guest_twice() {
    let (_, clean) = migrate(Fault::None, 50_000.0);
    let total = clean.sent;
    assert!(total > 10, "{total} messages");
    let mut seen = [0usize; 4];
    for n in 1..=total {
        let (end, sim) = migrate(Fault::Cut(n), 50_000.0);
        seen[match end {
            End::Failed { .. } => 0,
            End::InDoubt { .. } => 1,
            End::Completed(_) => 2,
            _ => 3,
        }] += 1;
        let here = sim.guest_running_here && !sim.paused;
        match &end {
            End::Failed { .. } => {
                assert!(here, "cut at {n}: failed, so the source must run: {end:?}");
                assert!(!sim.dest.runs, "cut at {n}: the destination must not run");
            }
            End::InDoubt { .. } => {
                assert!(!here && sim.guest_running_here, "cut at {n}: in doubt holds the copy paused");
            }
            End::Completed(_) | End::FailedAfterHandover { .. } => {
                assert!(sim.dest.runs && !sim.guest_running_here, "cut at {n}: {end:?}");
            }
            End::Aborted(_) => panic!("cut at {n}: no policy abort expected"),
        }
        assert!(!(here && sim.dest.runs), "cut at {n}: both copies run: {end:?}");
    }
    // Every kind of ending was reached: failed before Commit, in doubt after it, and
    // completed (a cut after Resumed only loses Done).
    assert!(seen[0] > 0 && seen[1] > 0 && seen[2] > 0, "endings seen {seen:?} over {total} cuts");
}

/// A destination that goes silent (the link stays up) costs the source at most its timeout:
/// before `Commit` it resumes, after it holds its copy in doubt.
#[test]
fn a_frozen_destination_is_given_up_after_the_timeout() {
    let (_, clean) = migrate(Fault::None, 50_000.0);
    for n in [3, clean.sent - 4, clean.sent - 2] {
        let (end, sim) = migrate(Fault::Freeze(n), 50_000.0);
        match &end {
            End::Failed { why, .. } => {
                assert!(matches!(why, super::session::Failure::Timeout { .. }), "freeze at {n}: {end:?}");
                assert!(sim.guest_running_here && !sim.paused && !sim.dest.runs);
            }
            End::InDoubt { .. } => assert!(sim.paused && !sim.dest.runs),
            other => panic!("freeze at {n}: {other:?}"),
        }
    }
}
