//! The destination side of a post-copy migration (see [`super::source`] for the exchange).
//!
//! Three threads share the [`PageStates`] and the [`Placer`]:
//! - the **fault handler** reads the guest's userfaultfd faults and sends a demand request
//!   on the urgent channel for each page not asked for yet (a page already requested or
//!   arriving just waits; a pushed page that landed is installed at once; one installed
//!   meanwhile is woken);
//! - the **urgent installer** receives the answers (urgent writes into the staging alias),
//!   hashes each page and installs it with `UFFDIO_CONTINUE`, which wakes the faulting
//!   thread; it times fault → wake;
//! - the **control loop** (the calling thread) runs the session: `Begin`, the device state,
//!   `Commit` (arm userfaultfd, start the guest, `Resumed`; `Running` once the guest runs, see
//!   [`RunningGate`]), then `Zero` and `Placed` runs
//!   from the push: every queued message is read before each installation step, so pushed
//!   pages land (see [`PageStates`]) as soon as their `Placed` is here and are then hashed and
//!   installed in turn, each step acknowledged (`Installed`) to bound the source's push; and
//!   the final digest comparison once every page is installed.
//!
//! A failure after the guest started leaves it unable to go on (its missing pages will not
//! come): the placer is kept registered, so the guest's threads stay blocked on those pages
//! rather than read wrong memory, and [`PostcopyDestError::GuestLost`] tells the caller,
//! who must not let that guest run again (e.g. exit the process).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig_transport::{Region, Transport, TransportError, UrgentChannel, UrgentEvent};
use serde::Serialize;

use super::pages::{OnArrival, OnFault, OnLanded, OnZero, PageStates};
use super::recover::{self, Recovery};
use super::uffd::{Placer, PlacerError};
use crate::guest::{Foreign, GuestError, GuestMemory};
use crate::integrity::{Digest, PageDigests};
use crate::precopy::proto::{self, Msg, PageRun, Strategy, MAX_RUNS, MAX_STATE};
use crate::precopy::{check_fit, error_chain, Mismatch};

/// Destination settings.
#[derive(Debug, Clone)]
pub struct PostcopyDestConfig {
    /// How long to wait for each message of the handshake and the hand-over, and how long
    /// the push may go without any progress (no message, no page) before the source counts
    /// as lost.
    pub reply_timeout: Duration,
    /// If the link breaks after the guest started here, wait for a new session that takes
    /// the migration over (see [`super::recover`]); the guest's faults block meanwhile.
    /// `None` (or a source that did not offer it): a broken link loses the guest.
    pub recovery: Option<Recovery>,
    /// For a VMM whose guest runs only some time after the hand-over (QEMU loads its device
    /// state from its own stream once the source knows the guest may run here): the
    /// embedder's word that it runs. `None`: it runs once the starter returned.
    pub running: Option<RunningGate>,
}

impl Default for PostcopyDestConfig {
    fn default() -> Self {
        PostcopyDestConfig { reply_timeout: crate::precopy::REPLY_TIMEOUT, recovery: None, running: None }
    }
}

/// Set by the embedder once its guest runs here. Until then the destination does not send
/// `Running`, so the source does not push (it answers demands): the push does not compete
/// with the guest's start (the device state crossing and loading) for the link and the
/// CPUs. After `within` the destination sends `Running` anyway.
#[derive(Debug, Clone)]
pub struct RunningGate {
    /// Set once the guest runs.
    pub running: Arc<AtomicBool>,
    /// Longest `Running` is withheld (at most half the destination's `reply_timeout`, so
    /// that the source, which waits as long as that, does not give up first).
    pub within: Duration,
}

impl RunningGate {
    /// How long the destination waits at most, given its `reply_timeout`.
    pub fn bound(&self, reply_timeout: Duration) -> Duration {
        self.within.min(reply_timeout / 2)
    }
}

