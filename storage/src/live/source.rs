//! The source of a live disk transfer: [`SourceDisk`] is what the NBD server serves (it
//! counts every write for the running transfer and refuses I/O once the disk is handed
//! over), and [`SourceDisk::migrate`] is the driver that moves chunks over a session.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use livemig_transport::auth::Secret;
use livemig_transport::{Transport, UrgentChannel, UrgentEvent};

use super::proto::{self, HeldChunk, Msg, Strategy};
use super::{recv, send, Error, Progress, SwitchoverMode};
use crate::chunks::Range;
use crate::disk::Disk;
use crate::mirror::{DiskError, Mirror};
use crate::transfer::{PrecopyTransfer, SourceTransfer};

/// Which state machine runs.
#[derive(Debug)]
enum Sm {
    Hybrid(SourceTransfer),
    Precopy(PrecopyTransfer),
}

impl Sm {
    fn on_write(&mut self, c: usize) {
        match self {
            Sm::Hybrid(s) => s.on_write(c),
            Sm::Precopy(p) => p.on_write(c),
        }
    }
    fn next_push(&mut self) -> Option<usize> {
        match self {
            Sm::Hybrid(s) => s.next_push(),
            Sm::Precopy(p) => p.next_push(),
        }
    }
}

#[derive(Debug)]
struct Live {
    sm: Sm,
    /// Every chunk that must reach the destination (the transfer set and every chunk written
    /// during the transfer).
    must: BTreeSet<usize>,
    /// The range last sent of each chunk (what the destination must hold: a read here may
    /// grow a chunk's local range from the base afterwards, which changes nothing there).
    sent: HashMap<usize, (u32, u32)>,
}

/// Reads chunk `c`'s locally valid bytes: `(lo, bytes)`, or `None` when nothing is local (a
/// write that failed before any byte landed; the chunk still reads as the base).
fn read_chunk(mirror: &Mirror, c: usize) -> Result<Option<(u32, Vec<u8>)>, DiskError> {
    let Some((lo, hi)) = mirror.valid_range(c) else { return Ok(None) };
    let r = chunk_range(mirror.chunk_size(), mirror.size(), c);
    let mut buf = vec![0u8; (hi - lo) as usize];
    mirror.read(r.start + lo as u64, &mut buf)?;
    Ok(Some((lo, buf)))
}

impl Live {
    /// Records what was sent of `c` (or that nothing could be: it reads as the base).
    fn record(&mut self, c: usize, sent: &Option<(u32, Vec<u8>)>) {
        match sent {
            Some((lo, b)) => {
                self.sent.insert(c, (*lo, *lo + b.len() as u32));
            }
            None => {
                self.must.remove(&c);
            }
        }
    }
}

/// Where the disk's I/O stands.
#[derive(Debug)]
enum Mode {
    /// Served here; no transfer.
    Idle,
    /// Served here while a transfer runs.
    Migrating(Arc<Mutex<Live>>),
    /// Handed over: no I/O here any more.
    Handed,
}

/// A disk that can be migrated while it is served.
#[derive(Debug)]
pub struct SourceDisk {
    mirror: Arc<Mirror>,
    mode: RwLock<Mode>,
    switchover: AtomicBool,
    cancel: AtomicBool,
    busy: AtomicBool,
    /// How the running transfer's handover went, for those waiting on it.
    handover: Mutex<Handover>,
    handover_cv: Condvar,
}

/// How a transfer's handover went.
#[derive(Debug, Clone, Default, PartialEq)]
enum Handover {
    /// Not yet.
    #[default]
    Pending,
    /// The destination serves the disk.
    Confirmed,
    /// The transfer ended without a confirmed handover.
    Failed(String),
}

/// What the source driver is told.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The destination (`livemig disk receive --listen`).
    pub to: String,
    /// Strategy.
    pub strategy: Strategy,
    /// Hybrid: chunks written this often are held back from pushing.
    pub threshold: u32,
    /// When to hand over.
    pub switchover: SwitchoverMode,
    /// Pre-copy: the last round (run with I/O stopped) must fit this at the measured rate.
    pub max_downtime: Duration,
    /// Pre-copy: rounds after which the last round is forced.
    pub max_rounds: u32,
    /// A silent peer is declared gone after this.
    pub io_timeout: Duration,
    /// Pushed bytes beyond what the destination reported installed (its memory bound).
    pub push_window: u64,
    /// The session's backend.
    pub transport: livemig_engine::connect::TransportChoice,
}

