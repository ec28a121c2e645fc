//! Pre-copy live migration of a running guest (the paper's section 7 and Algorithm 2),
//! through the embedding API of [`crate::guest`].
//!
//! # Data flow
//!
//! ```text
//!   source process                                   destination process
//!   GuestMemory (N regions, the guest runs)          GuestMemory (exposed REMOTE_WRITE)
//!   DirtySource (userfaultfd WP, or the embedder's log)
//!   policy (ibrahim | kvm | xen, pure)
//!        │ Begin{regions: len, page size} ──────────────▶ checks each region fits
//!        │ ◀──────────────────────────────── Accept | Refuse{reason}
//!   never-populated pages → Zero{runs} before the first pass ───▶ zeroed where needed
//!   interval i (schedule.rs picks, policy sizes the window):
//!     zero pages found by reading → Zero{runs} ──────────▶ zeroed where needed
//!     per region, per 8 MiB slice: coalesced writes ─────▶ placed by the transport
//!                      Placed{runs} ──────────────────────▶ hashed (digest thread)
//!                      hash the slice's pages here
//!     flush, harvest dirty log, IntervalReport → Decision
//!        │ IterationDone{i, pages, dirty} ──────────────▶ progress
//!        │ ◀──────────────────────────────── IterationAck{i}   (Zero runs placed)
//!   StopAndCopy: GuestControl::pause (downtime starts), final harvest, send the last
//!                pages (hashed as above), flush, save the device state
//!        │ DeviceState{…} ──────────────────────────────▶ kept
//!        │ Final ───────────────────────────────────────▶ finishes hashing the last slice
//!        │ SourceChecksum{digest} ──────────────────────▶ compares
//!        │ ◀──────────────────────────────── Verified{ok, digest}   (not started yet)
//!        │ Commit ──────────────────────────────────────▶ starts the guest with the state
//!        │ ◀──────────────────────────────── Resumed     (downtime ends; the guest runs there)
//!   GuestControl::handed_over: the source copy never runs again
//!        │ Done ────────────────────────────────────────▶
//!   Abort (policy gave up) or a transport error: tracking stops, the guest keeps running at
//!   the source (resumed if it was paused), Abort{reason} is sent when the link still works.
//! ```
//!
//! **At most one copy runs (no split brain).** The destination starts the guest only on
//! `Commit`, and the source sends `Commit` only after a matching `Verified`. Any failure
//! before `Commit` resumes the source and the destination never runs. A failure at or after
//! `Commit` (the link dies, the destination dies, `Resumed` is lost) is *in doubt*: the
//! source cannot know whether `Commit` arrived, so it keeps its copy paused and reports
//! [`SourceError::InDoubt`]; the destination, if it got `Commit`, runs the guest. Both
//! memories stay intact; nothing is resumed twice. (An explicit `Abort` from the destination
//! after `Commit` — it could not start the guest — resumes the source.)
//!
//! The policies are pure state machines ([`crate::policy`]), and so is the source's whole
//! side of the protocol ([`session::SourceSession`]); [`source`] and [`dest`] are the thin
//! drivers that read the clock and move bytes. Which transport backend carries the
//! session does not matter to them: they only see `dyn Transport`.
//!
//! **Integrity off the downtime path** ([`crate::integrity`]): both sides keep an
//! order-independent digest of the region as pages go out and land, so at switchover only
//! the last slice is hashed, not the region.
//!
//! **Zero pages.** Pages never populated at the source are known to be zero without reading
//! them (page-presence information, see `Region::known_zero_pages`); other never-sent pages
//! are read once to find zeros. Either way they are announced in `Zero` and the destination
//! makes them zero — it does not assume its memory starts zeroed (an embedder's may not) —
//! writing only where its memory may hold data, so a fresh region is not touched. The
//! transport orders a message after the writes posted before it, not before later ones, so
//! the source writes none of the announced pages before the destination's `IterationAck`
//! for that interval.

#[cfg(feature = "fault-injection")]
pub mod cut;
pub mod dest;
pub mod dest_session;
pub mod proto;
pub mod schedule;
pub mod session;
pub mod source;
pub mod switchover;

