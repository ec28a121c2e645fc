//! The destination of a live disk transfer: [`receive`] installs pushed chunks, takes I/O over
//! at `TRANSFER_IO_CONTROL` (the caller starts serving the [`DestDisk`] then), pulls what
//! remains in decreasing write-count order while client I/O that needs a missing chunk pulls
//! it at once on the urgent stream, and ends with the source's check of every chunk held here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig_transport::{Transport, UrgentChannel, UrgentEvent};

use super::proto::{self, HeldChunk, Msg, Strategy};
use super::{recv, send, Error, Progress};
use crate::chunks::Range;
use crate::disk::Disk;
use crate::mirror::{DiskError, Mirror};
use crate::transfer::{DestTransfer, ReadAction, WriteAction};

/// What the source announced (`Begin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Strategy.
    pub strategy: Strategy,
    /// Chunk size.
    pub chunk_size: u32,
    /// Disk size.
    pub disk_size: u64,
    /// Base fingerprint (0: plain disk).
    pub base: u64,
}

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// A silent source is declared gone after this (also bounds a client's wait for a pull).
    pub io_timeout: Duration,
    /// Background pulls outstanding at once.
    pub pulls_in_flight: usize,
}

/// The outcome at the destination.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestSummary {
    /// Strategy.
    pub strategy: String,
    /// From `Begin` to the end, seconds.
    pub total_s: f64,
    /// From `Begin` to the handover, seconds.
    pub handover_s: f64,
    /// From the handover until every chunk was here, seconds.
    pub pull_s: f64,
    /// Pushed chunks received (every round).
    pub chunks_pushed: u64,
    /// Their bytes.
    pub bytes_pushed: u64,
    /// Chunks handed over still to come.
    pub remaining_at_handover: u64,
    /// Chunks pulled in the background.
    pub chunks_pulled: u64,
    /// Chunks pulled on demand.
    pub chunks_pulled_urgent: u64,
    /// Pulls made unnecessary by a whole-chunk write.
    pub pulls_cancelled: u64,
    /// Bytes pulled.
    pub bytes_pulled: u64,
    /// Chunks the source compared with its own at the end.
    pub verified_chunks: u32,
    /// Bytes this host read from the base while the transfer ran (fills of partly pushed
    /// chunks, and reads of chunks never modified).
    pub base_fetched_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    sm: DestTransfer,
    /// Why the source can no longer be asked (chunks still needed then fail with EIO).
    lost: Option<String>,
    /// The range last installed from the source, per chunk.
    installed: HashMap<usize, (u32, u32)>,
    /// Chunks written here since they were installed, or instead of being pulled.
    overwritten: HashSet<usize>,
    pulled_urgent: u64,
    bytes_pulled: u64,
    /// Chunks asked for on the urgent stream and not yet answered.
    urgent_asked: HashSet<usize>,
}

/// Shared between the driver, the urgent receiver and the disk served to clients.
#[derive(Debug)]
struct Shared {
    mirror: Arc<Mirror>,
    st: Mutex<State>,
    cv: Condvar,
    io_timeout: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chunk_range(&self, c: usize) -> Range {
        let chunk = self.mirror.chunk_size() as u64;
        let start = c as u64 * chunk;
        Range::new(start, (start + chunk).min(self.mirror.size()))
    }

