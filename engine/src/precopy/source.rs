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

use super::proto::{self, Msg, RegionDesc, MAX_RUNS};
use super::schedule::Schedule;
use super::session::{Action, BatchDone, End, Failure, SessionConfig, SourceSession};
use super::{check_fit, IterationLine, Mismatch, Outcome, Phase, Summary};
use crate::dirty::{DirtyError, DirtySource};
use crate::guest::{GuestControl, GuestError, GuestMemory};
use crate::integrity::{Digest, PageDigests};
use crate::policy::{self, PolicyConfig};

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
///
/// This is the thin driver of [`SourceSession`]: it carries out the session's actions (send,
/// post pages, harvest the dirty log, pause, save state, digest) and feeds back what happened
/// and what the destination says; every decision is the session's.
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
    let regions = memory.regions().iter().map(|r| RegionDesc { len: r.len(), page_size: r.page_size() }).collect();
    let scfg = SessionConfig { reply_timeout: cfg.reply_timeout, switchover_idle: cfg.switchover_idle };
    let mut sess = SourceSession::new(regions, &cfg.policy, scfg);
    let mut s = Sender {
        memory: memory.clone(),
        remotes,
        coalescer,
        digests: PageDigests::new(pages, ps),
        region_batch: memory.regions().iter().map(|r| PageBitmap::new(r.pages())).collect(),
        page_buf: vec![0u8; ps as usize],
        wrs: Vec::new(),
    };
    let start = Instant::now();
    let now = || start.elapsed();
    let mut summary = Summary {
        outcome: Outcome::Aborted,
        policy: sess.policy_name().to_string(),
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
    let progress0 = guest.progress();
    let mut interval_progress = (Instant::now(), progress0);
    // The first error a driver operation or the link returned (the session's failure
    // reports only that something failed; this says what).
    let mut err: Option<SourceError> = None;
    let mut tracking = false;
    loop {
        while let Some(a) = sess.poll_action() {
            let phase = sess.phase();
            let r: Result<(), SourceError> = match a {
                Action::Send(m) => send(t, phase, &m),
                Action::StartTracking => dirty.start().map_err(SourceError::Dirty).map(|()| {
                    tracking = true;
                    // Pages never populated are zero: announced without reading them. Scanned
                    // after arming the tracker, so a page written from now on is dirty and
                    // sent anyway.
                    sess.handle_tracking_started(now(), &memory.known_zero_pages());
                }),
                Action::ZeroPages(runs) => {
                    for r in runs {
                        s.digests.record_zero(r.first as usize, r.pages as usize);
                    }
                    Ok(())
                }
                Action::SendBatch { budget } => {
                    let phase = sess.phase();
                    s.send_batch(t, &mut sess, budget, phase).map(|b| sess.handle_batch_done(now(), b))
                }
                Action::CollectDirty => {
                    dirty.collect(sess.pending_mut()).map_err(SourceError::Dirty).map(|_| sess.handle_collected(now()))
                }
                Action::Interval(mut line) => {
                    let p = guest.progress();
                    if let (Some(a), Some(b)) = (interval_progress.1, p) {
                        line.guest_rate =
                            Some(b.saturating_sub(a) as f64 / interval_progress.0.elapsed().as_secs_f64().max(1e-9));
                    }
                    interval_progress = (Instant::now(), p);
                    on_interval(&line);
                    summary.intervals.push(line);
                    Ok(())
                }
                Action::Wait { until } => {
                    std::thread::sleep(until.saturating_sub(now()));
                    sess.handle_timeout(now());
                    Ok(())
                }
                Action::PauseGuest => {
                    // The downtime starts when the guest is asked to stop: whatever the pause
                    // takes (draining I/O, handing disks over) is the guest's.
                    let asked = now();
                    guest.pause().map_err(SourceError::Guest).map(|()| {
                        summary.guest_rate_during = rate(progress0, guest.progress(), start.elapsed());
                        tracing::info!("stop-and-copy: guest paused");
                        sess.handle_paused(asked)
                    })
                }
                Action::SaveState => {
                    #[cfg(feature = "fault-injection")]
                    let r = fault::corrupt_in_flight(t, &mut s);
                    #[cfg(not(feature = "fault-injection"))]
                    let r = Ok(());
                    r.and_then(|()| guest.save_state().map_err(SourceError::Guest))
                        .map(|state| sess.handle_state(now(), &state))
                }
                Action::Digest => match s.digests.first_missing() {
                    // Every page went out once: the final batch takes never-sent pages too.
                    Some(page) => Err(SourceError::Unsent { page }),
                    None => {
                        tracing::debug!("source digest ready");
                        sess.handle_digest(now(), s.digests.digest().to_bytes());
                        Ok(())
                    }
                },
                Action::ResumeGuest => guest.resume().map_err(SourceError::Guest),
                Action::HandedOver => {
                    guest.handed_over();
                    Ok(())
                }
                Action::StopTracking => {
                    if tracking {
                        dirty.stop();
                        tracking = false;
                    }
                    Ok(())
                }
            };
            if let Err(e) = r {
                if sess.end().is_none() {
                    let link = !matches!(e, SourceError::Transport { .. });
                    sess.handle_failure(now(), link.then(|| e.to_string()));
                    err.get_or_insert(e);
                } else {
                    tracing::warn!(error = %super::error_chain(&e), "after the session ended");
                }
            }
        }
        if sess.end().is_some() {
            break;
        }
        // Waiting for the destination, at most until the session's deadline.
        let phase = sess.phase();
        let timeout = sess.poll_timeout().map(|d| d.saturating_sub(now()));
        match t.recv_message(timeout) {
            Ok(Some(b)) => match proto::decode(&b) {
                Ok(m) => sess.handle_message(now(), m),
                Err(source) => {
                    sess.handle_failure(now(), Some(format!("invalid message: {source}")));
                    err.get_or_insert(SourceError::Protocol { phase, source });
                }
            },
            Ok(None) => sess.handle_timeout(now()),
            Err(source) => {
                sess.handle_failure(now(), None);
                err.get_or_insert(SourceError::Transport { phase, source });
            }
        }
    }
    if tracking {
        dirty.stop();
    }
    let totals = sess.totals().clone();
    summary.iterations = totals.iterations;
    summary.bytes = totals.bytes;
    summary.pages_sent = totals.pages_sent;
    summary.zero_pages = totals.zero_pages;
    summary.final_pages = totals.final_pages;
    summary.device_state_bytes = totals.state_bytes;
    if let (Some(p), Some(f)) = (totals.paused_at, totals.final_sent_at) {
        summary.final_transfer_ms = Some((f - p).as_secs_f64() * 1e3);
    }
    let end = sess.end().cloned().expect("the loop ends with the session");
    let to_error = |phase: Phase, why: Failure, err: &mut Option<SourceError>| -> SourceError {
        match why {
            Failure::Refused(r) => SourceError::Refused(r),
            Failure::PeerAborted(reason) => SourceError::PeerAborted { phase, reason },
            Failure::Unexpected { expected, got } => SourceError::Unexpected { phase, expected, got },
            Failure::Timeout { expected, timeout } => SourceError::Timeout { phase, expected, timeout },
            Failure::Mismatch { ours, theirs } => SourceError::ChecksumMismatch {
                source_sum: Digest::from_bytes(&ours).hex(),
                dest_sum: Digest::from_bytes(&theirs).hex(),
            },
            Failure::Driver { .. } => err.take().unwrap_or(SourceError::Unexpected {
                phase,
                expected: "a working driver",
                got: "an unreported failure",
            }),
        }
    };
    match end {
        End::Completed(reason) => {
            summary.outcome = Outcome::Completed;
            if let (Some(p), Some(r)) = (totals.paused_at, totals.resumed_at) {
                summary.downtime_ms = Some((r - p).as_secs_f64() * 1e3);
            }
            summary.total_s = totals.resumed_at.unwrap_or_else(now).as_secs_f64();
            summary.checksum = totals.digest.map(|d| Digest::from_bytes(&d).hex());
            tracing::info!(downtime_ms = summary.downtime_ms, "destination resumed");
            Ok(finish(summary, now(), reason))
        }
        End::Aborted(reason) => {
            tracing::info!(reason = %reason, "pre-copy aborted by the policy; the source keeps running");
            summary.guest_rate_during = rate(progress0, guest.progress(), start.elapsed());
            Ok(finish(summary, now(), reason))
        }
        End::Failed { phase, why } => Err(to_error(phase, why, &mut err)),
        End::InDoubt { why } => {
            let e = to_error(Phase::StopAndCopy, why, &mut err);
            tracing::error!(error = %e, "switchover in doubt; the source copy stays paused");
            Err(SourceError::InDoubt(Box::new(e)))
        }
        End::FailedAfterHandover { why } => Err(to_error(Phase::Resumed, why, &mut err)),
    }
}