#[cfg(test)]
mod convergence_tests;
#[cfg(test)]
mod sim_tests;

use std::time::Duration;

use serde::Serialize;

pub use dest::{receive, receive_from, DestConfig, DestError, DestReport};
pub use proto::{decode, Msg, PageRun, ProtoError, RegionDesc, Strategy};
pub(crate) use source::pick_remotes;
pub use source::{migrate, SourceConfig, SourceError};

/// The pre-copy phase a failure happened in (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Phase {
    /// Begin/Accept.
    Handshake,
    /// Iterative rounds (the guest runs at the source).
    Precopy,
    /// The guest is paused; the last dirty pages, the device state and the digest are in
    /// flight.
    StopAndCopy,
    /// After the destination resumed.
    Resumed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Handshake => "handshake",
            Phase::Precopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Resumed => "after resume",
        })
    }
}

/// Why a destination cannot take the source's region. Checked on both sides: by the source
/// against the regions the destination exposed at the transport handshake, and by the
/// destination against `Begin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Mismatch {
    /// The destination exposes no writable region.
    #[error("the destination exposes no writable region")]
    NoRegion,
    /// The destination region is smaller.
    #[error("the destination region ({dst} bytes) is smaller than the source region ({src} bytes)")]
    TooSmall {
        /// Source bytes.
        src: u64,
        /// Destination bytes.
        dst: u64,
    },
    /// Page sizes differ.
    #[error("the destination page size {dst} differs from the source page size {src}")]
    PageSize {
        /// Source page size.
        src: u32,
        /// Destination page size.
        dst: u32,
    },
}

/// Pure check: may a region of `dest_len` bytes with `dest_page` pages receive the source's?
/// (Whether the guest accepts a larger region is the guest's business, checked when it
/// starts at the destination.)
pub fn check_fit(source_len: u64, source_page: u32, dest_len: u64, dest_page: u32) -> Result<(), Mismatch> {
    if dest_page != source_page {
        return Err(Mismatch::PageSize { src: source_page, dst: dest_page });
    }
    if dest_len < source_len {
        return Err(Mismatch::TooSmall { src: source_len, dst: dest_len });
    }
    Ok(())
}

/// One pre-copy interval, as printed on its progress line.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IterationLine {
    /// Interval number, from 1.
    pub iter: u32,
    /// Milliseconds since the migration started.
    pub at_ms: u64,
    /// Data pages written in the interval.
    pub sent: u64,
    /// Zero pages announced in the interval (first pass).
    pub zero: u64,
    /// Dirty-set size after the harvest (`remaining`).
    pub dirty: u64,
    /// Pages sent that were also sent in the previous interval.
    pub retransmitted: u64,
    /// Active length of the interval (post + wait), ms.
    pub interval_ms: f64,
    /// Window for the next interval (`None` = whole dirty set).
    pub window: Option<u64>,
    /// The guest's progress per second during the interval (`GuestControl::progress`), when
    /// it reports progress.
    pub guest_rate: Option<f64>,
}

impl std::fmt::Display for IterationLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let window = self.window.map_or("all".to_string(), |w| w.to_string());
        write!(
            f,
            "iter {:>3} {:>7.1}s  sent {:>8}  zero {:>7}  dirty {:>8}  retx {:>8}  interval {:>7.1} ms  window {:>8}",
            self.iter,
            self.at_ms as f64 / 1000.0,
            self.sent,
            self.zero,
            self.dirty,
            self.retransmitted,
            self.interval_ms,
            window,
        )?;
        if let Some(r) = self.guest_rate {
            write!(f, "  guest {r:>9.0}/s")?;
        }
        Ok(())
    }
}

/// How the migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Stop-and-copy ran, the digests matched, the destination runs the guest.
    Completed,
    /// The policy gave up; the guest kept running at the source.
    Aborted,
}