/// The outcome at the source.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceSummary {
    /// Strategy.
    pub strategy: String,
    /// From the request to the release, seconds.
    pub total_s: f64,
    /// From the request to the handover, seconds.
    pub switchover_s: f64,
    /// I/O stopped here until the destination was told it has control, ms (pre-copy: the last
    /// round).
    pub handover_ms: f64,
    /// Chunks pushed (every round).
    pub chunks_pushed: u64,
    /// Bytes pushed.
    pub bytes_pushed: u64,
    /// Chunks pulled by the destination in the background.
    pub chunks_pulled: u64,
    /// Chunks pulled on demand (urgent).
    pub chunks_pulled_urgent: u64,
    /// Bytes pulled.
    pub bytes_pulled: u64,
    /// Chunks handed over still to move (hybrid), or pushed in the last round (pre-copy).
    pub remaining_at_switchover: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pre-copy: the last round was forced after `max_rounds`.
    pub forced: bool,
    /// Chunks compared with the destination's at the end.
    pub verified_chunks: u32,
    /// Bytes this host read from the base during the migration.
    pub base_fetched_bytes: u64,
}

fn chunk_range(map_chunk: u32, size: u64, c: usize) -> Range {
    let start = c as u64 * map_chunk as u64;
    Range::new(start, (start + map_chunk as u64).min(size))
}

impl SourceDisk {
    /// Serves `mirror`; no transfer yet.
    pub fn new(mirror: Arc<Mirror>) -> SourceDisk {
        SourceDisk {
            mirror,
            mode: RwLock::new(Mode::Idle),
            switchover: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            handover: Mutex::new(Handover::Pending),
            handover_cv: Condvar::new(),
        }
    }

    /// The disk underneath.
    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// Asks a running transfer to hand over now (`switchover: command`, or earlier than
    /// `auto` would).
    pub fn request_switchover(&self) -> bool {
        let running = matches!(*self.mode.read().unwrap_or_else(|e| e.into_inner()), Mode::Migrating(_));
        if running {
            self.switchover.store(true, Ordering::Release);
        }
        running
    }

    /// Hands over now and waits until the destination confirms it serves the disk (`Ok`), or
    /// the handover failed (the reason; the disk is then still served here unless the
    /// reason says it is in doubt), at most `wait`.
    pub fn hand_over_now(&self, wait: Duration) -> Result<(), String> {
        if !self.request_switchover() {
            // One lock at a time (cancel takes them in the other order).
            let handed = self.state() == "handed-over";
            let confirmed = *self.handover.lock().unwrap_or_else(|e| e.into_inner()) == Handover::Confirmed;
            return if handed && confirmed { Ok(()) } else { Err("no migration is running".into()) };
        }
        let g = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .handover_cv
            .wait_timeout_while(g, wait, |h| *h == Handover::Pending)
            .unwrap_or_else(|e| e.into_inner());
        match &*g {
            Handover::Confirmed => Ok(()),
            Handover::Failed(why) => Err(why.clone()),
            Handover::Pending => Err(format!(
                "in doubt: the handover did not end within {wait:?} (the destination may come to serve the disk)"
            )),
        }
    }

    /// Cancels a running transfer that has not handed over yet: the destination is told and
    /// the disk is served here as before. False when there is none to cancel.
    pub fn cancel(&self) -> bool {
        // A transfer still connecting is cancelled too (its push checks the flag first).
        let busy = self.busy.load(Ordering::Acquire)
            && !matches!(*self.mode.read().unwrap_or_else(|e| e.into_inner()), Mode::Handed);
        let running = busy && *self.handover.lock().unwrap_or_else(|e| e.into_inner()) != Handover::Confirmed;
        if running {
            self.cancel.store(true, Ordering::Release);
        }
        running
    }

    fn settle(&self, h: Handover) {
        let mut g = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        if *g == Handover::Pending {
            *g = h;
        }
        self.handover_cv.notify_all();
    }

