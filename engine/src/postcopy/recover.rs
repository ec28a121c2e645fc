//! Resuming a post-copy migration whose link broke after the hand-over, as QEMU's
//! `migrate-recover` does: the guest runs at the destination and its missing pages exist
//! only at the source, so instead of losing the guest both sides wait for a new session.
//!
//! ```text
//!   source                                           destination
//!   Recoverable{id} (before Commit) ─────────────────▶ remembers id
//!   … the link breaks during the push or the verification …
//!   faults keep blocking; the source keeps its frozen copy
//!   new session (same secret; the source dials) ────▶ accepted within the deadline
//!   Reattach{id} ────────────────────────────────────▶ checks id
//!   ◀──────────────────────────────────────────────── Missing{runs…, last}
//!   pages reported missing are unsent again; zero ones announced again, the rest pushed;
//!   demands the destination had sent are sent again on the new urgent channel;
//!   the push and the verification go on as before.
//! ```
//!
//! Nothing is lost: a page counts as arrived at the destination only once it is hashed and
//! installed, so every other page is in the missing list and is sent again (the source's
//! memory is frozen: a page sent twice carries the same bytes, and its digest term is the
//! same). A late write from the broken session can only land in a page that has not arrived,
//! with those same bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_transport::{Transport, TransportError};

/// A new session to the same peer, authenticated with the same secret: the source dials
/// again, the destination accepts on its listener.
pub trait Relink: Send + Sync {
    /// One attempt, giving up at `deadline`.
    fn relink(&self, deadline: Instant) -> Result<Box<dyn Transport>, TransportError>;

    /// The session in use when the migration ended, if a new one took over: for a caller
    /// whose own protocol goes on over the session afterwards. Dropped by default.
    fn adopt(&self, t: Box<dyn Transport>) {
        drop(t);
    }
}

/// A [`Relink`] that keeps the last session for the caller ([`Relinked::take`]).
pub struct Relinked<F> {
    dial: F,
    last: std::sync::Mutex<Option<Box<dyn Transport>>>,
}

impl<F> std::fmt::Debug for Relinked<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.last.lock().map(|g| g.is_some()).unwrap_or(false);
        f.debug_struct("Relinked").field("kept", &kept).finish_non_exhaustive()
    }
}

impl<F> Relinked<F>
where
    F: Fn(Instant) -> Result<Box<dyn Transport>, TransportError> + Send + Sync,
{
    /// Relinks with `dial`.
    pub fn new(dial: F) -> Arc<Self> {
        Arc::new(Relinked { dial, last: std::sync::Mutex::new(None) })
    }

    /// The session that took the migration over, once the migration ended (`None` if the
    /// first session lasted).
    pub fn take(&self) -> Option<Box<dyn Transport>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl<F> Relink for Relinked<F>
where
    F: Fn(Instant) -> Result<Box<dyn Transport>, TransportError> + Send + Sync,
{
    fn relink(&self, deadline: Instant) -> Result<Box<dyn Transport>, TransportError> {
        (self.dial)(deadline)
    }

    fn adopt(&self, t: Box<dyn Transport>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }
}

impl<F> Relink for F
where
    F: Fn(Instant) -> Result<Box<dyn Transport>, TransportError> + Send + Sync,
{
    fn relink(&self, deadline: Instant) -> Result<Box<dyn Transport>, TransportError> {
        self(deadline)
    }
}

/// How a post-copy migration resumes after its link broke.
#[derive(Clone)]
pub struct Recovery {
    /// Makes the new session.
    pub link: Arc<dyn Relink>,
    /// How long after the break the new session may take (all attempts together).
    pub within: Duration,
    /// Source: dial attempts. Destination: sessions accepted that fail to take the
    /// migration over (a wrong id, a silent peer) before it gives up.
    pub tries: u32,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery").field("within", &self.within).field("tries", &self.tries).finish_non_exhaustive()
    }
}

impl Recovery {
    /// Recovery through `link`, within `within`, with `tries` attempts.
    pub fn new(link: impl Relink + 'static, within: Duration, tries: u32) -> Self {
        Recovery { link: Arc::new(link), within, tries: tries.max(1) }
    }

    /// Recovery through a shared `link` (e.g. a [`Relinked`] the caller keeps).
    pub fn shared(link: Arc<dyn Relink>, within: Duration, tries: u32) -> Self {
        Recovery { link, within, tries: tries.max(1) }
    }
}

/// A fresh random migration identity.
pub fn new_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::getrandom(&mut id).is_err() {
        // Without the OS random source, a time- and process-derived id still tells this
        // migration from another one to the same destination.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id = (t.as_nanos() ^ ((std::process::id() as u128) << 96)).to_le_bytes();
    }
    id
}

/// The time left until `deadline`, at most `cap`.
pub(crate) fn left(deadline: Instant, cap: Duration) -> Duration {
    deadline.saturating_duration_since(Instant::now()).min(cap)
}

/// `id` as 32 hex digits.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The inverse of [`id_hex`].
pub fn parse_id(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex_and_bad_ones_are_refused() {
        let id = new_id();
        assert_eq!(parse_id(&id_hex(&id)), Some(id));
        assert_ne!(new_id(), id);
        for bad in ["", "00", &"g".repeat(32), &"0".repeat(31), &"0".repeat(33), "é0000000000000000000000000000000"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }
}
