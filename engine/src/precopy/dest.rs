//! The destination driver: checks `Begin`, lets the transport place pages in its exposed
//! memory, keeps the digest of what landed, verifies it at switchover and starts the guest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_transport::{Transport, TransportError};

use super::proto::{self, Msg, PageRun, MAX_STATE};
use super::switchover::{DestNext, DestSwitchover};
use super::{check_fit, error_chain, Mismatch, Phase};
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
    let span = tracing::info_span!("receive", memory_bytes = memory.len(), transport = %t.kind());
    let _span = span.enter();
    let phase = Phase::Handshake;
    let first = t
        .recv_message(Some(cfg.reply_timeout))
        .map_err(|source| DestError::Transport { phase, source })?
        .ok_or(DestError::Timeout(cfg.reply_timeout))?;
    let layout = match decode(phase, &first)? {
        Msg::Begin { regions } => {
            let refuse = |t: &mut dyn Transport, e: DestError| {
                let _ = t.send_message(&Msg::Refuse { reason: error_chain(&e) }.encode());
                Err(e)
            };
            if regions.len() != memory.regions().len() {
                return refuse(t, DestError::RegionCount { src: regions.len(), dst: memory.regions().len() });
            }
            for (index, (s, d)) in regions.iter().zip(memory.regions()).enumerate() {
                if let Err(source) = check_fit(s.len, s.page_size, d.len(), d.page_size()) {
                    return refuse(t, DestError::Refused { index, source });
                }
            }
            PageLayout::new(regions.iter().map(|r| (r.len / r.page_size as u64) as usize))
        }
        other => return Err(DestError::Unexpected { phase, got: other.name() }),
    };
    send(t, phase, &Msg::Accept)?;
    tracing::info!(pages = layout.pages(), regions = layout.regions(), "accepted the migration");

    let phase = Phase::Precopy;
    let ps = memory.page_size() as u64;
    let pages = layout.pages() as u64;
    // Dropping it (on any return) ends the hashing thread.
    let hasher = Hasher::spawn(memory.clone(), layout.clone());
    let mut state: Vec<u8> = Vec::new();
    let mut state_done = false;
    let mut announced = 0u64;
    let mut rep = DestReport {
        iterations: 0,
        zero_pages: 0,
        bytes_received: 0,
        checksum: String::new(),
        hashed_at_final: 0,
        verify_ms: 0.0,
        switchover_ms: 0.0,
        device_state_bytes: 0,
    };
    // Liveness: a long interval (a big first pass under kvm) sends pages for a long time
    // without a control message, so progress is counted in bytes as well as messages.
    let mut last = (Instant::now(), t.stats().bytes_received);
    loop {
        let m = t
            .recv_message(Some(Duration::from_millis(500)))
            .map_err(|source| DestError::Transport { phase, source })?;
        let Some(m) = m else {
            let bytes = t.stats().bytes_received;
            if bytes != last.1 {
                last = (Instant::now(), bytes);
            } else if last.0.elapsed() > cfg.reply_timeout {
                return Err(DestError::ReplyTimeout { expected: "pre-copy progress", timeout: cfg.reply_timeout });
            }
            continue;
        };
        last = (Instant::now(), t.stats().bytes_received);
        match decode(phase, &m)? {
            Msg::IterationDone { iter, pages, dirty } => {
                rep.iterations = iter;
                on_iteration(iter, pages, dirty);
                // Every message before it is processed (Zero runs placed): the source may
                // now write those pages again.
                send(t, phase, &Msg::IterationAck { iter })?;
            }
            Msg::Zero { runs } => {
                // Make the pages zero (no assumption that our memory starts zeroed), writing
                // only where data may be: nothing on a fresh region. The source writes none
                // of them again before our IterationAck, so no newer copy can be here yet.
                check_runs(&runs, pages).map_err(|got| DestError::Unexpected { phase, got })?;
                for r in &runs {
                    for_each_region_part(&layout, r, |i, local, n| {
                        memory.regions()[i].place_zero(local as u64 * ps, n as u64 * ps);
                    });
                    rep.zero_pages += r.pages as u64;
                }
                hasher.send(Work::Zero(runs));
            }
            Msg::Placed { runs } => {
                check_runs(&runs, pages).map_err(|got| DestError::Unexpected { phase, got })?;
                announced += runs.iter().map(|r| r.pages as u64).sum::<u64>();
                hasher.send(Work::Placed(runs));
            }
            Msg::DeviceState { last, bytes } => {
                if state_done || state.len() + bytes.len() > MAX_STATE {
                    return Err(DestError::Unexpected { phase, got: "DeviceState (too much or after the last)" });
                }
                state.extend_from_slice(&bytes);
                state_done = last;
            }
            Msg::Final if state_done => {
                tracing::info!(iterations = rep.iterations, "stop-and-copy data complete; verifying");
                break;
            }
            Msg::Final => return Err(DestError::Unexpected { phase, got: "Final before the device state" }),
            other => return Err(DestError::Unexpected { phase, got: other.name() }),
        }
    }

    // Switchover (the pure `DestSwitchover` decides; see `switchover`): hash, compare, answer,
    // resume only on Commit.
    let phase = Phase::StopAndCopy;
    let t0 = Instant::now();
    let mut sw = DestSwitchover::new();
    // Only the pages announced since the hasher last caught up are left to hash.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    rep.hashed_at_final = announced.saturating_sub(hasher.hashed());
    hasher.send(Work::Finish(done_tx));
    let (digest, missing) = loop {
        match done_rx.recv_timeout(cfg.alive_every) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => send(t, phase, &Msg::Alive)?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the hashing thread panicked"),
        }
    };
    // The thread ends now; joining it (and freeing its tables) waits until after the
    // switchover, when the hasher is dropped.
    if let Some(page) = missing {
        tracing::warn!(page, "a page was never announced; the digests cannot match");
    }
    let ours = digest.to_bytes();
    sw.hashed(ours);
    let m = recv(t, phase, cfg.reply_timeout, sw.expected())?;
    match sw.handle(&m) {
        Ok(DestNext::Answer { ok }) => {
            send(t, phase, &Msg::Verified { ok, checksum: ours })?;
            rep.verify_ms = t0.elapsed().as_secs_f64() * 1e3;
            if !ok {
                let Msg::SourceChecksum { checksum: theirs } = m else { unreachable!("answered a SourceChecksum") };
                return Err(DestError::ChecksumMismatch {
                    source_sum: Digest::from_bytes(&theirs).hex(),
                    dest_sum: digest.hex(),
                });
            }
        }
        _ => return Err(DestError::Unexpected { phase, got: m.name() }),
    }
    rep.checksum = digest.hex();
    let commit = match recv(t, phase, cfg.reply_timeout, sw.expected()) {
        Ok(m) => sw.handle(&m).map_err(|_| DestError::Unexpected { phase, got: m.name() })?,
        Err(DestError::SourceAborted(r)) => return Err(DestError::SourceAborted(r)),
        Err(e) => return Err(DestError::NotCommitted(error_chain(&e))),
    };
    debug_assert!(commit == DestNext::Resume && sw.may_run());
    rep.bytes_received = t.stats().bytes_received;
    rep.device_state_bytes = state.len() as u64;
    if let Err(e) = start(state) {
        // Tell the source, which then resumes its own copy.
        let _ =
            t.send_message(&Msg::Abort { reason: format!("starting the guest failed: {}", error_chain(&e)) }.encode());
        return Err(DestError::Guest(e));
    }
    rep.switchover_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::info!(switchover_ms = rep.switchover_ms, "committed; the guest runs here");

    // From here the guest runs here: failures only lose the report, never the guest.
    let phase = Phase::Resumed;
    if let Err(e) = send(t, phase, &Msg::Resumed) {
        tracing::warn!(error = %error_chain(&e), "could not tell the source we resumed (it holds its copy paused)");
        return Ok(rep);
    }
    // The source closes with Done; a source that vanished now does not undo the migration.
    match t.recv_message(Some(cfg.reply_timeout)) {
        Ok(Some(m)) if matches!(proto::decode(&m), Ok(Msg::Done)) => {}
        other => tracing::warn!(?other, "source ended the session without Done"),
    }
    Ok(rep)
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