    /// Runs `f` on the disk while no migration can start: what a COMMIT needs, since it
    /// replaces the base and clears the ModifiedSet a transfer is made of. Refused while a
    /// migration runs or after a handover.
    pub fn exclusive<T>(&self, f: impl FnOnce(&Mirror) -> T) -> Result<T, String> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err("a migration of this disk is running".into());
        }
        let handed = matches!(*self.mode.read().unwrap_or_else(|e| e.into_inner()), Mode::Handed);
        let out = (!handed).then(|| f(&self.mirror));
        self.busy.store(false, Ordering::Release);
        out.ok_or_else(|| "this disk was handed over to a migration destination".into())
    }

    /// `idle`, `migrating` or `handed-over`.
    pub fn state(&self) -> &'static str {
        match *self.mode.read().unwrap_or_else(|e| e.into_inner()) {
            Mode::Idle => "idle",
            Mode::Migrating(_) => "migrating",
            Mode::Handed => "handed-over",
        }
    }

    fn count_writes(&self, r: Range, f: impl FnOnce() -> Result<(), DiskError>) -> Result<(), DiskError> {
        let g = self.mode.read().unwrap_or_else(|e| e.into_inner());
        match &*g {
            Mode::Handed => Err(DiskError::HandedOver),
            Mode::Idle => f(),
            Mode::Migrating(live) => {
                let res = f();
                // Counted even when the write failed part-way: its chunks may have changed.
                let chunk = self.mirror.chunk_size() as u64;
                if !r.is_empty() {
                    let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
                    for c in (r.start / chunk) as usize..r.end.div_ceil(chunk) as usize {
                        l.sm.on_write(c);
                        l.must.insert(c);
                    }
                }
                res
            }
        }
    }

    /// Runs a transfer to `o.to` to its end: pushes while the disk is served here, hands
    /// over, answers pulls, then checks the destination's chunks against these. A failure
    /// before the handover leaves the disk served here, intact; after it, the disk stays
    /// handed over (the destination may have written) and the error says what was not pulled.
    pub fn migrate(
        &self,
        o: &MigrateOptions,
        secret: &Secret,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<SourceSummary, Error> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(Error::Busy);
        }
        struct Unbusy<'a>(&'a AtomicBool);
        impl Drop for Unbusy<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _unbusy = Unbusy(&self.busy);
        if matches!(*self.mode.read().unwrap_or_else(|e| e.into_inner()), Mode::Handed) {
            return Err(Error::Refused("this disk was already handed over".into()));
        }
        self.switchover.store(false, Ordering::Release);
        self.cancel.store(false, Ordering::Release);
        *self.handover.lock().unwrap_or_else(|e| e.into_inner()) = Handover::Pending;
        // Whatever ends this call before a confirmed handover settles it as failed.
        struct Settle<'a>(&'a SourceDisk);
        impl Drop for Settle<'_> {
            fn drop(&mut self) {
                self.0.settle(Handover::Failed("the migration ended before the handover".into()));
            }
        }
        let _settle = Settle(self);
        let chunk = self.mirror.chunk_size();
        if chunk > proto::MAX_CHUNK {
            return Err(Error::Refused(format!("chunks of {chunk} bytes are larger than a transfer carries")));
        }
        let start = Instant::now();
        let fetched_at_start = self.mirror.fetched_bytes();
        let mut t = super::connect(o.transport, &o.to, secret, o.io_timeout)?;
        let urgent = t.urgent().map_err(Error::Transport)?;
        send(
            &mut *t,
            &Msg::Begin {
                version: proto::VERSION,
                strategy: o.strategy,
                chunk_size: chunk,
                disk_size: self.mirror.size(),
                base: self.mirror.base_fingerprint()?,
            },
        )?;
        match recv(&mut *t, o.io_timeout, "the destination's answer")? {
            Msg::Accept => {}
            Msg::Refuse(why) => return Err(Error::Refused(why)),
            m => return Err(Error::Unexpected(format!("{m:?} instead of Accept"))),
        }
        // Writes are counted from the instant the set is taken.
        let live = {
            let mut g = self.mode.write().unwrap_or_else(|e| e.into_inner());
            let set = self.mirror.transfer_set()?;
            let must: BTreeSet<usize> = set.iter().copied().collect();
            let sm = match o.strategy {
                Strategy::Hybrid => Sm::Hybrid(SourceTransfer::new(set, o.threshold)),
                Strategy::Precopy => Sm::Precopy(PrecopyTransfer::new(set)),
            };
            let live = Arc::new(Mutex::new(Live { sm, must, sent: HashMap::new() }));
            *g = Mode::Migrating(live.clone());
            live
        };
        let mut sum = SourceSummary { strategy: o.strategy.as_str().into(), ..Default::default() };
        let res = self.push_phase(&mut *t, o, &live, &mut sum, start, progress);
        if let Err(Error::InDoubt(e)) = res {
            self.settle(Handover::Failed(format!("in doubt: the destination may serve the disk: {e}")));
            return Err(Error::InDoubt(e));
        }
        if let Err(e) = res {
            self.settle(Handover::Failed(format!("{e} (the disk is still served here)")));
            // Nothing was handed over: the disk is served here as before.
            *self.mode.write().unwrap_or_else(|e| e.into_inner()) = Mode::Idle;
            let _ = send(&mut *t, &Msg::Abort(e.to_string()));
            return Err(Error::BeforeHandover(Box::new(e)));
        }
        sum.switchover_s = start.elapsed().as_secs_f64();
        // Passive: answer pulls until the destination is done.
        let stop = Arc::new(AtomicBool::new(false));
        let activity = Arc::new(AtomicU64::new(0));
        let responder = {
            let (mirror, live, stop, activity, urgent) =
                (self.mirror.clone(), live.clone(), stop.clone(), activity.clone(), urgent.clone());
            std::thread::Builder::new()
                .name("livemig-disk-urgent".into())
                .spawn(move || answer_urgent(&mirror, &live, &*urgent, &stop, &activity, start))
                .map_err(|e| Error::Unexpected(format!("no thread for urgent pulls: {e}")))?
        };
        let res = self.passive_phase(&mut *t, o, &live, &mut sum, start, &activity, progress);
        stop.store(true, Ordering::Release);
        let urgent_res =
            responder.join().unwrap_or_else(|_| Err(Error::Unexpected("urgent responder panicked".into())));
        let (n, bytes) = urgent_res.unwrap_or((0, 0));
        sum.chunks_pulled_urgent = n;
        sum.bytes_pulled += bytes;
        sum.total_s = start.elapsed().as_secs_f64();
        sum.base_fetched_bytes = self.mirror.fetched_bytes() - fetched_at_start;
        match res {
            Ok(()) => Ok(sum),
            Err(e) => {
                let _ = send(&mut *t, &Msg::Abort(e.to_string()));
                Err(Error::AfterHandover(Box::new(e)))
            }
        }
    }

    /// Pushes chunk `c` (or, with nothing local, drops it from what must cross).
    fn push_one(&self, t: &mut dyn Transport, live: &Mutex<Live>, c: usize) -> Result<u64, Error> {
        let got = read_chunk(&self.mirror, c)?;
        live.lock().unwrap_or_else(|e| e.into_inner()).record(c, &got);
        let Some((lo, buf)) = got else { return Ok(0) };
        t.send_message(&proto::encode_chunk(c as u32, lo, proto::hash(&buf), &buf)).map_err(Error::Transport)?;
        Ok(buf.len() as u64)
    }

    fn push_phase(
        &self,
        t: &mut dyn Transport,
        o: &MigrateOptions,
        live: &Arc<Mutex<Live>>,
        sum: &mut SourceSummary,
        start: Instant,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), Error> {
        let chunk = self.mirror.chunk_size() as u64;
        let mut last_report = Instant::now();
        let mut last_alive = Instant::now();
        // Flow control: pushes sent, and installed at the destination as it last said.
        let window = (o.push_window / chunk).max(2 * proto::INSTALLED_EVERY);
        let (mut sent, mut installed) = (0u64, 0u64);
        let mut installed_at = Instant::now();
        loop {
            // The destination may give up at any time; with a full window, its next report
            // is awaited: no installing for the I/O timeout (even with Alive) is the error.
            let full = sent.saturating_sub(installed) >= window;
            if full && installed_at.elapsed() > o.io_timeout {
                return Err(Error::Silent("the destination while it installed pushes"));
            }
            if full && self.cancel.load(Ordering::Acquire) {
                return Err(Error::Cancelled);
            }
            let wait = if full { Duration::from_millis(100) } else { Duration::ZERO };
            if let Some(m) = t.recv_message(Some(wait)).map_err(Error::Transport)? {
                match proto::decode(&m)? {
                    Msg::Alive => {}
                    Msg::Installed(n) if n <= sent => {
                        if n > installed {
                            installed = n;
                            installed_at = Instant::now();
                        }
                    }
                    Msg::Abort(why) => return Err(Error::PeerAborted(why)),
                    m => return Err(Error::Unexpected(format!("{m:?} while pushing"))),
                }
            }
            if full {
                continue;
            }
            if sent.saturating_sub(installed) == 0 {
                // Nothing outstanding: the wait for the next report starts with the next push.
                installed_at = Instant::now();
            }
            let elapsed = start.elapsed().as_secs_f64().max(1e-3);
            let rate = sum.bytes_pushed as f64 / elapsed;
            let (next, pending, converged, rounds) = {
                let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
                let limit = ((rate * o.max_downtime.as_secs_f64()) / chunk as f64) as usize;
                let (converged, rounds, pending) = match &l.sm {
                    Sm::Precopy(p) => (p.converged(limit.max(1)) || p.rounds() > o.max_rounds, p.rounds(), p.pending()),
                    Sm::Hybrid(_) => (false, 0, 0),
                };
                // Pre-copy stops pushing once converged: the rest goes in the last round.
                let next = if converged && o.switchover == SwitchoverMode::Auto { None } else { l.sm.next_push() };
                (next, pending, converged, rounds)
            };
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress(&Progress {
                    phase: "pushing",
                    elapsed_s: start.elapsed().as_secs_f64(),
                    chunks_pushed: sum.chunks_pushed,
                    bytes_pushed: sum.bytes_pushed,
                    pending: pending as u64,
                    rounds,
                    ready: match o.strategy {
                        Strategy::Hybrid => next.is_none(),
                        Strategy::Precopy => converged,
                    },
                    ..Default::default()
                });
            }
            if self.cancel.load(Ordering::Acquire) {
                return Err(Error::Cancelled);
            }
            let wanted = self.switchover.load(Ordering::Acquire);
            match next {
                Some(c) => {
                    let n = self.push_one(t, live, c)?;
                    sum.chunks_pushed += 1;
                    sum.bytes_pushed += n;
                    if n > 0 {
                        sent += 1;
                    }
                    if !wanted {
                        continue;
                    }
                }
                None if o.switchover == SwitchoverMode::Auto && (o.strategy == Strategy::Hybrid || converged) => {}
                None if wanted => {}
                None => {
                    // Waiting for the switchover command: tell the destination we are here.
                    if last_alive.elapsed() >= Duration::from_secs(1) {
                        send(t, &Msg::Alive)?;
                        last_alive = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            }
            if o.strategy == Strategy::Precopy {
                sum.forced = rounds > o.max_rounds;
            }
            return self.hand_over(t, live, sum, o.io_timeout);
        }
    }

    /// Stops I/O here (waiting for writes under way), tells the destination what it still
    /// needs, and leaves the disk handed over.
    fn hand_over(
        &self,
        t: &mut dyn Transport,
        live: &Arc<Mutex<Live>>,
        sum: &mut SourceSummary,
        io_timeout: Duration,
    ) -> Result<(), Error> {
        let stopped = Instant::now();
        let mut g = self.mode.write().unwrap_or_else(|e| e.into_inner());
        let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
        let rest: Vec<(u32, u32)> = match &mut l.sm {
            Sm::Hybrid(s) => {
                let mut rest = Vec::new();
                for (c, n) in s.transfer_control() {
                    if self.mirror.valid_range(c).is_some() {
                        rest.push((c as u32, n));
                    } else {
                        // Nothing local: it reads as the base there too.
                        l.must.remove(&c);
                    }
                }
                rest
            }
            Sm::Precopy(p) => {
                let last = p.stop();
                sum.rounds = p.rounds();
                drop(l);
                // The last round, with I/O stopped (this is the downtime of pre-copy).
                for &c in &last {
                    let n = self.push_one(t, live, c)?;
                    sum.chunks_pushed += 1;
                    sum.bytes_pushed += n;
                }
                sum.remaining_at_switchover = last.len() as u64;
                l = live.lock().unwrap_or_else(|e| e.into_inner());
                Vec::new()
            }
        };
        drop(l);
        if !rest.is_empty() {
            sum.remaining_at_switchover = rest.len() as u64;
        }
        for part in rest.chunks(proto::MAX_ENTRIES) {
            send(t, &Msg::Remaining(part.to_vec()))?;
        }
        send(t, &Msg::Control { entries: rest.len() as u32 })?;
        // I/O stays blocked (not failed) until the destination confirms: if it refuses, the
        // disk is served here again as if nothing happened.
        // The destination confirms once it has installed every push before the handover; it
        // says Alive meanwhile, so only its silence counts.
        let mut answer = recv(t, io_timeout, "the destination's confirmation of the handover");
        while let Ok(Msg::Alive | Msg::Installed(_)) = answer {
            answer = recv(t, io_timeout, "the destination's confirmation of the handover");
        }
        match answer {
            Ok(Msg::Taken) => {}
            Ok(Msg::Abort(why)) => return Err(Error::PeerAborted(why)),
            Ok(m) => {
                *g = Mode::Handed;
                return Err(Error::InDoubt(Box::new(Error::Unexpected(format!("{m:?} instead of Taken")))));
            }
            Err(e) => {
                *g = Mode::Handed;
                return Err(Error::InDoubt(Box::new(e)));
            }
        }
        *g = Mode::Handed;
        drop(g);
        self.settle(Handover::Confirmed);
        sum.handover_ms = stopped.elapsed().as_secs_f64() * 1e3;
        #[cfg(feature = "fault-injection")]
        if std::env::var_os("LIVEMIG_EXIT_AFTER_HANDOVER").is_some() {
            // Test builds only: the source host dies right after the handover.
            // Nothing answers pulls yet; give the handover time to leave.
            std::thread::sleep(Duration::from_millis(300));
            std::process::exit(7);
        }
        Ok(())
    }

    /// Answers a background pull of chunk `c`.
    fn answer_pull(
        &self,
        t: &mut dyn Transport,
        live: &Mutex<Live>,
        sum: &mut SourceSummary,
        c: u32,
    ) -> Result<(), Error> {
        let ok = match &mut live.lock().unwrap_or_else(|e| e.into_inner()).sm {
            Sm::Hybrid(s) => s.on_pull(c as usize),
            Sm::Precopy(_) => false,
        };
        let got = if ok { read_chunk(&self.mirror, c as usize)? } else { None };
        if ok {
            live.lock().unwrap_or_else(|e| e.into_inner()).record(c as usize, &got);
        }
        match got {
            Some((lo, buf)) => {
                t.send_message(&proto::encode_chunk(c, lo, proto::hash(&buf), &buf)).map_err(Error::Transport)?;
                sum.bytes_pulled += buf.len() as u64;
                sum.chunks_pulled += 1;
            }
            None => send(t, &Msg::Unavailable(c))?,
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn passive_phase(
        &self,
        t: &mut dyn Transport,
        o: &MigrateOptions,
        live: &Arc<Mutex<Live>>,
        sum: &mut SourceSummary,
        start: Instant,
        activity: &AtomicU64,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), Error> {
        let mut held: Vec<HeldChunk> = Vec::new();
        let mut cancelled: HashSet<u32> = HashSet::new();
        let mut last_heard = start.elapsed();
        let mut last_report = Instant::now();
        loop {
            let m = match t.recv_message(Some(Duration::from_millis(500))).map_err(Error::Transport)? {
                Some(m) => m,
                None => {
                    let urgent_heard = Duration::from_nanos(activity.load(Ordering::Acquire));
                    if start.elapsed().saturating_sub(last_heard.max(urgent_heard)) > o.io_timeout {
                        return Err(Error::Silent("the destination while it pulled"));
                    }
                    continue;
                }
            };
            last_heard = start.elapsed();
            match proto::decode(&m)? {
                Msg::Pull(c) => self.answer_pull(t, live, sum, c)?,
                Msg::Held(v) => {
                    if held.len() + v.len() > self.mirror.map().len() {
                        return Err(Error::Unexpected("more held chunks than the disk has".into()));
                    }
                    held.extend(v)
                }
                Msg::Cancelled(v) => cancelled.extend(v),
                Msg::Done { held: h, cancelled: n } => {
                    if h as usize != held.len() || n as usize != cancelled.len() {
                        return Err(Error::Unexpected(format!(
                            "Done announces {h} held and {n} cancelled chunks, {} and {} arrived",
                            held.len(),
                            cancelled.len()
                        )));
                    }
                    if let Sm::Hybrid(s) = &mut live.lock().unwrap_or_else(|e| e.into_inner()).sm {
                        s.release();
                    }
                    let (must, sent) = {
                        let l = live.lock().unwrap_or_else(|e| e.into_inner());
                        (l.must.clone(), l.sent.clone())
                    };
                    let bad = self.verify(&held, &cancelled, &must, &sent)?;
                    sum.verified_chunks = held.len() as u32;
                    send(t, &Msg::Verified { checked: held.len() as u32, bad: bad.clone() })?;
                    if !bad.is_empty() {
                        return Err(Error::Mismatch(bad));
                    }
                    return Ok(());
                }
                Msg::Alive => {}
                Msg::Abort(why) => return Err(Error::PeerAborted(why)),
                m => return Err(Error::Unexpected(format!("{m:?} after the handover"))),
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress(&Progress {
                    phase: "pulled",
                    elapsed_s: start.elapsed().as_secs_f64(),
                    chunks_pushed: sum.chunks_pushed,
                    bytes_pushed: sum.bytes_pushed,
                    chunks_pulled: sum.chunks_pulled,
                    ..Default::default()
                });
            }
        }
    }

    /// Compares the destination's chunks with these (the disk is frozen here now): every
    /// chunk that had to cross is either held there with the same bytes, or was overwritten
    /// there after the handover. Returns the chunks that fail.
    fn verify(
        &self,
        held: &[HeldChunk],
        cancelled: &HashSet<u32>,
        must: &BTreeSet<usize>,
        sent: &HashMap<usize, (u32, u32)>,
    ) -> Result<Vec<u32>, Error> {
        let chunk = self.mirror.chunk_size();
        let size = self.mirror.size();
        let mut bad = BTreeSet::new();
        let mut seen: HashMap<u32, bool> = HashMap::new();
        for h in held {
            let ok = sent.get(&(h.index as usize)) == Some(&(h.lo, h.hi)) && must.contains(&(h.index as usize)) && {
                let r = chunk_range(chunk, size, h.index as usize);
                let mut buf = vec![0u8; (h.hi - h.lo) as usize];
                self.mirror.read(r.start + h.lo as u64, &mut buf)?;
                proto::hash(&buf) == h.hash
            };
            if !ok || seen.insert(h.index, ok).is_some() {
                bad.insert(h.index);
            }
        }
        for &c in must {
            let c32 = c as u32;
            if !seen.contains_key(&c32) && !cancelled.contains(&c32) {
                bad.insert(c32);
            }
        }
        Ok(bad.into_iter().collect())
    }
}

/// Answers pulls on the urgent channel until `stop`; returns the chunks and bytes sent.
fn answer_urgent(
    mirror: &Mirror,
    live: &Mutex<Live>,
    urgent: &dyn UrgentChannel,
    stop: &AtomicBool,
    activity: &AtomicU64,
    start: Instant,
) -> Result<(u64, u64), Error> {
    let (mut n, mut bytes) = (0u64, 0u64);
    while !stop.load(Ordering::Acquire) {
        let ev = match urgent.recv(Some(Duration::from_millis(100))) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(_) => break, // the bulk side reports the session's end
        };
        activity.store(start.elapsed().as_nanos() as u64, Ordering::Release);
        let UrgentEvent::Message(m) = ev else { continue };
        let Ok(Msg::Pull(c)) = proto::decode(&m) else {
            tracing::warn!("unexpected urgent message from the destination");
            continue;
        };
        let ok = match &mut live.lock().unwrap_or_else(|e| e.into_inner()).sm {
            Sm::Hybrid(s) => s.on_pull(c as usize),
            Sm::Precopy(_) => false,
        };
        let got = if ok {
            read_chunk(mirror, c as usize).unwrap_or_else(|e| {
                tracing::warn!(chunk = c, error = %e, "reading a pulled chunk");
                None
            })
        } else {
            None
        };
        if ok {
            live.lock().unwrap_or_else(|e| e.into_inner()).record(c as usize, &got);
        }
        let reply = match got {
            Some((lo, buf)) => {
                n += 1;
                bytes += buf.len() as u64;
                proto::encode_chunk(c, lo, proto::hash(&buf), &buf)
            }
            None => proto::encode(&Msg::Unavailable(c)),
        };
        if urgent.send_message(&reply).is_err() {
            break;
        }
    }
    Ok((n, bytes))
}

impl Disk for SourceDisk {
    fn size(&self) -> u64 {
        self.mirror.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if matches!(*self.mode.read().unwrap_or_else(|e| e.into_inner()), Mode::Handed) {
            return Err(DiskError::HandedOver);
        }
        self.mirror.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        let r = Range::new(offset, offset.saturating_add(data.len() as u64).min(self.mirror.size().max(offset)));
        self.count_writes(r, || self.mirror.write(offset, data, fua))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, hole: bool) -> Result<(), DiskError> {
        let r = Range::new(offset, offset.saturating_add(len).min(self.mirror.size().max(offset)));
        self.count_writes(r, || self.mirror.write_zeroes(offset, len, fua, hole))
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.mirror.flush()
    }
    fn allocation(&self, r: Range) -> Result<Vec<(u64, bool)>, DiskError> {
        self.mirror.allocation(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination that accepts the disk and then installs nothing: the source stops after
    /// its push window instead of pushing the whole disk into the destination's memory, and
    /// gives up after the I/O timeout with the disk still served here.
    #[test]
    fn the_push_stops_at_its_window_when_the_destination_installs_nothing() {
        const SIZE: usize = 32 << 20;
        let path = std::env::temp_dir().join(format!("livemig-window-{}", std::process::id()));
        std::fs::write(&path, (0..SIZE).map(|i| (i * 31 + i / 4096) as u8 | 1).collect::<Vec<u8>>()).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let disk = SourceDisk::new(Arc::new(Mirror::plain(f).unwrap()));
        let secret = Secret::random();
        let l = livemig_transport::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let dest = {
            let secret = secret.clone();
            std::thread::spawn(move || {
                let cfg = livemig_transport::TcpConfig {
                    io_timeout: Duration::from_secs(5),
                    urgent_stream: true,
                    ..Default::default()
                };
                let mut t = l.accept(&cfg, &secret, &livemig_transport::RegionTable::new()).unwrap();
                assert!(matches!(recv(&mut t, Duration::from_secs(5), "Begin").unwrap(), Msg::Begin { .. }));
                send(&mut t, &Msg::Accept).unwrap();
                // Installs nothing, says nothing, until the source has given up.
                done_rx.recv().unwrap();
                let mut chunks = 0;
                while let Ok(Some(m)) = t.recv_message(Some(Duration::from_millis(200))) {
                    if matches!(proto::decode(&m), Ok(Msg::Chunk { .. })) {
                        chunks += 1;
                    }
                }
                chunks
            })
        };
        let o = MigrateOptions {
            to: addr,
            strategy: Strategy::Hybrid,
            threshold: 2,
            switchover: SwitchoverMode::Auto,
            max_downtime: Duration::from_millis(300),
            max_rounds: 30,
            io_timeout: Duration::from_secs(1),
            push_window: 4 << 20,
            transport: livemig_engine::connect::TransportChoice::Tcp,
        };
        let res = disk.migrate(&o, &secret, &mut |_| {});
        done_tx.send(()).unwrap();
        match res {
            Err(Error::BeforeHandover(e)) => assert!(matches!(*e, Error::Silent(_)), "{e}"),
            r => panic!("the push must stall and fail before the handover: {r:?}"),
        }
        assert_eq!(disk.state(), "idle", "the disk is served here still");
        let chunks = dest.join().unwrap();
        // 4 MiB of 256 KiB chunks is 16; the window is never below two reports (32 chunks).
        assert!((1..=2 * proto::INSTALLED_EVERY as usize).contains(&chunks), "{chunks} chunks pushed of 128");
    }
}
