//! The source side of a post-copy migration: hand the guest over first, then push its
//! pages in the [`Prepager`]'s order while a responder thread answers the destination's
//! demand requests on the urgent channel.
//!
//! ```text
//!   source                                           destination
//!   Begin{post-copy, regions} ───────────────────────▶ checks the layout
//!   ◀──────────────────────────────────────────────── Accept | Refuse
//!   pause (downtime starts), save the device state
//!   DeviceState{…} ──────────────────────────────────▶ kept
//!   Commit ──────────────────────────────────────────▶ arms userfaultfd, starts the guest
//!   ◀──────────────────────────────────────────────── Resumed   (downtime ends)
//!   (demands answered, nothing pushed yet) ◀──────────── Running   (the guest runs there)
//!   Zero{runs}  (pages never populated) ─────────────▶ zero-filled and installed
//!   push thread: runs of pages ──(bulk writes)───────▶ into the staging alias
//!                Placed{runs} ───────────────────────▶ hashed, installed (UFFDIO_CONTINUE)
//!   responder:   ◀──────────────── urgent Demand{page}  (a guest thread faulted)
//!                urgent write of the page ───────────▶ hashed, installed, faulting thread woken
//!   Final, SourceChecksum{digest} ───────────────────▶ waits for every page, compares
//!   ◀──────────────────────────────────────────────── Verified{ok}
//!   Done ────────────────────────────────────────────▶
//! ```
//!
//! Every page crosses once: the scheduler marks a page sent when it is handed to the push or
//! to the responder, and demands for sent pages are ignored (the destination waits for the
//! page already on its way). Both sides hash every page as it goes and lands, so the digest
//! comparison at the end proves the destination's memory equals the frozen source memory.
//!
//! **At most one copy runs.** Before `Commit` any failure resumes the source. From `Commit`
//! on the destination may run the guest, so the source copy stays paused whatever happens
//! ([`PostcopyError::HandedOver`]); it is kept, intact, until the destination has verified
//! every page, and released by the caller afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use livemig_transport::{Segment, Transport, TransportError, UrgentChannel, UrgentEvent, WriteRequest};
use serde::Serialize;

use super::prepage::{Demand, PrepageStats, Prepager, PushOrder};
use super::recover::{self, Recovery};
use crate::dirty::DirtySource;
use crate::guest::{GuestControl, GuestError, GuestMemory};
use crate::integrity::{Digest, PageDigests};
use crate::policy::{build, Decision, IntervalReport, PolicyConfig, RegionInfo, RetransmitTracker};
use crate::precopy::proto::{self, Msg, PageRun, RegionDesc, Strategy, MAX_RUNS, MAX_STATE_CHUNK};
use crate::precopy::{error_chain, pick_remotes, Mismatch};

/// Source settings.
#[derive(Debug, Clone)]
pub struct PostcopyConfig {
    /// Push order.
    pub order: PushOrder,
    /// Pages per push batch (one `Placed` message each). Small batches keep the push's queue
    /// short: a page the guest faults on while it is in flight waits for its batch.
    pub batch_pages: usize,
    /// Pages per run taken from one bubble edge.
    pub run_pages: usize,
    /// Most pushed pages not yet installed at the destination (its `Installed` count):
    /// the push waits for room before it takes the next batch. A page the guest faults on
    /// while it is pushed waits behind at most this many pages, and the next batch is taken
    /// around the latest faults. At least one batch.
    pub push_window: usize,
    /// How long to wait for each reply of the destination (`Accept`, `Resumed`, `Verified`).
    pub reply_timeout: Duration,
    /// Hybrid only: after the first pass, pre-copy rounds go on until this policy says
    /// pre-copy no longer pays (`StopAndCopy`, or `Abort` on its time limit); then post-copy
    /// moves what is left instead of a stop-and-copy. `None`: one pass, then post-copy.
    pub rounds: Option<PolicyConfig>,
    /// If the link breaks after the hand-over, take the migration over on a new session
    /// (see [`super::recover`]) instead of failing. `None`: a broken link loses the guest.
    pub recovery: Option<Recovery>,
    /// The migration's identity, presented by a session that takes it over (random when
    /// `None`). A caller that may have to take the migration over from another process
    /// ([`take_over`]) chooses it ([`super::new_migration_id`]) and keeps it.
    pub id: Option<[u8; 16]>,
}

impl Default for PostcopyConfig {
    fn default() -> Self {
        PostcopyConfig {
            order: PushOrder::default(),
            batch_pages: DEFAULT_BATCH_PAGES,
            run_pages: 64,
            push_window: DEFAULT_PUSH_WINDOW,
            reply_timeout: crate::precopy::REPLY_TIMEOUT,
            rounds: None,
            recovery: None,
            id: None,
        }
    }
}

/// [`PostcopyConfig::batch_pages`]'s default.
pub const DEFAULT_BATCH_PAGES: usize = 16;
/// [`PostcopyConfig::push_window`]'s default, pages: one batch in flight (64 KiB of 4 KiB
/// pages), so a page the guest faults on while it is on its way lands soon: fault service
/// p99 about 0.16 ms on loopback with a random writer, against 0.2 ms with two batches.
/// A larger window pushes faster where the destination's CPUs, not the link, are the limit
/// (on loopback 32 pages pushed 1.2× faster; at 1 and 10 Gbit/s no difference), and where
/// the round trip to the destination's acknowledgement is long: the push moves at most one
/// window per round trip.
pub const DEFAULT_PUSH_WINDOW: usize = DEFAULT_BATCH_PAGES;

/// Push settings that cannot work: a batch of no pages, or a window that cannot hold one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the push window ({window} pages) must hold at least one batch (of {batch} pages, at least 1)")]
pub struct PushSettingsError {
    /// Pages per batch.
    pub batch: usize,
    /// Pages in the window.
    pub window: usize,
}

/// Checks [`PostcopyConfig::batch_pages`] and [`PostcopyConfig::push_window`] as a user gave
/// them (the engine itself rounds a window up to one batch).
pub fn check_push(batch: usize, window: usize) -> Result<(), PushSettingsError> {
    if batch == 0 || window < batch {
        return Err(PushSettingsError { batch, window });
    }
    Ok(())
}

/// Where a post-copy migration was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopyPhase {
    /// Begin/Accept.
    Handshake,
    /// Hybrid: the pre-copy pass while the guest runs here.
    Precopy,
    /// Paused, sending the device state (before `Commit`).
    Handover,
    /// After `Commit`: pushing and serving demands.
    Push,
    /// Comparing digests.
    Verify,
    /// Taking the migration over on a new session after the link broke.
    Recover,
}

impl std::fmt::Display for PostcopyPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PostcopyPhase::Handshake => "handshake",
            PostcopyPhase::Precopy => "pre-copy pass",
            PostcopyPhase::Handover => "hand-over",
            PostcopyPhase::Push => "push",
            PostcopyPhase::Verify => "verification",
            PostcopyPhase::Recover => "recovery",
        })
    }
}

