//! The urgent channel of a verbs session: a queue pair of its own behind a lock (see the
//! module doc of [`crate::verbs`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{poll_fds, Broken, VerbsTransport};
use crate::region::Region;
use crate::verbs::ctrl::UrgentMsg;
use crate::wire::{self, DecodeError};
use crate::{Transport, TransportError, UrgentChannel, UrgentEvent, WriteRequest};

/// Longest sleep without the lock: a wake-up consumed by another thread (one that waited
/// for credits or send-queue room meanwhile) delays a receiver by this much at most.
const SLICE: Duration = Duration::from_millis(5);

/// The urgent channel: its connection and the events read but not yet handed out.
pub(super) struct VerbsUrgent {
    inner: Mutex<Inner>,
    peer: String,
}

struct Inner {
    t: VerbsTransport,
    events: VecDeque<UrgentEvent>,
}

impl std::fmt::Debug for VerbsUrgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsUrgent").field("peer", &self.peer).finish()
    }
}

impl VerbsUrgent {
    pub(super) fn new(t: VerbsTransport) -> Self {
        let peer = t.peer.clone();
        VerbsUrgent { inner: Mutex::new(Inner { t, events: VecDeque::new() }), peer }
    }

    /// Ends its queue pair at once ([`crate::Transport::shutdown`]).
    pub(super) fn shutdown(&self) {
        crate::Transport::shutdown(&mut self.lock().t);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the transport usable or broken (sticky):
        // either way its own checks answer the next caller.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a region exposed after the handshake on this queue pair and announces it;
    /// returns once the announcement is in the peer's receive queue.
    pub(super) fn expose(&self, region: &Arc<Region>) -> Result<(), TransportError> {
        let mut g = self.lock();
        if let Some(info) = g.t.cache.expose(region)? {
            g.t.announce(&[info])?;
            g.t.settle_sends()?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl VerbsUrgent {
    /// Test-only: sends `msg` as is on the urgent queue pair (no tag added), as a hostile
    /// peer could.
    pub(crate) fn send_raw_for_test(&self, msg: &[u8]) -> Result<(), TransportError> {
        self.lock().t.send_message(msg)
    }
}

impl Inner {
    /// Reads whatever arrived, without blocking: announcements update the peer's table
    /// (inside the transport), messages and placements are queued.
    fn drain(&mut self) -> Result<(), TransportError> {
        self.t.progress()?;
        while let Some(m) = self.t.try_assemble()? {
            let ev = match UrgentMsg::decode(&m) {
                Ok(UrgentMsg::Message(b)) => UrgentEvent::Message(b.to_vec()),
                Ok(UrgentMsg::Placed { region, offset, len }) => {
                    // The peer names a range it wrote: only what we exposed for writing.
                    let ok = self
                        .t
                        .regions
                        .get(region)
                        .is_some_and(|r| r.access().remote_write && r.contains(offset, len as u64));
                    if !ok {
                        return Err(self.refuse(DecodeError::Invalid {
                            field: "urgent placement outside the exposed regions",
                            value: offset,
                        }));
                    }
                    UrgentEvent::Placed { region, offset, len }
                }
                Err(d) => return Err(self.refuse(d)),
            };
            self.events.push_back(ev);
        }
        Ok(())
    }

    /// Waits (within the I/O timeout) until a SEND can go without waiting for the peer's
    /// credits, reading meanwhile what arrives (queued for `recv`) and returning credits: two
    /// ends that send to each other while holding their locks never wait on each other.
    /// Credit returns raise no completion here, so the wait polls in 1 ms slices.
    fn room_to_send(&mut self) -> Result<(), TransportError> {
        let limit = self.t.cfg.io_timeout;
        let deadline = Instant::now() + limit;
        loop {
            self.drain()?;
            self.t.return_credits(true)?;
            if self.t.credits_available() > 0 && self.t.sq.has_room(2) {
                return Ok(());
            }
            self.t.usable()?;
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout(limit, "a receive credit from the peer (urgent channel)"));
            }
            match self.t.prepare_wait()? {
                None => {}
                Some(mut fds) if !fds.is_empty() => {
                    poll_fds(&mut fds, Duration::from_millis(1))?;
                    self.t.after_wait(&fds)?;
                }
                Some(_) => std::thread::yield_now(),
            }
        }
    }

    fn refuse(&mut self, d: DecodeError) -> TransportError {
        self.t.set_broken(Broken::Protocol(d.clone()));
        TransportError::Protocol(d)
    }
}

impl UrgentChannel for VerbsUrgent {
    fn send_message(&self, msg: &[u8]) -> Result<(), TransportError> {
        if msg.len() >= wire::MAX_MESSAGE as usize {
            return Err(TransportError::TooLarge(format!(
                "{}-byte urgent message (less than {} allowed)",
                msg.len(),
                wire::MAX_MESSAGE
            )));
        }
        let mut g = self.lock();
        g.room_to_send()?;
        g.t.send_message(&UrgentMsg::Message(msg).encode())
    }

    fn post_write(&self, w: &WriteRequest<'_>) -> Result<(), TransportError> {
        let bytes = w.bytes();
        let len = u32::try_from(bytes)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| TransportError::TooLarge(format!("{bytes}-byte urgent write (1..={} allowed)", u32::MAX)))?;
        let mut g = self.lock();
        if !g.t.peer_regions.iter().any(|r| r.id == w.remote) {
            // Announced on this queue pair before the peer told us about it elsewhere: read it.
            g.drain()?;
        }
        g.room_to_send()?;
        g.t.post_writes(std::slice::from_ref(w))?;
        let placed = UrgentMsg::Placed { region: w.remote, offset: w.remote_offset, len };
        g.t.send_message(&placed.encode())
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Option<UrgentEvent>, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut fds = {
                let mut g = self.lock();
                if let Some(e) = g.events.pop_front() {
                    return Ok(Some(e));
                }
                g.drain()?;
                if let Some(e) = g.events.pop_front() {
                    return Ok(Some(e));
                }
                g.t.usable()?;
                g.t.return_credits(true)?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                match g.t.prepare_wait()? {
                    Some(fds) => fds,
                    None => continue,
                }
            };
            if fds.is_empty() {
                std::thread::yield_now(); // busy-poll mode
                continue;
            }
            let mut sleep = SLICE;
            if let Some(d) = deadline {
                sleep = sleep.min(d.saturating_duration_since(Instant::now()));
            }
            poll_fds(&mut fds, sleep)?;
            self.lock().t.after_wait(&fds)?;
        }
    }
}