fn rate(a: Option<u64>, b: Option<u64>, over: Duration) -> Option<f64> {
    Some(b?.saturating_sub(a?) as f64 / over.as_secs_f64().max(1e-9))
}

fn finish(mut summary: Summary, elapsed: Duration, reason: policy::Reason) -> Summary {
    if summary.total_s == 0.0 {
        summary.total_s = elapsed.as_secs_f64();
    }
    summary.end_rule = reason.label().to_string();
    summary.end_reason = reason.to_string();
    summary
}

/// The peer region each of ours is written to: the peer's writable regions in id order,
/// region `i` to the `i`-th, each checked to fit.
pub(crate) fn pick_remotes(t: &dyn Transport, memory: &GuestMemory) -> Result<Vec<RegionId>, SourceError> {
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

/// What the driver needs to move pages: the memory, where it goes, the digest of what went.
struct Sender {
    memory: GuestMemory,
    /// Peer region of each of ours.
    remotes: Vec<RegionId>,
    coalescer: Coalescer,
    /// The incremental digest of what was sent (see `integrity`).
    digests: PageDigests,
    /// Scratch: the batch's pages of each region, indexed within the region.
    region_batch: Vec<PageBitmap>,
    page_buf: Vec<u8>,
    wrs: Vec<WorkRequest>,
}

impl Sender {
    /// Picks up to `budget` data pages from the session's schedule; the zero pages found are
    /// handed back to the session to announce; posts the rest as coalesced writes, hashes
    /// them and waits for their completion.
    fn send_batch(
        &mut self,
        t: &mut dyn Transport,
        sess: &mut SourceSession,
        budget: usize,
        phase: Phase,
    ) -> Result<BatchDone, SourceError> {
        let mut b = BatchDone::default();
        let t0 = Instant::now();
        let (memory, buf) = (&self.memory, &mut self.page_buf);
        let picked = sess.pick(budget, &mut |p| {
            let Some((i, local)) = memory.locate(p) else { return false };
            memory.regions()[i].read_at((local * buf.len()) as u64, buf);
            buf.iter().all(|&x| x == 0)
        });
        b.data = picked.data;
        b.zero = picked.zero;
        // The session queues their `Zero` messages and digest terms; they go out after this
        // batch and before anything that follows it (`IterationDone`, `Final`), which is all
        // the ordering they need: no write of those pages can come before the
        // destination's `IterationAck`.
        sess.announce_zero(picked.zero_runs);
        let bytes0 = self.bytes_posted(t);
        for i in 0..self.memory.regions().len() {
            self.post_region(t, sess.schedule(), i, phase)?;
        }
        b.post_time = t0.elapsed();
        let t1 = Instant::now();
        t.flush().map_err(|source| SourceError::Transport { phase, source })?;
        b.wait_time = t1.elapsed();
        b.bytes = self.bytes_posted(t) - bytes0;
        Ok(b)
    }

    fn bytes_posted(&self, t: &dyn Transport) -> u64 {
        t.stats().bytes_posted
    }

    /// Posts the batch's pages of region `i` in slices; after each slice tells the
    /// destination which pages it holds (ordered after the writes) and hashes them here while
    /// they travel: both digests keep pace with the transfer, and at the end of the batch only
    /// its last slice is left to hash.
    fn post_region(
        &mut self,
        t: &mut dyn Transport,
        sched: &Schedule,
        i: usize,
        phase: Phase,
    ) -> Result<(), SourceError> {
        let region = self.memory.regions()[i].clone();
        let base = self.memory.base(i);
        // The batch's pages of this region, indexed within it.
        let rb = &mut self.region_batch[i];
        rb.clear_all();
        for r in sched.batch_runs_in(base, base + rb.len()) {
            rb.set_range(r.first as usize - base, r.pages as usize);
        }
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
            let runs = sched.batch_runs_in(slice.0, slice.1);
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

fn send(t: &mut dyn Transport, phase: Phase, m: &Msg) -> Result<(), SourceError> {
    t.send_message(&m.encode()).map_err(|source| SourceError::Transport { phase, source })
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

    pub(super) fn corrupt_in_flight(t: &mut dyn Transport, s: &mut Sender) -> Result<(), SourceError> {
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
        let runs = vec![crate::precopy::PageRun { first: page, pages: 1 }];
        t.send_message(&super::Msg::Placed { runs }.encode())
            .map_err(|source| SourceError::Transport { phase, source })?;
        t.flush().map_err(|source| SourceError::Transport { phase, source })
    }
}