/// Why a post-copy migration failed at the source. Every variant but
/// [`PostcopyError::HandedOver`] leaves the guest running at the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostcopyError {
    /// The destination's exposed regions cannot take ours.
    #[error("the destination cannot take region {index} of the guest memory")]
    Incompatible {
        /// Region index.
        index: usize,
        /// Why.
        #[source]
        source: Mismatch,
    },
    /// A region of ours is not registered with the transport.
    #[error("source region {0} is not registered with the transport")]
    NotRegistered(u32),
    /// The session has no urgent channel (demand requests need one).
    #[error("post-copy needs the session's urgent channel")]
    NoUrgentChannel(#[source] TransportError),
    /// The destination refused `Begin`.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The transport failed.
    #[error("transport failed during {phase}")]
    Transport {
        /// Where.
        phase: PostcopyPhase,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The destination sent something undecodable.
    #[error("undecodable message from the destination during {phase}")]
    Protocol {
        /// Where.
        phase: PostcopyPhase,
        /// Why.
        #[source]
        source: proto::ProtoError,
    },
    /// The destination sent a message out of turn.
    #[error("unexpected {got} from the destination during {phase}")]
    Unexpected {
        /// Where.
        phase: PostcopyPhase,
        /// What came.
        got: &'static str,
    },
    /// No reply in time.
    #[error("no {expected} from the destination within {timeout:?} during {phase}")]
    Timeout {
        /// Where.
        phase: PostcopyPhase,
        /// What was expected.
        expected: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The destination gave up.
    #[error("the destination aborted during {phase}: {reason}")]
    PeerAborted {
        /// Where.
        phase: PostcopyPhase,
        /// Its reason.
        reason: String,
    },
    /// The destination's memory differs from the source's.
    #[error("digest mismatch: source {source_sum}, destination {dest_sum}")]
    ChecksumMismatch {
        /// Ours (hex).
        source_sum: String,
        /// Theirs (hex).
        dest_sum: String,
    },
    /// Pausing or saving the guest failed (it runs at the source).
    #[error("guest control failed")]
    Guest(#[source] GuestError),
    /// Dirty tracking failed (hybrid; the guest runs at the source).
    #[error("dirty tracking failed")]
    Dirty(#[source] crate::dirty::DirtyError),
    /// The link broke after `Commit` and no new session took the migration over.
    #[error("the link broke and no new session took the migration over ({attempts} attempts within {within:?}; last: {last})")]
    NotReattached {
        /// Dial attempts made.
        attempts: u32,
        /// The recovery deadline.
        within: Duration,
        /// Why the last attempt failed.
        last: String,
        /// How the link broke.
        #[source]
        broke: Box<PostcopyError>,
    },
    /// The migration failed after the destination reported the guest running (`Resumed`):
    /// the source copy never runs again ([`GuestControl::handed_over`] was called) and is
    /// kept intact; the destination's guest cannot go on without the pages that did not
    /// arrive.
    #[error("post-copy failed after the hand-over; the source copy is kept but never resumed")]
    HandedOver(#[source] Box<PostcopyError>),
    /// The migration failed after `Commit` was sent and before `Resumed` came: the
    /// destination may or may not run the guest, so the source copy stays **paused** and
    /// intact; whoever holds both sides decides (resume it only once sure the destination
    /// does not run it).
    #[error("post-copy hand-over in doubt: Commit was sent, no Resumed came; the source copy stays paused")]
    InDoubt(#[source] Box<PostcopyError>),
}

/// The end of a completed post-copy migration.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopySummary {
    /// `post-copy` or `hybrid`.
    pub strategy: String,
    /// Hybrid: data pages sent in the pre-copy pass.
    pub precopy_pages: Option<u64>,
    /// Hybrid: length of the pre-copy pass, ms.
    pub precopy_ms: Option<f64>,
    /// Hybrid: pages written during the pass, sent again after the hand-over.
    pub invalidated_pages: Option<u64>,
    /// Hybrid with a policy: pre-copy rounds after the first pass.
    pub rounds: Option<u32>,
    /// Data pages those rounds sent again.
    pub round_pages: Option<u64>,
    /// Hybrid with a policy: the rule that ended pre-copy (post-copy took over then).
    pub decided_by: Option<String>,
    /// The push order.
    pub order: PushOrder,
    /// Transport backend.
    pub transport: String,
    /// Guest memory bytes.
    pub region_bytes: u64,
    /// Regions.
    pub regions: usize,
    /// Page size.
    pub page_size: u32,
    /// Seconds from `Begin` to `Verified`.
    pub total_s: f64,
    /// Pause to `Resumed`, ms: the only time the guest runs nowhere.
    pub downtime_ms: f64,
    /// `Resumed` to the last page sent, ms.
    pub push_ms: f64,
    /// `Resumed` to `Running`, ms: the push waited for the guest to run at the destination
    /// (a VMM's device state crossing and loading).
    pub push_held_ms: f64,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// Pages announced as zero.
    pub zero_pages: u64,
    /// Pages pushed in the background.
    pub pushed_pages: u64,
    /// Pages sent on demand (urgent channel).
    pub demanded_pages: u64,
    /// Demands for pages already sent (ignored).
    pub ignored_demands: u64,
    /// Pivots replaced by newer faults.
    pub pivots_replaced: u64,
    /// Payload bytes sent.
    pub bytes: u64,
    /// Times the link broke after the hand-over and a new session took the migration over.
    pub recoveries: u32,
    /// Time from each break to its new session, summed, ms.
    pub recovery_ms: f64,
    /// Pages sent again because the destination had not received them when the link broke.
    pub resent_pages: u64,
    /// The digest both sides agreed on.
    pub checksum: String,
}

impl PostcopySummary {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s =
            format!("migration completed: {} over {}, push order {:?}\n", self.strategy, self.transport, self.order);
        s += &crate::precopy::memory_line(self.region_bytes, self.regions, self.page_size);
        s += &format!("  total time     {:.2} s\n", self.total_s);
        if let (Some(n), Some(ms), Some(inv)) = (self.precopy_pages, self.precopy_ms, self.invalidated_pages) {
            match (self.rounds, self.round_pages, &self.decided_by) {
                (Some(r), Some(k), Some(by)) => {
                    s += &format!("  pre-copy       first pass {n} pages in {ms:.1} ms, then {r} rounds ({k} pages sent again)\n");
                    s += &format!("  post-copy from {by}; {inv} pages still dirty, sent after the resume\n");
                }
                _ => s += &format!(
                    "  pre-copy pass  {n} pages in {ms:.1} ms; {inv} pages written meanwhile, sent again after the resume\n"
                ),
            }
        }
        s += &format!(
            "  downtime       {:.1} ms (pause to resume at the destination; {} B of device state)\n",
            self.downtime_ms, self.device_state_bytes
        );
        s += &format!("  push           {:.1} ms after the resume\n", self.push_ms);
        if self.push_held_ms >= 0.05 {
            s += &format!("  push held      {:.1} ms (until the guest ran at the destination)\n", self.push_held_ms);
        }
        s += &format!(
            "  pages          {} pushed, {} on demand ({} demands for pages already sent), {} zero\n",
            self.pushed_pages, self.demanded_pages, self.ignored_demands, self.zero_pages
        );
        s += &format!("  bytes          {:.1} MiB\n", mb(self.bytes));
        if self.recoveries > 0 {
            s += &format!(
                "  recovery       the link broke {} time(s); taken over on a new session after {:.0} ms in all, {} pages sent again\n",
                self.recoveries, self.recovery_ms, self.resent_pages
            );
        }
        s += &format!("  digest         {} (verified by the destination)\n", self.checksum);
        s
    }
}

/// Progress of the push, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct PushProgress {
    /// Pages sent (pushed, demanded or zero).
    pub sent: u64,
    /// Pages in all.
    pub pages: u64,
    /// Pages sent on demand so far.
    pub demanded: u64,
}

/// What the pusher and the responder share.
struct Shared {
    prepager: Prepager,
    digests: PageDigests,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Migrates `memory` (every region registered in `t.regions()`) with post-copy: pauses
/// `guest`, hands its device state over, and pushes the pages while serving the
/// destination's demands. `t` must have an urgent channel. Returns once the destination has
/// verified every page; the source copy is then no longer needed (its guest stays paused).
pub fn migrate(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    guest: &mut dyn GuestControl,
    cfg: &PostcopyConfig,
    on_progress: &mut dyn FnMut(&PushProgress),
) -> Result<PostcopySummary, PostcopyError> {
    run(t, memory, guest, None, cfg, on_progress)
}

/// Hybrid migration: one pre-copy pass over `memory` while `guest` keeps running (its
/// writes tracked by `dirty`), then post-copy for the pages written since — they are
/// invalidated at the destination before the hand-over and pushed or demanded after it,
/// while every other page is already there.
pub fn migrate_hybrid(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    guest: &mut dyn GuestControl,
    dirty: &mut dyn DirtySource,
    cfg: &PostcopyConfig,
    on_progress: &mut dyn FnMut(&PushProgress),
) -> Result<PostcopySummary, PostcopyError> {
    run(t, memory, guest, Some(dirty), cfg, on_progress)
}

fn run(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    guest: &mut dyn GuestControl,
    mut dirty: Option<&mut dyn DirtySource>,
    cfg: &PostcopyConfig,
    on_progress: &mut dyn FnMut(&PushProgress),
) -> Result<PostcopySummary, PostcopyError> {
    let strategy = if dirty.is_some() { Strategy::Hybrid } else { Strategy::Postcopy };
    let span = tracing::info_span!("postcopy_migrate", %strategy, memory_bytes = memory.len(), transport = %t.kind());
    let _span = span.enter();
    if let Some(r) = memory.regions().iter().find(|r| t.regions().get(r.id()).is_none()) {
        return Err(PostcopyError::NotRegistered(r.id()));
    }
    let remotes = pick_remotes(t, memory).map_err(|e| match e {
        crate::precopy::SourceError::Incompatible { index, source } => PostcopyError::Incompatible { index, source },
        other => PostcopyError::Refused(error_chain(&other)),
    })?;
    t.urgent().map_err(PostcopyError::NoUrgentChannel)?;
    let t0 = Instant::now();
    let ps = memory.page_size();
    let pages = memory.pages();

    // Handshake.
    let phase = PostcopyPhase::Handshake;
    let regions = memory.regions().iter().map(|r| RegionDesc { len: r.len(), page_size: r.page_size() }).collect();
    send(t, phase, &Msg::Begin { strategy, regions })?;
    match recv(t, phase, "Accept", cfg.reply_timeout)? {
        Msg::Accept => {}
        Msg::Refuse { reason } => return Err(PostcopyError::Refused(reason)),
        m => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
    }
    let id = cfg.id.unwrap_or_else(recover::new_id);
    // A chosen id means the caller may take the migration over from another process.
    if cfg.recovery.is_some() || cfg.id.is_some() {
        send(t, phase, &Msg::Recoverable { id })?;
    }

    let mut digests = PageDigests::new(pages, ps);
    // Hybrid: one pass while the guest runs.
    let mut pass = None;
    // Pages written since they were sent, not sent again yet (with rounds).
    let mut pending = crate::PageBitmap::new(pages);
    let mut rounds = None;
    if let Some(d) = dirty.as_deref_mut() {
        let t_pass = Instant::now();
        let r = precopy_pass(t, memory, &remotes, d, &mut digests, on_progress)
            .and_then(|n| {
                pass = Some((n, t_pass.elapsed()));
                match &cfg.rounds {
                    Some(policy) => {
                        let r = Rounds { policy, t0, pass_pages: n, pass_time: t_pass.elapsed() };
                        r.run(t, memory, &remotes, d, &mut digests, &mut pending, cfg.reply_timeout, on_progress)
                            .map(|v| rounds = Some(v))
                    }
                    None => Ok(()),
                }
            })
            .and_then(|()| drain(t, cfg.reply_timeout));
        if let Err(e) = r {
            d.stop();
            let _ = t.send_message(&Msg::Abort { reason: error_chain(&e) }.encode());
            return Err(e);
        }
    }

    // Hand-over: the guest stops here.
    let phase = PostcopyPhase::Handover;
    // The downtime starts when the guest is asked to stop (the pause may hand disks over).
    let paused = Instant::now();
    if let Err(e) = guest.pause() {
        if let Some(d) = dirty.as_deref_mut() {
            d.stop();
        }
        let _ =
            t.send_message(&Msg::Abort { reason: format!("pausing the guest failed: {}", error_chain(&e)) }.encode());
        return Err(PostcopyError::Guest(e));
    }
    tracing::debug!("paused");
    let mut prepager = Prepager::new(pages, cfg.order);
    let mut invalidated = 0u64;
    let handover = (|| -> Result<Vec<u8>, PostcopyError> {
        if let Some(d) = dirty.as_deref_mut() {
            // Every page written since the pass started is stale at the destination.
            // (Tracking is stopped once the pages went: un-protecting the memory takes time
            // and the paused guest writes nothing meanwhile.)
            let mut written = pending.clone();
            d.collect(&mut written).map_err(PostcopyError::Dirty)?;
            let runs: Vec<PageRun> =
                written.runs().map(|(f, n)| PageRun { first: f as u64, pages: n as u32 }).collect();
            for chunk in runs.chunks(MAX_RUNS) {
                send(t, phase, &Msg::Invalidate { runs: chunk.to_vec() })?;
            }
            // Everything else is at the destination already.
            let mut q = 0;
            for r in &runs {
                prepager.mark_sent(q, r.first as usize - q);
                q = (r.first + r.pages as u64) as usize;
            }
            prepager.mark_sent(q, pages - q);
            invalidated = written.count_ones() as u64;
        }
        let state = guest.save_state().map_err(PostcopyError::Guest)?;
        let mut chunks = state.chunks(MAX_STATE_CHUNK).peekable();
        if chunks.peek().is_none() {
            send(t, phase, &Msg::DeviceState { last: true, bytes: Vec::new() })?;
        }
        while let Some(c) = chunks.next() {
            send(t, phase, &Msg::DeviceState { last: chunks.peek().is_none(), bytes: c.to_vec() })?;
        }
        Ok(state)
    })();
    let state = match handover {
        Ok(v) => v,
        Err(e) => {
            if let Some(d) = dirty.as_deref_mut() {
                d.stop();
            }
            resume_after(guest, &e);
            let _ = t.send_message(&Msg::Abort { reason: error_chain(&e) }.encode());
            return Err(e);
        }
    };

    let shared = Mutex::new(Shared { prepager, digests });
    let resumed = AtomicBool::new(false);
    let mut st = PushState::new(strategy == Strategy::Postcopy, pages);

    // From Commit on, the destination may run the guest: never resume here.
    // The guest runs at the destination from `Resumed` on: the source's copy is handed over
    // then (a VMM whose device state still has to reach the destination sends it now),
    // while its pages follow.
    let mut handed = false;
    let mut on_resumed = || {
        if resumed.load(Ordering::SeqCst) && !handed {
            handed = true;
            guest.handed_over();
        }
    };
    let res = drive(
        Some(&mut *t),
        remotes,
        memory,
        &shared,
        cfg,
        id,
        on_progress,
        paused,
        &mut st,
        &resumed,
        &mut on_resumed,
    );
    on_resumed();
    // Tracking stops once the pages went: un-protecting the memory takes CPU time (tens of
    // ms for a GiB) that a VMM sending and loading its device state needs more, and the
    // paused guest writes nothing meanwhile.
    if let Some(d) = dirty {
        d.stop();
    }
    if let Err(e @ PostcopyError::PeerAborted { phase: PostcopyPhase::Handover, .. }) = &res {
        // An explicit refusal to start instead of Resumed: nothing runs there.
        resume_after(guest, e);
        return res.map(|_| unreachable!("matched an error"));
    }
    if !resumed.load(Ordering::SeqCst) {
        return res.map(|_| unreachable!("no Resumed means an error")).map_err(|e| PostcopyError::InDoubt(Box::new(e)));
    }
    let checksum = res.map_err(|e| PostcopyError::HandedOver(Box::new(e)))?;
    let resumed_at = st.resumed_at.expect("resumed");
    let pushed_at = st.pushed_at.unwrap_or(resumed_at);
    let dirty_ran = strategy == Strategy::Hybrid;
    let ps_stats: PrepageStats = lock(&shared).prepager.stats();
    let (precopy_pages, precopy_ms) = pass.map_or((None, None), |(n, d)| (Some(n), Some(d.as_secs_f64() * 1e3)));
    let before = precopy_pages.unwrap_or(0) + rounds.as_ref().map_or(0, |r: &RoundsDone| r.pages);
    Ok(PostcopySummary {
        strategy: strategy.to_string(),
        precopy_pages,
        precopy_ms,
        invalidated_pages: dirty_ran.then_some(invalidated),
        rounds: rounds.as_ref().map(|r| r.rounds),
        round_pages: rounds.as_ref().map(|r| r.pages),
        decided_by: rounds.as_ref().map(|r| r.reason.clone()),
        order: cfg.order,
        transport: t.kind().to_string(),
        region_bytes: memory.len(),
        regions: memory.regions().len(),
        page_size: ps,
        total_s: t0.elapsed().as_secs_f64(),
        downtime_ms: (resumed_at - paused).as_secs_f64() * 1e3,
        push_ms: pushed_at.saturating_duration_since(resumed_at).as_secs_f64() * 1e3,
        push_held_ms: st.held.as_secs_f64() * 1e3,
        device_state_bytes: state.len() as u64,
        zero_pages: st.zero_announced.count_ones() as u64,
        pushed_pages: ps_stats.pushed,
        demanded_pages: ps_stats.demanded,
        ignored_demands: ps_stats.ignored,
        pivots_replaced: ps_stats.pivots_replaced,
        bytes: (before + ps_stats.pushed + ps_stats.demanded) * ps as u64,
        recoveries: st.recoveries,
        recovery_ms: st.recovery.as_secs_f64() * 1e3,
        resent_pages: st.resent,
        checksum: checksum.hex(),
    })
}

/// The migration after the hand-over, over `first` (the session that committed) and, each
/// time the link breaks, a new session that takes it over (`cfg.recovery`). Without `first`
/// the first session is such a take-over (see [`take_over`]). The session in use at the end
/// goes to the recovery's [`Relink::adopt`](super::Relink::adopt).
#[allow(clippy::too_many_arguments)]
fn drive(
    first: Option<&mut dyn Transport>,
    remotes: Vec<u32>,
    memory: &GuestMemory,
    shared: &Mutex<Shared>,
    cfg: &PostcopyConfig,
    id: [u8; 16],
    on_progress: &mut dyn FnMut(&PushProgress),
    paused: Instant,
    st: &mut PushState,
    resumed: &AtomicBool,
    on_resumed: &mut dyn FnMut(),
) -> Result<Digest, PostcopyError> {
    // The session in use: the caller's, or one that took the migration over after a break.
    let mut first = first;
    let mut owned: Option<Box<dyn Transport>> = None;
    let mut remotes = remotes;
    // Why a new session is needed (none at first when the caller's session is there).
    let mut broken: Option<PostcopyError> = match first {
        Some(_) => None,
        None => Some(PostcopyError::Transport {
            phase: PostcopyPhase::Recover,
            source: TransportError::Disconnected("taking over a migration whose source process is gone".into()),
        }),
    };
    let res = loop {
        if let Some(e) = broken.take() {
            let Some(rec) = cfg.recovery.as_ref() else { break Err(e) };
            if st.recoveries >= MAX_RECOVERIES {
                break Err(PostcopyError::NotReattached {
                    attempts: 0,
                    within: rec.within,
                    last: format!("the link broke {MAX_RECOVERIES} times already"),
                    broke: Box::new(e),
                });
            }
            // The broken session ends first: the destination sees it go (if it did not
            // already), and nothing of it is sent any more.
            match (owned.as_deref_mut(), first.as_deref_mut()) {
                (Some(n), _) => n.shutdown(),
                (None, Some(t)) => t.shutdown(),
                (None, None) => {}
            }
            let broke = Instant::now();
            if st.recoveries == 0 && first.is_none() && owned.is_none() {
                tracing::info!(within = ?rec.within, "taking over a migration whose source process is gone");
            } else {
                tracing::warn!(error = %error_chain(&e), within = ?rec.within, "the link broke; waiting for a new session to take the migration over");
            }
            match reattach(rec, id, memory, cfg.reply_timeout) {
                Ok((n, r, missing)) => {
                    if st.resumed_at.is_none() {
                        // The destination answers a Reattach only once its guest runs.
                        st.resumed_at = Some(Instant::now());
                        resumed.store(true, Ordering::SeqCst);
                        on_resumed();
                    }
                    let mut g = lock(shared);
                    for m in &missing {
                        st.resent += g.prepager.resend(m.first as usize, m.pages as usize) as u64;
                    }
                    drop(g);
                    // The broken session may take a while to close (its last frames time out).
                    if let Some(old) = owned.replace(n) {
                        std::thread::spawn(move || drop(old));
                    }
                    first = None;
                    remotes = r;
                    st.recoveries += 1;
                    st.recovery += broke.elapsed();
                    tracing::info!(
                        missing = missing.iter().map(|m| m.pages as u64).sum::<u64>(),
                        ms = broke.elapsed().as_secs_f64() * 1e3,
                        "a new session took the migration over"
                    );
                }
                Err((attempts, last)) => {
                    break Err(PostcopyError::NotReattached { attempts, within: rec.within, last, broke: Box::new(e) })
                }
            }
        }
        let cur: &mut dyn Transport = match (owned.as_deref_mut(), first.as_deref_mut()) {
            (Some(n), _) => n,
            (None, Some(t)) => t,
            (None, None) => unreachable!("a session was taken over above"),
        };
        match one_session(cur, memory, &remotes, shared, cfg, on_progress, paused, st, resumed, on_resumed) {
            Ok(d) => break Ok(d),
            Err(e) if cfg.recovery.is_some() && st.committed && e.link_broke() => broken = Some(e),
            Err(e) => break Err(e),
        }
    };
    // A session that took the migration over goes to the caller, whose own protocol may go
    // on over it.
    if let (Some(n), Some(rec)) = (owned, &cfg.recovery) {
        rec.link.adopt(n);
    }
    res
}

/// Most times one migration is taken over by a new session (a link that keeps breaking
/// gives up instead of blocking the guest's faults over and over).
const MAX_RECOVERIES: u32 = 8;

/// Takes over a post-copy migration whose source process is gone while its memory is not (a
/// VMM's guest memory, frozen since the hand-over, that this process maps again): every page
/// is hashed from `memory`, a session made by `cfg.recovery` presents `id` (the migration's
/// [`PostcopyConfig::id`]) to the destination, which answers with the pages it still misses;
/// those are pushed and demanded as before, and the destination verifies every page. Fails
/// at once without `cfg.recovery`. `on_attached` is called once the destination took the
/// new session (its guest was started there): a VMM whose device state had not gone yet
/// sends it then.
pub fn take_over(
    memory: &GuestMemory,
    id: [u8; 16],
    cfg: &PostcopyConfig,
    on_attached: &mut dyn FnMut(),
    on_progress: &mut dyn FnMut(&PushProgress),
) -> Result<PostcopySummary, PostcopyError> {
    let span = tracing::info_span!("postcopy_take_over", memory_bytes = memory.len());
    let _span = span.enter();
    let t0 = Instant::now();
    let (ps, pages) = (memory.page_size(), memory.pages());
    // The frozen memory's digest terms, as the gone source had them; zero pages unread.
    let zero = memory.known_zero_pages();
    let mut digests = PageDigests::new(pages, ps);
    for (i, r) in memory.regions().iter().enumerate() {
        for local in 0..r.pages() {
            let p = memory.base(i) + local;
            if zero.len() > p && zero.get(p) {
                digests.record_zero(p, 1);
            } else {
                digests.record_from(p, r, local);
            }
        }
    }
    // Everything counts as sent; the destination's list of missing pages unsends them.
    let mut prepager = Prepager::new(pages, cfg.order);
    prepager.mark_sent(0, pages);
    let shared = Mutex::new(Shared { prepager, digests });
    let resumed = AtomicBool::new(false);
    let mut st = PushState::new(true, pages);
    st.zero = Some(zero);
    st.committed = true;
    // The first Reattach answered marks the hand-over done (and calls `on_attached`).
    let res = drive(None, Vec::new(), memory, &shared, cfg, id, on_progress, t0, &mut st, &resumed, on_attached);
    let checksum = res?;
    let ps_stats = lock(&shared).prepager.stats();
    let resumed_at = st.resumed_at.expect("set by the take-over");
    Ok(PostcopySummary {
        strategy: "post-copy (taken over)".into(),
        precopy_pages: None,
        precopy_ms: None,
        invalidated_pages: None,
        rounds: None,
        round_pages: None,
        decided_by: None,
        order: cfg.order,
        transport: "-".into(),
        region_bytes: memory.len(),
        regions: memory.regions().len(),
        page_size: ps,
        total_s: t0.elapsed().as_secs_f64(),
        downtime_ms: 0.0,
        push_ms: st.pushed_at.unwrap_or(resumed_at).saturating_duration_since(resumed_at).as_secs_f64() * 1e3,
        push_held_ms: st.held.as_secs_f64() * 1e3,
        device_state_bytes: 0,
        zero_pages: st.zero_announced.count_ones() as u64,
        pushed_pages: ps_stats.pushed,
        demanded_pages: ps_stats.demanded,
        ignored_demands: ps_stats.ignored,
        pivots_replaced: ps_stats.pivots_replaced,
        bytes: (ps_stats.pushed + ps_stats.demanded) * ps as u64,
        recoveries: st.recoveries,
        recovery_ms: st.recovery.as_secs_f64() * 1e3,
        resent_pages: st.resent,
        checksum: checksum.hex(),
    })
}

/// Where the hand-over and the push stand, across the sessions of one migration.
struct PushState {
    /// Pages never populated are announced as zero (post-copy; hybrid sent them in its pass).
    find_zero: bool,
    /// Those pages, found once.
    zero: Option<crate::PageBitmap>,
    /// Pages announced as zero at least once.
    zero_announced: crate::PageBitmap,
    /// `Commit` was sent (from then on a broken link may be recovered).
    committed: bool,
    /// When `Resumed` came (or a new session took over before it did).
    resumed_at: Option<Instant>,
    /// When the last page went.
    pushed_at: Option<Instant>,
    /// How long the push waited for `Running`.
    held: Duration,
    recoveries: u32,
    recovery: Duration,
    resent: u64,
}

impl PushState {
    fn new(find_zero: bool, pages: usize) -> Self {
        PushState {
            find_zero,
            zero: None,
            zero_announced: crate::PageBitmap::new(if find_zero { pages } else { 0 }),
            committed: false,
            resumed_at: None,
            pushed_at: None,
            held: Duration::ZERO,
            recoveries: 0,
            recovery: Duration::ZERO,
            resent: 0,
        }
    }
}

impl PostcopyError {
    /// The link failed or went silent (a new session may take the migration over), as
    /// opposed to the peer refusing or breaking the protocol.
    fn link_broke(&self) -> bool {
        matches!(self, PostcopyError::Transport { .. } | PostcopyError::Timeout { .. })
    }
}

/// One session's part of the migration after the hand-over: the demand responder on its
/// urgent channel, and the push (from `Commit`, or where a broken session left it).
#[allow(clippy::too_many_arguments)]
fn one_session(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    remotes: &[u32],
    shared: &Mutex<Shared>,
    cfg: &PostcopyConfig,
    on_progress: &mut dyn FnMut(&PushProgress),
    paused: Instant,
    st: &mut PushState,
    resumed: &AtomicBool,
    on_resumed: &mut dyn FnMut(),
) -> Result<Digest, PostcopyError> {
    let phase = if st.committed { PostcopyPhase::Push } else { PostcopyPhase::Handover };
    let urgent = t.urgent().map_err(|source| PostcopyError::Transport { phase, source })?;
    let stop = AtomicBool::new(false);
    let urgent_failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let responder = s.spawn(|| {
            let r = respond(&*urgent, memory, remotes, shared, &stop);
            if r.is_err() {
                urgent_failed.store(true, Ordering::SeqCst);
            }
            r
        });
        let r =
            push_phase(t, memory, remotes, shared, cfg, on_progress, paused, st, &urgent_failed, resumed, on_resumed);
        stop.store(true, Ordering::SeqCst);
        let served =
            responder.join().unwrap_or_else(|_| Err(TransportError::Disconnected("responder panicked".into())));
        match (r, served) {
            (Ok(v), Ok(())) => Ok(v),
            // The urgent channel's own error says why the push stopped.
            (Err(_), Err(source)) if urgent_failed.load(Ordering::SeqCst) => {
                Err(PostcopyError::Transport { phase: PostcopyPhase::Push, source })
            }
            (Err(e), _) => Err(e),
            // The destination verified every page; the channel closing at the end is no
            // failure.
            (Ok(v), Err(e)) => {
                tracing::debug!(error = %e, "the demand responder ended with an error after the verification");
                Ok(v)
            }
        }
    })
}

/// A session that took the migration over: the session, the peer's regions for ours, and
/// the pages the destination is missing.
type Reattached = (Box<dyn Transport>, Vec<u32>, Vec<PageRun>);

/// Takes the migration over on a new session: dials (at most `rec.tries` times within
/// `rec.within`), presents `id`, and reads the pages the destination is missing. Returns
/// the session, the peer's regions for ours, and those pages; or the attempts made and the
/// last failure.
fn reattach(
    rec: &Recovery,
    id: [u8; 16],
    memory: &GuestMemory,
    reply_timeout: Duration,
) -> Result<Reattached, (u32, String)> {
    let phase = PostcopyPhase::Recover;
    let deadline = Instant::now() + rec.within;
    let pages = memory.pages() as u64;
    let mut attempts = 0;
    let mut last = "no attempt fitted in the deadline".to_string();
    while attempts < rec.tries && Instant::now() < deadline {
        attempts += 1;
        let r = (|| -> Result<_, PostcopyError> {
            let mut n = rec.link.relink(deadline).map_err(|source| PostcopyError::Transport { phase, source })?;
            let remotes = pick_remotes(n.as_ref(), memory).map_err(|e| PostcopyError::Refused(error_chain(&e)))?;
            send(n.as_mut(), phase, &Msg::Reattach { id })?;
            let mut missing = Vec::new();
            let mut total = 0u64;
            loop {
                if Instant::now() >= deadline {
                    return Err(PostcopyError::Timeout { phase, expected: "the end of Missing", timeout: rec.within });
                }
                let wait = recover::left(deadline, reply_timeout).max(Duration::from_millis(1));
                match recv(n.as_mut(), phase, "Missing", wait)? {
                    Msg::Missing { last, runs } => {
                        for r in &runs {
                            total += r.pages as u64;
                            if r.first.checked_add(r.pages as u64).is_none_or(|e| e > pages) || total > pages {
                                return Err(PostcopyError::Unexpected { phase, got: "Missing (pages out of range)" });
                            }
                        }
                        missing.extend(runs);
                        if last {
                            break;
                        }
                    }
                    Msg::Refuse { reason } => return Err(PostcopyError::Refused(reason)),
                    Msg::Abort { reason } => return Err(PostcopyError::PeerAborted { phase, reason }),
                    m => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
                }
            }
            Ok((n, remotes, missing))
        })();
        match r {
            Ok(v) => return Ok(v),
            Err(e) => {
                last = error_chain(&e);
                tracing::warn!(attempt = attempts, error = %last, "taking the migration over failed");
                // Attempts spread over the deadline (a dial into a dead link may fail at once).
                let spread = (rec.within / rec.tries.max(1)).clamp(Duration::from_millis(200), Duration::from_secs(5));
                let pause = recover::left(deadline, spread);
                if attempts < rec.tries && !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        }
    }
    Err((attempts, last))
}

fn resume_after(guest: &mut dyn GuestControl, e: &PostcopyError) {
    tracing::warn!(error = %error_chain(e), "post-copy failed before the hand-over; resuming the source");
    if let Err(r) = guest.resume() {
        tracing::error!(error = %error_chain(&r), "resuming the source guest failed");
    }
}

/// The hybrid strategy's pre-copy pass while the guest runs: tracking starts, pages never
/// populated are announced as zero, every other page is written once (hashed as it goes).
/// Returns the data pages sent.
fn precopy_pass(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    remotes: &[u32],
    dirty: &mut dyn DirtySource,
    digests: &mut PageDigests,
    on_progress: &mut dyn FnMut(&PushProgress),
) -> Result<u64, PostcopyError> {
    let phase = PostcopyPhase::Precopy;
    dirty.start().map_err(PostcopyError::Dirty)?;
    // After start: a page populated from now on is tracked as written.
    let zero = memory.known_zero_pages();
    let zero_runs: Vec<PageRun> = zero.runs().map(|(f, n)| PageRun { first: f as u64, pages: n as u32 }).collect();
    for r in &zero_runs {
        digests.record_zero(r.first as usize, r.pages as usize);
    }
    for chunk in zero_runs.chunks(MAX_RUNS) {
        send(t, phase, &Msg::Zero { runs: chunk.to_vec() })?;
    }
    let ps = memory.page_size() as usize;
    let pages = memory.pages();
    let mut sent = 0u64;
    let mut buf = vec![0u8; ps];
    let mut batch: Vec<(usize, usize)> = Vec::new();
    let mut p = 0;
    while p < pages {
        // Next batch: up to PASS_BATCH data pages, in page order.
        batch.clear();
        let mut n = 0;
        while p < pages && n < PASS_BATCH {
            if zero.get(p) {
                p = zero.next_zero(p);
                continue;
            }
            let end = zero.next_one(p).unwrap_or(pages).min(p + (PASS_BATCH - n));
            batch.push((p, end - p));
            n += end - p;
            p = end;
        }
        if batch.is_empty() {
            break;
        }
        post_runs(t, memory, remotes, &batch, phase)?;
        let runs = batch.iter().map(|&(f, k)| PageRun { first: f as u64, pages: k as u32 }).collect();
        send(t, phase, &Msg::Placed { runs })?;
        // Hashed after posting: a page the guest writes meanwhile is tracked and sent again.
        for &(f, k) in &batch {
            for q in f..f + k {
                let (i, local) = memory.locate(q).expect("in the page space");
                memory.regions()[i].read_at((local * ps) as u64, &mut buf);
                digests.record_bytes(q, &buf);
            }
        }
        sent += n as u64;
        on_progress(&PushProgress { sent: sent + zero.count_ones() as u64, pages: pages as u64, demanded: 0 });
    }
    t.flush().map_err(|source| PostcopyError::Transport { phase, source })?;
    Ok(sent)
}

/// How the pre-copy rounds after the first pass ended.
#[derive(Debug)]
struct RoundsDone {
    rounds: u32,
    pages: u64,
    reason: String,
}

/// Waits until the destination processed everything sent so far (an `IterationDone` it
/// acknowledges in order), while the guest still runs: the hand-over's messages then do not
/// queue behind the pass's last pages on the link (at 1 Gbit/s they waited 10-15 ms there,
/// all of it in the guest's pause). Pages written meanwhile are handed over as any others.
fn drain(t: &mut dyn Transport, reply_timeout: Duration) -> Result<(), PostcopyError> {
    let phase = PostcopyPhase::Precopy;
    send(t, phase, &Msg::IterationDone { iter: 0, pages: 0, dirty: 0 })?;
    match recv(t, phase, "IterationAck", reply_timeout)? {
        Msg::IterationAck { iter: 0 } => Ok(()),
        Msg::Abort { reason } => Err(PostcopyError::PeerAborted { phase, reason }),
        m => Err(PostcopyError::Unexpected { phase, got: m.name() }),
    }
}

/// Pre-copy rounds after the hybrid pass, ended by a convergence policy (the same pure state
/// machines as pre-copy's). Each round sends the pages written since they were last sent:
/// `Invalidate` for them, `IterationDone`, and only once the destination's `IterationAck`
/// says it has invalidated them (it refuses writes to pages it holds) the pages themselves,
/// then `Placed`. The policy sees one interval per round; when it stops pre-copy, the pages
/// written and not sent again are left in `pending` for the hand-over's invalidation.
struct Rounds<'a> {
    policy: &'a PolicyConfig,
    t0: Instant,
    pass_pages: u64,
    pass_time: Duration,
}

impl Rounds<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        t: &mut dyn Transport,
        memory: &GuestMemory,
        remotes: &[u32],
        dirty: &mut dyn DirtySource,
        digests: &mut PageDigests,
        pending: &mut crate::PageBitmap,
        reply_timeout: Duration,
        on_progress: &mut dyn FnMut(&PushProgress),
    ) -> Result<RoundsDone, PostcopyError> {
        let phase = PostcopyPhase::Precopy;
        let (pages, ps) = (memory.pages(), memory.page_size() as usize);
        let mut policy = build(self.policy, RegionInfo::new(pages, ps));
        let mut tracker = RetransmitTracker::new(pages);
        dirty.collect(pending).map_err(PostcopyError::Dirty)?;
        // The first pass is the first interval.
        let mut report = IntervalReport {
            now: self.t0.elapsed(),
            pages_posted: self.pass_pages as usize,
            post_time: self.pass_time,
            wait_time: Duration::ZERO,
            modified: pages,
            retransmitted: 0,
            remaining: pending.count_ones(),
            bytes_sent: self.pass_pages * ps as u64,
            first_pass_done: true,
        };
        let (mut iter, mut sent) = (1u32, 0u64);
        let mut buf = vec![0u8; ps];
        loop {
            let window = match policy.handle_interval(&report) {
                Decision::Continue { window } => window,
                Decision::StopAndCopy(r) | Decision::Abort(r) => {
                    tracing::info!(reason = %r, rounds = iter - 1, "pre-copy ends; post-copy moves the rest");
                    return Ok(RoundsDone { rounds: iter - 1, pages: sent, reason: r.to_string() });
                }
            };
            iter += 1;
            let started = Instant::now();
            let modified = pending.count_ones();
            let chosen = take_window(pending, window);
            let n = chosen.count_ones();
            let runs: Vec<PageRun> = chosen.runs().map(|(f, k)| PageRun { first: f as u64, pages: k as u32 }).collect();
            for chunk in runs.chunks(MAX_RUNS) {
                send(t, phase, &Msg::Invalidate { runs: chunk.to_vec() })?;
            }
            send(t, phase, &Msg::IterationDone { iter, pages: n as u64, dirty: pending.count_ones() as u64 })?;
            match recv(t, phase, "IterationAck", reply_timeout)? {
                Msg::IterationAck { iter: i } if i == iter => {}
                Msg::Abort { reason } => return Err(PostcopyError::PeerAborted { phase, reason }),
                m => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
            }
            let post_start = Instant::now();
            let all: Vec<(usize, usize)> = chosen.runs().collect();
            for batch in all.chunks(64) {
                post_runs(t, memory, remotes, batch, phase)?;
                let runs = batch.iter().map(|&(f, k)| PageRun { first: f as u64, pages: k as u32 }).collect();
                send(t, phase, &Msg::Placed { runs })?;
                for &(f, k) in batch {
                    tracker.record_sent_range(f, k);
                    for q in f..f + k {
                        let (i, local) = memory.locate(q).expect("in the page space");
                        memory.regions()[i].read_at((local * ps) as u64, &mut buf);
                        digests.record_bytes(q, &buf);
                    }
                }
            }
            t.flush().map_err(|source| PostcopyError::Transport { phase, source })?;
            let post_time = post_start.elapsed();
            sent += n as u64;
            dirty.collect(pending).map_err(PostcopyError::Dirty)?;
            on_progress(&PushProgress { sent: self.pass_pages + sent, pages: pages as u64, demanded: 0 });
            report = IntervalReport {
                now: self.t0.elapsed(),
                pages_posted: n,
                post_time,
                wait_time: started.elapsed().saturating_sub(post_time),
                modified,
                retransmitted: tracker.finish_interval(),
                remaining: pending.count_ones(),
                bytes_sent: (n * ps) as u64,
                first_pass_done: true,
            };
        }
    }
}

