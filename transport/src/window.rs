//! The send window: a bound on outstanding work requests and bytes, with selective
//! signaling. Pure bookkeeping; the backends block (poll completions) while
//! [`SendWindow::can_post`] is false.
//!
//! Completions are cumulative, like an RC send queue: one signaled request completing means
//! every earlier request completed too. To make sure a full window always drains, a request
//! is signaled every `signal_every` posts *and* whenever it fills the window.

use std::collections::VecDeque;
use std::num::{NonZeroU32, NonZeroUsize};

/// Window limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Maximum work requests posted and not yet completed.
    pub max_wrs: NonZeroUsize,
    /// Maximum payload bytes posted and not yet completed (a single larger request is still
    /// allowed when nothing else is outstanding).
    pub max_bytes: u64,
    /// Request a completion every this many work requests.
    pub signal_every: NonZeroU32,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            max_wrs: NonZeroUsize::new(128).expect("non-zero"),
            max_bytes: 64 << 20,
            signal_every: NonZeroU32::new(16).expect("non-zero"),
        }
    }
}

/// Outstanding-work bookkeeping.
#[derive(Debug)]
pub struct SendWindow {
    cfg: WindowConfig,
    last_posted: u64,
    completed: u64,
    outstanding: VecDeque<(u64, u64)>,
    outstanding_bytes: u64,
    since_signal: u32,
    last_signaled: u64,
}

impl SendWindow {
    /// An empty window.
    pub fn new(cfg: WindowConfig) -> Self {
        SendWindow {
            cfg,
            last_posted: 0,
            completed: 0,
            outstanding: VecDeque::new(),
            outstanding_bytes: 0,
            since_signal: 0,
            last_signaled: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> WindowConfig {
        self.cfg
    }

    /// True when a request of `bytes` may be posted now.
    pub fn can_post(&self, bytes: u64) -> bool {
        if self.outstanding.is_empty() {
            return true;
        }
        self.outstanding.len() < self.cfg.max_wrs.get() && self.outstanding_bytes + bytes <= self.cfg.max_bytes
    }

    /// Records a post of `bytes`; returns its id and whether it must be signaled.
    /// `force_signal` requests a completion regardless of the signaling interval.
    pub fn on_post(&mut self, bytes: u64, force_signal: bool) -> (u64, bool) {
        self.last_posted += 1;
        let id = self.last_posted;
        self.outstanding.push_back((id, bytes));
        self.outstanding_bytes += bytes;
        self.since_signal += 1;
        let fills = self.outstanding.len() >= self.cfg.max_wrs.get() || self.outstanding_bytes >= self.cfg.max_bytes;
        let signaled = force_signal || fills || self.since_signal >= self.cfg.signal_every.get();
        if signaled {
            self.since_signal = 0;
            self.last_signaled = id;
        }
        (id, signaled)
    }

    /// Records that every request with id `<= upto` completed. Ids beyond the last posted one
    /// are a peer bug and are ignored (returns false).
    pub fn on_complete(&mut self, upto: u64) -> bool {
        if upto > self.last_posted {
            return false;
        }
        while let Some(&(id, b)) = self.outstanding.front() {
            if id > upto {
                break;
            }
            self.outstanding.pop_front();
            self.outstanding_bytes -= b;
        }
        self.completed = self.completed.max(upto);
        true
    }

    /// Id of the last posted request (0 if none).
    pub fn last_posted(&self) -> u64 {
        self.last_posted
    }
    /// Highest completed id.
    pub fn completed(&self) -> u64 {
        self.completed
    }
    /// Requests outstanding.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
    /// Bytes outstanding.
    pub fn outstanding_bytes(&self) -> u64 {
        self.outstanding_bytes
    }
    /// True when outstanding requests exist but none of them will generate a completion:
    /// a flush must then request one explicitly.
    pub fn unsignaled_tail(&self) -> bool {
        self.last_posted > self.completed && self.last_signaled < self.last_posted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(wrs: usize, bytes: u64, every: u32) -> WindowConfig {
        WindowConfig {
            max_wrs: NonZeroUsize::new(wrs).unwrap(),
            max_bytes: bytes,
            signal_every: NonZeroU32::new(every).unwrap(),
        }
    }

    #[test]
    fn back_pressure_by_count() {
        let mut w = SendWindow::new(cfg(4, u64::MAX, 100));
        let mut sig = vec![];
        for _ in 0..4 {
            assert!(w.can_post(10));
            sig.push(w.on_post(10, false).1);
        }
        assert!(!w.can_post(10), "window of 4 is full");
        assert_eq!(sig, vec![false, false, false, true], "the request that fills the window is signaled");
        assert!(w.on_complete(2));
        assert!(w.can_post(10));
        assert_eq!(w.outstanding(), 2);
        assert!(!w.on_complete(99), "completion past the last post is rejected");
    }

    #[test]
    fn back_pressure_by_bytes_and_big_single() {
        let mut w = SendWindow::new(cfg(100, 1000, 100));
        assert!(w.can_post(5000), "an oversized request may go alone");
        w.on_post(600, false);
        assert!(!w.can_post(500));
        assert!(w.can_post(400));
        w.on_complete(1);
        assert_eq!(w.outstanding_bytes(), 0);
    }

    #[test]
    fn selective_signaling_and_tail() {
        let mut w = SendWindow::new(cfg(100, u64::MAX, 4));
        let s: Vec<bool> = (0..8).map(|_| w.on_post(1, false).1).collect();
        assert_eq!(s, vec![false, false, false, true, false, false, false, true]);
        assert!(!w.unsignaled_tail());
        w.on_post(1, false);
        assert!(w.unsignaled_tail());
        w.on_complete(9);
        assert!(!w.unsignaled_tail());
    }
}
