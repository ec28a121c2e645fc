//! Live storage transfer, the hybrid active push / prioritized prefetch strategy of the
//! storage-transfer paper (section 4.3, Algorithms 1–4), as two pure state machines: no I/O,
//! no clock. A driver feeds them the disk's writes and reads and the peer's messages, and
//! moves the chunks they name.
//!
//! Source ([`SourceTransfer`]): on `MIGRATION_REQUEST` the ModifiedSet becomes the
//! RemainingSet, pushed in the background; every write counts against its chunk (WriteCount)
//! and puts it back in the RemainingSet; chunks written `threshold` times or more are held
//! back (they would only be pushed again). At switchover `TRANSFER_IO_CONTROL` hands the
//! destination the RemainingSet with the write counts, and the source only answers pulls.
//!
//! Destination ([`DestTransfer`]): pushed chunks are installed as they come. After
//! `TRANSFER_IO_CONTROL` it serves I/O at once: background pull in decreasing write-count
//! order; a read of a chunk still remaining pulls it at once (and the background pull waits);
//! a read of a chunk being pulled waits for it; a write of a whole remaining chunk cancels its
//! pull (a partial write first needs the chunk, like a read). When the RemainingSet is empty
//! the source is released.
//!
//! [`PrecopyTransfer`] is the baseline: iterative rounds of dirty chunks, then a last round
//! with I/O stopped.

use std::collections::{BTreeSet, HashMap, HashSet};

/// Source phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Pushing in the background while the disk is still used here.
    Pushing,
    /// Control transferred: answering pulls only.
    Passive,
    /// The destination has every chunk: released.
    Released,
}

/// The source side (Algorithms 1 and 2).
#[derive(Debug, Clone)]
pub struct SourceTransfer {
    phase: SourcePhase,
    threshold: u32,
    remaining: BTreeSet<usize>,
    write_count: HashMap<usize, u32>,
    pushed: u64,
    pulled: u64,
}

impl SourceTransfer {
    /// `MIGRATION_REQUEST`: `modified` (the ModifiedSet) is queued for pushing; chunks
    /// written `threshold` times during the migration are no longer pushed.
    pub fn new(modified: impl IntoIterator<Item = usize>, threshold: u32) -> SourceTransfer {
        SourceTransfer {
            phase: SourcePhase::Pushing,
            threshold: threshold.max(1),
            remaining: modified.into_iter().collect(),
            write_count: HashMap::new(),
            pushed: 0,
            pulled: 0,
        }
    }

    /// The phase.
    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// A write of chunk `c` here (Algorithm 2): counted, and `c` must cross (again).
    pub fn on_write(&mut self, c: usize) {
        if self.phase == SourcePhase::Pushing {
            *self.write_count.entry(c).or_insert(0) += 1;
            self.remaining.insert(c);
        }
    }

    /// How often `c` was written since the request.
    pub fn write_count(&self, c: usize) -> u32 {
        self.write_count.get(&c).copied().unwrap_or(0)
    }

    /// The next chunk to push (lowest index first among those below the threshold), removed
    /// from the RemainingSet: a write after this puts it back. `None`: nothing to push now.
    pub fn next_push(&mut self) -> Option<usize> {
        if self.phase != SourcePhase::Pushing {
            return None;
        }
        let c = *self.remaining.iter().find(|&&c| self.write_count(c) < self.threshold)?;
        self.remaining.remove(&c);
        self.pushed += 1;
        Some(c)
    }

    /// `TRANSFER_IO_CONTROL` (Algorithm 3, source side): stops pushing and returns what the
    /// destination still needs, with write counts.
    pub fn transfer_control(&mut self) -> Vec<(usize, u32)> {
        self.phase = SourcePhase::Passive;
        self.remaining.iter().map(|&c| (c, self.write_count(c))).collect()
    }

    /// A pull request for `c`: whether to answer it (only for a chunk the destination was
    /// told about, while passive).
    pub fn on_pull(&mut self, c: usize) -> bool {
        let ok = self.phase == SourcePhase::Passive && self.remaining.contains(&c);
        if ok {
            self.remaining.remove(&c);
            self.pulled += 1;
        }
        ok
    }

    /// The destination needs nothing more.
    pub fn release(&mut self) {
        self.phase = SourcePhase::Released;
        self.remaining.clear();
    }