    /// Checks and installs chunk `c`'s bytes `[lo, lo + data.len())` from the source.
    fn install(&self, index: u32, lo: u32, hash: u64, data: &[u8]) -> Result<usize, Error> {
        let c = index as usize;
        let n = self.mirror.size().div_ceil(self.mirror.chunk_size() as u64) as usize;
        if c >= n {
            return Err(Error::Unexpected(format!("chunk {c} is past the disk's {n} chunks")));
        }
        let r = self.chunk_range(c);
        let hi = lo as u64 + data.len() as u64;
        if data.is_empty() || hi > r.len() {
            return Err(Error::Unexpected(format!("chunk {c}: bytes {lo}..{hi} do not fit a {}-byte chunk", r.len())));
        }
        if proto::hash(data) != hash {
            return Err(Error::Unexpected(format!("chunk {c} arrived corrupted (hash mismatch)")));
        }
        self.mirror.write(r.start + lo as u64, data, false)?;
        #[cfg(feature = "fault-injection")]
        corrupt_for_tests(&self.mirror, c, r.start + lo as u64);
        self.lock().installed.insert(c, (lo, hi as u32));
        Ok(c)
    }

    /// Waits until chunk `c` is here for a read (`write: None`) or a write (`Some(whole)`),
    /// pulling it on the urgent stream when needed.
    fn ensure(&self, urgent: &dyn UrgentChannel, c: usize, write: Option<bool>) -> Result<(), DiskError> {
        let deadline = Instant::now() + self.io_timeout;
        let mut st = self.lock();
        loop {
            if let Some(why) = &st.lost {
                if st.sm.needs(c) {
                    return Err(DiskError::Unavailable { chunk: c, why: why.clone() });
                }
            }
            let pull = match write {
                None => match st.sm.on_read(c) {
                    ReadAction::Local => return Ok(()),
                    ReadAction::PullNow => true,
                    ReadAction::Wait => false,
                },
                Some(whole) => match st.sm.on_write(c, whole) {
                    WriteAction::Local | WriteAction::Cancelled => {
                        st.overwritten.insert(c);
                        return Ok(());
                    }
                    WriteAction::PullNow => true,
                    WriteAction::Wait => false,
                },
            };
            if pull {
                st.urgent_asked.insert(c);
                drop(st);
                let sent = urgent.send_message(&proto::encode(&Msg::Pull(c as u32)));
                st = self.lock();
                if let Err(e) = sent {
                    st.lost.get_or_insert_with(|| format!("the urgent stream failed: {e}"));
                    self.cv.notify_all();
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DiskError::Unavailable { chunk: c, why: "the source did not send it in time".into() });
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(feature = "fault-injection")]
fn corrupt_for_tests(m: &Mirror, c: usize, at: u64) {
    if std::env::var("LIVEMIG_CORRUPT_CHUNK").ok().and_then(|v| v.parse::<usize>().ok()) == Some(c) {
        let mut b = [0u8; 1];
        if m.read(at, &mut b).is_ok() {
            b[0] ^= 0x5a;
            let _ = m.write(at, &b, false);
            tracing::warn!(chunk = c, "fault injection: one byte of an installed chunk flipped");
        }
    }
}

/// The disk served at the destination from the handover on.
#[derive(Debug)]
pub struct DestDisk {
    shared: Arc<Shared>,
    urgent: Arc<dyn UrgentChannel>,
}

impl DestDisk {
    /// The disk underneath.
    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.shared.mirror
    }

    /// Chunks still to come from the source (all of them fail with EIO once it is lost).
    pub fn missing(&self) -> Vec<usize> {
        self.shared.lock().sm.missing()
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let chunk = self.shared.mirror.chunk_size() as u64;
        let end = offset.saturating_add(len).min(self.shared.mirror.size());
        if offset >= end {
            return 0..0;
        }
        (offset / chunk) as usize..end.div_ceil(chunk) as usize
    }

    fn before_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        for c in self.chunks(offset, len) {
            let r = self.shared.chunk_range(c);
            let whole = offset <= r.start && offset.saturating_add(len) >= r.end;
            self.shared.ensure(&*self.urgent, c, Some(whole))?;
        }
        Ok(())
    }
}

impl Disk for DestDisk {
    fn size(&self) -> u64 {
        self.shared.mirror.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        for c in self.chunks(offset, buf.len() as u64) {
            self.shared.ensure(&*self.urgent, c, None)?;
        }
        self.shared.mirror.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        self.before_write(offset, data.len() as u64)?;
        self.shared.mirror.write(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, hole: bool) -> Result<(), DiskError> {
        self.before_write(offset, len)?;
        self.shared.mirror.write_zeroes(offset, len, fua, hole)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.shared.mirror.flush()
    }
    fn allocation(&self, r: Range) -> Result<Vec<(u64, bool)>, DiskError> {
        // A chunk still at the source may be a hole in the local file (a plain disk): a
        // range touching one is reported as data, so no client skips reading it.
        let pending = {
            let st = self.shared.lock();
            self.chunks(r.start, r.len()).any(|c| st.sm.needs(c))
        };
        if pending {
            return Ok(vec![(r.len(), false)]);
        }
        self.shared.mirror.allocation(r)
    }
}

/// The destination's failure after the handover: what could not be pulled.
#[derive(Debug, thiserror::Error)]
#[error("{} chunk(s) could not be pulled (reads of them fail with EIO): {:?}", missing.len(), &missing[..missing.len().min(16)])]
pub struct SourceLost {
    /// Why.
    #[source]
    pub cause: Error,
    /// The chunks that never came.
    pub missing: Vec<usize>,
}

/// Runs the destination of one transfer on an accepted session `t`. `open` gets the source's
/// offer and returns the disk to receive into (or why not); `serve` is called at the handover
/// with the disk to serve from then on. Returns the summary, or the failure; after the
/// handover a failure is a [`SourceLost`] with the chunks that never came, and the disk goes
/// on being served (those chunks fail with EIO).
pub fn receive(
    t: Box<dyn Transport>,
    o: &ReceiveOptions,
    open: impl FnOnce(&Offer) -> Result<Arc<Mirror>, String>,
    serve: impl FnOnce(Arc<DestDisk>) -> Result<(), String>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<DestSummary, Box<SourceLost>> {
    // Whatever fails before the handover is told to the source (which then serves the disk
    // on) before the session closes.
    let mut t = AbortOnDrop(Some(t));
    let fail = |cause: Error| Box::new(SourceLost { cause, missing: Vec::new() });
    let start = Instant::now();
    let offer = match recv(&mut *t, o.io_timeout, "the source's Begin").map_err(fail)? {
        Msg::Begin { version, strategy, chunk_size, disk_size, base } => {
            if version != proto::VERSION {
                let why = format!("disk-transfer version {version}, this end speaks {}", proto::VERSION);
                let _ = send(&mut *t, &Msg::Refuse(why.clone()));
                return Err(fail(Error::Refused(why)));
            }
            // An authenticated peer still gets its numbers checked before anything is sized.
            if !(4096..=proto::MAX_CHUNK).contains(&chunk_size) || !chunk_size.is_power_of_two() || disk_size > 1 << 50
            {
                let why = format!("a {disk_size}-byte disk in {chunk_size}-byte chunks is out of range");
                let _ = send(&mut *t, &Msg::Refuse(why.clone()));
                return Err(fail(Error::Refused(why)));
            }
            Offer { strategy, chunk_size, disk_size, base }
        }
        m => return Err(fail(Error::Unexpected(format!("{m:?} instead of Begin")))),
    };
    let mirror = match open(&offer) {
        Ok(m) => m,
        Err(why) => {
            let _ = send(&mut *t, &Msg::Refuse(why.clone()));
            return Err(fail(Error::Refused(why)));
        }
    };
    let urgent = t.urgent().map_err(|e| fail(Error::Transport(e)))?;
    let shared =
        Arc::new(Shared { mirror, st: Mutex::new(State::default()), cv: Condvar::new(), io_timeout: o.io_timeout });
    send(&mut *t, &Msg::Accept).map_err(fail)?;
    let mut sum = DestSummary { strategy: offer.strategy.as_str().into(), ..Default::default() };

    // Until the handover: pushes and the RemainingSet.
    let nchunks = offer.disk_size.div_ceil(offer.chunk_size as u64) as usize;
    let mut rest: Vec<(usize, u32)> = Vec::new();
    let mut last_report = Instant::now();
    let mut last_alive = Instant::now();
    loop {
        if last_alive.elapsed() >= Duration::from_secs(1) {
            // Installing a backlog of pushes can take a while: the source must not take it
            // for silence.
            send(&mut *t, &Msg::Alive).map_err(fail)?;
            last_alive = Instant::now();
        }
        match recv(&mut *t, o.io_timeout, "the source while it pushed").map_err(fail)? {
            Msg::Alive => {}
            Msg::Chunk { index, lo, hash, data } => {
                let c = shared.install(index, lo, hash, &data).map_err(fail)?;
                shared.lock().sm.on_pushed(c);
                sum.chunks_pushed += 1;
                sum.bytes_pushed += data.len() as u64;
                if sum.chunks_pushed % proto::INSTALLED_EVERY == 0 {
                    // The source pushes at most a window beyond this.
                    send(&mut *t, &Msg::Installed(sum.chunks_pushed)).map_err(fail)?;
                }
            }
            Msg::Remaining(v) => {
                if rest.len() + v.len() > nchunks || v.iter().any(|e| e.0 as usize >= nchunks) {
                    return Err(fail(Error::Unexpected("a RemainingSet outside the disk".into())));
                }
                rest.extend(v.into_iter().map(|(c, n)| (c as usize, n)));
            }
            Msg::Control { entries } => {
                if entries as usize != rest.len() {
                    return Err(fail(Error::Unexpected(format!(
                        "control announces {entries} remaining chunks, {} arrived",
                        rest.len()
                    ))));
                }
                break;
            }
            Msg::Abort(why) => return Err(fail(Error::PeerAborted(why))),
            m => return Err(fail(Error::Unexpected(format!("{m:?} before the handover")))),
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(&Progress {
                phase: "receiving",
                elapsed_s: start.elapsed().as_secs_f64(),
                chunks_pushed: sum.chunks_pushed,
                bytes_pushed: sum.bytes_pushed,
                ..Default::default()
            });
        }
    }
    // TRANSFER_IO_CONTROL: the disk is served here first (a failure to serve it is an Abort,
    // and the source serves on), then the handover is confirmed.
    sum.remaining_at_handover = rest.len() as u64;
    shared.lock().sm.on_control(rest);
    let disk = Arc::new(DestDisk { shared: shared.clone(), urgent: urgent.clone() });
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (shared, urgent, stop) = (shared.clone(), urgent.clone(), stop.clone());
        std::thread::Builder::new()
            .name("livemig-disk-urgent".into())
            .spawn(move || receive_urgent(&shared, &*urgent, &stop))
            .map_err(|e| fail(Error::Unexpected(format!("no thread for urgent pulls: {e}"))))?
    };
    if let Err(why) = serve(disk.clone()) {
        stop.store(true, Ordering::Release);
        let _ = receiver.join();
        return Err(fail(Error::Unexpected(format!("serving the disk: {why}"))));
    }
    send(&mut *t, &Msg::Taken).map_err(fail)?;
    let mut t = t.0.take().expect("the session is still here");
    sum.handover_s = start.elapsed().as_secs_f64();
    let handover = Instant::now();
    let res = pull_rest(&mut *t, o, &shared, &mut sum, start, progress);
    sum.pull_s = handover.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let _ = receiver.join();
    {
        let st = shared.lock();
        sum.chunks_pulled_urgent = st.pulled_urgent;
        sum.bytes_pulled = st.bytes_pulled;
        sum.pulls_cancelled = st.sm.counts().2;
        sum.chunks_pulled = st.sm.counts().1.saturating_sub(st.pulled_urgent);
    }
    sum.total_s = start.elapsed().as_secs_f64();
    sum.base_fetched_bytes = shared.mirror.fetched_bytes();
    match res {
        Ok(()) => Ok(sum),
        Err(cause) => {
            let mut st = shared.lock();
            st.lost.get_or_insert_with(|| cause.to_string());
            shared.cv.notify_all();
            let missing = st.sm.missing();
            drop(st);
            let _ = send(&mut *t, &Msg::Abort(cause.to_string()));
            Err(Box::new(SourceLost { cause, missing }))
        }
    }
}

/// The session before the handover: dropped on a failure, it tells the source first.
struct AbortOnDrop(Option<Box<dyn Transport>>);

impl std::ops::Deref for AbortOnDrop {
    type Target = dyn Transport;
    fn deref(&self) -> &Self::Target {
        &**self.0.as_ref().expect("the session is still here")
    }
}

impl std::ops::DerefMut for AbortOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut **self.0.as_mut().expect("the session is still here")
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.as_mut() {
            let _ = t.send_message(&proto::encode(&Msg::Abort("the destination failed before the handover".into())));
            // Give the message time to leave before the session closes.
            let _ = t.recv_message(Some(Duration::from_millis(100)));
        }
    }
}