/// Takes a round's pages out of `pending`: the first `window` of them in page order (all of
/// them with no window). Pure.
fn take_window(pending: &mut crate::PageBitmap, window: Option<usize>) -> crate::PageBitmap {
    let mut chosen = crate::PageBitmap::new(pending.len());
    let mut n = 0usize;
    for (f, k) in pending.runs() {
        let k = window.map_or(k, |w| k.min(w.saturating_sub(n)));
        chosen.set_range(f, k);
        n += k;
        if window.is_some_and(|w| n >= w) {
            break;
        }
    }
    pending.and_not_assign(&chosen);
    chosen
}

/// Pages per batch of the hybrid pre-copy pass.
const PASS_BATCH: usize = 2048;

/// Posts the writes of `batch` (runs of pages), each run split at region ends and at 1 MiB.
fn post_runs(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    remotes: &[u32],
    batch: &[(usize, usize)],
    phase: PostcopyPhase,
) -> Result<(), PostcopyError> {
    let ps = memory.page_size() as usize;
    let mut segs: Vec<[Segment; 1]> = Vec::new();
    let mut meta: Vec<(usize, u64)> = Vec::new();
    for &(f, k) in batch {
        let mut p = f;
        while p < f + k {
            let (i, local) = memory.locate(p).expect("scheduled pages are in the page space");
            let left_in_region = memory.regions()[i].pages() - local;
            let n = (f + k - p).min(left_in_region).min((1 << 20) / ps);
            segs.push([Segment { offset: (local * ps) as u64, len: (n * ps) as u32 }]);
            meta.push((i, (local * ps) as u64));
            p += n;
        }
    }
    let wrs: Vec<WriteRequest<'_>> = segs
        .iter()
        .zip(&meta)
        .map(|(seg, &(i, off))| WriteRequest {
            local: memory.regions()[i].id(),
            segments: seg,
            remote: remotes[i],
            remote_offset: off,
        })
        .collect();
    t.post_writes(&wrs).map_err(|source| PostcopyError::Transport { phase, source })?;
    Ok(())
}

