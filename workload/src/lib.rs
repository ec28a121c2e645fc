//! Synthetic workloads that run inside a [`Region`] and keep all their state in it, so that a
//! destination process can resume them from migrated memory and they visibly continue where
//! the source stopped.
//!
//! Modelled on the dirtying workloads of the pre-copy literature and on
//! `shared/qemu-guest/dirty.c`: each step touches one data page (a write is two `u64` stores
//! into the page: the thread's running write counter and a tag), walking the working set
//! sequentially (`seq`), uniformly at random (`random`), or only reading it (`readonly`).
//!
//! # Region layout
//!
//! Page 0 is the header; pages `1..=W` are the working set; pages `W+1..N` are never touched.
//! All header fields are native-endian `u64` words (migration is between hosts of the same
//! architecture, and the fields are updated with native atomics):
//!
//! ```text
//! byte  0  magic        "LMWKLD01" (MAGIC)
//! byte  8  version      VERSION
//! byte 16  kind         1 seq, 2 random, 3 readonly
//! byte 24  W            working-set pages (data pages 1..=W)
//! byte 32  N            region pages (checked against the region on attach)
//! byte 40  page size    region page size in bytes (checked on attach)
//! byte 48  rate         target pages/s over all threads, 0 = flat out
//! byte 56  threads      k; thread t owns data pages [1 + t*W/k, 1 + (t+1)*W/k)
//! byte 64  seed         PRNG seed given to init
//! byte 72..128          reserved, zero
//! byte 128 + 64*t       state slot of thread t (8 words):
//!           +0  position   next page offset within the thread's slice (seq, readonly)
//!           +8  prng       splitmix64 state (random)
//!          +16  passes     completed passes over the slice (seq, readonly)
//!          +24  written    data pages written by this thread (ever, across migrations)
//!          +32  read       data pages read (readonly)
//!          +40  checksum   wrapping sum of words read (readonly; keeps the reads real)
//!          +48  last_page  last data page touched, +1 (0 = none yet)
//!          +56  reserved
//! ```
//!
//! A data page written by thread `t` holds `written` (after that write) in word 0 and
//! `tag(t, page)` in word 1; [`Workload::verify`] checks the page at `last_page` against the
//! slot, which proves header and data came across together.
//!
//! Every step also updates the thread's slot, so **page 0 is dirty whenever the workload
//! runs**, even for `readonly` (which writes nothing else). That is one page per round and is
//! the price of keeping the resume point in migrated memory.
//!
//! # Control
//!
//! [`Workload::pause`] is the stop-and-copy boundary: each thread finishes its current page
//! (data and slot), then parks; when `pause` returns no workload thread touches the region
//! until [`Workload::resume`]. Pure parts (header codec, [`advance`], [`TokenBucket`]) take
//! their inputs explicitly; the worker threads are the thin driver that reads the clock.

use std::fmt;
use std::io;
use std::num::{NonZeroU32, NonZeroU64};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_transport::Region;
use serde::{Deserialize, Serialize};

/// Header magic: the bytes "LMWKLD01" read as a native-endian u64.
pub const MAGIC: u64 = u64::from_ne_bytes(*b"LMWKLD01");
/// Header layout version.
pub const VERSION: u64 = 1;

const HEADER_FIELDS_BYTES: usize = 128;
const SLOT_BYTES: usize = 64;
const SLOT_WORDS: usize = SLOT_BYTES / 8;
/// Smallest region page size the header fits in with one slot and room to spare.
pub const MIN_PAGE_SIZE: usize = 512;
/// Words read per page by `readonly` (spread over the page).
const READ_WORDS: usize = 8;

/// Access pattern of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// Sequential writer over the working set, wrapping.
    Seq,
    /// Uniform random writer over the working set (deterministic PRNG kept in the header).
    Random,
    /// Sequential reader; writes only its counters in the header page.
    Readonly,
}

impl WorkloadKind {
    fn code(self) -> u64 {
        match self {
            WorkloadKind::Seq => 1,
            WorkloadKind::Random => 2,
            WorkloadKind::Readonly => 3,
        }
    }

    fn from_code(c: u64) -> Option<Self> {
        match c {
            1 => Some(WorkloadKind::Seq),
            2 => Some(WorkloadKind::Random),
            3 => Some(WorkloadKind::Readonly),
            _ => None,
        }
    }

    /// True for kinds that write data pages.
    pub fn writes(self) -> bool {
        self != WorkloadKind::Readonly
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadKind::Seq => "seq",
            WorkloadKind::Random => "random",
            WorkloadKind::Readonly => "readonly",
        })
    }
}

impl FromStr for WorkloadKind {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seq" => Ok(WorkloadKind::Seq),
            "random" => Ok(WorkloadKind::Random),
            "readonly" => Ok(WorkloadKind::Readonly),
            _ => Err(WorkloadError::UnknownKind(s.to_owned())),
        }
    }
}

fn one_thread() -> NonZeroU32 {
    NonZeroU32::MIN
}

/// Parameters of a workload, stored in its header by [`Workload::init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadParams {
    /// Access pattern.
    pub kind: WorkloadKind,
    /// W: data pages touched (pages `1..=W` of the region); at most the region's pages - 1
    /// and at least `threads`.
    pub working_set_pages: NonZeroU64,
    /// Target pages per second over all threads; 0 runs flat out. When non-zero, at least
    /// `threads` (each thread gets an equal share).
    #[serde(default)]
    pub rate_pages_per_sec: u64,
    /// Threads; each owns an equal slice of the working set and a state slot in the header.
    #[serde(default = "one_thread")]
    pub threads: NonZeroU32,
    /// Seed of the per-thread PRNGs (`random`).
    #[serde(default)]
    pub seed: u64,
}