    /// Chunks pushed and pulled so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.pushed, self.pulled)
    }
}

/// Pre-copy block migration at the source (the baseline, as QEMU's block migration and
/// drive-mirror): the ModifiedSet is pushed in a first round; every chunk written meanwhile
/// is pushed again in the next round, and so on. When the pending set fits the downtime, I/O
/// stops and [`stop`](Self::stop) hands out the last round; the destination needs no pulls.
#[derive(Debug, Clone, Default)]
pub struct PrecopyTransfer {
    round: BTreeSet<usize>,
    dirty: BTreeSet<usize>,
    rounds: u32,
    pushed: u64,
    stopped: bool,
}

impl PrecopyTransfer {
    /// Round 1 pushes `modified`.
    pub fn new(modified: impl IntoIterator<Item = usize>) -> PrecopyTransfer {
        PrecopyTransfer { round: modified.into_iter().collect(), rounds: 1, ..Default::default() }
    }

    /// A write of chunk `c`: pushed again in a later round (unless still pending in this one).
    pub fn on_write(&mut self, c: usize) {
        if !self.stopped && !self.round.contains(&c) {
            self.dirty.insert(c);
        }
    }

    /// The next chunk to push; when a round is over, the chunks written during it start the
    /// next. `None`: nothing pending now.
    pub fn next_push(&mut self) -> Option<usize> {
        if self.stopped {
            return None;
        }
        if self.round.is_empty() && !self.dirty.is_empty() {
            self.round = std::mem::take(&mut self.dirty);
            self.rounds += 1;
        }
        let c = self.round.pop_first()?;
        self.pushed += 1;
        Some(c)
    }

    /// Chunks still to push (this round's and the ones written since).
    pub fn pending(&self) -> usize {
        self.round.len() + self.dirty.len()
    }

    /// Rounds started so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Whether the rest fits `limit` chunks, once the first round is over (the whole set
    /// crosses once before convergence is judged).
    pub fn converged(&self, limit: usize) -> bool {
        (self.rounds > 1 || self.round.is_empty()) && self.pending() <= limit
    }

    /// I/O has stopped: the last round (every chunk still pending), in order.
    pub fn stop(&mut self) -> Vec<usize> {
        self.stopped = true;
        let mut last: Vec<usize> = std::mem::take(&mut self.round).into_iter().collect();
        last.extend(std::mem::take(&mut self.dirty));
        last.sort_unstable();
        last.dedup();
        self.pushed += last.len() as u64;
        last
    }

    /// Chunks pushed so far (the last round counted once [`stop`](Self::stop) handed it out).
    pub fn pushed(&self) -> u64 {
        self.pushed
    }
}

/// What a read at the destination must do first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAction {
    /// The chunk is here: read it.
    Local,
    /// Pull it now (on the urgent channel), then read.
    PullNow,
    /// Its pull is under way: wait for [`DestTransfer::pulled`], then read.
    Wait,
}

/// What a write at the destination must do first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAction {
    /// Write.
    Local,
    /// A whole-chunk write of a remaining chunk: its pull was cancelled; write.
    Cancelled,
    /// A partial write of a remaining chunk: pull it now, then write.
    PullNow,
    /// Its pull is under way: wait, then write.
    Wait,
}

/// The destination side (Algorithms 3 and 4).
#[derive(Debug, Clone, Default)]
pub struct DestTransfer {
    in_control: bool,
    /// Remaining chunks, in pull order (decreasing write count, then index).
    queue: Vec<(usize, u32)>,
    remaining: HashSet<usize>,
    in_flight: HashSet<usize>,
    urgent: usize,
    received_pushes: u64,
    pulled: u64,
    cancelled: u64,
}

impl DestTransfer {
    /// A destination that has accepted the migration notification.
    pub fn new() -> DestTransfer {
        DestTransfer::default()
    }

    /// A pushed chunk arrived (before control): install it.
    pub fn on_pushed(&mut self, _c: usize) {
        self.received_pushes += 1;
    }

    /// `TRANSFER_IO_CONTROL` with the source's RemainingSet: the destination now serves I/O.
    pub fn on_control(&mut self, remaining: Vec<(usize, u32)>) {
        self.in_control = true;
        let mut q = remaining;
        q.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        q.dedup_by_key(|e| e.0);
        self.remaining = q.iter().map(|e| e.0).collect();
        self.queue = q;
        // Pop from the end: reverse so the most written chunk comes out first.
        self.queue.reverse();
    }

