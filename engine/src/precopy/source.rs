//! The source driver: pre-copy rounds under a convergence policy, then stop-and-copy.
//!
//! This is the thin I/O layer around the pure [`ConvergencePolicy`]: it reads the clock,
//! harvests the dirty log, posts writes and exchanges the [`proto`] messages.
//! See the module doc of [`precopy`](super) for the message flow.
//!
//! Failure contract: on a policy abort, a transport error or a refused handshake the guest
//! keeps running at the source (it is resumed if the failure hit during stop-and-copy) and
//! dirty tracking is disarmed.

use std::time::{Duration, Instant};

use livemig_transport::{
    CoalesceConfig, Coalescer, PageBitmap, RegionId, Transport, TransportError, WorkRequest, WriteRequest,
};

use super::proto::{self, Msg, PageRun, RegionDesc, MAX_RUNS, MAX_STATE_CHUNK};
use super::schedule::Schedule;
use super::switchover::{Fate, Next, SourceSwitchover, Violation};
use super::{check_fit, IterationLine, Mismatch, Outcome, Phase, Summary};
use crate::dirty::{DirtyError, DirtySource};
use crate::guest::{GuestControl, GuestError, GuestMemory};
use crate::integrity::{Digest, PageDigests};
use crate::policy::{self, ConvergencePolicy, Decision, IntervalReport, PolicyConfig};

/// Source-side settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Convergence policy and its parameters.
    pub policy: PolicyConfig,
    /// How dirty pages become writes.
    pub coalesce: CoalesceConfig,
    /// How long to wait for a control reply from the destination.
    pub reply_timeout: Duration,
    /// Stop-and-copy bound: while the guest is paused, a destination that sends nothing
    /// (no reply, no `Alive`) for this long is given up — before `Commit` the source resumes,
    /// so a frozen destination costs at most this much extra downtime.
    pub switchover_idle: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            policy: PolicyConfig::default(),
            coalesce: CoalesceConfig::default(),
            reply_timeout: super::REPLY_TIMEOUT,
            switchover_idle: Duration::from_secs(20),
        }
    }
}