impl WorkloadParams {
    /// One thread, flat out, seed 0.
    pub fn new(kind: WorkloadKind, working_set_pages: NonZeroU64) -> Self {
        WorkloadParams { kind, working_set_pages, rate_pages_per_sec: 0, threads: one_thread(), seed: 0 }
    }
}

/// Lifecycle state of a [`Workload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// No threads (after init/attach or stop).
    Idle,
    /// Threads running.
    Running,
    /// Threads parked at a page boundary.
    Paused,
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunState::Idle => "idle",
            RunState::Running => "running",
            RunState::Paused => "paused",
        })
    }
}

/// Errors of workloads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// Page 0 does not start with [`MAGIC`].
    #[error("region holds no workload header (magic {found:#018x})")]
    BadMagic {
        /// The word found.
        found: u64,
    },
    /// The header layout version is not [`VERSION`].
    #[error("workload header version {found} is not supported (this build reads {VERSION})")]
    Version {
        /// The version found.
        found: u64,
    },
    /// A header field or parameter is out of range.
    #[error("workload {field} = {value} is invalid: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The header was written for a region of another shape.
    #[error("header describes {header_pages} pages of {header_page_size} bytes, region has {region_pages} of {region_page_size}")]
    RegionMismatch {
        /// Pages in the header.
        header_pages: u64,
        /// Page size in the header.
        header_page_size: u64,
        /// Pages of the region.
        region_pages: u64,
        /// Page size of the region.
        region_page_size: u64,
    },
    /// The operation is not allowed in the current state.
    #[error("cannot {op} a workload that is {state}")]
    State {
        /// The operation.
        op: &'static str,
        /// The current state.
        state: RunState,
    },
    /// A worker thread could not be spawned.
    #[error("spawning workload thread {thread} failed")]
    Spawn {
        /// Thread index.
        thread: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A worker thread panicked.
    #[error("workload thread {thread} panicked")]
    ThreadPanicked {
        /// Thread index.
        thread: usize,
    },
    /// Data and header disagree (see [`Workload::verify`]).
    #[error("thread {thread}: page {page} holds counter {found} and tag {found_tag:#x}, header expects {expected}")]
    Inconsistent {
        /// Thread index.
        thread: usize,
        /// Data page.
        page: u64,
        /// Counter in the header slot.
        expected: u64,
        /// Counter found in the page.
        found: u64,
        /// Tag found in the page.
        found_tag: u64,
    },
    /// Unknown workload kind name.
    #[error("unknown workload kind {0:?} (expected seq, random or readonly)")]
    UnknownKind(String),
}

// ---------------------------------------------------------------------------------------
// Pure parts: header codec, per-thread state machine, token bucket.
// ---------------------------------------------------------------------------------------

/// The fixed part of the header: parameters and region shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Parameters.
    pub params: WorkloadParams,
    /// N: region pages.
    pub region_pages: u64,
    /// Region page size.
    pub page_size: u64,
}

/// Most threads whose slots fit in a header page of `page_size` bytes.
pub fn max_threads(page_size: usize) -> usize {
    page_size.saturating_sub(HEADER_FIELDS_BYTES) / SLOT_BYTES
}

impl Header {
    /// Validates `params` for a region of `region_pages` pages of `page_size` bytes.
    pub fn new(params: WorkloadParams, region_pages: u64, page_size: u64) -> Result<Self, WorkloadError> {
        let h = Header { params, region_pages, page_size };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        let bad = |field, value, reason| Err(WorkloadError::Invalid { field, value, reason });
        let p = &self.params;
        if self.page_size < MIN_PAGE_SIZE as u64 || self.page_size % 8 != 0 {
            return bad("page_size", self.page_size, "must be a multiple of 8 and at least 512");
        }
        if self.region_pages < 2 {
            return bad("region_pages", self.region_pages, "needs a header page and a data page");
        }
        let w = p.working_set_pages.get();
        if w >= self.region_pages {
            return bad("working_set_pages", w, "must be below the region's page count");
        }
        let k = p.threads.get() as u64;
        if k as usize > max_threads(self.page_size as usize) {
            return bad("threads", k, "more threads than state slots in the header page");
        }
        if k > w {
            return bad("threads", k, "each thread needs at least one working-set page");
        }
        if p.rate_pages_per_sec != 0 && p.rate_pages_per_sec < k {
            return bad("rate_pages_per_sec", p.rate_pages_per_sec, "must be 0 or at least one page/s per thread");
        }
        Ok(())
    }

    /// The data pages `[lo, hi)` owned by thread `t`.
    pub fn slice(&self, t: usize) -> (u64, u64) {
        let (w, k) = (self.params.working_set_pages.get(), self.params.threads.get() as u64);
        let t = t as u64;
        (1 + t * w / k, 1 + (t + 1) * w / k)
    }

    /// Target rate of thread `t` (pages/s, 0 = flat out): an equal share of the total.
    pub fn thread_rate(&self, t: usize) -> u64 {
        let (r, k) = (self.params.rate_pages_per_sec, self.params.threads.get() as u64);
        r / k + u64::from((t as u64) < r % k)
    }

    /// The initial state of thread `t`.
    pub fn initial_state(&self, t: usize) -> ThreadState {
        ThreadState {
            prng: splitmix64_mix(self.params.seed ^ (t as u64).wrapping_mul(0xA24B_AED4_963E_E407)),
            ..Default::default()
        }
    }