/// The final summary of a migration, printed by the source.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Completed or aborted.
    pub outcome: Outcome,
    /// Policy name.
    pub policy: String,
    /// Transport backend.
    pub transport: String,
    /// Dirty-tracking mechanism.
    pub tracker: String,
    /// Guest memory bytes (all regions).
    pub region_bytes: u64,
    /// Guest memory regions.
    pub regions: usize,
    /// Page size.
    pub page_size: u32,
    /// Seconds from the start of pre-copy to the end (resume or abort).
    pub total_s: f64,
    /// Downtime: from pausing the workload to the destination's `Resumed` (ms).
    pub downtime_ms: Option<f64>,
    /// Part of the downtime spent sending the last dirty set (ms).
    pub final_transfer_ms: Option<f64>,
    /// Pages sent in stop-and-copy.
    pub final_pages: Option<u64>,
    /// Bytes of device state sent in stop-and-copy.
    pub device_state_bytes: Option<u64>,
    /// Payload bytes written in total.
    pub bytes: u64,
    /// Data pages written in total.
    pub pages_sent: u64,
    /// Zero pages announced instead of sent.
    pub zero_pages: u64,
    /// Pre-copy intervals.
    pub iterations: u32,
    /// Short label of the rule that ended pre-copy (`a`, `b`, `c`, `kvm-downtime`, …).
    pub end_rule: String,
    /// Its full description.
    pub end_reason: String,
    /// The guest's progress per second during pre-copy (`GuestControl::progress`), when it
    /// reports progress.
    pub guest_rate_during: Option<f64>,
    /// The digest both ends agreed on (hex), when completed.
    pub checksum: Option<String>,
    /// The per-interval lines.
    pub intervals: Vec<IterationLine>,
}

impl Summary {
    /// Human-readable multi-line summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let verdict = match self.outcome {
            Outcome::Completed => "completed",
            Outcome::Aborted => "ABORTED (source still running)",
        };
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        s +=
            &format!("migration {verdict}: policy {} over {}, tracker {}\n", self.policy, self.transport, self.tracker);
        s += &memory_line(self.region_bytes, self.regions, self.page_size);
        s += &format!("  total time     {:.2} s\n", self.total_s);
        match self.downtime_ms {
            Some(d) => {
                s += &format!(
                "  downtime       {:.1} ms ({} pages in stop-and-copy, {:.1} ms sending them; {} B of device state)\n",
                d,
                self.final_pages.unwrap_or(0),
                self.final_transfer_ms.unwrap_or(0.0),
                self.device_state_bytes.unwrap_or(0)
            )
            }
            None => s += "  downtime       none (the guest never stopped)\n",
        }
        s += &format!(
            "  bytes          {:.1} MiB ({} pages sent, {} zero pages as flags)\n",
            mb(self.bytes),
            self.pages_sent,
            self.zero_pages
        );
        s += &format!("  iterations     {}\n", self.iterations);
        s += &format!("  ended by       {} [{}]\n", self.end_reason, self.end_rule);
        if let Some(r) = self.guest_rate_during {
            s += &format!("  guest          {r:.0}/s during pre-copy\n");
        }
        if let Some(c) = &self.checksum {
            s += &format!("  digest         {c} (verified by the destination)\n");
        }
        s
    }
}

/// The `memory` line of a migration summary.
pub(crate) fn memory_line(bytes: u64, regions: usize, page_size: u32) -> String {
    format!(
        "  memory         {:.0} MiB in {} region{}, {} B pages\n",
        bytes as f64 / (1u64 << 20) as f64,
        regions,
        if regions == 1 { "" } else { "s" },
        page_size
    )
}

/// `e` and its sources, joined with ": " (for logs and reports).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += ": ";
        s += &c.to_string();
        cur = c.source();
    }
    s
}

/// Hex of a checksum.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Default time to wait for a control reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether this build corrupts a page in flight when `LIVEMIG_CORRUPT_PAGE` is set
/// (cargo feature `fault-injection`; test builds only).
pub const FAULT_INJECTION: bool = cfg!(feature = "fault-injection");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_rules() {
        assert_eq!(check_fit(100, 4096, 100, 4096), Ok(()));
        assert_eq!(check_fit(100, 4096, 200, 4096), Ok(()));
        assert!(matches!(check_fit(100, 4096, 50, 4096), Err(Mismatch::TooSmall { .. })));
        assert!(matches!(check_fit(100, 4096, 100, 8192), Err(Mismatch::PageSize { .. })));
    }
}