fn recv(t: &mut dyn Transport, phase: Phase, timeout: Duration, expected: &'static str) -> Result<Msg, DestError> {
    let m = t
        .recv_message(Some(timeout))
        .map_err(|source| DestError::Transport { phase, source })?
        .ok_or(DestError::ReplyTimeout { expected, timeout })?;
    decode(phase, &m)
}

fn send(t: &mut dyn Transport, phase: Phase, m: &Msg) -> Result<(), DestError> {
    t.send_message(&m.encode()).map_err(|source| DestError::Transport { phase, source })
}

fn decode(phase: Phase, b: &[u8]) -> Result<Msg, DestError> {
    match proto::decode(b).map_err(|source| DestError::Protocol { phase, source })? {
        Msg::Abort { reason } => Err(DestError::SourceAborted(reason)),
        m => Ok(m),
    }
}

/// Checks that every run lies within the source region's `pages`; names the message if not.
fn check_runs(runs: &[PageRun], pages: u64) -> Result<(), &'static str> {
    for r in runs {
        if !matches!(r.first.checked_add(r.pages as u64), Some(end) if end <= pages) {
            return Err("page run out of range");
        }
    }
    Ok(())
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
    fn spawn(memory: GuestMemory, layout: PageLayout) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let ps = memory.page_size();
        let pages = layout.pages();
        let hashed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = hashed.clone();
        let handle = std::thread::Builder::new()
            .name("livemig-digest".into())
            .spawn(move || {
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
            })
            .expect("spawn the digest thread");
        Hasher { tx: Some(tx), handle: Some(handle), hashed }
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