    /// Whether I/O is served here.
    pub fn in_control(&self) -> bool {
        self.in_control
    }

    /// The next chunk for the background pull, if it may run now (not while urgent pulls
    /// are under way).
    pub fn next_pull(&mut self) -> Option<usize> {
        if !self.in_control || self.urgent > 0 {
            return None;
        }
        while let Some((c, _)) = self.queue.pop() {
            if self.remaining.contains(&c) && !self.in_flight.contains(&c) {
                self.in_flight.insert(c);
                return Some(c);
            }
        }
        None
    }

    /// A read of chunk `c` (Algorithm 4).
    pub fn on_read(&mut self, c: usize) -> ReadAction {
        if !self.remaining.contains(&c) {
            return ReadAction::Local;
        }
        if self.in_flight.contains(&c) {
            return ReadAction::Wait;
        }
        self.in_flight.insert(c);
        self.urgent += 1;
        ReadAction::PullNow
    }

    /// A write of chunk `c`, `whole` if it covers the entire chunk.
    pub fn on_write(&mut self, c: usize, whole: bool) -> WriteAction {
        if !self.remaining.contains(&c) {
            return WriteAction::Local;
        }
        if self.in_flight.contains(&c) {
            return WriteAction::Wait;
        }
        if whole {
            // The old contents must not come any more.
            self.remaining.remove(&c);
            self.cancelled += 1;
            return WriteAction::Cancelled;
        }
        self.in_flight.insert(c);
        self.urgent += 1;
        WriteAction::PullNow
    }

    /// A pull of `c` completed (its bytes are installed); `urgent` if it was started by
    /// [`on_read`](Self::on_read) or [`on_write`](Self::on_write).
    pub fn pulled(&mut self, c: usize, urgent: bool) {
        if self.in_flight.remove(&c) {
            self.remaining.remove(&c);
            self.pulled += 1;
            if urgent {
                self.urgent = self.urgent.saturating_sub(1);
            }
        }
    }

    /// Whether `c` has yet to come from the source (remaining, or being pulled).
    pub fn needs(&self, c: usize) -> bool {
        self.remaining.contains(&c)
    }

    /// Every chunk is here: the source can be released.
    pub fn done(&self) -> bool {
        self.in_control && self.remaining.is_empty() && self.in_flight.is_empty()
    }