/// Why a migration failed at the source. In every case but [`SourceError::InDoubt`] the
/// guest runs at the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The destination's exposed regions cannot take ours (checked before sending anything).
    #[error("the destination cannot take region {index} of the guest memory")]
    Incompatible {
        /// Which region (in page-space order).
        index: usize,
        /// Why.
        #[source]
        source: Mismatch,
    },
    /// The destination refused `Begin`.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The source region is not registered with the transport.
    #[error("source region {0} is not registered with the transport")]
    NotRegistered(RegionId),
    /// The coalescer configuration is invalid.
    #[error("invalid coalescing configuration")]
    Coalesce(#[source] livemig_transport::coalesce::CoalesceConfigError),
    /// The transport failed (destination died, link cut, …).
    #[error("transport failed during {phase}")]
    Transport {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The destination sent an undecodable message.
    #[error("the destination sent an invalid message during {phase}")]
    Protocol {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: proto::ProtoError,
    },
    /// The destination sent a message out of turn.
    #[error("unexpected {got} from the destination while waiting for {expected} during {phase}")]
    Unexpected {
        /// Where.
        phase: Phase,
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// No reply in time.
    #[error("no {expected} from the destination within {timeout:?} during {phase}")]
    Timeout {
        /// Where.
        phase: Phase,
        /// What was expected.
        expected: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The destination gave up.
    #[error("the destination aborted during {phase}: {reason}")]
    PeerAborted {
        /// Where.
        phase: Phase,
        /// Its reason.
        reason: String,
    },
    /// The destination's memory differs from ours after stop-and-copy.
    #[error("digest mismatch: source {source_sum}, destination {dest_sum}; the source guest resumed")]
    ChecksumMismatch {
        /// Ours (hex).
        source_sum: String,
        /// Theirs (hex).
        dest_sum: String,
    },
    /// A page was never sent, so the digest cannot cover it (a driver bug, reported rather
    /// than hidden).
    #[error("page {page} was never sent; the source guest resumed")]
    Unsent {
        /// The first such page.
        page: usize,
    },
    /// Dirty tracking failed.
    #[error("dirty tracking failed")]
    Dirty(#[source] DirtyError),
    /// Pausing, resuming or saving the guest failed.
    #[error("guest control failed")]
    Guest(#[source] GuestError),
    /// The session failed at or after sending `Commit`: the destination may already run the
    /// guest. The source copy stays **paused** (never resumed, memory intact) so the guest
    /// runs at most once; whoever holds the source decides (resume it only after making sure
    /// the destination does not run it).
    #[error("switchover in doubt: the session failed at or after Commit; the destination may be running the guest, so the source copy stays paused")]
    InDoubt(#[source] Box<SourceError>),
}

impl SourceError {
    /// Whether the source workload was left paused because the switchover is in doubt.
    pub fn in_doubt(&self) -> bool {
        matches!(self, SourceError::InDoubt(_))
    }
}

/// Migrates `memory` (every region registered in `t.regions()`), written by `guest` and
/// tracked by `dirty`, to the peer of `t`. Calls `on_interval` once per pre-copy interval.
/// Returns the summary of a completed or policy-aborted migration; every other ending is an
/// error. See [`GuestControl`] for the order of the guest calls.
pub fn migrate(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    guest: &mut dyn GuestControl,
    dirty: &mut dyn DirtySource,
    cfg: &SourceConfig,
    on_interval: &mut dyn FnMut(&IterationLine),
) -> Result<Summary, SourceError> {
    let span = tracing::info_span!("migrate", memory_bytes = memory.len(), regions = memory.regions().len(), transport = %t.kind());
    let _span = span.enter();
    let ps = memory.page_size();
    let pages = memory.pages();
    if let Some(r) = memory.regions().iter().find(|r| t.regions().get(r.id()).is_none()) {
        return Err(SourceError::NotRegistered(r.id()));
    }
    let coalescer = Coalescer::new(cfg.coalesce).map_err(SourceError::Coalesce)?;
    // Refuse before sending anything: the transport handshake told us what the peer exposes.
    let remotes = pick_remotes(t, memory)?;

    let phase = Phase::Handshake;
    let regions = memory.regions().iter().map(|r| RegionDesc { len: r.len(), page_size: r.page_size() }).collect();
    send(t, phase, &Msg::Begin { regions })?;
    match recv(t, phase, "Accept", cfg.reply_timeout)? {
        Msg::Accept => {}
        Msg::Refuse { reason } => return Err(SourceError::Refused(reason)),
        other => return Err(unexpected(phase, "Accept", &other)),
    }

    tracing::info!(pages, page_size = ps, "destination accepted; pre-copy starts");
    let mut s = Sender {
        memory: memory.clone(),
        remotes,
        coalescer,
        sched: Schedule::new(pages),
        digests: PageDigests::new(pages, ps),
        region_batch: memory.regions().iter().map(|r| PageBitmap::new(r.pages())).collect(),
        page_buf: vec![0u8; ps as usize],
        wrs: Vec::new(),
        bytes: 0,
        pages_sent: 0,
        zero_pages: 0,
    };
    let mut policy = policy::build(&cfg.policy, policy::RegionInfo::new(pages, ps as usize));
    let start = Instant::now();
    let progress0 = guest.progress();
    let mut summary = Summary {
        outcome: Outcome::Aborted,
        policy: policy.name().to_string(),
        transport: t.kind().to_string(),
        tracker: dirty.mechanism().to_string(),
        region_bytes: memory.len(),
        regions: memory.regions().len(),
        page_size: ps,
        total_s: 0.0,
        downtime_ms: None,
        final_transfer_ms: None,
        final_pages: None,
        device_state_bytes: None,
        bytes: 0,
        pages_sent: 0,
        zero_pages: 0,
        iterations: 0,
        end_rule: String::new(),
        end_reason: String::new(),
        guest_rate_during: None,
        checksum: None,
        intervals: Vec::new(),
    };
    let rate_since = |g: &dyn GuestControl, since: Instant| match (progress0, g.progress()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / since.elapsed().as_secs_f64().max(1e-9)),
        _ => None,
    };

    // Pre-copy. Errors here leave the guest running; tracking is disarmed on the way out.
    dirty.start().map_err(SourceError::Dirty)?;
    // Pages never populated are zero: announced without reading them. Scanned after arming
    // the tracker, so a page written from now on is dirty and sent anyway.
    let runs = s.sched.take_known_zero(&memory.known_zero_pages());
    s.zero_pages += runs.iter().map(|r| r.pages as u64).sum::<u64>();
    let decision = s.announce_zero(t, Phase::Precopy, &runs).and_then(|()| {
        precopy_rounds(t, &mut s, dirty, policy.as_mut(), &*guest, start, cfg.reply_timeout, &mut summary, on_interval)
    });
    let reason = match decision {
        Err(e) => {
            dirty.stop();
            if !matches!(e, SourceError::Transport { .. }) {
                let _ = t.send_message(&Msg::Abort { reason: e.to_string() }.encode());
            }
            return Err(e);
        }
        Ok(Decision::StopAndCopy(r)) => r,
        Ok(Decision::Abort(r)) => {
            tracing::info!(reason = %r, "pre-copy aborted by the policy; the source keeps running");
            dirty.stop();
            let _ = t.send_message(&Msg::Abort { reason: format!("pre-copy did not converge: {r}") }.encode());
            summary.guest_rate_during = rate_since(&*guest, start);
            return Ok(finish(summary, &s, start.elapsed(), r));
        }
        Ok(_) => unreachable!("precopy_rounds returns only final decisions"),
    };

    // Stop-and-copy: downtime starts with the pause.
    let paused_at = Instant::now();
    if let Err(e) = guest.pause() {
        dirty.stop();
        let _ = t.send_message(&Msg::Abort { reason: format!("pausing the guest failed: {e}") }.encode());
        return Err(SourceError::Guest(e));
    }
    summary.guest_rate_during = rate_since(&*guest, start);
    tracing::info!(reason = %reason, "stop-and-copy: guest paused");
    let mut sw = None;
    let res = stop_and_copy(t, &mut s, dirty, guest, cfg, start, paused_at, &mut summary, &mut sw);
    dirty.stop();
    if let Err(e) = res {
        // What becomes of the paused copy is the state machine's call (see `switchover`):
        // once Commit may have reached the destination, resuming here could run the guest
        // twice.
        let fate = sw.map_or(Fate::ResumeHere, |sw| sw.fate(matches!(e, SourceError::PeerAborted { .. })));
        match fate {
            Fate::ResumeHere => {}
            Fate::HoldInDoubt => {
                tracing::error!(error = %e, "switchover in doubt; the source copy stays paused");
                return Err(SourceError::InDoubt(Box::new(e)));
            }
            // Past the handover stop_and_copy fails no more (it only logs): keep it that way.
            Fate::StayStopped => return Err(e),
        }
        // The destination did not take over: the source stays authoritative.
        guest.resume().map_err(SourceError::Guest)?;
        if !matches!(e, SourceError::Transport { .. }) {
            let _ = t.send_message(&Msg::Abort { reason: e.to_string() }.encode());
        }
        return Err(e);
    }
    summary.outcome = Outcome::Completed;
    let elapsed = start.elapsed();
    Ok(finish(summary, &s, elapsed, reason))
}

fn finish(mut summary: Summary, s: &Sender, elapsed: Duration, reason: policy::Reason) -> Summary {
    if summary.total_s == 0.0 {
        summary.total_s = elapsed.as_secs_f64();
    }
    summary.bytes = s.bytes;
    summary.pages_sent = s.pages_sent;
    summary.zero_pages = s.zero_pages;
    summary.end_rule = reason.label().to_string();
    summary.end_reason = reason.to_string();
    summary
}

/// The peer region each of ours is written to: the peer's writable regions in id order,
/// region `i` to the `i`-th, each checked to fit.
fn pick_remotes(t: &dyn Transport, memory: &GuestMemory) -> Result<Vec<RegionId>, SourceError> {
    let mut peer: Vec<_> = t.peer_regions().iter().filter(|r| r.access.remote_write).copied().collect();
    peer.sort_by_key(|r| r.id);
    let mut out = Vec::with_capacity(memory.regions().len());
    for (index, r) in memory.regions().iter().enumerate() {
        let Some(d) = peer.get(index) else {
            return Err(SourceError::Incompatible { index, source: Mismatch::NoRegion });
        };
        check_fit(r.len(), r.page_size(), d.len, d.page_size)
            .map_err(|source| SourceError::Incompatible { index, source })?;
        out.push(d.id);
    }
    Ok(out)
}

/// Pages per posting slice (8 MiB of 4 KiB pages): the unit announced in one `Placed` round.
const SLICE_PAGES: usize = 2048;

/// Sending state: the schedule (pending set, cursor, retransmission history), totals.
struct Sender {
    memory: GuestMemory,
    /// Peer region of each of ours.
    remotes: Vec<RegionId>,
    coalescer: Coalescer,
    sched: Schedule,
    /// The incremental digest of what was sent (see `integrity`).
    digests: PageDigests,
    /// Scratch: the batch's pages of each region, indexed within the region.
    region_batch: Vec<PageBitmap>,
    page_buf: Vec<u8>,
    wrs: Vec<WorkRequest>,
    bytes: u64,
    pages_sent: u64,
    zero_pages: u64,
}

/// Counts of one batch.
#[derive(Debug, Default, Clone, Copy)]
struct Batch {
    data: usize,
    zero: usize,
    post_time: Duration,
    wait_time: Duration,
}

impl Sender {
    /// Announces zero pages (the destination zeroes them) and records their digest terms.
    fn announce_zero(&mut self, t: &mut dyn Transport, phase: Phase, runs: &[PageRun]) -> Result<(), SourceError> {
        for chunk in runs.chunks(MAX_RUNS) {
            send(t, phase, &Msg::Zero { runs: chunk.to_vec() })?;
        }
        for r in runs {
            self.digests.record_zero(r.first as usize, r.pages as usize);
        }
        Ok(())
    }

    /// Takes up to `budget` data pages from the pending set, announces never-sent zero pages
    /// as flags, posts the rest as coalesced writes and waits for them.
    fn send_batch(&mut self, t: &mut dyn Transport, budget: usize, phase: Phase) -> Result<Batch, SourceError> {
        let mut b = Batch::default();
        let t0 = Instant::now();
        let (memory, buf) = (&self.memory, &mut self.page_buf);
        let picked = self.sched.pick(budget, &mut |p| {
            let Some((i, local)) = memory.locate(p) else { return false };
            memory.regions()[i].read_at((local * buf.len()) as u64, buf);
            buf.iter().all(|&x| x == 0)
        });
        b.data = picked.data;
        b.zero = picked.zero;
        self.announce_zero(t, phase, &picked.zero_runs)?;
        for i in 0..self.memory.regions().len() {
            self.post_region(t, i, phase)?;
        }
        b.post_time = t0.elapsed();
        let t1 = Instant::now();
        t.flush().map_err(|source| SourceError::Transport { phase, source })?;
        b.wait_time = t1.elapsed();
        self.pages_sent += b.data as u64;
        self.zero_pages += b.zero as u64;
        Ok(b)
    }

    /// Posts the batch's pages of region `i` in slices; after each slice tells the
    /// destination which pages it holds (ordered after the writes) and hashes them here while
    /// they travel: both digests keep pace with the transfer, and at the end of the batch only
    /// its last slice is left to hash.
    fn post_region(&mut self, t: &mut dyn Transport, i: usize, phase: Phase) -> Result<(), SourceError> {
        let region = self.memory.regions()[i].clone();
        let base = self.memory.base(i);
        extract(self.sched.batch(), base, &mut self.region_batch[i]);
        let local = region.id();
        let remote = self.remotes[i];
        let mut from = 0;
        while from < self.region_batch[i].len() {
            self.wrs.clear();
            let (next, st) = self.coalescer.coalesce_from(&self.region_batch[i], from, SLICE_PAGES, &mut self.wrs);
            let slice = (base + from, base + next);
            from = next;
            if st.wrs == 0 {
                break;
            }
            let reqs: Vec<WriteRequest<'_>> = self
                .wrs
                .iter()
                .map(|w| WriteRequest { local, segments: &w.segments, remote, remote_offset: w.offset })
                .collect();
            for chunk in reqs.chunks(256) {
                t.post_writes(chunk).map_err(|source| SourceError::Transport { phase, source })?;
            }
            drop(reqs);
            self.bytes += self.wrs.iter().map(|w| w.len).sum::<u64>();
            let runs = self.sched.batch_runs_in(slice.0, slice.1);
            for chunk in runs.chunks(MAX_RUNS) {
                send(t, phase, &Msg::Placed { runs: chunk.to_vec() })?;
            }
            for r in &runs {
                for p in r.first as usize..r.first as usize + r.pages as usize {
                    self.digests.record_from(p, &region, p - base);
                }
            }
        }
        Ok(())
    }
}

/// Copies bits `[base, base + dst.len())` of `src` into `dst` (cleared first).
fn extract(src: &PageBitmap, base: usize, dst: &mut PageBitmap) {
    dst.clear_all();
    let end = base + dst.len();
    let mut p = base;
    while let Some(start) = src.next_one(p).filter(|&s| s < end) {
        let stop = src.next_zero(start).min(end);
        dst.set_range(start - base, stop - start);
        p = stop;
    }
}

#[allow(clippy::too_many_arguments)]
fn precopy_rounds(
    t: &mut dyn Transport,
    s: &mut Sender,
    tracker: &mut dyn DirtySource,
    policy: &mut dyn ConvergencePolicy,
    guest: &dyn GuestControl,
    start: Instant,
    reply_timeout: Duration,
    summary: &mut Summary,
    on_interval: &mut dyn FnMut(&IterationLine),
) -> Result<Decision, SourceError> {
    let phase = Phase::Precopy;
    let mut iter = 0u32;
    loop {
        iter += 1;
        let started = Instant::now();
        let progress0 = guest.progress();
        s.sched.begin_interval();
        let budget = policy.send_window().unwrap_or(usize::MAX).max(1);
        let bytes0 = s.bytes;
        let b = s.send_batch(t, budget, phase)?;
        // The sample: harvest the dirty log into the pending set.
        tracker.collect(s.sched.pending_mut()).map_err(SourceError::Dirty)?;
        let f = s.sched.end_interval();
        let (remaining, retransmitted) = (f.remaining, f.retransmitted);
        let report = IntervalReport {
            now: start.elapsed(),
            pages_posted: f.posted,
            post_time: b.post_time,
            wait_time: b.wait_time,
            modified: f.modified,
            retransmitted,
            remaining,
            bytes_sent: s.bytes - bytes0,
            first_pass_done: f.first_pass_done,
        };
        let decision = policy.handle_interval(&report);
        send(t, phase, &Msg::IterationDone { iter, pages: b.data as u64, dirty: remaining as u64 })?;
        // Pages announced zero may be dirty again: the destination must have zeroed them
        // before their new content is written. (The round trip also shows, once per
        // interval, that the destination keeps up.)
        match recv(t, phase, "IterationAck", reply_timeout)? {
            Msg::IterationAck { iter: i } if i == iter => {}
            other => return Err(unexpected(phase, "IterationAck", &other)),
        }
        let line = IterationLine {
            iter,
            at_ms: start.elapsed().as_millis() as u64,
            sent: b.data as u64,
            zero: b.zero as u64,
            dirty: remaining as u64,
            retransmitted: retransmitted as u64,
            interval_ms: report.period().as_secs_f64() * 1e3,
            window: match decision {
                Decision::Continue { window } => window.map(|w| w as u64),
                _ => None,
            },
            guest_rate: match (progress0, guest.progress()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / started.elapsed().as_secs_f64().max(1e-9)),
                _ => None,
            },
        };
        on_interval(&line);
        summary.intervals.push(line);
        summary.iterations = iter;
        match decision {
            Decision::Continue { .. } => {}
            d => return Ok(d),
        }
        if let Some(p) = policy.pacing_period() {
            let next = started + p;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    }
}

/// Stop-and-copy and the switchover handshake. The guest is paused.
///
/// ```text
/// source                                           destination
/// final harvest, post the last pages ─────────────▶ placed, hashed as announced
/// DeviceState{…} ─────────────────────────────────▶ kept
/// Final ──────────────────────────────────────────▶ finish the digest
/// SourceChecksum{digest} ─────────────────────────▶ compare
///   ◀───────────────────────────────────────────── Verified{ok, its digest}  (does NOT start yet)
/// committed = true; Commit ───────────────────────▶ start the guest with the device state
///   ◀───────────────────────────────────────────── Resumed  (downtime ends)
/// ```
///
/// The handover steps live in the pure [`SourceSwitchover`] (in `sw` once the digest is
/// known), which enters `Committed` *before* `Commit` is written — a failed send may still
/// have delivered it — and tells the caller what to do with the paused copy on failure.
#[allow(clippy::too_many_arguments)]
fn stop_and_copy(
    t: &mut dyn Transport,
    s: &mut Sender,
    tracker: &mut dyn DirtySource,
    guest: &mut dyn GuestControl,
    cfg: &SourceConfig,
    start: Instant,
    paused_at: Instant,
    summary: &mut Summary,
    sw: &mut Option<SourceSwitchover>,
) -> Result<(), SourceError> {
    let phase = Phase::StopAndCopy;
    tracker.collect(s.sched.pending_mut()).map_err(SourceError::Dirty)?;
    let final_pages = s.sched.pending_count();
    // The source copy is frozen: the last pages are hashed as they are posted, and the
    // digest is then that of the frozen memory.
    let b = s.send_batch(t, usize::MAX, phase)?;
    summary.final_pages = Some((b.data + b.zero) as u64);
    summary.final_transfer_ms = Some(paused_at.elapsed().as_secs_f64() * 1e3);
    debug_assert_eq!(b.data + b.zero, final_pages);
    #[cfg(feature = "fault-injection")]
    fault::corrupt_in_flight(t, s)?;
    if let Some(page) = s.digests.first_missing() {
        // The final batch takes every pending page, never-sent ones included.
        return Err(SourceError::Unsent { page });
    }
    let state = guest.save_state().map_err(SourceError::Guest)?;
    summary.device_state_bytes = Some(state.len() as u64);
    let mut chunks = state.chunks(MAX_STATE_CHUNK).peekable();
    if chunks.peek().is_none() {
        send(t, phase, &Msg::DeviceState { last: true, bytes: Vec::new() })?;
    }
    while let Some(c) = chunks.next() {
        send(t, phase, &Msg::DeviceState { last: chunks.peek().is_none(), bytes: c.to_vec() })?;
    }
    let sum = s.digests.digest().to_bytes();
    // Every page is placed (Final is ordered after the writes).
    send(t, phase, &Msg::Final)?;
    tracing::debug!(ms = paused_at.elapsed().as_secs_f64() * 1e3, "source checksum ready");
    let sw = sw.insert(SourceSwitchover::new(sum));
    send(t, phase, &Msg::SourceChecksum { checksum: sum })?;
    sw.checksum_sent();
    // The destination finishes its digest now (sending `Alive` meanwhile), answers Verified,
    // and after our Commit starts the guest and answers Resumed.
    loop {
        let m = recv(t, phase, sw.expected(), cfg.switchover_idle)?;
        match sw.handle(&m) {
            Ok(Next::Wait) => {}
            Ok(Next::SendCommit) => {
                tracing::debug!(ms = paused_at.elapsed().as_secs_f64() * 1e3, "verified; committing");
                send(t, phase, &Msg::Commit)?;
            }
            Ok(Next::Done) => break,
            Err(Violation::Mismatch { theirs }) => {
                return Err(SourceError::ChecksumMismatch {
                    source_sum: Digest::from_bytes(&sum).hex(),
                    dest_sum: Digest::from_bytes(&theirs).hex(),
                })
            }
            Err(Violation::Unexpected { expected, got }) => {
                return Err(SourceError::Unexpected { phase, expected, got })
            }
        }
    }
    summary.downtime_ms = Some(paused_at.elapsed().as_secs_f64() * 1e3);
    tracing::info!(downtime_ms = summary.downtime_ms, "destination resumed");
    summary.total_s = start.elapsed().as_secs_f64();
    summary.checksum = Some(Digest::from_bytes(&sum).hex());
    // The guest lives at the destination now; the source copy never runs again.
    guest.handed_over();
    let _ = t.send_message(&Msg::Done.encode());
    Ok(())
}

fn send(t: &mut dyn Transport, phase: Phase, m: &Msg) -> Result<(), SourceError> {
    t.send_message(&m.encode()).map_err(|source| SourceError::Transport { phase, source })
}

fn recv(t: &mut dyn Transport, phase: Phase, expected: &'static str, timeout: Duration) -> Result<Msg, SourceError> {
    let bytes = t
        .recv_message(Some(timeout))
        .map_err(|source| SourceError::Transport { phase, source })?
        .ok_or(SourceError::Timeout { phase, expected, timeout })?;
    match proto::decode(&bytes).map_err(|source| SourceError::Protocol { phase, source })? {
        Msg::Abort { reason } => Err(SourceError::PeerAborted { phase, reason }),
        m => Ok(m),
    }
}

fn unexpected(phase: Phase, expected: &'static str, got: &Msg) -> SourceError {
    SourceError::Unexpected { phase, expected, got: got.name() }
}

#[cfg(feature = "fault-injection")]
mod fault {
    //! Test builds only: `LIVEMIG_CORRUPT_PAGE=N` overwrites page N (of the memory's page
    //! space) at the destination with a copy that has one byte flipped, just before `Final`,
    //! announced like any transfer, so the digests must differ.
    use std::sync::Arc;

    use livemig_transport::{Access, Region, Segment, Transport, WriteRequest};

    use super::{Phase, Sender, SourceError};

    /// Local id of the scratch page region (outside the ids the CLI and tests use).
    const SCRATCH_ID: u32 = u32::MAX - 7;

    pub(super) fn corrupt_in_flight(t: &mut dyn Transport, s: &Sender) -> Result<(), SourceError> {
        let Some(page) = std::env::var("LIVEMIG_CORRUPT_PAGE").ok().and_then(|v| v.parse::<u64>().ok()) else {
            return Ok(());
        };
        let ps = s.memory.page_size();
        let Some((i, local)) = s.memory.locate(page as usize) else {
            return Ok(());
        };
        let scratch = Arc::new(Region::anonymous(SCRATCH_ID, ps as u64, ps, Access::LOCAL).expect("scratch page"));
        let mut buf = vec![0u8; ps as usize];
        s.memory.regions()[i].read_at(local as u64 * ps as u64, &mut buf);
        buf[ps as usize / 2] ^= 0x5a;
        scratch.write_at(0, &buf);
        let _reg = t.regions().register(scratch).expect("scratch id is free");
        tracing::warn!(page, "fault injection: corrupting one page in flight");
        let seg = [Segment { offset: 0, len: ps }];
        let phase = Phase::StopAndCopy;
        t.post_writes(&[WriteRequest {
            local: SCRATCH_ID,
            segments: &seg,
            remote: s.remotes[i],
            remote_offset: local as u64 * ps as u64,
        }])
        .map_err(|source| SourceError::Transport { phase, source })?;
        // Announced like any transfer: the destination hashes what actually landed.
        let runs = vec![super::PageRun { first: page, pages: 1 }];
        t.send_message(&super::Msg::Placed { runs }.encode())
            .map_err(|source| SourceError::Transport { phase, source })?;
        t.flush().map_err(|source| SourceError::Transport { phase, source })
    }
}