    /// Encodes a full header page (fields and initial slots).
    pub fn encode(&self) -> Vec<u8> {
        let mut page = vec![0u8; self.page_size as usize];
        let p = &self.params;
        let fields = [
            MAGIC,
            VERSION,
            p.kind.code(),
            p.working_set_pages.get(),
            self.region_pages,
            self.page_size,
            p.rate_pages_per_sec,
            p.threads.get() as u64,
            p.seed,
        ];
        for (i, v) in fields.iter().enumerate() {
            page[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        for t in 0..p.threads.get() as usize {
            let off = HEADER_FIELDS_BYTES + t * SLOT_BYTES;
            for (i, v) in self.initial_state(t).to_words().iter().enumerate() {
                page[off + i * 8..off + i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
            }
        }
        page
    }

    /// Decodes and validates the fixed fields of a header page (at least the first 128
    /// bytes). Checks magic, version and ranges, not the region shape.
    pub fn decode(page: &[u8]) -> Result<Self, WorkloadError> {
        let word = |i: usize| -> u64 {
            page.get(i * 8..i * 8 + 8).map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        };
        if word(0) != MAGIC {
            return Err(WorkloadError::BadMagic { found: word(0) });
        }
        if word(1) != VERSION {
            return Err(WorkloadError::Version { found: word(1) });
        }
        let invalid = |field, value, reason| WorkloadError::Invalid { field, value, reason };
        let kind = WorkloadKind::from_code(word(2)).ok_or(invalid("kind", word(2), "unknown kind code"))?;
        let working_set_pages = NonZeroU64::new(word(3)).ok_or(invalid("working_set_pages", 0, "must be positive"))?;
        let threads = u32::try_from(word(7)).ok().and_then(NonZeroU32::new).ok_or(invalid(
            "threads",
            word(7),
            "must be in 1..=u32::MAX",
        ))?;
        let h = Header {
            params: WorkloadParams { kind, working_set_pages, rate_pages_per_sec: word(6), threads, seed: word(8) },
            region_pages: word(4),
            page_size: word(5),
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks that the header was written for a region of this shape.
    pub fn check_region(&self, region_pages: u64, page_size: u64) -> Result<(), WorkloadError> {
        if self.region_pages != region_pages || self.page_size != page_size {
            return Err(WorkloadError::RegionMismatch {
                header_pages: self.region_pages,
                header_page_size: self.page_size,
                region_pages,
                region_page_size: page_size,
            });
        }
        Ok(())
    }
}

/// The state slot of one worker thread (see the module doc for the layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// Next page offset within the thread's slice (seq, readonly).
    pub position: u64,
    /// splitmix64 state (random).
    pub prng: u64,
    /// Completed passes over the slice (seq, readonly).
    pub passes: u64,
    /// Data pages written.
    pub written: u64,
    /// Data pages read.
    pub read: u64,
    /// Wrapping sum of words read.
    pub checksum: u64,
    /// Last data page touched + 1 (0 = none).
    pub last_page: u64,
}

impl ThreadState {
    fn to_words(self) -> [u64; SLOT_WORDS] {
        [self.position, self.prng, self.passes, self.written, self.read, self.checksum, self.last_page, 0]
    }

    fn from_words(w: [u64; SLOT_WORDS]) -> Self {
        ThreadState {
            position: w[0],
            prng: w[1],
            passes: w[2],
            written: w[3],
            read: w[4],
            checksum: w[5],
            last_page: w[6],
        }
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The tag a writer stores in word 1 of each data page it writes.
pub fn tag(thread: usize, page: u64) -> u64 {
    0x5A5A_0000_0000_0000 ^ ((thread as u64) << 40) ^ page
}

/// One step of a thread: the data page to touch in `[lo, hi)` and the state after touching
/// it (`checksum` excepted: it depends on what the read returns). Pure and deterministic, so
/// a resumed thread continues exactly the sequence the source would have produced.
pub fn advance(kind: WorkloadKind, s: &ThreadState, lo: u64, hi: u64) -> (u64, ThreadState) {
    let len = hi - lo;
    let mut n = *s;
    let page = match kind {
        WorkloadKind::Seq | WorkloadKind::Readonly => {
            let page = lo + s.position % len;
            n.position = s.position % len + 1;
            if n.position == len {
                n.position = 0;
                n.passes += 1;
            }
            page
        }
        WorkloadKind::Random => {
            n.prng = s.prng.wrapping_add(GOLDEN);
            let r = splitmix64_mix(n.prng);
            lo + ((r as u128 * len as u128) >> 64) as u64
        }
    };
    if kind.writes() {
        n.written += 1;
    } else {
        n.read += 1;
    }
    n.last_page = page + 1;
    (page, n)
}

/// A token bucket on a caller-supplied clock: `rate` tokens (pages) per second, holding at
/// most `burst`. Integer arithmetic in nano-tokens.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst_nt: u128,
    tokens_nt: u128,
    last: Instant,
}

const NANO: u128 = 1_000_000_000;

impl TokenBucket {
    /// A bucket of `rate` tokens/s (> 0) and capacity `burst` (>= 1), holding one token.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let rate = rate.max(1);
        let burst_nt = burst.max(1) as u128 * NANO;
        TokenBucket { rate, burst_nt, tokens_nt: NANO, last: now }
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        self.tokens_nt = (self.tokens_nt + dt * self.rate as u128).min(self.burst_nt);
        if self.tokens_nt >= NANO {
            self.tokens_nt -= NANO;
            Ok(())
        } else {
            let wait_ns = (NANO - self.tokens_nt).div_ceil(self.rate as u128);
            Err(Duration::from_nanos(wait_ns as u64))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Region access: header and data words as atomics.
// ---------------------------------------------------------------------------------------

/// The `u64` at byte offset `off` of `region`, as an atomic.
fn word_at(region: &Region, off: usize) -> &AtomicU64 {
    assert!(off % 8 == 0 && off + 8 <= region.len() as usize, "word at {off} outside the region");
    // Workload threads and the controller only touch the region through these atomics;
    // other accessors (a transport copying pages) are ordered against them by `pause`.
    // SAFETY: in the mapping (assert above), alive as long as the borrow of `region`, and
    // 8-aligned (page-aligned base, `off` a multiple of 8).
    unsafe { AtomicU64::from_ptr(region.as_ptr().add(off).cast::<u64>()) }
}

fn slot_word(region: &Region, t: usize, i: usize) -> &AtomicU64 {
    word_at(region, HEADER_FIELDS_BYTES + t * SLOT_BYTES + i * 8)
}

fn load_slot(region: &Region, t: usize) -> ThreadState {
    let mut w = [0u64; SLOT_WORDS];
    for (i, v) in w.iter_mut().enumerate() {
        *v = slot_word(region, t, i).load(Ordering::Relaxed);
    }
    ThreadState::from_words(w)
}

fn store_slot(region: &Region, t: usize, old: &ThreadState, new: &ThreadState) {
    for (i, (o, n)) in old.to_words().iter().zip(new.to_words()).enumerate() {
        if *o != n {
            slot_word(region, t, i).store(n, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Driver: threads and their control.
// ---------------------------------------------------------------------------------------

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

#[derive(Debug)]
struct Gate {
    state: u8,
    /// Threads parked in `checkpoint`.
    parked: usize,
    /// Threads that have not exited.
    alive: usize,
}

/// Run/pause/stop signalling between the controller and the worker threads.
#[derive(Debug)]
struct Control {
    /// Mirror of `gate.state`, polled once per page without locking.
    fast: AtomicU8,
    gate: Mutex<Gate>,
    to_workers: Condvar,
    to_controller: Condvar,
}

impl Control {
    fn new(threads: usize) -> Self {
        Control {
            fast: AtomicU8::new(RUN),
            gate: Mutex::new(Gate { state: RUN, parked: 0, alive: threads }),
            to_workers: Condvar::new(),
            to_controller: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: u8) {
        let mut g = self.lock();
        g.state = state;
        self.fast.store(state, Ordering::Release);
        drop(g);
        self.to_workers.notify_all();
    }

    /// Called by a worker between pages: returns false when it must exit. Parks while
    /// paused; the worker's region stores happen-before the controller sees it parked
    /// (both sides hold `gate`).
    fn checkpoint(&self) -> bool {
        if self.fast.load(Ordering::Acquire) == RUN {
            return true;
        }
        let mut g = self.lock();
        loop {
            match g.state {
                RUN => return true,
                STOP => return false,
                _ => {
                    g.parked += 1;
                    self.to_controller.notify_all();
                    while g.state == PAUSE {
                        g = self.to_workers.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked -= 1;
                }
            }
        }
    }

    /// Sleeps up to `d` for rate limiting, waking early on pause/stop.
    fn sleep(&self, d: Duration) {
        let g = self.lock();
        if g.state == RUN {
            let _ = self.to_workers.wait_timeout(g, d);
        }
    }

    /// Waits until every live worker is parked.
    fn wait_parked(&self) {
        let mut g = self.lock();
        while g.parked < g.alive {
            g = self.to_controller.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn exited(&self) {
        let mut g = self.lock();
        g.alive -= 1;
        drop(g);
        self.to_controller.notify_all();
    }
}

/// Decrements the live count even if the worker panics, so `pause` cannot hang.
struct ExitGuard<'a>(&'a Control);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        self.0.exited();
    }
}

fn worker(region: &Region, header: &Header, ctl: &Control, t: usize) {
    let _guard = ExitGuard(ctl);
    let kind = header.params.kind;
    let (lo, hi) = header.slice(t);
    let ps = header.page_size as usize;
    let rate = header.thread_rate(t);
    let mut bucket = (rate > 0).then(|| TokenBucket::new(rate, (rate / 100).max(1), Instant::now()));
    let mut st = load_slot(region, t);
    while ctl.checkpoint() {
        if let Some(b) = bucket.as_mut() {
            if let Err(wait) = b.try_take(Instant::now()) {
                ctl.sleep(wait);
                continue;
            }
        }
        let (page, mut next) = advance(kind, &st, lo, hi);
        let base = page as usize * ps;
        if kind.writes() {
            word_at(region, base).store(next.written, Ordering::Relaxed);
            word_at(region, base + 8).store(tag(t, page), Ordering::Relaxed);
        } else {
            let stride = ps / READ_WORDS / 8 * 8;
            let sum = (0..READ_WORDS)
                .fold(0u64, |a, i| a.wrapping_add(word_at(region, base + i * stride).load(Ordering::Relaxed)));
            next.checksum = st.checksum.wrapping_add(sum);
        }
        store_slot(region, t, &st, &next);
        st = next;
    }
}

/// A workload running (or ready to run) inside a region. Dropping it stops its threads.
#[derive(Debug)]
pub struct Workload {
    region: Arc<Region>,
    header: Header,
    state: RunState,
    ctl: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Formats page 0 of `region` as a fresh workload with `params` (slots zeroed, PRNGs
    /// seeded). Data pages are left as they are. Nothing runs until [`Workload::start`].
    pub fn init(region: Arc<Region>, params: WorkloadParams) -> Result<Self, WorkloadError> {
        let header = Header::new(params, region.pages() as u64, region.page_size() as u64)?;
        let page = header.encode();
        for (i, chunk) in page.chunks_exact(8).enumerate() {
            word_at(&region, i * 8).store(u64::from_ne_bytes(chunk.try_into().expect("8 bytes")), Ordering::Relaxed);
        }
        Ok(Self::idle(region, header))
    }

    /// Validates the header in page 0 of `region` (e.g. migrated memory) and returns the
    /// workload it describes, ready to [`start`](Workload::start) from its saved state.
    pub fn attach(region: Arc<Region>) -> Result<Self, WorkloadError> {
        let fixed: Vec<u8> = (0..HEADER_FIELDS_BYTES / 8)
            .flat_map(|i| word_at(&region, i * 8).load(Ordering::Relaxed).to_ne_bytes())
            .collect();
        let header = Header::decode(&fixed)?;
        header.check_region(region.pages() as u64, region.page_size() as u64)?;
        Ok(Self::idle(region, header))
    }

    fn idle(region: Arc<Region>, header: Header) -> Self {
        let k = header.params.threads.get() as usize;
        Workload { region, header, state: RunState::Idle, ctl: Arc::new(Control::new(k)), threads: Vec::new() }
    }

    /// The parameters (from the header).
    pub fn params(&self) -> &WorkloadParams {
        &self.header.params
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The region the workload lives in.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Current lifecycle state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Spawns the worker threads; they continue from the state saved in the header.
    pub fn start(&mut self) -> Result<(), WorkloadError> {
        if self.state != RunState::Idle {
            return Err(WorkloadError::State { op: "start", state: self.state });
        }
        let k = self.header.params.threads.get() as usize;
        self.ctl = Arc::new(Control::new(k));
        for t in 0..k {
            let (region, ctl, header) = (self.region.clone(), self.ctl.clone(), self.header);
            let spawned = std::thread::Builder::new()
                .name(format!("livemig-wl-{t}"))
                .spawn(move || worker(&region, &header, &ctl, t));
            match spawned {
                Ok(h) => self.threads.push(h),
                Err(source) => {
                    // Threads not spawned will never check in: account for them, then stop.
                    for _ in t..k {
                        self.ctl.exited();
                    }
                    self.state = RunState::Running;
                    let _ = self.stop();
                    return Err(WorkloadError::Spawn { thread: t, source });
                }
            }
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// Stops the threads at a page boundary: each finishes the page it is on (data and
    /// header slot) and parks. When this returns, no workload thread touches the region
    /// until [`resume`](Workload::resume) or [`stop`](Workload::stop).
    pub fn pause(&mut self) -> Result<(), WorkloadError> {
        if self.state != RunState::Running {
            return Err(WorkloadError::State { op: "pause", state: self.state });
        }
        self.ctl.set(PAUSE);
        self.ctl.wait_parked();
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets paused threads continue.
    pub fn resume(&mut self) -> Result<(), WorkloadError> {
        if self.state != RunState::Paused {
            return Err(WorkloadError::State { op: "resume", state: self.state });
        }
        self.ctl.set(RUN);
        self.state = RunState::Running;
        Ok(())
    }

    /// Stops and joins the threads (from running or paused; a no-op when idle). The state
    /// stays in the header, so [`start`](Workload::start) continues from it.
    pub fn stop(&mut self) -> Result<(), WorkloadError> {
        if self.state == RunState::Idle {
            return Ok(());
        }
        self.ctl.set(STOP);
        let mut result = Ok(());
        for (t, h) in self.threads.drain(..).enumerate() {
            if h.join().is_err() && result.is_ok() {
                result = Err(WorkloadError::ThreadPanicked { thread: t });
            }
        }
        self.state = RunState::Idle;
        result
    }

    /// State slots of all threads, read from the header (atomically per word; consistent
    /// as a whole only while paused or idle).
    pub fn thread_states(&self) -> Vec<ThreadState> {
        (0..self.header.params.threads.get() as usize).map(|t| load_slot(&self.region, t)).collect()
    }

    /// Data pages written so far, summed over the header counters: it includes the pages
    /// written before a migration. Sample it over time for pages/s.
    pub fn pages_written(&self) -> u64 {
        self.sum_slot(3)
    }

    /// Data pages read so far (`readonly`), summed over the header counters.
    pub fn pages_read(&self) -> u64 {
        self.sum_slot(4)
    }

    /// Pages processed: written plus read.
    pub fn pages_touched(&self) -> u64 {
        self.pages_written() + self.pages_read()
    }

    fn sum_slot(&self, i: usize) -> u64 {
        (0..self.header.params.threads.get() as usize)
            .map(|t| slot_word(&self.region, t, i).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Checks that data pages agree with the header: for each writing thread that has
    /// written, its last page holds its counter and tag. Needs the threads paused or idle.
    pub fn verify(&self) -> Result<(), WorkloadError> {
        if self.state == RunState::Running {
            return Err(WorkloadError::State { op: "verify", state: self.state });
        }
        if !self.header.params.kind.writes() {
            return Ok(());
        }
        let ps = self.header.page_size as usize;
        for (t, s) in self.thread_states().iter().enumerate() {
            if s.last_page == 0 {
                continue;
            }
            let page = s.last_page - 1;
            let (lo, hi) = self.header.slice(t);
            let in_slice = (lo..hi).contains(&page);
            let found = if in_slice { word_at(&self.region, page as usize * ps).load(Ordering::Relaxed) } else { 0 };
            let found_tag =
                if in_slice { word_at(&self.region, page as usize * ps + 8).load(Ordering::Relaxed) } else { 0 };
            if !in_slice || found != s.written || found_tag != tag(t, page) {
                return Err(WorkloadError::Inconsistent { thread: t, page, expected: s.written, found, found_tag });
            }
        }
        Ok(())
    }
}

/// The device state of a migrated workload: only this tag, since all of its state lives in
/// its region (page 0). It tells the destination that a workload is to be started.
pub const DEVICE_STATE: &[u8] = b"livemig-workload/1";

/// The workload as a guest the engine migrates: its device state is [`DEVICE_STATE`]; its
/// progress is the pages it touched.
impl livemig_engine::guest::GuestControl for Workload {
    fn pause(&mut self) -> Result<(), livemig_engine::guest::GuestError> {
        Workload::pause(self).map_err(|e| livemig_engine::guest::GuestError::new("pause", e))
    }

    fn resume(&mut self) -> Result<(), livemig_engine::guest::GuestError> {
        if self.state() == RunState::Paused {
            Workload::resume(self).map_err(|e| livemig_engine::guest::GuestError::new("resume", e))?;
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, livemig_engine::guest::GuestError> {
        Ok(DEVICE_STATE.to_vec())
    }

    fn handed_over(&mut self) {
        if let Err(e) = self.stop() {
            // It is paused and stays so; the migration itself is complete.
            tracing::warn!(error = %e, "stopping the paused source workload failed");
        }
    }

    fn progress(&self) -> Option<u64> {
        Some(self.pages_touched())
    }
}

/// The destination's start closure for a migrated workload: with the workload's device
/// state it attaches to `region` (the migrated header is checked against it) and starts the
/// workload threads, keeping the running workload in `slot`; with an empty state (the source
/// had no workload) it starts nothing.
pub fn starter(
    region: Arc<Region>,
    slot: &mut Option<Workload>,
) -> impl FnMut(Vec<u8>) -> Result<(), livemig_engine::guest::GuestError> + '_ {
    move |state| {
        if state.is_empty() {
            return Ok(());
        }
        if state != DEVICE_STATE {
            return Err(livemig_engine::guest::GuestError::new("start", "the device state is not a workload's"));
        }
        let mut w = Workload::attach(region.clone()).map_err(|e| livemig_engine::guest::GuestError::new("start", e))?;
        w.start().map_err(|e| livemig_engine::guest::GuestError::new("start", e))?;
        *slot = Some(w);
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "workload stopped with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_transport::{Access, Backing};

    const PS: usize = 4096;

    fn region(backing: Backing, pages: usize) -> Arc<Region> {
        let len = (pages * PS) as u64;
        Arc::new(match backing {
            Backing::Memfd => Region::memfd(2, len, PS as u32, Access::LOCAL).unwrap(),
            _ => Region::anonymous(2, len, PS as u32, Access::LOCAL).unwrap(),
        })
    }

    fn params(kind: WorkloadKind, w: u64, threads: u32) -> WorkloadParams {
        WorkloadParams {
            kind,
            working_set_pages: NonZeroU64::new(w).unwrap(),
            rate_pages_per_sec: 0,
            threads: NonZeroU32::new(threads).unwrap(),
            seed: 42,
        }
    }

    /// Copies the whole region, as a stop-and-copy would (only valid while paused).
    fn copy_region(src: &Region, dst: &Region) {
        let mut buf = vec![0u8; src.len() as usize];
        assert!(src.read_at(0, &mut buf));
        assert!(dst.write_at(0, &buf));
    }

    fn snapshot(r: &Region) -> Vec<u8> {
        let mut buf = vec![0u8; r.len() as usize];
        assert!(r.read_at(0, &mut buf));
        buf
    }

    /// Runs the workload for at least `d` and until every thread has done two passes over its
    /// slice (or touched 64 pages), so a loaded machine that schedules a thread late does not
    /// make the test see no work (bounded by 30 s).
    fn run_for(w: &mut Workload, d: Duration) {
        let t0: Vec<ThreadState> = w.thread_states();
        w.start().unwrap();
        std::thread::sleep(d);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline
            && !w
                .thread_states()
                .iter()
                .zip(&t0)
                .all(|(n, o)| n.passes >= o.passes + 2 || n.written + n.read >= o.written + o.read + 64)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        w.pause().unwrap();
    }

    /// Replays `advance` from `from` until it reaches `to`'s counter and checks it lands
    /// exactly on `to`: the destination continued the source's sequence, step for step.
    fn replays(h: &Header, t: usize, from: &ThreadState, to: &ThreadState) {
        let (lo, hi) = h.slice(t);
        let mut s = *from;
        let target = |s: &ThreadState| s.written + s.read;
        while target(&s) < target(to) {
            s = advance(h.params.kind, &s, lo, hi).1;
        }
        s.checksum = to.checksum;
        assert_eq!(s, *to, "thread {t} did not continue the source's sequence");
    }

    fn migrate_and_resume(kind: WorkloadKind, threads: u32, backing: Backing) {
        let src = region(backing, 64);
        let mut w = Workload::init(src.clone(), params(kind, 48, threads)).unwrap();
        run_for(&mut w, Duration::from_millis(40));
        let before = w.thread_states();
        assert!(w.pages_touched() > 0, "{kind}: nothing ran");
        w.verify().unwrap();

        // Paused: nobody touches the region.
        let snap = snapshot(&src);
        std::thread::sleep(Duration::from_millis(20));
        assert!(snapshot(&src) == snap, "{kind}: region changed while paused");

        let dst = region(Backing::Anonymous, 64);
        copy_region(&src, &dst);
        w.stop().unwrap();
        drop(w);

        let mut d = Workload::attach(dst.clone()).unwrap();
        assert_eq!(*d.params(), params(kind, 48, threads));
        assert_eq!(d.thread_states(), before, "attach reads the migrated state");
        d.verify().unwrap();
        run_for(&mut d, Duration::from_millis(40));
        let after = d.thread_states();
        for (t, (b, a)) in before.iter().zip(&after).enumerate() {
            assert!(a.written + a.read > b.written + b.read, "{kind} thread {t}: did not continue");
            replays(d.header(), t, b, a);
        }
        d.verify().unwrap();
        // The readonly kind never writes data pages.
        if !kind.writes() {
            assert_eq!(d.pages_written(), 0);
            assert!(snapshot(&dst)[PS..].iter().all(|&b| b == 0));
        }
        // Counters keep increasing across resume/pause cycles.
        let n1 = d.pages_touched();
        d.resume().unwrap();
        std::thread::sleep(Duration::from_millis(10));
        d.pause().unwrap();
        assert!(d.pages_touched() > n1);
        d.stop().unwrap();
    }

    #[test]
    fn seq_migrates_and_resumes() {
        migrate_and_resume(WorkloadKind::Seq, 1, Backing::Anonymous);
        migrate_and_resume(WorkloadKind::Seq, 3, Backing::Memfd);
    }

    #[test]
    fn random_migrates_and_resumes() {
        migrate_and_resume(WorkloadKind::Random, 1, Backing::Memfd);
        migrate_and_resume(WorkloadKind::Random, 4, Backing::Anonymous);
    }

    #[test]
    fn readonly_migrates_and_resumes() {
        migrate_and_resume(WorkloadKind::Readonly, 1, Backing::Anonymous);
        migrate_and_resume(WorkloadKind::Readonly, 2, Backing::Memfd);
    }

    #[test]
    fn bad_headers_are_rejected() {
        let r = region(Backing::Anonymous, 16);
        assert!(matches!(Workload::attach(r.clone()), Err(WorkloadError::BadMagic { found: 0 })));

        let h = Header::new(params(WorkloadKind::Seq, 8, 2), 16, PS as u64).unwrap();
        let good = h.encode();
        assert_eq!(Header::decode(&good).unwrap(), h);
        let patch = |i: usize, v: u64| {
            let mut p = good.clone();
            p[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
            p
        };
        assert!(matches!(Header::decode(&patch(0, 7)), Err(WorkloadError::BadMagic { found: 7 })));
        assert!(matches!(Header::decode(&patch(1, 99)), Err(WorkloadError::Version { found: 99 })));
        assert!(matches!(Header::decode(&patch(2, 9)), Err(WorkloadError::Invalid { field: "kind", .. })));
        assert!(matches!(
            Header::decode(&patch(3, 16)),
            Err(WorkloadError::Invalid { field: "working_set_pages", .. })
        ));
        assert!(matches!(Header::decode(&patch(7, 0)), Err(WorkloadError::Invalid { field: "threads", .. })));
        assert!(matches!(Header::decode(&patch(7, 1000)), Err(WorkloadError::Invalid { field: "threads", .. })));
        assert!(matches!(Header::decode(&good[..16]), Err(WorkloadError::Invalid { .. })));

        // A valid header for another region shape.
        Workload::init(r.clone(), params(WorkloadKind::Seq, 8, 2)).unwrap();
        let other = region(Backing::Anonymous, 32);
        copy_region_prefix(&r, &other, PS);
        assert!(matches!(Workload::attach(other), Err(WorkloadError::RegionMismatch { header_pages: 16, .. })));
        assert!(Workload::attach(r).is_ok());
    }

    fn copy_region_prefix(src: &Region, dst: &Region, len: usize) {
        let mut buf = vec![0u8; len];
        assert!(src.read_at(0, &mut buf) && dst.write_at(0, &buf));
    }

    #[test]
    fn invalid_params_are_rejected() {
        let r = region(Backing::Anonymous, 16);
        let bad = |p| matches!(Workload::init(r.clone(), p), Err(WorkloadError::Invalid { .. }));
        assert!(bad(params(WorkloadKind::Seq, 16, 1)), "W must leave the header page");
        assert!(bad(params(WorkloadKind::Seq, 4, 5)), "more threads than pages");
        assert!(bad(WorkloadParams { rate_pages_per_sec: 1, ..params(WorkloadKind::Seq, 8, 2) }));
        let big = region(Backing::Anonymous, 128);
        let too_many = params(WorkloadKind::Seq, 100, max_threads(PS) as u32 + 1);
        assert!(matches!(Workload::init(big, too_many), Err(WorkloadError::Invalid { field: "threads", .. })));
        assert_eq!(max_threads(PS), 62);
    }

    #[test]
    fn lifecycle_errors() {
        let r = region(Backing::Anonymous, 16);
        let mut w = Workload::init(r, params(WorkloadKind::Seq, 8, 1)).unwrap();
        assert!(matches!(w.pause(), Err(WorkloadError::State { op: "pause", state: RunState::Idle })));
        assert!(matches!(w.resume(), Err(WorkloadError::State { .. })));
        w.start().unwrap();
        assert!(matches!(w.start(), Err(WorkloadError::State { op: "start", state: RunState::Running })));
        assert!(matches!(w.verify(), Err(WorkloadError::State { .. })));
        w.pause().unwrap();
        assert_eq!(w.state(), RunState::Paused);
        w.stop().unwrap();
        w.stop().unwrap();
        // Stop keeps the state in the header; start continues from it.
        let n = w.pages_written();
        run_for(&mut w, Duration::from_millis(5));
        assert!(w.pages_written() > n);
        w.verify().unwrap();
    }

    #[test]
    fn rate_limit_is_roughly_respected() {
        let r = region(Backing::Anonymous, 256);
        let rate = 2000;
        let p = WorkloadParams { rate_pages_per_sec: rate, ..params(WorkloadKind::Seq, 200, 2) };
        let mut w = Workload::init(r, p).unwrap();
        let t0 = Instant::now();
        w.start().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        w.pause().unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let pages = w.pages_written() as f64;
        assert!(pages < 3.0 * rate as f64 * secs, "{pages} pages in {secs:.2}s, target {rate}/s");
        assert!(pages > rate as f64 * secs / 10.0, "{pages} pages in {secs:.2}s, target {rate}/s");
        // Pause wakes rate-limited sleepers promptly.
        w.resume().unwrap();
        let t1 = Instant::now();
        w.pause().unwrap();
        assert!(t1.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn flat_out_is_fast() {
        let r = region(Backing::Anonymous, 1024);
        let mut w = Workload::init(r, params(WorkloadKind::Seq, 1000, 1)).unwrap();
        run_for(&mut w, Duration::from_millis(100));
        // Even an unoptimised build writes far more than a rate-limited one would.
        assert!(w.pages_written() > 10_000, "{}", w.pages_written());
        assert!(w.thread_states()[0].passes > 0);
    }

    #[test]
    fn advance_walks_slices() {
        let h = Header::new(params(WorkloadKind::Seq, 10, 3), 16, PS as u64).unwrap();
        assert_eq!((0..3).map(|t| h.slice(t)).collect::<Vec<_>>(), vec![(1, 4), (4, 7), (7, 11)]);

        let mut s = ThreadState::default();
        let pages: Vec<u64> = (0..7)
            .map(|_| {
                let (p, n) = advance(WorkloadKind::Seq, &s, 4, 7);
                s = n;
                p
            })
            .collect();
        assert_eq!(pages, vec![4, 5, 6, 4, 5, 6, 4]);
        assert_eq!((s.passes, s.written, s.position, s.last_page), (2, 7, 1, 5));

        let h = Header::new(params(WorkloadKind::Random, 100, 2), 128, PS as u64).unwrap();
        let run = |t: usize| {
            let (lo, hi) = h.slice(t);
            let mut s = h.initial_state(t);
            (0..1000)
                .map(|_| {
                    let (p, n) = advance(WorkloadKind::Random, &s, lo, hi);
                    assert!((lo..hi).contains(&p));
                    s = n;
                    p
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1), "deterministic");
        let distinct: std::collections::BTreeSet<_> = run(1).into_iter().collect();
        assert_eq!(distinct.len(), 50, "1000 draws cover a 50-page slice");
        assert_ne!(h.initial_state(0).prng, h.initial_state(1).prng);

        assert_eq!(h.thread_rate(0), 0);
        let h = Header::new(WorkloadParams { rate_pages_per_sec: 7, ..params(WorkloadKind::Seq, 8, 3) }, 16, PS as u64)
            .unwrap();
        assert_eq!((0..3).map(|t| h.thread_rate(t)).collect::<Vec<_>>(), vec![3, 2, 2]);
    }

    #[test]
    fn token_bucket_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 10, t0);
        assert!(b.try_take(t0).is_ok(), "starts with one token");
        assert_eq!(b.try_take(t0), Err(Duration::from_millis(1)));
        assert!(b.try_take(t0 + Duration::from_millis(1)).is_ok());
        // After a long idle period only `burst` tokens are available.
        let later = t0 + Duration::from_secs(5);
        assert_eq!((0..20).filter(|_| b.try_take(later).is_ok()).count(), 10);
        // Over one simulated second, at most rate + burst pages.
        let mut now = later;
        let mut taken = 0;
        while now < later + Duration::from_secs(1) {
            match b.try_take(now) {
                Ok(()) => taken += 1,
                Err(w) => now += w,
            }
        }
        assert!((990..=1010).contains(&taken), "{taken}");
    }

    #[test]
    fn kind_names_round_trip() {
        for k in [WorkloadKind::Seq, WorkloadKind::Random, WorkloadKind::Readonly] {
            assert_eq!(k.to_string().parse::<WorkloadKind>().unwrap(), k);
        }
        assert!(matches!("zipf".parse::<WorkloadKind>(), Err(WorkloadError::UnknownKind(_))));
        let p: WorkloadParams = serde_json::from_str(r#"{"kind":"random","working_set_pages":8}"#).unwrap();
        assert_eq!((p.threads.get(), p.rate_pages_per_sec), (1, 0));
        assert!(serde_json::from_str::<WorkloadParams>(r#"{"kind":"seq","working_set_pages":8,"x":1}"#).is_err());
    }

    #[test]
    fn dirty_tracker_sees_the_working_set() {
        use livemig_engine::dirty::open_tracker;
        use livemig_transport::PageBitmap;
        for kind in [WorkloadKind::Seq, WorkloadKind::Readonly] {
            let r = region(Backing::Memfd, 64);
            let mut w = Workload::init(r.clone(), params(kind, 8, 2)).unwrap();
            let mut t = open_tracker(&r).unwrap();
            t.start().unwrap();
            run_for(&mut w, Duration::from_millis(20));
            let mut bm = PageBitmap::new(64);
            t.collect(&mut bm).unwrap();
            let expect: Vec<usize> = if kind.writes() { (0..=8).collect() } else { vec![0] };
            assert_eq!(bm.iter_ones().collect::<Vec<_>>(), expect, "{kind}");
            // Paused: nothing more is dirtied.
            let mut bm = PageBitmap::new(64);
            assert_eq!(t.collect(&mut bm).unwrap(), 0, "{kind}");
            w.stop().unwrap();
            t.stop();
        }
    }
}