    /// The chunks that never came (for the report when the source is lost): reads of them
    /// must fail, never read as zeros.
    pub fn missing(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.remaining.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// (pushes received, chunks pulled, pulls cancelled by writes).
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.received_pushes, self.pulled, self.cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_pushes_the_modified_set_and_holds_back_hot_chunks() {
        let mut s = SourceTransfer::new([1, 4, 7], 2);
        assert_eq!(s.next_push(), Some(1));
        // Chunk 4 is written twice: at the threshold, it is held back.
        s.on_write(4);
        s.on_write(4);
        // Chunk 1, already pushed, is written once: it must cross again.
        s.on_write(1);
        assert_eq!(s.next_push(), Some(1));
        assert_eq!(s.next_push(), Some(7));
        assert_eq!(s.next_push(), None, "4 is hot: not pushed");
        let rest = s.transfer_control();
        assert_eq!(rest, [(4, 2)]);
        assert_eq!(s.next_push(), None, "no pushing once passive");
        assert!(!s.on_pull(9), "only chunks the destination was told about");
        assert!(s.on_pull(4));
        assert!(!s.on_pull(4), "a chunk is pulled once");
        assert_eq!(s.counts(), (3, 1));
        s.on_write(2);
        assert_eq!(s.write_count(2), 0, "writes after the switchover are the destination's");
    }

    #[test]
    fn the_destination_pulls_hottest_first_and_serves_io_at_once() {
        let mut d = DestTransfer::new();
        d.on_pushed(1);
        assert_eq!(d.next_pull(), None, "no pulls before control");
        d.on_control(vec![(3, 1), (5, 9), (8, 4), (2, 4)]);
        assert!(d.in_control());
        assert_eq!(d.on_read(0), ReadAction::Local, "a chunk never modified is served here");
        // Background pull: decreasing write count, ties by index.
        assert_eq!(d.next_pull(), Some(5));
        assert_eq!(d.on_read(5), ReadAction::Wait, "a read of a chunk being pulled waits");
        d.pulled(5, false);
        assert_eq!(d.on_read(5), ReadAction::Local);
        // A read of a remaining chunk pulls it now; the background pull waits meanwhile.
        assert_eq!(d.on_read(8), ReadAction::PullNow);
        assert_eq!(d.next_pull(), None);
        d.pulled(8, true);
        assert_eq!(d.next_pull(), Some(2));
        // A whole-chunk write cancels a pull not yet started; a partial one needs the chunk.
        assert_eq!(d.on_write(3, true), WriteAction::Cancelled);
        assert_eq!(d.on_write(2, false), WriteAction::Wait);
        d.pulled(2, false);
        assert!(d.done());
        assert_eq!(d.next_pull(), None, "the cancelled chunk is not pulled");
        assert_eq!(d.counts(), (1, 3, 1));
    }

    #[test]
    fn a_lost_source_leaves_a_list_of_missing_chunks() {
        let mut d = DestTransfer::new();
        d.on_control(vec![(10, 0), (11, 0), (12, 0)]);
        assert_eq!(d.next_pull(), Some(10));
        d.pulled(10, false);
        assert_eq!(d.on_write(11, false), WriteAction::PullNow);
        // The source dies here: 11 is in flight, 12 never asked for.
        assert!(!d.done());
        assert_eq!(d.missing(), [11, 12]);
    }

    #[test]
    fn precopy_rounds_repush_what_was_written_and_stop_hands_out_the_rest() {
        let mut p = PrecopyTransfer::new([0, 1, 2]);
        assert!(!p.converged(100), "not before the first round is over");
        assert_eq!(p.next_push(), Some(0));
        p.on_write(0); // already pushed: next round
        p.on_write(2); // still pending in this round: pushed once
        assert_eq!(p.next_push(), Some(1));
        assert_eq!(p.next_push(), Some(2));
        assert_eq!(p.pending(), 1);
        assert!(p.converged(1));
        assert!(!p.converged(0));
        assert_eq!(p.next_push(), Some(0), "round 2");
        assert_eq!(p.rounds(), 2);
        assert_eq!(p.next_push(), None);
        p.on_write(5);
        p.on_write(3);
        assert_eq!(p.stop(), [3, 5]);
        assert_eq!(p.next_push(), None);
        p.on_write(7);
        assert_eq!(p.pending(), 0, "no writes count once stopped");
        assert_eq!(p.pushed(), 6);
    }

    /// Random interleavings: every chunk written at the source after its last push crosses
    /// again, nothing is pulled twice, and the destination ends with every remaining chunk.
    #[test]
    fn random_interleavings_lose_nothing() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..200 {
            let n = 1 + rnd(40);
            let modified: Vec<usize> = (0..n).filter(|_| rnd(2) == 0).collect();
            let mut s = SourceTransfer::new(modified.clone(), 1 + rnd(4) as u32);
            // The chunks whose latest contents the destination holds.
            let mut fresh: HashSet<usize> = HashSet::new();
            let mut must: HashSet<usize> = modified.iter().copied().collect();
            for _ in 0..rnd(100) {
                if rnd(2) == 0 {
                    let c = rnd(n);
                    s.on_write(c);
                    fresh.remove(&c);
                    must.insert(c);
                } else if let Some(c) = s.next_push() {
                    fresh.insert(c);
                }
            }
            let rest = s.transfer_control();
            for c in &must {
                assert!(fresh.contains(c) || rest.iter().any(|r| r.0 == *c), "chunk {c} lost");
            }
            let mut d = DestTransfer::new();
            d.on_control(rest.clone());
            let mut got = HashSet::new();
            loop {
                let c = if rnd(3) == 0 {
                    let c = rnd(n);
                    match d.on_read(c) {
                        ReadAction::PullNow => Some((c, true)),
                        _ => None,
                    }
                } else {
                    d.next_pull().map(|c| (c, false))
                };
                if let Some((c, urgent)) = c {
                    assert!(s.on_pull(c), "chunk {c} pulled twice or unknown");
                    assert!(got.insert(c));
                    d.pulled(c, urgent);
                }
                if d.done() {
                    break;
                }
            }
            assert_eq!(got.len(), rest.len());
            s.release();
            assert_eq!(s.phase(), SourcePhase::Released);
        }
    }
}
