//! The mirroring module: a disk that is a read-only base image plus locally held chunks
//! ([`ChunkMap`]), served from a local file of the disk's size. Reads of bytes not held
//! locally fetch from the base first (whole chunks); writes stay local (fetching only the gap
//! that keeps each chunk's local range contiguous). The chunk map is written beside the local
//! file (`FILE.lmmeta`) on every flush and on close, after the data reached stable storage,
//! so a restarted process finds what it held.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::base::Base;
use crate::chunks::{ChunkMap, OutOfRange, Range};

/// Default chunk size (the paper's setup).
pub const DEFAULT_CHUNK: u32 = 256 << 10;

/// A disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Outside the disk.
    #[error(transparent)]
    Range(#[from] OutOfRange),
    /// The base could not be read.
    #[error("reading the base at {offset} ({len} bytes)")]
    Base {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The local file failed (a full disk shows here as ENOSPC).
    #[error("{op} on the local file")]
    Local {
        /// What.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The disk was handed over to a migration destination: this host serves no more I/O.
    #[error("the disk was handed over to the migration destination")]
    HandedOver,
    /// A chunk could not be brought from the migration source (it died or went silent).
    #[error("chunk {chunk} is unavailable: {why}")]
    Unavailable {
        /// The chunk.
        chunk: usize,
        /// Why.
        why: String,
    },
    /// The disk is not served here yet (it arrives with a migration's handover).
    #[error("the disk is not here yet: {0}")]
    NotYet(String),
    /// The disk mirrors no base (a plain image).
    #[error("the disk mirrors no base image")]
    NoBase,
    /// The metadata beside the local file is unreadable or does not fit the disk.
    #[error("metadata {path}: {why}")]
    Meta {
        /// Path.
        path: String,
        /// Why.
        why: String,
    },
}

impl DiskError {
    /// The errno an NBD client should see.
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::Range(_) => libc::EINVAL,
            DiskError::HandedOver => libc::ESHUTDOWN,
            DiskError::Local { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

/// A mirrored disk (see the module doc).
#[derive(Debug)]
pub struct Mirror {
    /// The base (a mirror keeps one for life; [`Frozen::finish`] may replace it by one that
    /// reads the same bytes wherever the disk is not modified, as a COMMIT does).
    base: Option<std::sync::RwLock<Box<dyn Base>>>,
    local: File,
    meta: Option<PathBuf>,
    map: Mutex<ChunkMap>,
    /// Maps taken for saving, numbered; and the number of the last one written (its lock
    /// also serialises the metadata writes).
    generation: std::sync::atomic::AtomicU64,
    meta_lock: Mutex<u64>,
    /// Serialises fetches and the map updates that follow them (reads and writes of bytes
    /// already local do not take it).
    fetch: Mutex<()>,
    /// Bytes copied from the base so far.
    fetched: std::sync::atomic::AtomicU64,
}

fn local_err(op: &'static str) -> impl FnOnce(std::io::Error) -> DiskError {
    move |source| DiskError::Local { op, source }
}

/// The metadata path beside `local`.
pub fn meta_path(local: &Path) -> PathBuf {
    let mut p = local.as_os_str().to_owned();
    p.push(".lmmeta");
    PathBuf::from(p)
}

impl Mirror {
    /// A plain disk: every byte of `file` is local; no base, no metadata.
    pub fn plain(file: File) -> Result<Mirror, DiskError> {
        let size = file.metadata().map_err(local_err("reading the size"))?.len();
        Ok(Mirror {
            base: None,
            local: file,
            meta: None,
            map: Mutex::new(ChunkMap::all_local(size, DEFAULT_CHUNK)),
            generation: Default::default(),
            meta_lock: Mutex::new(0),
            fetch: Mutex::new(()),
            fetched: Default::default(),
        })
    }

    /// Mirrors `base` into the local file at `path` (created, sparse, of the base's size, if
    /// missing). If metadata from an earlier run is beside it, its state is taken up again.
    pub fn open(base: Box<dyn Base>, path: &Path, chunk: u32) -> Result<Mirror, DiskError> {
        let size = base.size();
        let meta = meta_path(path);
        let existing = path.exists();
        let local = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(local_err("opening"))?;
        // One process at a time: two mirrors of one file would each fill and commit over the
        // other's acknowledged writes. The lock goes with the descriptor.
        // SAFETY: flock on our own open descriptor; no memory is passed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&local), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Local {
                op: "locking (another process serves or commits this file)",
                source: std::io::Error::last_os_error(),
            });
        }
        let map = if existing && meta.exists() {
            let m = load_meta(&meta)?;
            if m.size() != size {
                return Err(DiskError::Meta {
                    path: meta.display().to_string(),
                    why: format!("describes a {}-byte disk, the base has {size} bytes", m.size()),
                });
            }
            m
        } else {
            // Without metadata nothing local can be trusted: start empty.
            ChunkMap::new(size, chunk)
        };
        local.set_len(size).map_err(local_err("sizing"))?;
        Ok(Mirror {
            base: Some(std::sync::RwLock::new(base)),
            local,
            meta: Some(meta),
            map: Mutex::new(map),
            generation: Default::default(),
            meta_lock: Mutex::new(0),
            fetch: Mutex::new(()),
            fetched: Default::default(),
        })
    }

    /// Disk size.
    pub fn size(&self) -> u64 {
        self.lock().size()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChunkMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the chunk map.
    pub fn map(&self) -> ChunkMap {
        self.lock().clone()
    }

    /// Copies `ranges` from the base into the local file and records them.
    fn fetch(&self, ranges: &[Range], record: impl Fn(&mut ChunkMap, Range)) -> Result<(), DiskError> {
        let base = self.base.as_ref().expect("only a mirror has bytes that are not local");
        let base = base.read().unwrap_or_else(|e| e.into_inner());
        let mut buf = Vec::new();
        let mut i = 0;
        while i < ranges.len() {
            // Ranges that follow each other are read from the base in one call (a remote
            // base answers a run of chunks in one request).
            let mut j = i + 1;
            while j < ranges.len() && ranges[j].start == ranges[j - 1].end && ranges[j].end - ranges[i].start <= 8 << 20
            {
                j += 1;
            }
            let r = Range::new(ranges[i].start, ranges[j - 1].end);
            buf.resize(r.len() as usize, 0);
            base.read_at(r.start, &mut buf).map_err(|source| DiskError::Base {
                offset: r.start,
                len: r.len(),
                source,
            })?;
            self.local.write_all_at(&buf, r.start).map_err(local_err("writing fetched bytes"))?;
            self.fetched.fetch_add(r.len(), std::sync::atomic::Ordering::Relaxed);
            let mut m = self.lock();
            for r in &ranges[i..j] {
                record(&mut m, *r);
            }
            drop(m);
            i = j;
        }
        Ok(())
    }

    /// Bytes copied from the base since this mirror was opened.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Chunk size of the map.
    pub fn chunk_size(&self) -> u32 {
        self.lock().chunk_size()
    }

    /// Chunk `c`'s locally valid range, relative to its start.
    pub fn valid_range(&self, c: usize) -> Option<(u32, u32)> {
        let m = self.lock();
        (c < m.len()).then(|| m.chunk(c).valid).flatten()
    }

    /// Whether this disk mirrors a base (else every byte is local).
    pub fn has_base(&self) -> bool {
        self.base.is_some()
    }

    /// What a live transfer must move: the ModifiedSet of a mirror (the rest reads the
    /// same from the base on both hosts); every chunk holding data of a plain disk.
    pub fn transfer_set(&self) -> Result<Vec<usize>, DiskError> {
        let map = self.map();
        if self.base.is_some() {
            return Ok(map.modified());
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.local);
        let mut out = Vec::new();
        let mut at = 0u64;
        while at < map.size() {
            // SAFETY: lseek on our own descriptor; no memory is passed.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // only a hole from here on
                }
                return Ok((0..map.len()).collect()); // cannot tell: everything
            }
            let c = (data as u64 / map.chunk_size() as u64) as usize;
            if c >= map.len() {
                break;
            }
            out.push(c);
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { map.size() } else { hole as u64 };
            let last = (end.div_ceil(map.chunk_size() as u64) as usize).min(map.len());
            out.extend(c + 1..last);
            at = (last as u64 * map.chunk_size() as u64).max(data as u64 + 1);
        }
        out.dedup();
        Ok(out)
    }

    /// A fingerprint of the base (its size, its identity if it has one, and the hash of its
    /// first and last MiB), so two hosts can tell they mirror the same image without reading
    /// it whole; 0 for a plain disk.
    pub fn base_fingerprint(&self) -> Result<u64, DiskError> {
        let Some(b) = &self.base else { return Ok(0) };
        let b = b.read().unwrap_or_else(|e| e.into_inner());
        let size = b.size();
        let n = size.min(1 << 20);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&size.to_le_bytes());
        // A base that knows its whole content (a repository version) says so: two versions that
        // differ only in the middle must not pass for the same base.
        if let Some(id) = b.identity() {
            h.update(b"identity");
            h.update(&id);
        }
        let mut buf = vec![0u8; n as usize];
        for at in [0, size - n] {
            b.read_at(at, &mut buf).map_err(|source| DiskError::Base { offset: at, len: n, source })?;
            h.update(&buf);
        }
        Ok(h.digest())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let r = self.lock().check(offset, buf.len() as u64)?;
        if !self.lock().is_local(r) {
            let _g = self.fetch.lock().unwrap_or_else(|e| e.into_inner());
            let plan = self.lock().plan_read(r);
            self.fetch(&plan, |m, r| m.fetched(r))?;
        }
        self.local.read_exact_at(buf, offset).map_err(local_err("reading"))
    }

    /// Writes `data` at `offset`; with `fua`, it reaches stable storage before this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        let r = self.lock().check(offset, data.len() as u64)?;
        if self.base.is_some() {
            let _g = self.fetch.lock().unwrap_or_else(|e| e.into_inner());
            let plan = self.lock().plan_write(r);
            self.fetch(&plan, |m, r| m.fetched(r))?;
            self.local.write_all_at(data, offset).map_err(local_err("writing"))?;
            self.lock().written(r);
        } else {
            self.local.write_all_at(data, offset).map_err(local_err("writing"))?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`: a hole where the file system allows and `hole`
    /// is set, else written zeros (NBD's NO_HOLE).
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool, hole: bool) -> Result<(), DiskError> {
        let r = self.lock().check(offset, len)?;
        let punch = |m: &Mirror| -> Result<(), DiskError> {
            let rc = if !hole {
                -1
            } else {
                // SAFETY: fallocate on our own open file descriptor; no memory is passed.
                unsafe {
                    libc::fallocate(
                        std::os::fd::AsRawFd::as_raw_fd(&m.local),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                }
            };
            if rc == 0 {
                return Ok(());
            }
            // No hole punching here: write the zeros.
            let zeros = vec![0u8; (len as usize).min(1 << 20)];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                m.local.write_all_at(&zeros[..n], at).map_err(local_err("writing zeros"))?;
                at += n as u64;
            }
            Ok(())
        };
        if self.base.is_some() {
            let _g = self.fetch.lock().unwrap_or_else(|e| e.into_inner());
            let plan = self.lock().plan_write(r);
            self.fetch(&plan, |m, r| m.fetched(r))?;
            punch(self)?;
            self.lock().written(r);
        } else {
            punch(self)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Holds writes (and reads of bytes not yet local) until the returned guard is dropped
    /// or finished: a consistent view of the ModifiedSet for a COMMIT. Only a mirror of a
    /// base has one.
    pub fn freeze(&self) -> Result<Frozen<'_>, DiskError> {
        if self.base.is_none() {
            return Err(DiskError::NoBase);
        }
        let guard = self.fetch.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Frozen { m: self, _writes: guard })
    }

    /// Makes every acknowledged write stable (fdatasync), then the metadata. The chunk map
    /// is taken *before* the sync, so it never claims bytes the sync did not cover; maps are
    /// written in the order they were taken (a slower, older one never replaces a newer one).
    pub fn flush(&self) -> Result<(), DiskError> {
        let Some(path) = &self.meta else {
            return self.local.sync_data().map_err(local_err("syncing"));
        };
        let (snapshot, generation) = {
            let m = self.lock();
            let g = self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
            (m.clone(), g)
        };
        self.local.sync_data().map_err(local_err("syncing"))?;
        let mut written = self.meta_lock.lock().unwrap_or_else(|e| e.into_inner());
        if *written >= generation {
            return Ok(()); // a newer map is already on disk
        }
        save_meta(path, &snapshot)?;
        *written = generation;
        Ok(())
    }

    /// Which of `r` is allocated locally and which is a hole reading as zeros (for
    /// `base:allocation`): `(length, is_hole)` runs covering `r`. Bytes still in the base count
    /// as data; within a chunk's local range, SEEK_DATA/SEEK_HOLE on the local file tell.
    pub fn allocation(&self, r: Range) -> Result<Vec<(u64, bool)>, DiskError> {
        let map = self.lock().clone();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |len: u64, hole: bool| match out.last_mut() {
            Some((l, h)) if *h == hole => *l += len,
            _ => out.push((len, hole)),
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.local);
        let mut at = r.start;
        while at < r.end {
            let i = (at / map.chunk_size() as u64) as usize;
            let start = map.chunk_start(i);
            let chunk_end = start + map.chunk_len(i) as u64;
            let (lo, hi) = match map.chunk(i).valid {
                Some((lo, hi)) => (start + lo as u64, start + hi as u64),
                None => (chunk_end, chunk_end),
            };
            if at < lo || at >= hi {
                // In the base: data, up to where the local range starts or the chunk ends.
                let end = if at < lo { lo } else { chunk_end }.min(r.end);
                push(end - at, false);
                at = end;
                continue;
            }
            // Local: never report past the local range.
            let end = hi.min(r.end);
            // SAFETY: lseek on our own descriptor; no memory is passed.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            let (next, hole) = if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    (end, true) // no data after `at`: a hole to the end
                } else {
                    (end, false) // cannot tell: data
                }
            } else if data as u64 > at {
                ((data as u64).min(end), true)
            } else {
                // SAFETY: as above.
                let h = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_HOLE) };
                let next = if h < 0 { end } else { (h as u64).min(end) };
                (next.max(at + 1), false)
            };
            push(next - at, hole);
            at = next;
        }
        Ok(out)
    }
}

/// A mirror with its writes held (see [`Mirror::freeze`]).
#[derive(Debug)]
pub struct Frozen<'a> {
    m: &'a Mirror,
    _writes: std::sync::MutexGuard<'a, ()>,
}

impl Frozen<'_> {
    /// The ModifiedSet: chunks written since the base was set, in order.
    pub fn modified(&self) -> Vec<usize> {
        self.m.lock().modified()
    }

    /// Reads chunk `c` whole into `buf` (resized to the chunk's length), first fetching from
    /// the base whatever of it is not local.
    pub fn read_chunk(&self, c: usize, buf: &mut Vec<u8>) -> Result<(), DiskError> {
        let (r, plan) = {
            let map = self.m.lock();
            if c >= map.len() {
                return Err(DiskError::Range(OutOfRange { offset: map.size(), len: 1, size: map.size() }));
            }
            let r = Range::new(map.chunk_start(c), map.chunk_start(c) + map.chunk_len(c) as u64);
            (r, map.plan_read(r))
        };
        self.m.fetch(&plan, |m, r| m.fetched(r))?;
        buf.resize(r.len() as usize, 0);
        self.m.local.read_exact_at(buf, r.start).map_err(local_err("reading"))
    }

    /// Replaces the base by `base` (same size; it must read as this disk does now wherever
    /// the disk is not modified, and as the modified chunks do where it is), clears the
    /// ModifiedSet and saves the state: the disk now mirrors `base` with nothing modified.
    pub fn finish(self, base: Box<dyn Base>) -> Result<(), DiskError> {
        let size = self.m.lock().size();
        if base.size() != size {
            return Err(DiskError::Meta {
                path: "(new base)".into(),
                why: format!("a {}-byte base for a {size}-byte disk", base.size()),
            });
        }
        let slot = self.m.base.as_ref().expect("a frozen mirror has a base");
        *slot.write().unwrap_or_else(|e| e.into_inner()) = base;
        self.m.lock().clear_modified();
        self.m.flush()
    }
}

/// Writes `map` to `path` atomically (temporary file, fsync, rename, fsync of the directory).
fn save_meta(path: &Path, map: &ChunkMap) -> Result<(), DiskError> {
    let text = serde_json::to_vec(map).expect("the chunk map serialises");
    let tmp = path.with_extension("lmmeta.tmp");
    let werr = |source| DiskError::Local { op: "writing the metadata", source };
    let f = File::create(&tmp).map_err(werr)?;
    f.write_all_at(&text, 0).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)?;
    if let Some(dir) = path.parent() {
        let d = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(d) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "saving the mirror state on close");
        }
    }
}

fn load_meta(path: &Path) -> Result<ChunkMap, DiskError> {
    let err = |why: String| DiskError::Meta { path: path.display().to_string(), why };
    let b = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let m: ChunkMap = serde_json::from_slice(&b).map_err(|e| err(e.to_string()))?;
    m.validate().map_err(err)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::{ChunkDirBase, FileBase};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("livemig-mirror-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn image(d: &Path, size: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        let p = d.join("base.img");
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    #[test]
    fn reads_come_from_the_base_writes_stay_local_and_state_survives_a_restart() {
        let d = dir("restart");
        let (bp, mut want) = image(&d, 1 << 20);
        let local = d.join("disk.img");
        {
            let m = Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &local, 64 << 10).unwrap();
            let mut b = vec![0u8; 100];
            m.read(70_000, &mut b).unwrap();
            assert_eq!(b, want[70_000..70_100]);
            assert_eq!(m.map().local_chunks(), 1, "one whole chunk fetched");
            // A write into an untouched chunk fetches nothing; a second one that leaves a
            // gap fetches the gap.
            m.write(300_000, &[0xaa; 10], false).unwrap();
            m.write(300_100, &[0xbb; 10], false).unwrap();
            let c = m.map().chunk(300_000 / (64 << 10));
            assert_eq!(c.valid, Some(((300_000 % 65536) as u32, (300_110 % 65536) as u32)));
            want[300_000..300_010].fill(0xaa);
            want[300_100..300_110].fill(0xbb);
            m.write_zeroes(500_000, 5000, true, true).unwrap();
            want[500_000..505_000].fill(0);
        }
        assert_eq!(
            std::fs::read(&bp).unwrap()[300_000],
            (300_000usize * 7 + 300_000 / 4096) as u8,
            "the base is never written"
        );
        let m = Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &local, 64 << 10).unwrap();
        assert_eq!(m.map().modified().len(), 2, "the ModifiedSet came back");
        let mut all = vec![0u8; 1 << 20];
        m.read(0, &mut all).unwrap();
        assert!(all == want, "the restarted mirror reads the base plus the writes");
        assert!(matches!(m.read((1 << 20) - 10, &mut [0u8; 11]), Err(DiskError::Range(_))));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn allocation_never_calls_base_bytes_a_hole() {
        let d = dir("alloc");
        let (bp, _) = image(&d, 1 << 20);
        let m = Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &d.join("disk.img"), 64 << 10).unwrap();
        // Chunk 0: bytes 0..4096 zeroed locally, the rest still in the base.
        m.write_zeroes(0, 4096, false, true).unwrap();
        let runs = m.allocation(Range::new(0, 65536)).unwrap();
        assert_eq!(runs, [(4096, true), (61440, false)]);
        // Chunk 1 wholly fetched (data), chunk 2 untouched (base: data).
        let mut b = vec![0u8; 10];
        m.read(65536, &mut b).unwrap();
        let runs = m.allocation(Range::new(65536, 3 * 65536)).unwrap();
        assert_eq!(runs, [(2 * 65536, false)]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn concurrent_flushes_keep_the_newest_map() {
        let d = dir("flush");
        let (bp, _) = image(&d, 1 << 20);
        let local = d.join("disk.img");
        {
            let m =
                std::sync::Arc::new(Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &local, 64 << 10).unwrap());
            let ts: Vec<_> = (0..8u64)
                .map(|i| {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        m.write(i * 65536, &[i as u8 + 1; 100], true).unwrap();
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap();
            }
            // No drop-time save: what the FUA flushes wrote must already hold all 8 writes.
            let saved = load_meta(&meta_path(&local)).unwrap();
            assert_eq!(saved.modified(), (0..8).collect::<Vec<_>>());
            std::mem::forget(m);
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn metadata_for_another_disk_is_refused() {
        let d = dir("meta");
        let (bp, _) = image(&d, 1 << 20);
        let local = d.join("disk.img");
        drop(Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &local, 64 << 10).unwrap());
        std::fs::write(&bp, vec![1u8; 2 << 20]).unwrap();
        let e = Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &local, 64 << 10).unwrap_err();
        assert!(matches!(e, DiskError::Meta { .. }), "{e}");
        std::fs::write(meta_path(&local), b"{not json").unwrap();
        assert!(matches!(
            Mirror::open(Box::new(FileBase::open(&bp).unwrap()), &local, 64 << 10),
            Err(DiskError::Meta { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_chunk_directory_reads_as_the_image() {
        let d = dir("chunkdir");
        let (bp, mut want) = image(&d, 300_000);
        want[100_000..200_000].fill(0);
        std::fs::write(&bp, &want).unwrap();
        ChunkDirBase::create(&d.join("chunks"), &bp, 64 << 10).unwrap();
        let b = ChunkDirBase::open(&d.join("chunks")).unwrap();
        assert_eq!(b.size(), 300_000);
        let mut got = vec![1u8; 300_000];
        b.read_at(0, &mut got).unwrap();
        assert!(got == want);
        let _ = std::fs::remove_dir_all(&d);
    }
}