/// Background pulls (a few outstanding, paused while demand pulls run), then the final check.
fn pull_rest(
    t: &mut dyn Transport,
    o: &ReceiveOptions,
    shared: &Shared,
    sum: &mut DestSummary,
    start: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(), Error> {
    let mut in_flight: BTreeSet<usize> = BTreeSet::new();
    let mut last_heard = Instant::now();
    let mut last_report = Instant::now();
    let mut last_alive = Instant::now();
    loop {
        if last_alive.elapsed() >= Duration::from_secs(1) {
            send(t, &Msg::Alive)?;
            last_alive = Instant::now();
        }
        {
            let mut st = shared.lock();
            if let Some(why) = &st.lost {
                return Err(Error::Unexpected(why.clone()));
            }
            while in_flight.len() < o.pulls_in_flight.max(1) {
                let Some(c) = st.sm.next_pull() else { break };
                in_flight.insert(c);
                drop(st);
                send(t, &Msg::Pull(c as u32))?;
                st = shared.lock();
            }
            if st.sm.done() && in_flight.is_empty() {
                break;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let st = shared.lock();
            progress(&Progress {
                phase: "pulling",
                elapsed_s: start.elapsed().as_secs_f64(),
                chunks_pushed: sum.chunks_pushed,
                bytes_pushed: sum.bytes_pushed,
                pending: st.sm.missing().len() as u64,
                chunks_pulled: st.sm.counts().1,
                ..Default::default()
            });
        }
        let wait = if in_flight.is_empty() { Duration::from_millis(5) } else { Duration::from_millis(200) };
        let Some(m) = t.recv_message(Some(wait)).map_err(Error::Transport)? else {
            if !in_flight.is_empty() && last_heard.elapsed() > o.io_timeout {
                return Err(Error::Silent("the source while pulling"));
            }
            continue;
        };
        last_heard = Instant::now();
        match proto::decode(&m)? {
            Msg::Chunk { index, lo, hash, data } => {
                if !in_flight.remove(&(index as usize)) {
                    return Err(Error::Unexpected(format!("chunk {index} that was not asked for")));
                }
                let c = shared.install(index, lo, hash, &data)?;
                let mut st = shared.lock();
                st.sm.pulled(c, false);
                st.bytes_pulled += data.len() as u64;
                shared.cv.notify_all();
            }
            Msg::Unavailable(c) => return Err(Error::Unexpected(format!("the source cannot send chunk {c}"))),
            Msg::Alive => {}
            Msg::Abort(why) => return Err(Error::PeerAborted(why)),
            m => return Err(Error::Unexpected(format!("{m:?} while pulling"))),
        }
    }
    // Every chunk is here: the source checks what is held against its own.
    let (held, overwritten) = held_chunks(shared)?;
    for part in held.chunks(proto::MAX_ENTRIES) {
        send(t, &Msg::Held(part.to_vec()))?;
    }
    for part in overwritten.chunks(proto::MAX_ENTRIES) {
        send(t, &Msg::Cancelled(part.to_vec()))?;
    }
    send(t, &Msg::Done { held: held.len() as u32, cancelled: overwritten.len() as u32 })?;
    let mut answer = recv(t, o.io_timeout.max(Duration::from_secs(60)), "the source's check")?;
    while answer == Msg::Alive {
        answer = recv(t, o.io_timeout.max(Duration::from_secs(60)), "the source's check")?;
    }
    match answer {
        Msg::Verified { checked, bad } if bad.is_empty() => {
            sum.verified_chunks = checked;
            Ok(())
        }
        Msg::Verified { bad, .. } => Err(Error::Mismatch(bad)),
        Msg::Abort(why) => Err(Error::PeerAborted(why)),
        m => Err(Error::Unexpected(format!("{m:?} instead of Verified"))),
    }
}

/// The chunks held as the source sent them (hashed from the file), and the ones written
/// here since. A chunk is marked overwritten before its write starts, and checked again after
/// it is hashed, so a write racing with the hash moves it to the overwritten list.
fn held_chunks(shared: &Shared) -> Result<(Vec<HeldChunk>, Vec<u32>), Error> {
    let installed: Vec<(usize, (u32, u32))> = {
        let st = shared.lock();
        let mut v: Vec<_> = st.installed.iter().map(|(c, r)| (*c, *r)).collect();
        v.sort_unstable();
        v
    };
    let mut held = Vec::with_capacity(installed.len());
    for (c, (lo, hi)) in installed {
        if shared.lock().overwritten.contains(&c) {
            continue;
        }
        let r = shared.chunk_range(c);
        let mut buf = vec![0u8; (hi - lo) as usize];
        shared.mirror.read(r.start + lo as u64, &mut buf)?;
        let hash = proto::hash(&buf);
        if !shared.lock().overwritten.contains(&c) {
            held.push(HeldChunk { index: c as u32, lo, hi, hash });
        }
    }
    let held_set: HashSet<u32> = held.iter().map(|h| h.index).collect();
    let mut over: Vec<u32> =
        shared.lock().overwritten.iter().map(|&c| c as u32).filter(|c| !held_set.contains(c)).collect();
    over.sort_unstable();
    Ok((held, over))
}

/// Installs chunks that answer demand pulls, until `stop` or the stream ends.
fn receive_urgent(shared: &Shared, urgent: &dyn UrgentChannel, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let ev = match urgent.recv(Some(Duration::from_millis(100))) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(e) => {
                let mut st = shared.lock();
                if !st.sm.done() {
                    st.lost.get_or_insert_with(|| format!("the urgent stream failed: {e}"));
                }
                shared.cv.notify_all();
                return;
            }
        };
        let UrgentEvent::Message(m) = ev else { continue };
        let outcome = match proto::decode(&m) {
            Ok(Msg::Chunk { index, lo, hash, data }) => {
                let asked = shared.lock().urgent_asked.remove(&(index as usize));
                if !asked {
                    Err(format!("urgent chunk {index} that was not asked for"))
                } else {
                    match shared.install(index, lo, hash, &data) {
                        Ok(c) => {
                            let mut st = shared.lock();
                            st.sm.pulled(c, true);
                            st.pulled_urgent += 1;
                            st.bytes_pulled += data.len() as u64;
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            }
            Ok(Msg::Unavailable(c)) => Err(format!("the source cannot send chunk {c}")),
            Ok(m) => Err(format!("{m:?} on the urgent stream")),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = outcome {
            shared.lock().lost.get_or_insert(why);
        }
        shared.cv.notify_all();
    }
}