/// Commit (unless a session before this one got that far), the zero runs, the push, and the
/// verification. Returns the agreed digest; `st` records when the guest resumed and when
/// the last page went. Stops with a transport error as soon as `urgent_failed` is set.
#[allow(clippy::too_many_arguments)]
fn push_phase(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    remotes: &[u32],
    shared: &Mutex<Shared>,
    cfg: &PostcopyConfig,
    on_progress: &mut dyn FnMut(&PushProgress),
    paused: Instant,
    st: &mut PushState,
    urgent_failed: &AtomicBool,
    resumed_flag: &AtomicBool,
    on_resumed: &mut dyn FnMut(),
) -> Result<Digest, PostcopyError> {
    let phase = PostcopyPhase::Push;
    if !st.committed {
        // Set first: a Commit may arrive even if sending it reported a failure, and a new
        // session then finds out whether the guest runs there.
        st.committed = true;
        send(t, phase, &Msg::Commit)?;
        tracing::debug!("Commit sent");
    }
    if st.resumed_at.is_none() {
        match recv_watching(t, phase, "Resumed", cfg.reply_timeout, urgent_failed)? {
            Msg::Resumed => {}
            // The destination did not start the guest: it may run here again.
            Msg::Abort { reason } => return Err(PostcopyError::PeerAborted { phase: PostcopyPhase::Handover, reason }),
            m => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
        }
        let resumed = Instant::now();
        st.resumed_at = Some(resumed);
        resumed_flag.store(true, Ordering::SeqCst);
        on_resumed();
        tracing::info!(downtime_ms = (resumed - paused).as_secs_f64() * 1e3, "the guest runs at the destination");
        // The push (and finding the zero pages) waits until the guest really runs there: a
        // VMM may still be loading its device state, which the push would slow down. Demands
        // are answered meanwhile. (A session that takes over after a broken link does not
        // wait: the destination says `Running` once.)
        match recv_watching(t, phase, "Running", cfg.reply_timeout, urgent_failed)? {
            Msg::Running => {}
            Msg::Abort { reason } => return Err(PostcopyError::PeerAborted { phase, reason }),
            m => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
        }
        st.held = resumed.elapsed();
        tracing::debug!(held_ms = st.held.as_secs_f64() * 1e3, "the guest runs at the destination: pushing");
    }
    // Pages never populated are known zero without reading them (the source is frozen; this
    // runs while the guest already runs at the destination, off the downtime). Pages sent
    // otherwise meanwhile (the responder's, or ones the destination holds) are left out.
    let mut zero_runs: Vec<PageRun> = Vec::new();
    if st.find_zero {
        let t0 = Instant::now();
        let zero = st.zero.get_or_insert_with(|| memory.known_zero_pages());
        tracing::debug!(us = t0.elapsed().as_micros() as u64, "zero pages found");
        let mut g = lock(shared);
        for (f, n) in zero.runs() {
            let mut p = f;
            while p < f + n {
                if g.prepager.is_sent(p) {
                    p += 1;
                    continue;
                }
                let mut k = 0;
                while p + k < f + n && !g.prepager.is_sent(p + k) && k < u32::MAX as usize {
                    k += 1;
                }
                g.prepager.mark_sent(p, k);
                g.digests.record_zero(p, k);
                st.zero_announced.set_range(p, k);
                zero_runs.push(PageRun { first: p as u64, pages: k as u32 });
                p += k;
            }
        }
    }
    for chunk in zero_runs.chunks(MAX_RUNS) {
        send(t, phase, &Msg::Zero { runs: chunk.to_vec() })?;
    }
    let ps = memory.page_size() as usize;
    let total = memory.pages() as u64;
    let mut batch: Vec<(usize, usize)> = Vec::new();
    let mut buf = vec![0u8; ps];
    let mut terms: Vec<(usize, u128)> = Vec::new();
    let batch_pages = cfg.batch_pages.max(1);
    let mut window = PushWindow::new(cfg.push_window as u64, batch_pages as u64);
    loop {
        if urgent_failed.load(Ordering::SeqCst) {
            return Err(urgent_broke(phase));
        }
        // Room in the window first: the batch is then taken around the latest faults.
        take_replies(&mut window, t, phase, None)?;
        if !window.has_room() && lock(shared).prepager.remaining() > 0 {
            wait_room(&mut window, t, phase, cfg.reply_timeout, urgent_failed)?;
        }
        batch.clear();
        let (sent, demanded) = {
            let mut g = lock(shared);
            let mut n = 0;
            while n < batch_pages {
                match g.prepager.next_run(cfg.run_pages.max(1).min(batch_pages - n)) {
                    Some((f, k)) => {
                        batch.push((f, k));
                        n += k;
                    }
                    None => break,
                }
            }
            (total - g.prepager.remaining() as u64, g.prepager.stats().demanded)
        };
        if batch.is_empty() {
            break;
        }
        // Hash outside the lock (the memory is frozen) and record under it, before the pages
        // go: whatever reached the destination is in the digest even if this session breaks.
        terms.clear();
        for &(f, k) in &batch {
            for p in f..f + k {
                let (i, local) = memory.locate(p).expect("in the page space");
                memory.regions()[i].read_at((local * ps) as u64, &mut buf);
                terms.push((p, PageDigests::page_term(p, &buf)));
            }
        }
        {
            let mut g = lock(shared);
            for &(p, term) in &terms {
                g.digests.record_term(p, term);
            }
        }
        post_runs(t, memory, remotes, &batch, phase)?;
        #[cfg(feature = "fault-injection")]
        fault::corrupt_in_flight(t, memory, remotes, &batch)?;
        let runs = batch.iter().map(|&(f, k)| PageRun { first: f as u64, pages: k as u32 }).collect();
        send(t, phase, &Msg::Placed { runs })?;
        window.pushed(batch.iter().map(|&(_, k)| k as u64).sum());
        on_progress(&PushProgress { sent, pages: total, demanded });
    }
    t.flush().map_err(|source| PostcopyError::Transport { phase, source })?;
    st.pushed_at = Some(Instant::now());
    let (digest, demanded) = {
        let g = lock(shared);
        (g.digests.digest(), g.prepager.stats().demanded)
    };
    on_progress(&PushProgress { sent: total, pages: total, demanded });

    let phase = PostcopyPhase::Verify;
    send(t, phase, &Msg::Final)?;
    send(t, phase, &Msg::SourceChecksum { checksum: digest.to_bytes() })?;
    let verdict = loop {
        match recv_watching(t, phase, "Verified", cfg.reply_timeout, urgent_failed)? {
            // The last batches' acknowledgements.
            Msg::Installed { pages } => window.installed(phase, pages)?,
            m => break m,
        }
    };
    match verdict {
        Msg::Verified { ok: true, checksum } if Digest::from_bytes(&checksum) == digest => {}
        Msg::Verified { checksum, .. } => {
            let e = PostcopyError::ChecksumMismatch {
                source_sum: digest.hex(),
                dest_sum: Digest::from_bytes(&checksum).hex(),
            };
            let _ = send(t, phase, &Msg::Abort { reason: e.to_string() });
            return Err(e);
        }
        Msg::Abort { reason } => return Err(PostcopyError::PeerAborted { phase, reason }),
        m => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
    }
    // Every page is verified: the end of the session is no failure.
    if let Err(e) = send(t, phase, &Msg::Done) {
        tracing::debug!(error = %error_chain(&e), "Done after the verification did not go");
    }
    Ok(digest)
}

