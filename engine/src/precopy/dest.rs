//! The destination driver: checks `Begin`, lets the transport place pages in its exposed
//! memory, keeps the digest of what landed, verifies it at switchover and starts the guest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_transport::{Transport, TransportError};

use super::dest_session::{DestAction, DestEnd, DestFailure, DestSession, DestSessionConfig};
use super::proto::{self, Msg, PageRun, RegionDesc};
use super::{error_chain, Mismatch, Phase};
use crate::guest::{GuestError, GuestMemory, PageLayout};
use crate::integrity::{Digest, PageDigests};

/// Destination-side settings.
#[derive(Debug, Clone)]
pub struct DestConfig {
    /// While hashing at the switchover, send `Alive` this often (the source's
    /// `switchover_idle` must be longer).
    pub alive_every: Duration,
    /// How long to wait for `Begin`, for each switchover message and for `Done`; and how long
    /// pre-copy may go without progress (no control message and no page bytes arriving: a
    /// source that is alive but frozen) before the destination gives up.
    pub reply_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig { alive_every: Duration::from_millis(250), reply_timeout: super::REPLY_TIMEOUT }
    }
}

/// What the destination saw.
#[derive(Debug)]
pub struct DestReport {
    /// Pre-copy intervals announced by the source.
    pub iterations: u32,
    /// Zero pages announced.
    pub zero_pages: u64,
    /// Payload bytes the source wrote into our memory.
    pub bytes_received: u64,
    /// The verified region digest (hex).
    pub checksum: String,
    /// Pages hashed after `Final` (the digest's share of the downtime).
    pub hashed_at_final: u64,
    /// Time from `Final` to `Verified` (finishing our digest, and waiting for the source's), ms.
    pub verify_ms: f64,
    /// Time from `Final` to `Resumed` (digest, commit round trip, starting the guest), ms.
    pub switchover_ms: f64,
    /// Bytes of device state received.
    pub device_state_bytes: u64,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestError {
    /// We refused the source's memory: region `index` does not fit.
    #[error("refused the migration: region {index} does not fit")]
    Refused {
        /// Which region (in page-space order).
        index: usize,
        /// Why.
        #[source]
        source: Mismatch,
    },
    /// We refused the source's memory: it has a different number of regions.
    #[error("refused the migration: the source has {src} regions, this memory {dst}")]
    RegionCount {
        /// The source's.
        src: usize,
        /// Ours.
        dst: usize,
    },
    /// The source asked for a strategy this receiver does not run.
    #[error("refused the migration: the source asked for {0}, this receiver runs pre-copy")]
    Strategy(super::proto::Strategy),
    /// The transport failed.
    #[error("transport failed during {phase}")]
    Transport {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The source sent an undecodable message.
    #[error("the source sent an invalid message during {phase}")]
    Protocol {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: proto::ProtoError,
    },
    /// A message out of turn or out of range.
    #[error("unexpected {got} from the source during {phase}")]
    Unexpected {
        /// Where.
        phase: Phase,
        /// What came.
        got: &'static str,
    },
    /// No `Begin` in time.
    #[error("no Begin from the source within {0:?}")]
    Timeout(Duration),
    /// No reply in time during the switchover.
    #[error("no {expected} from the source within {timeout:?}")]
    ReplyTimeout {
        /// What was expected.
        expected: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The source gave up (policy abort or its own failure); nothing runs here.
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
    /// Our memory differs from the source's.
    #[error("digest mismatch: source {source_sum}, destination {dest_sum}; the guest was not started")]
    ChecksumMismatch {
        /// The source's (hex).
        source_sum: String,
        /// Ours (hex).
        dest_sum: String,
    },
    /// The guest could not be started (the source was told, and resumes).
    #[error("starting the guest failed")]
    Guest(#[source] GuestError),
    /// Digests matched but no `Commit` came: the source kept the guest (or holds it paused,
    /// if its `Commit` was lost). Nothing runs here; the memory is left as received.
    #[error("no Commit from the source after a matching digest ({0}); the guest was not started here")]
    NotCommitted(String),
    /// The thread keeping the digest could not be started or stopped working; the guest was
    /// not started here.
    #[error("the digest thread failed")]
    Digest(#[source] std::io::Error),
}

/// Receives one migration into `memory` (every region exposed `REMOTE_WRITE` in `t`'s
/// table). Once the memory is verified and the source has committed, `start` is called with
/// the guest's device state and must start the guest; if it fails, the source is told and
/// resumes its copy. `on_iteration(iter, pages, dirty)` is called per announced interval.
pub fn receive(
    t: &mut dyn Transport,
    memory: &GuestMemory,
    start: &mut dyn FnMut(Vec<u8>) -> Result<(), GuestError>,
    cfg: &DestConfig,
    on_iteration: &mut dyn FnMut(u32, u64, u64),
) -> Result<DestReport, DestError> {
    receive_from(t, None, memory, start, cfg, on_iteration)
}

/// [`receive`], when the caller has read the session's first message (`Begin`) already to
/// pick the strategy: `first` is handled before anything else is read.
pub fn receive_from(
    t: &mut dyn Transport,
    mut first: Option<Vec<u8>>,
    memory: &GuestMemory,
    start: &mut dyn FnMut(Vec<u8>) -> Result<(), GuestError>,
    cfg: &DestConfig,
    on_iteration: &mut dyn FnMut(u32, u64, u64),
) -> Result<DestReport, DestError> {
    let span = tracing::info_span!("receive", memory_bytes = memory.len(), transport = %t.kind());
    let _span = span.enter();
    let local = memory.regions().iter().map(|r| RegionDesc { len: r.len(), page_size: r.page_size() }).collect();
    let scfg = DestSessionConfig { reply_timeout: cfg.reply_timeout, alive_every: cfg.alive_every };
    let mut sess = DestSession::new(local, scfg);
    let t0 = Instant::now();
    let now = || t0.elapsed();
    let ps = memory.page_size() as u64;
    // Spawned once the layout is known; dropping it (on any return) ends the hashing thread.
    let mut hasher: Option<Hasher> = None;
    let mut digest_rx: Option<std::sync::mpsc::Receiver<(Digest, Option<usize>)>> = None;
    let mut digest: Option<Digest> = None;
    let mut hashed_at_final = 0;
    let mut err: Option<DestError> = None;
    let mut last_bytes = t.stats().bytes_received;
    let mut guest_error: Option<GuestError> = None;
    loop {
        while let Some(a) = sess.poll_action() {
            let phase = sess.phase();
            match a {
                DestAction::Send(m) => {
                    if let Err(e) = send(t, phase, &m) {
                        if sess.end().is_none() {
                            sess.handle_failure(now());
                            err.get_or_insert(e);
                        } else {
                            tracing::warn!(error = %error_chain(&e), message = m.name(), "could not send after the session ended");
                        }
                    }
                }
                DestAction::PlaceZero(runs) => {
                    let layout = sess.layout().cloned().unwrap_or_else(|| PageLayout::new([]));
                    // Make the pages zero (no assumption that our memory starts zeroed),
                    // writing only where data may be: nothing on a fresh region. The source
                    // writes none of them again before our IterationAck.
                    for r in &runs {
                        for_each_region_part(&layout, r, |i, local, n| {
                            memory.regions()[i].place_zero(local as u64 * ps, n as u64 * ps);
                        });
                    }
                    match hasher_for(&mut hasher, memory, layout) {
                        Ok(h) => h.send(Work::Zero(runs)),
                        Err(e) => fail(&mut sess, now(), &mut err, e),
                    }
                }
                DestAction::HashPlaced(runs) => {
                    let layout = sess.layout().cloned().unwrap_or_else(|| PageLayout::new([]));
                    match hasher_for(&mut hasher, memory, layout) {
                        Ok(h) => h.send(Work::Placed(runs)),
                        Err(e) => fail(&mut sess, now(), &mut err, e),
                    }
                }
                DestAction::Progress { iter, pages, dirty } => on_iteration(iter, pages, dirty),
                DestAction::FinishDigest => {
                    tracing::info!(iterations = sess.iterations, "stop-and-copy data complete; verifying");
                    let layout = sess.layout().cloned().unwrap_or_else(|| PageLayout::new([]));
                    match hasher_for(&mut hasher, memory, layout) {
                        Ok(h) => {
                            // Only the pages announced since the hasher last caught up are left.
                            hashed_at_final = sess.placed_pages.saturating_sub(h.hashed());
                            let (tx, rx) = std::sync::mpsc::channel();
                            h.send(Work::Finish(tx));
                            digest_rx = Some(rx);
                        }
                        Err(e) => fail(&mut sess, now(), &mut err, e),
                    }
                }
                DestAction::StartGuest(state) => {
                    let r = start(state);
                    if let Err(e) = &r {
                        tracing::warn!(error = %error_chain(e), "starting the guest failed");
                    }
                    sess.handle_started(now(), r.as_ref().map(|_| ()).map_err(|e| error_chain(e)));
                    if let Err(e) = r {
                        guest_error = Some(e);
                    } else {
                        tracing::info!("committed; the guest runs here");
                    }
                }
            }
        }
        if sess.end().is_some() {
            break;
        }
        let timeout = sess.poll_timeout().map(|d| d.saturating_sub(now()));
        if let (true, Some(rx)) = (sess.finishing_digest(), digest_rx.as_ref()) {
            match rx.recv_timeout(timeout.unwrap_or(cfg.alive_every)) {
                Ok((d, missing)) => {
                    if let Some(page) = missing {
                        tracing::warn!(page, "a page was never announced; the digests cannot match");
                    }
                    digest = Some(d);
                    sess.handle_digest(now(), d.to_bytes());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => sess.handle_timeout(now()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let e = DestError::Digest(std::io::Error::other("the digest thread ended without a digest"));
                    fail(&mut sess, now(), &mut err, e);
                }
            }
            continue;
        }
        // Liveness: a long interval (a big first pass under kvm) sends pages for a long time
        // without a control message, so arriving page bytes count as progress too.
        let slice = timeout.unwrap_or(cfg.reply_timeout).min(Duration::from_millis(500));
        let phase = sess.phase();
        let got = match first.take() {
            Some(b) => Ok(Some(b)),
            None => t.recv_message(Some(slice)),
        };
        match got {
            Ok(Some(b)) => match proto::decode(&b) {
                Ok(m) => sess.handle_message(now(), m),
                Err(source) => {
                    sess.handle_failure(now());
                    err.get_or_insert(DestError::Protocol { phase, source });
                }
            },
            Ok(None) => {
                let bytes = t.stats().bytes_received;
                if bytes != last_bytes {
                    last_bytes = bytes;
                    sess.handle_progress(now());
                }
                sess.handle_timeout(now());
            }
            Err(source) => {
                sess.handle_failure(now());
                err.get_or_insert(DestError::Transport { phase, source });
            }
        }
    }
    let rep = DestReport {
        iterations: sess.iterations,
        zero_pages: sess.zero_pages,
        bytes_received: t.stats().bytes_received,
        checksum: digest.map(|d| d.hex()).unwrap_or_default(),
        hashed_at_final,
        verify_ms: ms_between(sess.final_at, sess.verified_at),
        switchover_ms: ms_between(sess.final_at, sess.started_at),
        device_state_bytes: sess.state_len() as u64,
    };
    let to_error =
        |phase: Phase, why: DestFailure, err: &mut Option<DestError>, guest: &mut Option<GuestError>| match why {
            DestFailure::Refused { index, why } => DestError::Refused { index, source: why },
            DestFailure::RegionCount { src, dst } => DestError::RegionCount { src, dst },
            DestFailure::SourceAborted(r) => DestError::SourceAborted(r),
            DestFailure::Strategy(st) => DestError::Strategy(st),
            DestFailure::Unexpected { got } => DestError::Unexpected { phase, got },
            DestFailure::Timeout { expected: "Begin", timeout } => DestError::Timeout(timeout),
            DestFailure::Timeout { expected, timeout } => DestError::ReplyTimeout { expected, timeout },
            DestFailure::Mismatch { theirs, ours } => DestError::ChecksumMismatch {
                source_sum: Digest::from_bytes(&theirs).hex(),
                dest_sum: Digest::from_bytes(&ours).hex(),
            },
            DestFailure::Start(_) => match guest.take() {
                Some(e) => DestError::Guest(e),
                None => DestError::Unexpected { phase, got: "a failed start" },
            },
            DestFailure::Driver => err.take().unwrap_or(DestError::Unexpected { phase, got: "an unreported failure" }),
        };
    match sess.end().cloned().expect("the loop ends with the session") {
        DestEnd::Completed => {
            if let Some(e) = err {
                tracing::warn!(error = %error_chain(&e), "the session ended badly after the guest started here");
            }
            Ok(rep)
        }
        DestEnd::Failed { phase, why } => Err(to_error(phase, why, &mut err, &mut guest_error)),
        DestEnd::NotCommitted(why) => {
            let e = to_error(Phase::StopAndCopy, why, &mut err, &mut guest_error);
            Err(DestError::NotCommitted(error_chain(&e)))
        }
    }
}

fn ms_between(a: Option<Duration>, b: Option<Duration>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() * 1e3,
        _ => 0.0,
    }
}

/// The digest thread, started on first use.
fn hasher_for<'h>(
    slot: &'h mut Option<Hasher>,
    memory: &GuestMemory,
    layout: PageLayout,
) -> Result<&'h Hasher, DestError> {
    let h = match slot.take() {
        Some(h) => h,
        None => Hasher::spawn(memory.clone(), layout).map_err(DestError::Digest)?,
    };
    Ok(slot.insert(h))
}

/// Records a driver failure: the session decides what it means, `err` says what it was.
fn fail(sess: &mut DestSession, now: Duration, err: &mut Option<DestError>, e: DestError) {
    if sess.end().is_none() {
        sess.handle_failure(now);
        err.get_or_insert(e);
    }
}

/// Calls `f(region, first local page, pages)` for each region part of the run `r` (runs
/// are checked against the layout first).
fn for_each_region_part(layout: &PageLayout, r: &PageRun, mut f: impl FnMut(usize, usize, usize)) {
    let mut p = r.first as usize;
    let end = p + r.pages as usize;
    while p < end {
        let Some((i, local)) = layout.locate(p) else { return };
        let n = (layout.base(i + 1) - p).min(end - p);
        f(i, local, n);
        p += n;
    }
}

fn send(t: &mut dyn Transport, phase: Phase, m: &Msg) -> Result<(), DestError> {
    t.send_message(&m.encode()).map_err(|source| DestError::Transport { phase, source })
}

/// Work for the hashing thread, in message order.
enum Work {
    Placed(Vec<PageRun>),
    Zero(Vec<PageRun>),
    /// Reply with the digest and the first page never announced, then end.
    Finish(std::sync::mpsc::Sender<(Digest, Option<usize>)>),
}

/// The destination's digest, kept up to date off the control path: pages are hashed as they
/// are announced, so at `Final` only the last ones remain.
struct Hasher {
    tx: Option<std::sync::mpsc::Sender<Work>>,
    handle: Option<std::thread::JoinHandle<()>>,
    hashed: Arc<std::sync::atomic::AtomicU64>,
}

impl Hasher {
    fn spawn(memory: GuestMemory, layout: PageLayout) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let ps = memory.page_size();
        let pages = layout.pages();
        let hashed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = hashed.clone();
        let handle = std::thread::Builder::new().name("livemig-digest".into()).spawn(move || {
            let mut d = PageDigests::new(pages, ps);
            for w in rx {
                match w {
                    Work::Placed(runs) => {
                        for r in runs {
                            let mut p = r.first as usize;
                            for_each_region_part(&layout, &r, |i, local, n| {
                                for k in 0..n {
                                    d.record_from(p + k, &memory.regions()[i], local + k);
                                }
                                p += n;
                            });
                            count.fetch_add(r.pages as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Work::Zero(runs) => {
                        for r in runs {
                            d.record_zero(r.first as usize, r.pages as usize);
                        }
                    }
                    Work::Finish(reply) => {
                        let _ = reply.send((d.digest(), d.first_missing()));
                        return;
                    }
                }
            }
        })?;
        Ok(Hasher { tx: Some(tx), handle: Some(handle), hashed })
    }

    /// Pages hashed so far.
    fn hashed(&self) -> u64 {
        self.hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send(&self, w: Work) {
        // The thread only ends on Finish or a panic (reported at Finish).
        if let Some(tx) = &self.tx {
            let _ = tx.send(w);
        }
    }

    fn stop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        self.stop();
    }
}