/// What the destination saw.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyDestReport {
    /// Pages of the guest memory.
    pub pages: u64,
    /// Faults that sent a demand request.
    pub demand_requests: u64,
    /// Faults on pages already requested or arriving (they waited, no request).
    pub waited_faults: u64,
    /// Faults on pushed pages that had landed but were not installed yet: installed by the
    /// fault handler at once (no request, no wait for the push's turn).
    pub landed_faults: u64,
    /// Pages installed from the urgent channel.
    pub urgent_pages: u64,
    /// Pages installed from the push.
    pub pushed_pages: u64,
    /// Zero pages installed.
    pub zero_pages: u64,
    /// Fault service latency (fault read by the handler → page installed and the thread
    /// woken), for requested pages: median, µs.
    pub fault_p50_us: Option<f64>,
    /// 99th percentile, µs.
    pub fault_p99_us: Option<f64>,
    /// Maximum, µs.
    pub fault_max_us: Option<f64>,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// From starting the guest to the last page installed, ms.
    pub complete_ms: f64,
    /// `Resumed` to `Running`, ms: how long the push waited for the guest to run (see
    /// [`RunningGate`]; about 0 without one).
    pub running_wait_ms: f64,
    /// The gate's bound ended that wait (the embedder never said the guest runs).
    pub running_by_bound: bool,
    /// Times the link broke and a new session took the migration over.
    pub recoveries: u32,
    /// From each break to its new session, summed, ms (the guest's faults waited).
    pub recovery_ms: f64,
    /// The verified digest.
    pub checksum: String,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostcopyDestError {
    /// The source's layout does not fit ours.
    #[error("refused the migration: {0}")]
    Refused(String),
    /// Region `index` does not fit.
    #[error("refused the migration: region {index} does not fit")]
    Fit {
        /// Region index.
        index: usize,
        /// Why.
        #[source]
        source: Mismatch,
    },
    /// The transport failed before the guest started (nothing runs here).
    #[error("transport failed before the guest started")]
    Transport(#[source] TransportError),
    /// The session has no urgent channel.
    #[error("post-copy needs the session's urgent channel")]
    NoUrgentChannel(#[source] TransportError),
    /// An undecodable or out-of-turn message before the guest started.
    #[error("protocol error before the guest started: {0}")]
    Protocol(String),
    /// Nothing in time before the guest started.
    #[error("no {0} from the source within {1:?}")]
    Timeout(&'static str, Duration),
    /// The source gave up before the guest started.
    #[error("the source aborted: {0}")]
    SourceAborted(String),
    /// Arming userfaultfd failed (the guest was not started).
    #[error("setting up userfaultfd placement failed")]
    Placer(#[source] PlacerError),
    /// The guest could not be started (the source was told, and resumes).
    #[error("starting the guest failed")]
    Guest(#[source] GuestError),
    /// The guest started here but the migration failed: its memory is incomplete (or
    /// differs from the source's). Its threads stay blocked on missing pages; it must not
    /// run on.
    #[error("post-copy failed after the guest started here ({installed} of {pages} pages installed); the guest cannot go on")]
    GuestLost {
        /// Pages installed.
        installed: u64,
        /// Pages in all.
        pages: u64,
        /// Why.
        #[source]
        source: Box<PostcopyDestError>,
    },
    /// After the start: the transport failed.
    #[error("transport failed")]
    Link(#[source] TransportError),
    /// After the start: a page or message the protocol forbids.
    #[error("the source broke the protocol: {0}")]
    Violation(String),
    /// After the start: installing pages failed.
    #[error("installing pages failed")]
    Install(#[source] PlacerError),
    /// After the start: no progress in time.
    #[error("no progress from the source within {0:?}")]
    Stalled(Duration),
    /// After the start: the link broke and no new session took the migration over in time.
    #[error(
        "the link broke and no session took the migration over ({sessions} sessions within {within:?}; last: {last})"
    )]
    NotReattached {
        /// Sessions accepted that did not take it over.
        sessions: u32,
        /// The recovery deadline.
        within: Duration,
        /// Why the last one did not (or why none came).
        last: String,
        /// How the link broke.
        #[source]
        broke: Box<PostcopyDestError>,
    },
    /// After the start: the digests differ.
    #[error("digest mismatch: source {source_sum}, destination {dest_sum}")]
    ChecksumMismatch {
        /// The source's (hex).
        source_sum: String,
        /// Ours (hex).
        dest_sum: String,
    },
}

/// What the fault handler and the urgent installer count.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    demand_requests: u64,
    waited_faults: u64,
    landed_faults: u64,
    urgent_pages: u64,
    /// `Resumed` to `Running` (see [`RunningGate`]), and whether the gate's bound ended it.
    running_wait: Duration,
    running_by_bound: bool,
}

struct Ctx<'a> {
    placer: &'a Placer,
    states: &'a PageStates,
    digests: &'a Mutex<PageDigests>,
    requested_at: &'a Mutex<HashMap<usize, Instant>>,
    latencies: &'a Mutex<Vec<Duration>>,
    page_size: usize,
}

impl Ctx<'_> {
    /// Pages `[first, first+n)` are zero: their page cache is punched out (an embedder's
    /// memory may hold old data), their digests recorded; a page a fault waits for is
    /// installed now, the others by their first fault (or never: a hole reads as zeros).
    fn zero(&self, first: usize, n: usize) -> Result<u64, PostcopyDestError> {
        let end = first + n;
        if let Some(p) = (first..end).find(|&p| p >= self.states.pages() || self.states.has_arrived(p)) {
            return Err(PostcopyDestError::Violation(format!("zero page {p} arrived twice or is out of range")));
        }
        self.placer.punch(first, n).map_err(PostcopyDestError::Install)?;
        // Terms first: once the last page counts as arrived, the digest is taken.
        self.digests.lock().unwrap_or_else(|e| e.into_inner()).record_zero(first, n);
        for p in first..end {
            match self.states.on_zero(p) {
                OnZero::Lazy => {}
                OnZero::InstallNow => {
                    self.placer.install_zero(p, 1).map_err(PostcopyDestError::Install)?;
                    self.states.installed_now(p);
                    if let Some(t) = self.requested_at.lock().unwrap_or_else(|e| e.into_inner()).remove(&p) {
                        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(t.elapsed());
                    }
                }
                OnZero::Duplicate | OnZero::OutOfRange => {
                    return Err(PostcopyDestError::Violation(format!("zero page {p} arrived twice")))
                }
            }
        }
        Ok(n as u64)
    }

    /// Pre-copied pages `[first, first+n)` (hybrid, before the guest runs here): hashed from
    /// the alias and staged, to be mapped by their first fault.
    fn stage(&self, first: usize, n: usize) -> Result<(), PostcopyDestError> {
        let mut buf = vec![0u8; self.page_size];
        let mut terms = Vec::with_capacity(n);
        for p in first..first + n {
            if !self.states.on_staged(p) {
                return Err(PostcopyDestError::Protocol(format!("page {p} sent twice in the pre-copy pass")));
            }
            let (alias, local) = self.placer.alias_of(p).expect("checked against the page space");
            alias.read_at((local * self.page_size) as u64, &mut buf);
            terms.push((p, PageDigests::page_term(p, &buf)));
        }
        let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        for (q, term) in terms {
            d.record_term(q, term);
        }
        Ok(())
    }

    /// Installs the pages `[first, first+n)` that arrived on the urgent channel (their
    /// content is in the alias): each claimed once, hashed, installed, timed if a fault
    /// asked for it.
    fn arrive(&self, first: usize, n: usize) -> Result<u64, PostcopyDestError> {
        let mut claimed = Vec::with_capacity(n);
        for p in first..first + n {
            match self.states.on_arrival(p) {
                OnArrival::Install { requested } => claimed.push((p, requested)),
                OnArrival::Duplicate => return Err(PostcopyDestError::Violation(format!("page {p} arrived twice"))),
                OnArrival::OutOfRange => {
                    return Err(PostcopyDestError::Violation(format!("page {p} is outside the guest memory")))
                }
            }
        }
        self.install_claimed(&claimed)?;
        Ok(n as u64)
    }

    /// Pushed pages `[first, first+n)` landed (their `Placed` message was read): marked, so
    /// that a fault on one installs it at once; those a fault had requested are installed now.
    fn land(&self, first: usize, n: usize) -> Result<(), PostcopyDestError> {
        let mut now = Vec::new();
        for p in first..first + n {
            match self.states.on_landed(p) {
                OnLanded::Landed => {}
                OnLanded::InstallNow => now.push((p, true)),
                OnLanded::Duplicate => return Err(PostcopyDestError::Violation(format!("page {p} arrived twice"))),
                OnLanded::OutOfRange => {
                    return Err(PostcopyDestError::Violation(format!("page {p} is outside the guest memory")))
                }
            }
        }
        self.install_claimed(&now)
    }

    /// Installs the landed pages of `[first, first+n)` that no fault installed first.
    fn install_landed(&self, first: usize, n: usize) -> Result<(), PostcopyDestError> {
        let claimed: Vec<(usize, bool)> =
            (first..first + n).filter(|&p| self.states.claim_landed(p)).map(|p| (p, false)).collect();
        self.install_claimed(&claimed)
    }

    /// Hashes and installs pages this thread claimed (in ascending order; `true`: a fault
    /// requested it, time it), in stretches of consecutive pages.
    fn install_claimed(&self, claimed: &[(usize, bool)]) -> Result<(), PostcopyDestError> {
        let mut buf = vec![0u8; self.page_size];
        let mut rest = claimed;
        while !rest.is_empty() {
            let k = (1..rest.len()).find(|&i| rest[i].0 != rest[0].0 + i || i >= 256).unwrap_or(rest.len());
            let (stretch, tail) = rest.split_at(k);
            rest = tail;
            let mut terms = Vec::with_capacity(k);
            // Hash before installing: until then the guest cannot touch the page.
            for &(q, _) in stretch {
                let (alias, local) = self.placer.alias_of(q).expect("claimed pages are in range");
                alias.read_at((local * self.page_size) as u64, &mut buf);
                terms.push((q, PageDigests::page_term(q, &buf)));
            }
            self.placer.install(stretch[0].0, k).map_err(PostcopyDestError::Install)?;
            let now = Instant::now();
            // Terms first: once the last page counts as installed, the digest is taken.
            {
                let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
                for (q, term) in terms {
                    d.record_term(q, term);
                }
            }
            for &(q, requested) in stretch {
                self.states.installed_now(q);
                if requested {
                    if let Some(t) = self.requested_at.lock().unwrap_or_else(|e| e.into_inner()).remove(&q) {
                        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(now - t);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Receives one post-copy migration into `memory`, whose staging aliases `aliases` (see
/// [`super::staging_aliases`]) are what `t` exposes to the source, in page-space order. `first`
/// is the session's first message if the caller read it already (to pick the strategy).
/// `start` starts the guest with its device state once the source commits; from then on
/// the guest runs while its pages arrive. `on_progress(installed, pages)` is called as pages
/// land.
pub fn receive(
    t: &mut dyn Transport,
    first: Option<Vec<u8>>,
    memory: &GuestMemory,
    aliases: &[Arc<Region>],
    start: &mut dyn FnMut(Vec<u8>) -> Result<(), GuestError>,
    cfg: &PostcopyDestConfig,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<PostcopyDestReport, PostcopyDestError> {
    receive_with(t, first, memory, aliases, Box::new(|| Placer::new(memory, aliases)), start, cfg, on_progress)
}

/// [`receive`] into guest memory another process maps ([`Foreign`]: a VMM that shared its
/// memory's files and handed over a userfaultfd of its address space). `memory`'s regions
/// are this process's mappings of those files: they are what `t` exposes and where pages
/// arrive, and the VMM's threads that touch a page not installed yet wait on its
/// userfaultfd for this process to install it. `start` is called once the placement is
/// armed, before the device state reaches the VMM.
pub fn receive_foreign(
    t: &mut dyn Transport,
    first: Option<Vec<u8>>,
    memory: &GuestMemory,
    foreign: Foreign,
    start: &mut dyn FnMut(Vec<u8>) -> Result<(), GuestError>,
    cfg: &PostcopyDestConfig,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<PostcopyDestReport, PostcopyDestError> {
    let aliases = memory.regions().to_vec();
    receive_with(t, first, memory, &aliases, Box::new(|| Placer::foreign(memory, foreign)), start, cfg, on_progress)
}

#[allow(clippy::too_many_arguments)]
fn receive_with(
    t: &mut dyn Transport,
    first: Option<Vec<u8>>,
    memory: &GuestMemory,
    aliases: &[Arc<Region>],
    placer: Box<dyn FnOnce() -> Result<Placer, PlacerError> + '_>,
    start: &mut dyn FnMut(Vec<u8>) -> Result<(), GuestError>,
    cfg: &PostcopyDestConfig,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<PostcopyDestReport, PostcopyDestError> {
    let span = tracing::info_span!("postcopy_receive", memory_bytes = memory.len(), transport = %t.kind());
    let _span = span.enter();
    let urgent = t.urgent().map_err(PostcopyDestError::NoUrgentChannel)?;
    let mut first = first;
    let mut next = |t: &mut dyn Transport, what: &'static str| -> Result<Msg, PostcopyDestError> {
        let b = match first.take() {
            Some(b) => b,
            None => t
                .recv_message(Some(cfg.reply_timeout))
                .map_err(PostcopyDestError::Transport)?
                .ok_or(PostcopyDestError::Timeout(what, cfg.reply_timeout))?,
        };
        match proto::decode(&b) {
            Ok(Msg::Abort { reason }) => Err(PostcopyDestError::SourceAborted(reason)),
            Ok(m) => Ok(m),
            Err(e) => Err(PostcopyDestError::Protocol(e.to_string())),
        }
    };
    let refuse = |t: &mut dyn Transport, e: PostcopyDestError| {
        let _ = t.send_message(&Msg::Refuse { reason: error_chain(&e) }.encode());
        e
    };
    let hybrid = match next(t, "Begin")? {
        Msg::Begin { strategy: strategy @ (Strategy::Postcopy | Strategy::Hybrid), regions } => {
            if regions.len() != memory.regions().len() {
                let e = PostcopyDestError::Refused(format!(
                    "the source has {} regions, this memory {}",
                    regions.len(),
                    memory.regions().len()
                ));
                return Err(refuse(t, e));
            }
            for (index, (s, d)) in regions.iter().zip(memory.regions()).enumerate() {
                if let Err(source) = check_fit(s.len, s.page_size, d.len(), d.page_size()) {
                    return Err(refuse(t, PostcopyDestError::Fit { index, source }));
                }
            }
            strategy == Strategy::Hybrid
        }
        Msg::Begin { strategy, .. } => {
            return Err(refuse(t, PostcopyDestError::Refused(format!("this receiver runs post-copy, not {strategy}"))))
        }
        m => return Err(PostcopyDestError::Protocol(format!("{} instead of Begin", m.name()))),
    };
    let mut placer = match placer() {
        Ok(p) => p,
        Err(e) => return Err(refuse(t, PostcopyDestError::Placer(e))),
    };
    t.send_message(&Msg::Accept.encode()).map_err(PostcopyDestError::Transport)?;
    let pages = memory.pages();
    let states = Arc::new(PageStates::new(pages));
    // The source may write a page only until it has arrived (been hashed): the transport
    // refuses later writes, so nothing changes a page after its digest term is taken.
    let _guards = GuardReset(aliases);
    for (i, alias) in aliases.iter().enumerate() {
        let (st, base, ps) = (states.clone(), memory.base(i), memory.page_size() as u64);
        alias.set_write_guard(Some(Arc::new(move |offset: u64, len: u64| {
            let first = base + (offset / ps) as usize;
            let last = base + ((offset + len.max(1) - 1) / ps) as usize;
            (first..=last).all(|p| !st.has_arrived(p))
        })));
    }
    let digests = Mutex::new(PageDigests::new(pages, memory.page_size()));
    let requested_at = Mutex::new(HashMap::new());
    let latencies = Mutex::new(Vec::new());
    macro_rules! ctx {
        ($placer:expr) => {
            Ctx {
                placer: $placer,
                states: &*states,
                digests: &digests,
                requested_at: &requested_at,
                latencies: &latencies,
                page_size: memory.page_size() as usize,
            }
        };
    }
    // Until Commit: the hybrid pass (staged pages, zero pages, invalidations) and the device
    // state. Nothing runs here yet; a failure tells the source, which resumes.
    let mut state = Vec::new();
    let mut recover_id = None;
    let pre = (|| -> Result<(), PostcopyDestError> {
        let c = ctx!(&placer);
        let violation = |what: String| Err(PostcopyDestError::Protocol(what));
        let check = |runs: &[PageRun]| {
            runs.iter().all(|r| r.first.checked_add(r.pages as u64).is_some_and(|e| e <= pages as u64))
        };
        loop {
            match next(t, "Commit")? {
                Msg::Zero { runs } if hybrid && check(&runs) => {
                    for r in runs {
                        c.zero(r.first as usize, r.pages as usize)
                            .map_err(|e| PostcopyDestError::Protocol(e.to_string()))?;
                    }
                }
                Msg::Placed { runs } if hybrid && check(&runs) => {
                    for r in runs {
                        c.stage(r.first as usize, r.pages as usize)?;
                    }
                    on_progress(states.installed() as u64, pages as u64);
                }
                // A pre-copy round: every invalidation before it is done, its pages may come.
                Msg::IterationDone { iter, .. } if hybrid => {
                    t.send_message(&Msg::IterationAck { iter }.encode()).map_err(PostcopyDestError::Transport)?
                }
                Msg::Invalidate { runs } if hybrid && check(&runs) => {
                    for r in runs {
                        for p in r.first as usize..(r.first + r.pages as u64) as usize {
                            if !states.invalidate(p) {
                                return violation(format!("page {p} invalidated but never sent"));
                            }
                        }
                    }
                }
                Msg::DeviceState { last: _, bytes } if state.len() + bytes.len() > MAX_STATE => {
                    return violation(format!("device state over {MAX_STATE} bytes"))
                }
                Msg::DeviceState { bytes, .. } => state.extend_from_slice(&bytes),
                Msg::Recoverable { id } => recover_id = Some(id),
                Msg::Commit => {
                    tracing::debug!("Commit received");
                    return Ok(());
                }
                m => return violation(format!("unexpected {} before Commit", m.name())),
            }
        }
    })();
    if let Err(e) = pre {
        if !matches!(e, PostcopyDestError::SourceAborted(_)) {
            let _ = t.send_message(&Msg::Abort { reason: error_chain(&e) }.encode());
        }
        return Err(e);
    }
    let device_state_bytes = state.len() as u64;
    if let Err(e) = placer.arm().and_then(|()| {
        tracing::debug!("userfaultfd armed");
        punch_missing(&placer, &states)
    }) {
        let e = PostcopyDestError::Placer(e);
        let _ = t.send_message(&Msg::Abort { reason: error_chain(&e) }.encode());
        return Err(e);
    }
    tracing::debug!("pages not here removed from the mappings");
    let ctx = ctx!(&placer);
    let counts = Mutex::new(Counts::default());
    let started = Instant::now();
    // The guest was started here / the source was told so.
    let (mut guest_started, mut resumed_sent) = (false, false);
    let mut totals = (0u64, 0u64); // zero pages, pushed pages
    let mut owned: Option<Box<dyn Transport>> = None;
    let mut urgent = urgent;
    let mut first_session = Some(state);
    let (mut recoveries, mut recovery_time) = (0u32, Duration::ZERO);
    let out = loop {
        let cur: &mut dyn Transport = match owned.as_deref_mut() {
            Some(n) => n,
            None => &mut *t,
        };
        let starting: Option<(Vec<u8>, Starter<'_>)> = match first_session.take() {
            Some(st) => Some((st, &mut *start)),
            None => None,
        };
        let e = match dest_session(
            cur,
            &ctx,
            &*urgent,
            cfg,
            &counts,
            starting,
            &mut guest_started,
            &mut resumed_sent,
            &mut totals,
            on_progress,
        ) {
            Ok(sum) => break Ok(sum),
            Err(e) => e,
        };
        let rec = match (&cfg.recovery, recover_id) {
            (Some(rec), Some(id)) if guest_started && e.link_broke() && recoveries < MAX_RECOVERIES => (rec, id),
            _ => break Err(e),
        };
        // The broken session ends first: the source sees it go (if it did not already), and
        // nothing it sent lands here any more (a late write could overwrite a page installed
        // from the next session).
        match owned.as_deref_mut() {
            Some(n) => n.shutdown(),
            None => t.shutdown(),
        }
        let broke = Instant::now();
        // Pages whose bytes are here are installed now, not after the next session came:
        // the guest's threads wait only for pages that really are missing.
        if let Err(e) = states.landed_runs().into_iter().try_for_each(|(f, n)| ctx.install_landed(f, n)) {
            break Err(e);
        }
        tracing::warn!(
            error = %error_chain(&e),
            within = ?rec.0.within,
            installed = states.installed(),
            pages,
            "the link broke; the guest's faults wait for a new session"
        );
        match await_reattach(rec.0, rec.1, &states, cfg.reply_timeout) {
            Ok(n) => {
                urgent = match n.urgent() {
                    Ok(u) => u,
                    Err(source) => break Err(PostcopyDestError::NoUrgentChannel(source)),
                };
                // The broken session may take a while to close (its last frames time out).
                if let Some(old) = owned.replace(n) {
                    std::thread::spawn(move || drop(old));
                }
                recoveries += 1;
                recovery_time += broke.elapsed();
                tracing::info!(ms = broke.elapsed().as_secs_f64() * 1e3, "a new session took the migration over");
            }
            Err((sessions, last)) => {
                break Err(PostcopyDestError::NotReattached {
                    sessions,
                    within: rec.0.within,
                    last,
                    broke: Box::new(e),
                })
            }
        }
    };
    let t: &mut dyn Transport = match owned.as_deref_mut() {
        Some(n) => n,
        None => t,
    };
    let complete_ms = started.elapsed().as_secs_f64() * 1e3;
    let r = match out {
        Ok(checksum) => {
            let (zero, pushed) = totals;
            // Every page is verified: stop placing (faults on lazy pages now go to the page
            // cache directly) before anything else.
            drop(placer);
            let _ = t.send_message(&Msg::Done.encode());
            let Counts { demand_requests, waited_faults, landed_faults, urgent_pages, running_wait, running_by_bound } =
                *counts.lock().unwrap_or_else(|e| e.into_inner());
            let mut l = latencies.into_inner().unwrap_or_else(|e| e.into_inner());
            l.sort();
            let pct =
                |q: f64| (!l.is_empty()).then(|| l[((l.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6);
            Ok(PostcopyDestReport {
                pages: pages as u64,
                demand_requests,
                waited_faults,
                landed_faults,
                urgent_pages,
                pushed_pages: pushed,
                zero_pages: zero,
                fault_p50_us: pct(0.5),
                fault_p99_us: pct(0.99),
                fault_max_us: l.last().map(|d| d.as_secs_f64() * 1e6),
                device_state_bytes,
                complete_ms,
                running_wait_ms: running_wait.as_secs_f64() * 1e3,
                running_by_bound,
                recoveries,
                recovery_ms: recovery_time.as_secs_f64() * 1e3,
                checksum,
            })
        }
        Err(PostcopyDestError::Guest(e)) => Err(PostcopyDestError::Guest(e)),
        Err(e) => {
            // Only once the source knows the guest runs here: an Abort instead of Resumed
            // would tell it that nothing runs here, and it would resume its copy.
            if resumed_sent {
                let _ = t.send_message(&Msg::Abort { reason: error_chain(&e) }.encode());
            }
            let installed = states.installed() as u64;
            // Keep the registration: the guest's threads stay blocked on missing pages
            // instead of reading memory that never arrived.
            std::mem::forget(placer);
            Err(PostcopyDestError::GuestLost { installed, pages: pages as u64, source: Box::new(e) })
        }
    };
    // A session that took the migration over goes to the caller, whose own protocol may go
    // on over it.
    if let (Some(n), Some(rec)) = (owned, &cfg.recovery) {
        rec.link.adopt(n);
    }
    r
}

/// Landed pages the control loop installs between reads of the source's messages.
const INSTALL_STEP: usize = 16;

/// The landed runs a session's control loop installs in turn (a fault may install a page
/// first), and the count it acknowledges to the source: only this session's pushed pages
/// count, not those a broken session left.
#[derive(Debug, Default)]
struct InstallQueue {
    /// First page, pages, pushed in this session.
    runs: VecDeque<(usize, usize, bool)>,
    /// This session's pushed pages taken off the queue.
    installed: u64,
}

/// One installation step.
#[derive(Debug, PartialEq, Eq)]
struct InstallStep {
    first: usize,
    pages: usize,
    /// This session's count once the step is done (`None`: pages a broken session left).
    acknowledge: Option<u64>,
}

impl InstallQueue {
    /// A queue that starts with the runs a broken session left.
    fn left_by(runs: Vec<(usize, usize)>) -> Self {
        InstallQueue { runs: runs.into_iter().map(|(f, n)| (f, n, false)).collect(), installed: 0 }
    }

    /// This session's pushed pages `[first, first+n)` landed.
    fn landed(&mut self, first: usize, n: usize) {
        self.runs.push_back((first, n, true));
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The next at most `max` pages of the first run.
    fn next_step(&mut self, max: usize) -> Option<InstallStep> {
        let (first, n, ours) = self.runs.pop_front()?;
        let pages = n.min(max.max(1));
        if pages < n {
            self.runs.push_front((first + pages, n - pages, ours));
        }
        let acknowledge = ours.then(|| {
            self.installed += pages as u64;
            self.installed
        });
        Some(InstallStep { first, pages, acknowledge })
    }
}

/// Most times one migration is taken over by a new session.
const MAX_RECOVERIES: u32 = 8;

/// Starts the guest with its device state.
type Starter<'a> = &'a mut dyn FnMut(Vec<u8>) -> Result<(), GuestError>;

/// One session's part after the hand-over: the fault handler and the urgent installer on
/// its urgent channel, and the control loop. The first session also starts the guest
/// (`starting`) and sends `Resumed`; a later one first asks again for the pages faults
/// were waiting for when the link broke.
#[allow(clippy::too_many_arguments)]
fn dest_session(
    t: &mut dyn Transport,
    ctx: &Ctx<'_>,
    urgent: &dyn UrgentChannel,
    cfg: &PostcopyDestConfig,
    counts: &Mutex<Counts>,
    starting: Option<(Vec<u8>, Starter<'_>)>,
    started: &mut bool,
    resumed_sent: &mut bool,
    totals: &mut (u64, u64),
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<String, PostcopyDestError> {
    let stop = AtomicBool::new(false);
    // Set by a helper thread that failed, so the control loop stops at once.
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let failed = &failed;
        let flag = move |r: Result<(), PostcopyDestError>| {
            if r.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            r
        };
        let stop = &stop;
        let faults = s.spawn(move || flag(handle_faults(ctx, urgent, stop, counts)));
        let installer = s.spawn(move || flag(install_urgent(ctx, urgent, stop, counts)));
        let r = (|| {
            match starting {
                Some((state, start)) => {
                    if let Err(e) = start(state) {
                        // Nothing runs here: the source may resume its copy.
                        let _ = t.send_message(
                            &Msg::Abort { reason: format!("starting the guest failed: {}", error_chain(&e)) }.encode(),
                        );
                        return Err(PostcopyDestError::Guest(e));
                    }
                    tracing::info!("the guest runs here; its pages follow");
                    // From here on the guest runs: a failure to tell the source is a broken link.
                    *started = true;
                    t.send_message(&Msg::Resumed.encode()).map_err(PostcopyDestError::Link)?;
                    *resumed_sent = true;
                    // The push starts once the guest really runs (bounded wait; faults are
                    // served meanwhile by the other threads).
                    if let Some(g) = &cfg.running {
                        let (wait, by_bound) = await_running(t, g, cfg.reply_timeout, failed)?;
                        let mut c = lock_counts(counts);
                        (c.running_wait, c.running_by_bound) = (wait, by_bound);
                    }
                    t.send_message(&Msg::Running.encode()).map_err(PostcopyDestError::Link)?;
                }
                None => {
                    for p in ctx.states.requested() {
                        urgent
                            .send_message(&Msg::Demand { page: p as u64 }.encode())
                            .map_err(PostcopyDestError::Link)?;
                    }
                }
            }
            control(t, ctx, cfg, failed, totals, on_progress)
        })();
        stop.store(true, Ordering::SeqCst);
        let f = faults.join().unwrap_or_else(|_| Err(PostcopyDestError::Violation("fault handler panicked".into())));
        let i = installer.join().unwrap_or_else(|_| Err(PostcopyDestError::Violation("installer panicked".into())));
        match (r, f, i) {
            (Ok(v), Ok(()), Ok(())) => Ok(v),
            // A helper's own error says more than the control loop's "a helper failed".
            (_, Err(e), _) | (_, Ok(()), Err(e)) if failed.load(Ordering::SeqCst) => Err(e),
            (Err(e), _, _) | (Ok(_), Err(e), _) | (Ok(_), Ok(()), Err(e)) => Err(e),
        }
    })
}

impl PostcopyDestError {
    /// The link failed or went silent (a new session may take the migration over), as
    /// opposed to the source breaking the protocol or placement failing.
    fn link_broke(&self) -> bool {
        matches!(self, PostcopyDestError::Link(_) | PostcopyDestError::Stalled(_))
    }
}

/// Waits for a session that takes the migration over: accepts (at most `rec.tries` sessions
/// within `rec.within`) until one presents `id`, and answers it with the pages that have
/// not arrived. Returns that session, or the sessions tried and why the last one failed.
fn await_reattach(
    rec: &Recovery,
    id: [u8; 16],
    states: &PageStates,
    reply_timeout: Duration,
) -> Result<Box<dyn Transport>, (u32, String)> {
    let deadline = Instant::now() + rec.within;
    let mut sessions = 0;
    let mut last = "no session came".to_string();
    while sessions < rec.tries && Instant::now() < deadline {
        let mut n = match rec.link.relink(deadline) {
            Ok(n) => n,
            Err(e) => {
                last = error_chain(&e);
                // A failed accept (not the deadline) is retried after a pause.
                std::thread::sleep(recover::left(deadline, Duration::from_millis(100)));
                continue;
            }
        };
        sessions += 1;
        let wait = recover::left(deadline, reply_timeout).max(Duration::from_millis(1));
        let refuse = |n: &mut Box<dyn Transport>, why: String| {
            let _ = n.send_message(&Msg::Refuse { reason: why.clone() }.encode());
            why
        };
        last = match n.recv_message(Some(wait)) {
            Ok(Some(b)) => match proto::decode(&b) {
                Ok(Msg::Reattach { id: theirs }) if theirs == id => {
                    let runs: Vec<PageRun> = states
                        .missing_runs()
                        .into_iter()
                        .map(|(f, k)| PageRun { first: f as u64, pages: k as u32 })
                        .collect();
                    let mut chunks = runs.chunks(MAX_RUNS).peekable();
                    let mut sent = Ok(());
                    if chunks.peek().is_none() {
                        sent = n.send_message(&Msg::Missing { last: true, runs: Vec::new() }.encode());
                    }
                    while let Some(c) = chunks.next() {
                        if sent.is_ok() {
                            sent = n.send_message(
                                &Msg::Missing { last: chunks.peek().is_none(), runs: c.to_vec() }.encode(),
                            );
                        }
                    }
                    match sent {
                        Ok(()) => return Ok(n),
                        Err(e) => error_chain(&e),
                    }
                }
                Ok(Msg::Reattach { .. }) => refuse(&mut n, "a Reattach for another migration".into()),
                Ok(m) => refuse(&mut n, format!("{} instead of Reattach", m.name())),
                Err(e) => refuse(&mut n, format!("undecodable message instead of Reattach: {e}")),
            },
            Ok(None) => format!("no Reattach within {wait:?}"),
            Err(e) => error_chain(&e),
        };
        tracing::warn!(session = sessions, reason = %last, "a session did not take the migration over");
    }
    Err((sessions, last))
}

/// In another process's view (see [`Placer::foreign`]), a page it mapped before the placer
/// was armed would never fault: each such page that has not arrived is punched out of the
/// page cache, which unmaps it there too, so its first access faults. (One that is not
/// mapped there faults anyway, and is installed only once its new content is written: its
/// stale page cache is left alone, off the downtime.)
fn punch_missing(placer: &Placer, states: &PageStates) -> Result<(), PlacerError> {
    let Some(mapped) = placer.mapped_in_views()? else { return Ok(()) };
    for (f, n) in mapped.runs() {
        let mut p = f;
        while p < f + n {
            if states.has_arrived(p) {
                p += 1;
                continue;
            }
            let first = p;
            while p < f + n && !states.has_arrived(p) {
                p += 1;
            }
            placer.punch(first, p - first)?;
        }
    }
    Ok(())
}

/// Removes the write guards of the staging aliases when the session ends, whichever way.
struct GuardReset<'a>(&'a [Arc<Region>]);

impl Drop for GuardReset<'_> {
    fn drop(&mut self) {
        for a in self.0 {
            a.set_write_guard(None);
        }
    }
}

/// The control loop after the start: zero and pushed runs (counted into `totals`), then the
/// verification. Returns the digest (hex).
fn control(
    t: &mut dyn Transport,
    ctx: &Ctx<'_>,
    cfg: &PostcopyDestConfig,
    failed: &AtomicBool,
    totals: &mut (u64, u64),
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<String, PostcopyDestError> {
    let helper_failed = || PostcopyDestError::Violation("a fault-handling thread failed".into());
    let pages = ctx.states.pages() as u64;
    let (zero, pushed) = (&mut totals.0, &mut totals.1);
    let mut last_progress = Instant::now();
    let mut last_bytes = t.stats().bytes_received;
    let mut last_installed = 0;
    let mut pending = InstallQueue::left_by(ctx.states.landed_runs());

    let check_runs =
        |runs: &[PageRun]| runs.iter().all(|r| r.first.checked_add(r.pages as u64).is_some_and(|e| e <= pages));
    let theirs = loop {
        if failed.load(Ordering::SeqCst) {
            return Err(helper_failed());
        }
        // Messages first (every queued one is read before the next installation step, so a
        // page lands as soon as its `Placed` is here); with nothing queued, one step.
        let wait = if pending.is_empty() { Duration::from_millis(200) } else { Duration::ZERO };
        let m = match t.recv_message(Some(wait)).map_err(PostcopyDestError::Link)? {
            Some(b) => proto::decode(&b).map_err(|e| PostcopyDestError::Violation(e.to_string()))?,
            None if !pending.is_empty() => {
                let step = pending.next_step(INSTALL_STEP).expect("not empty");
                ctx.install_landed(step.first, step.pages)?;
                if let Some(pages) = step.acknowledge {
                    // The source pushes only so far ahead of this count.
                    t.send_message(&Msg::Installed { pages }.encode()).map_err(PostcopyDestError::Link)?;
                }
                on_progress(ctx.states.installed() as u64, pages);
                continue;
            }
            None => {
                let (bytes, inst) = (t.stats().bytes_received, ctx.states.installed());
                if bytes != last_bytes || inst != last_installed {
                    (last_bytes, last_installed) = (bytes, inst);
                    last_progress = Instant::now();
                } else if last_progress.elapsed() > cfg.reply_timeout {
                    return Err(PostcopyDestError::Stalled(cfg.reply_timeout));
                }
                on_progress(inst as u64, pages);
                continue;
            }
        };
        last_progress = Instant::now();
        match m {
            Msg::Zero { runs } if check_runs(&runs) => {
                let (t0, z0) = (Instant::now(), *zero);
                for r in runs {
                    *zero += ctx.zero(r.first as usize, r.pages as usize)?;
                }
                tracing::debug!(pages = *zero - z0, us = t0.elapsed().as_micros() as u64, "zero runs installed");
            }
            Msg::Placed { runs } if check_runs(&runs) => {
                for r in runs {
                    let (f, n) = (r.first as usize, r.pages as usize);
                    ctx.land(f, n)?;
                    *pushed += n as u64;
                    pending.landed(f, n);
                }
            }
            Msg::Final => {}
            Msg::SourceChecksum { checksum } => break Digest::from_bytes(&checksum),
            Msg::Abort { reason } => return Err(PostcopyDestError::Violation(format!("the source aborted: {reason}"))),
            m => return Err(PostcopyDestError::Violation(format!("unexpected {}", m.name()))),
        }
    };
    while let Some(step) = pending.next_step(usize::MAX) {
        ctx.install_landed(step.first, step.pages)?;
    }
    // Urgent pages may still be landing: wait for every page (bounded).
    let deadline = Instant::now() + cfg.reply_timeout;
    while !ctx.states.complete() {
        if failed.load(Ordering::SeqCst) {
            return Err(helper_failed());
        }
        if Instant::now() > deadline {
            // The last pages (answers to demands) did not come: the link may have gone silent.
            let first = ctx.states.first_missing().unwrap_or(0);
            tracing::warn!(page = first, "the source says it sent every page, but this one has not arrived");
            return Err(PostcopyDestError::Stalled(cfg.reply_timeout));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    on_progress(pages, pages);
    let ours = ctx.digests.lock().unwrap_or_else(|e| e.into_inner()).digest();
    let ok = ours == theirs;
    t.send_message(&Msg::Verified { ok, checksum: ours.to_bytes() }.encode()).map_err(PostcopyDestError::Link)?;
    if !ok {
        return Err(PostcopyDestError::ChecksumMismatch { source_sum: theirs.hex(), dest_sum: ours.hex() });
    }
    // Done (or the source closing) ends the session.
    match t.recv_message(Some(cfg.reply_timeout)) {
        Ok(Some(b)) => match proto::decode(&b) {
            Ok(Msg::Done) => {}
            Ok(m) => tracing::warn!(message = m.name(), "expected Done after Verified"),
            Err(e) => tracing::warn!(error = %e, "undecodable message after Verified"),
        },
        Ok(None) | Err(_) => tracing::warn!("no Done after Verified; the memory is verified, going on"),
    }
    Ok(ours.hex())
}

/// The fault handler thread.
fn handle_faults(
    ctx: &Ctx<'_>,
    urgent: &dyn UrgentChannel,
    stop: &AtomicBool,
    counts: &Mutex<Counts>,
) -> Result<(), PostcopyDestError> {
    let mut faults = Vec::new();
    // Lazy zero pages may fault after every page has arrived: serve until told to stop.
    while !stop.load(Ordering::SeqCst) {
        faults.clear();
        ctx.placer.wait_faults(Duration::from_millis(50), &mut faults).map_err(PostcopyDestError::Install)?;
        for &p in &faults {
            // The request's time is recorded under the map's lock taken before the state
            // changes: a page that lands and is installed at once finds it there.
            let on_fault = {
                let mut at = ctx.requested_at.lock().unwrap_or_else(|e| e.into_inner());
                let f = ctx.states.on_fault(p);
                if f == OnFault::Request {
                    at.insert(p, Instant::now());
                }
                f
            };
            match on_fault {
                OnFault::Request => {
                    counts.lock().unwrap_or_else(|e| e.into_inner()).demand_requests += 1;
                    urgent.send_message(&Msg::Demand { page: p as u64 }.encode()).map_err(PostcopyDestError::Link)?;
                }
                OnFault::Wait => counts.lock().unwrap_or_else(|e| e.into_inner()).waited_faults += 1,
                // Installed, yet it faulted: either the event predates the installation (the
                // page is mapped: EEXIST, just wake) or the page lost its mapping since
                // (reclaim, the embedder's MADV_DONTNEED): map it again.
                OnFault::Wake => ctx.placer.reinstall(p).map_err(PostcopyDestError::Install)?,
                OnFault::InstallZero => {
                    ctx.placer.install_zero(p, 1).map_err(PostcopyDestError::Install)?;
                    ctx.states.lazy_installed(p);
                }
                OnFault::InstallStaged => {
                    ctx.placer.install(p, 1).map_err(PostcopyDestError::Install)?;
                    ctx.states.lazy_installed(p);
                }
                // Pushed and not installed yet: installed here, without waiting for its turn.
                OnFault::InstallLanded => {
                    counts.lock().unwrap_or_else(|e| e.into_inner()).landed_faults += 1;
                    ctx.install_claimed(&[(p, false)])?;
                }
                OnFault::OutOfRange => {}
            }
        }
    }
    Ok(())
}

/// The urgent installer thread.
fn install_urgent(
    ctx: &Ctx<'_>,
    urgent: &dyn UrgentChannel,
    stop: &AtomicBool,
    counts: &Mutex<Counts>,
) -> Result<(), PostcopyDestError> {
    while !stop.load(Ordering::SeqCst) && !ctx.states.complete() {
        match urgent.recv(Some(Duration::from_millis(50))) {
            Ok(Some(UrgentEvent::Placed { region, offset, len })) => {
                let ps = ctx.page_size as u64;
                let index = ctx.placer.alias_index(region).ok_or_else(|| {
                    PostcopyDestError::Violation(format!("an urgent write into region {region}, not a staging view"))
                })?;
                if offset % ps != 0 || len as u64 % ps != 0 || len == 0 {
                    return Err(PostcopyDestError::Violation(format!(
                        "an urgent write of {len} bytes at {offset}, not whole pages"
                    )));
                }
                let first = ctx.placer.page_of_alias(index, offset).ok_or_else(|| {
                    PostcopyDestError::Violation(format!("an urgent write at {offset}, out of range"))
                })?;
                let n = (len as u64 / ps) as usize;
                let k = ctx.arrive(first, n)?;
                counts.lock().unwrap_or_else(|e| e.into_inner()).urgent_pages += k;
            }
            Ok(Some(UrgentEvent::Message(_))) => {
                return Err(PostcopyDestError::Violation("a message from the source on the urgent channel".into()))
            }
            Ok(None) => {}
            Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => return Err(PostcopyDestError::Link(e)),
        }
    }
    Ok(())
}

/// Waits until the embedder says its guest runs, or the gate's bound passed; returns how
/// long that took and whether the bound ended it. The source sends nothing before
/// `Running`, so the link is read meanwhile: a broken one is found at once (a new session
/// may take the migration over) and anything but `Alive` is a protocol violation.
fn await_running(
    t: &mut dyn Transport,
    g: &RunningGate,
    reply_timeout: Duration,
    failed: &AtomicBool,
) -> Result<(Duration, bool), PostcopyDestError> {
    let since = Instant::now();
    let within = g.bound(reply_timeout);
    while !g.running.load(Ordering::SeqCst) {
        if failed.load(Ordering::SeqCst) {
            return Err(PostcopyDestError::Violation("a fault-handling thread failed".into()));
        }
        if since.elapsed() >= within {
            tracing::warn!(?within, "the guest did not start: pushing anyway");
            return Ok((since.elapsed(), true));
        }
        match t.recv_message(Some(Duration::from_millis(1))) {
            Ok(None) => {}
            Ok(Some(b)) => match proto::decode(&b).map_err(|e| PostcopyDestError::Violation(e.to_string()))? {
                Msg::Alive => {}
                m => return Err(PostcopyDestError::Violation(format!("unexpected {} before Running", m.name()))),
            },
            Err(e) => return Err(PostcopyDestError::Link(e)),
        }
    }
    Ok((since.elapsed(), false))
}

fn lock_counts(c: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod install_queue_tests {
    use super::{InstallQueue, InstallStep};

    fn step(first: usize, pages: usize, acknowledge: Option<u64>) -> Option<InstallStep> {
        Some(InstallStep { first, pages, acknowledge })
    }

    #[test]
    fn steps_split_runs_and_only_this_sessions_pages_are_acknowledged() {
        let mut q = InstallQueue::left_by(vec![(100, 20)]);
        q.landed(0, 16);
        q.landed(40, 3);
        assert_eq!(q.next_step(16), step(100, 16, None), "a broken session's pages come first, unacknowledged");
        assert_eq!(q.next_step(16), step(116, 4, None));
        assert_eq!(q.next_step(16), step(0, 16, Some(16)));
        assert_eq!(q.next_step(16), step(40, 3, Some(19)), "the count is cumulative");
        assert!(q.is_empty());
        assert_eq!(q.next_step(16), None);
        q.landed(50, 5);
        assert_eq!(q.next_step(0), step(50, 1, Some(20)), "a step takes at least one page");
    }
}

#[cfg(test)]
mod running_gate_tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use super::RunningGate;

    #[test]
    fn the_wait_is_bounded_by_half_the_reply_timeout() {
        let g = RunningGate { running: Arc::new(AtomicBool::new(false)), within: Duration::from_secs(30) };
        assert_eq!(g.bound(Duration::from_secs(20)), Duration::from_secs(10), "the source must not give up first");
        assert_eq!(g.bound(Duration::from_secs(120)), Duration::from_secs(30));
    }
}