/// The push's pages in flight: pushed in this session and not yet acknowledged as
/// installed by the destination (`Installed`). Bookkeeping only; [`take_replies`] and
/// [`wait_room`] feed it from the session.
struct PushWindow {
    limit: u64,
    batch: u64,
    pushed: u64,
    installed: u64,
}

impl PushWindow {
    /// At most `limit` pages unacknowledged, batches of at most `batch` pages (`batch ≤ limit`).
    fn new(limit: u64, batch: u64) -> Self {
        PushWindow { limit: limit.max(batch), batch, pushed: 0, installed: 0 }
    }

    /// Whether a whole batch fits.
    fn has_room(&self) -> bool {
        self.pushed - self.installed + self.batch <= self.limit
    }

    fn pushed(&mut self, pages: u64) {
        self.pushed += pages;
    }

    /// The destination's count: it only grows, and never beyond what was pushed.
    fn installed(&mut self, phase: PostcopyPhase, pages: u64) -> Result<(), PostcopyError> {
        if pages < self.installed || pages > self.pushed {
            return Err(PostcopyError::Unexpected { phase, got: "Installed count out of order" });
        }
        self.installed = pages;
        Ok(())
    }
}

/// Takes the destination's messages already queued (or, with `wait`, the next one within
/// it): acknowledgements move `window`; an abort or anything else ends the push.
fn take_replies(
    window: &mut PushWindow,
    t: &mut dyn Transport,
    phase: PostcopyPhase,
    wait: Option<Duration>,
) -> Result<(), PostcopyError> {
    let mut wait = wait;
    loop {
        let b = t
            .recv_message(Some(wait.take().unwrap_or(Duration::ZERO)))
            .map_err(|source| PostcopyError::Transport { phase, source })?;
        let Some(b) = b else { return Ok(()) };
        match proto::decode(&b) {
            Ok(Msg::Installed { pages }) => window.installed(phase, pages)?,
            Ok(Msg::Abort { reason }) => return Err(PostcopyError::PeerAborted { phase, reason }),
            Ok(m) => return Err(PostcopyError::Unexpected { phase, got: m.name() }),
            Err(source) => return Err(PostcopyError::Protocol { phase, source }),
        }
    }
}

