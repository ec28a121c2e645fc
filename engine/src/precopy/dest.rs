//! The destination driver: checks `Begin`, lets the transport place pages in its exposed
//! region, verifies the checksum at switchover and resumes the workload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_transport::{Region, Transport, TransportError};

use super::proto::{self, Msg};
use super::{check_fit, hex, Mismatch, Phase};
use crate::workload::{Workload, WorkloadError};

/// Destination-side settings.
#[derive(Debug, Clone)]
pub struct DestConfig {
    /// After resuming, measure the workload's rate for this long and report it.
    pub rate_window: Duration,
    /// How long to wait for `Begin` and for `Done`.
    pub reply_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig { rate_window: Duration::from_secs(2), reply_timeout: super::REPLY_TIMEOUT }
    }
}

/// What the destination saw.
#[derive(Debug)]
pub struct DestReport {
    /// Pre-copy intervals announced by the source.
    pub iterations: u32,
    /// Zero pages announced.
    pub zero_pages: u64,
    /// Payload bytes the source wrote into our region.
    pub bytes_received: u64,
    /// The verified checksum (hex).
    pub checksum: String,
    /// Time from `Final` to `Resumed` (checksum and attach), ms.
    pub verify_ms: f64,
    /// Rate of the resumed workload, pages/s.
    pub after_rate: Option<f64>,
    /// The resumed workload (running), if the source had one.
    pub workload: Option<Workload>,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestError {
    /// We refused the source's region.
    #[error("refused the migration")]
    Refused(#[source] Mismatch),
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
    /// The source gave up (policy abort or its own failure); nothing runs here.
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
    /// Our memory differs from the source's.
    #[error("checksum mismatch: source {source_sum}, destination {dest_sum}; the workload was not resumed")]
    ChecksumMismatch {
        /// The source's (hex).
        source_sum: String,
        /// Ours (hex).
        dest_sum: String,
    },
    /// The migrated workload could not be resumed.
    #[error("resuming the workload failed")]
    Workload(#[source] WorkloadError),
}

/// Receives one migration into `region` (exposed, `REMOTE_WRITE`, in `t`'s table).
/// `on_iteration(iter, pages, dirty)` is called per announced interval.
pub fn receive(
    t: &mut dyn Transport,
    region: &Arc<Region>,
    cfg: &DestConfig,
    on_iteration: &mut dyn FnMut(u32, u64, u64),
) -> Result<DestReport, DestError> {
    let phase = Phase::Handshake;
    let first = t
        .recv_message(Some(cfg.reply_timeout))
        .map_err(|source| DestError::Transport { phase, source })?
        .ok_or(DestError::Timeout(cfg.reply_timeout))?;
    let (src_len, workload) = match decode(phase, &first)? {
        Msg::Begin { region_len, page_size, workload } => {
            if let Err(m) = check_fit(region_len, page_size, workload, region.len(), region.page_size()) {
                let _ = t.send_message(&Msg::Refuse { reason: m.to_string() }.encode());
                return Err(DestError::Refused(m));
            }
            (region_len, workload)
        }
        other => return Err(DestError::Unexpected { phase, got: other.name() }),
    };
    send(t, phase, &Msg::Accept)?;

    let phase = Phase::Precopy;
    let pages = region.pages() as u64;
    let mut rep = DestReport {
        iterations: 0,
        zero_pages: 0,
        bytes_received: 0,
        checksum: String::new(),
        verify_ms: 0.0,
        after_rate: None,
        workload: None,
    };
    let (theirs, resume) = loop {
        let m = t.recv_message(None).map_err(|source| DestError::Transport { phase, source })?;
        let Some(m) = m else { continue };
        match decode(phase, &m)? {
            Msg::IterationDone { iter, pages, dirty } => {
                rep.iterations = iter;
                on_iteration(iter, pages, dirty);
            }
            Msg::Zero { runs } => {
                // The region is fresh anonymous memory, already zero (see the module doc of
                // `precopy` for why we must not write zeros here); check the range only.
                for r in runs {
                    if !matches!(r.first.checked_add(r.pages as u64), Some(end) if end <= pages) {
                        return Err(DestError::Unexpected { phase, got: "Zero (out of range)" });
                    }
                    rep.zero_pages += r.pages as u64;
                }
            }
            Msg::Final { checksum, resume } => break (checksum, resume),
            other => return Err(DestError::Unexpected { phase, got: other.name() }),
        }
    };

    let phase = Phase::StopAndCopy;
    let t0 = Instant::now();
    // SAFETY: `Final` is ordered after every write the source posted, and the source posts
    // nothing more until it has our verdict; no local writer touches the region yet.
    let ours = unsafe { super::checksum::region_checksum(region, src_len) };
    let ok = ours == theirs;
    send(t, phase, &Msg::Verified { ok, checksum: ours })?;
    if !ok {
        return Err(DestError::ChecksumMismatch { source_sum: hex(&theirs), dest_sum: hex(&ours) });
    }
    rep.checksum = hex(&ours);
    rep.bytes_received = t.stats().bytes_received;
    if resume && workload {
        let mut w = Workload::attach(region.clone()).map_err(DestError::Workload)?;
        w.start().map_err(DestError::Workload)?;
        rep.workload = Some(w);
    }
    send(t, phase, &Msg::Resumed)?;
    rep.verify_ms = t0.elapsed().as_secs_f64() * 1e3;

    let phase = Phase::Resumed;
    if let Some(w) = &rep.workload {
        let (n0, t1) = (w.pages_touched(), Instant::now());
        std::thread::sleep(cfg.rate_window);
        let secs = t1.elapsed().as_secs_f64();
        let rate = (w.pages_touched() - n0) as f64 / secs;
        rep.after_rate = Some(rate);
        send(t, phase, &Msg::WorkloadRate { pages_per_sec: rate as u64, over_ms: (secs * 1e3) as u32 })?;
    }
    // The source closes with Done; a source that vanished now does not undo the migration.
    match t.recv_message(Some(cfg.reply_timeout)) {
        Ok(Some(m)) if matches!(proto::decode(&m), Ok(Msg::Done)) => {}
        other => tracing::info!(?other, "source ended the session without Done"),
    }
    Ok(rep)
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