/// Waits until `window` has room: the destination acknowledges within `timeout` (in short
/// slices, so that a failed urgent channel ends the wait at once).
fn wait_room(
    window: &mut PushWindow,
    t: &mut dyn Transport,
    phase: PostcopyPhase,
    timeout: Duration,
    urgent_failed: &AtomicBool,
) -> Result<(), PostcopyError> {
    let deadline = Instant::now() + timeout;
    while !window.has_room() {
        if urgent_failed.load(Ordering::SeqCst) {
            return Err(urgent_broke(phase));
        }
        let left = recover::left(deadline, Duration::from_millis(200));
        if left.is_zero() {
            return Err(PostcopyError::Timeout { phase, expected: "Installed", timeout });
        }
        take_replies(window, t, phase, Some(left))?;
    }
    Ok(())
}

fn urgent_broke(phase: PostcopyPhase) -> PostcopyError {
    PostcopyError::Transport { phase, source: TransportError::Disconnected("the urgent channel failed".into()) }
}

/// The next control message within `timeout`, waited for in short slices so that a failed
/// urgent channel (the same link) ends the wait at once.
fn recv_watching(
    t: &mut dyn Transport,
    phase: PostcopyPhase,
    expected: &'static str,
    timeout: Duration,
    urgent_failed: &AtomicBool,
) -> Result<Msg, PostcopyError> {
    let deadline = Instant::now() + timeout;
    loop {
        if urgent_failed.load(Ordering::SeqCst) {
            return Err(urgent_broke(phase));
        }
        let left = recover::left(deadline, Duration::from_millis(200));
        if left.is_zero() {
            return Err(PostcopyError::Timeout { phase, expected, timeout });
        }
        match t.recv_message(Some(left)) {
            Ok(Some(b)) => return proto::decode(&b).map_err(|source| PostcopyError::Protocol { phase, source }),
            Ok(None) => {}
            Err(source) => return Err(PostcopyError::Transport { phase, source }),
        }
    }
}

/// The responder: answers demand requests until `stop`. A demand for a page not sent yet
/// is sent at once as an urgent write; the page becomes a pivot of the push.
fn respond(
    urgent: &dyn UrgentChannel,
    memory: &GuestMemory,
    remotes: &[u32],
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
) -> Result<(), TransportError> {
    let ps = memory.page_size() as usize;
    let mut buf = vec![0u8; ps];
    while !stop.load(Ordering::SeqCst) {
        let m = match urgent.recv(Some(Duration::from_millis(50))) {
            Ok(Some(UrgentEvent::Message(m))) => m,
            Ok(Some(UrgentEvent::Placed { .. })) => {
                return Err(TransportError::Disconnected("the destination wrote into our memory".into()))
            }
            Ok(None) => continue,
            // The session ending (Done) closes the channel too.
            Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => return Err(e),
        };
        let page = match proto::decode(&m) {
            Ok(Msg::Demand { page }) => page as usize,
            Ok(other) => {
                tracing::warn!(message = other.name(), "unexpected message on the urgent channel");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable demand request");
                continue;
            }
        };
        let Some((i, local)) = memory.locate(page) else {
            tracing::warn!(page, "demand for a page outside the guest memory");
            continue;
        };
        // The memory is frozen: hash first, then take the page and record its term at once,
        // so that the digest covers every page the scheduler counts as sent.
        memory.regions()[i].read_at((local * ps) as u64, &mut buf);
        let term = PageDigests::page_term(page, &buf);
        {
            let mut g = lock(shared);
            match g.prepager.demand(page) {
                Demand::Send => {
                    g.digests.record_term(page, term);
                }
                Demand::AlreadySent => continue,
                Demand::OutOfRange => {
                    tracing::warn!(page, "demand for a page outside the guest memory");
                    continue;
                }
            }
        }
        let seg = [Segment { offset: (local * ps) as u64, len: ps as u32 }];
        urgent.post_write(&WriteRequest {
            local: memory.regions()[i].id(),
            segments: &seg,
            remote: remotes[i],
            remote_offset: (local * ps) as u64,
        })?;
    }
    Ok(())
}

fn send(t: &mut dyn Transport, phase: PostcopyPhase, m: &Msg) -> Result<(), PostcopyError> {
    t.send_message(&m.encode()).map_err(|source| PostcopyError::Transport { phase, source })
}

/// The next control message within `timeout`.
fn recv(
    t: &mut dyn Transport,
    phase: PostcopyPhase,
    expected: &'static str,
    timeout: Duration,
) -> Result<Msg, PostcopyError> {
    match t.recv_message(Some(timeout)) {
        Ok(Some(b)) => proto::decode(&b).map_err(|source| PostcopyError::Protocol { phase, source }),
        Ok(None) => Err(PostcopyError::Timeout { phase, expected, timeout }),
        Err(source) => Err(PostcopyError::Transport { phase, source }),
    }
}

#[cfg(feature = "fault-injection")]
mod fault {
    //! Test builds only: `LIVEMIG_CORRUPT_PAGE=N` overwrites page N at the destination with
    //! a copy that has one byte flipped, right after the push wrote it and before its
    //! `Placed`, so the destination hashes and installs the corrupted page.
    use std::sync::Arc;

    use livemig_transport::{Access, Region, Segment, Transport, WriteRequest};

    use super::{PostcopyError, PostcopyPhase};
    use crate::guest::GuestMemory;

    const SCRATCH_ID: u32 = u32::MAX - 8;

    pub(super) fn corrupt_in_flight(
        t: &mut dyn Transport,
        memory: &GuestMemory,
        remotes: &[u32],
        batch: &[(usize, usize)],
    ) -> Result<(), PostcopyError> {
        let Some(page) = std::env::var("LIVEMIG_CORRUPT_PAGE").ok().and_then(|v| v.parse::<usize>().ok()) else {
            return Ok(());
        };
        if !batch.iter().any(|&(f, n)| page >= f && page < f + n) {
            return Ok(());
        }
        let ps = memory.page_size();
        let (i, local) = memory.locate(page).expect("in the batch");
        let scratch = Arc::new(Region::anonymous(SCRATCH_ID, ps as u64, ps, Access::LOCAL).expect("scratch page"));
        let mut buf = vec![0u8; ps as usize];
        memory.regions()[i].read_at(local as u64 * ps as u64, &mut buf);
        buf[ps as usize / 2] ^= 0x5a;
        scratch.write_at(0, &buf);
        let _reg = t.regions().register(scratch).expect("scratch id is free");
        tracing::warn!(page, "fault injection: corrupting one page in flight");
        let seg = [Segment { offset: 0, len: ps }];
        let phase = PostcopyPhase::Push;
        t.post_writes(&[WriteRequest {
            local: SCRATCH_ID,
            segments: &seg,
            remote: remotes[i],
            remote_offset: local as u64 * ps as u64,
        }])
        .map_err(|source| PostcopyError::Transport { phase, source })?;
        t.flush().map_err(|source| PostcopyError::Transport { phase, source })
    }
}

#[cfg(test)]
mod window_tests {
    use super::{PostcopyError, PostcopyPhase, PushWindow};

    #[test]
    fn the_window_fills_with_pushed_pages_and_empties_with_the_destinations_count() {
        let mut w = PushWindow::new(32, 16);
        assert!(w.has_room());
        w.pushed(16);
        assert!(w.has_room());
        w.pushed(16);
        assert!(!w.has_room(), "32 pages in flight fill a 32-page window");
        w.installed(PostcopyPhase::Push, 10).unwrap();
        assert!(!w.has_room(), "22 in flight: another batch of 16 would make 38");
        w.installed(PostcopyPhase::Push, 16).unwrap();
        assert!(w.has_room());
        w.pushed(16);
        w.installed(PostcopyPhase::Push, 48).unwrap();
        assert!(w.has_room());
        assert!(PushWindow::new(8, 16).has_room(), "a window smaller than a batch still takes one");
    }

    #[test]
    fn a_count_that_goes_back_or_beyond_what_was_pushed_is_refused() {
        let mut w = PushWindow::new(32, 16);
        w.pushed(16);
        let over = w.installed(PostcopyPhase::Push, 17).unwrap_err();
        assert!(matches!(over, PostcopyError::Unexpected { .. }), "{over:?}");
        w.installed(PostcopyPhase::Push, 10).unwrap();
        let back = w.installed(PostcopyPhase::Push, 9).unwrap_err();
        assert!(matches!(back, PostcopyError::Unexpected { .. }), "{back:?}");
        assert!(w.has_room(), "a refused count leaves the window as it was");
    }
}

#[cfg(test)]
mod round_tests {
    use super::take_window;
    use crate::PageBitmap;

    #[test]
    fn a_round_takes_the_first_window_of_pending_pages_in_order() {
        let mut p = PageBitmap::new(100);
        p.set_range(10, 5);
        p.set_range(40, 20);
        let c = take_window(&mut p, Some(12));
        assert_eq!(c.runs().collect::<Vec<_>>(), vec![(10, 5), (40, 7)]);
        assert_eq!(p.runs().collect::<Vec<_>>(), vec![(47, 13)]);
        let c = take_window(&mut p, None);
        assert_eq!((c.count_ones(), p.count_ones()), (13, 0));
        assert_eq!(take_window(&mut p, Some(5)).count_ones(), 0);
    }
}
