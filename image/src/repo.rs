//! The image repository: images striped into chunks kept in pack objects, versions that
//! share unmodified chunks, clones that share everything with their origin until they
//! diverge. Objects:
//!
//! - `packs/<32 hex>`: bytes of chunks, written once and never changed. A push fills packs
//!   up to a pack size (default [`PACK_MAX`]); a commit writes one pack per run of
//!   consecutive modified chunks.
//! - `images/<name>/v<version, 10 digits>.json`: a version's [`Manifest`], written last and
//!   create-only: a version is visible whole or not at all, and of two writers of the same
//!   version one wins and the other is refused.
//!
//! Every chunk read is checked against its SHA-256; a mismatch or a missing pack is an error,
//! never wrong or zero bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::manifest::{chunk_count, runs, ChunkRef, Manifest, ManifestError, Sum, VersionRef, FORMAT};
use crate::store::{Store, StoreError};

/// Most bytes of one pack object by default. Small enough that a store which reads or hashes a whole
/// object to answer a ranged read (s3s-fs recomputes the object's MD5 on every GET) stays fast;
/// large enough that a commit's runs and a push need few writes.
pub const PACK_MAX: u64 = 4 << 20;
/// Runs of chunks an export reads at once.
pub const EXPORT_READERS: usize = 4;
/// Default chunk size (the paper's smallest; 512K and 1M are the others it measured).
pub const DEFAULT_CHUNK: u32 = 256 << 10;

/// A repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest in the repository is unusable.
    #[error("{key}: {source}")]
    BadManifest {
        /// The manifest's object.
        key: String,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// No image of that name.
    #[error("no image {0:?} in the repository")]
    NoImage(String),
    /// The image has no such version.
    #[error("{name} has no version {version} (its versions: {have})")]
    NoVersion {
        /// Image.
        name: String,
        /// Asked.
        version: u32,
        /// What it has.
        have: String,
    },
    /// The name is taken.
    #[error("an image named {0:?} exists already")]
    NameTaken(String),
    /// Another writer made this version first.
    #[error("{0} was written by another writer first; nothing of this write is visible (clone to keep these changes under a new name)")]
    Conflict(VersionRef),
    /// A chunk's bytes do not match its checksum.
    #[error("chunk {chunk} of {image}: checksum mismatch (the stored bytes are corrupt)")]
    Corrupt {
        /// Image version.
        image: VersionRef,
        /// Chunk.
        chunk: usize,
    },
    /// A chunk could not be read.
    #[error("chunk {chunk} of {image}: {source}")]
    Chunk {
        /// Image version.
        image: VersionRef,
        /// Chunk.
        chunk: usize,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// A local file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be met.
    #[error("{0}")]
    Invalid(String),
}

/// A repository.
#[derive(Debug)]
pub struct Repo {
    store: Store,
}

/// Where a commit reads a chunk's bytes: `(chunk, buffer)` fills the buffer with the chunk.
pub type ChunkSource<'a> = dyn FnMut(usize, &mut Vec<u8>) -> Result<(), String> + 'a;

/// What a push or a commit wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WriteSummary {
    /// The version made.
    pub image: String,
    /// Chunks written (not counting zero chunks, which are not stored).
    pub chunks_written: usize,
    /// Chunks found to be zero (stored as nothing).
    pub zero_chunks: usize,
    /// Pack objects written.
    pub packs_written: usize,
    /// Bytes written to the repository (packs + manifest).
    pub bytes_written: u64,
}

fn manifest_key(name: &str, version: u32) -> String {
    format!("images/{name}/v{version:010}.json")
}

fn pack_key(pack: &str) -> String {
    format!("packs/{pack}")
}

/// Checks the bytes of a stretch of chunks `cs` (stored back to back) against their sums and
/// copies them to `out` (the stretch's length). Pure: what every chunk read goes through.
pub fn place_stretch(m: &Manifest, cs: std::ops::Range<usize>, bytes: &[u8], out: &mut [u8]) -> Result<(), RepoError> {
    if cs.start >= cs.end || cs.end > m.len() {
        return Err(RepoError::Invalid(format!("chunks {cs:?} of a {}-chunk image", m.len())));
    }
    let want = (m.chunk_start(cs.end - 1) + m.chunk_len(cs.end - 1) as u64 - m.chunk_start(cs.start)) as usize;
    if bytes.len() != want || out.len() != want {
        return Err(RepoError::Invalid(format!("chunks {cs:?} are {want} bytes, got {}", bytes.len())));
    }
    let mut off = 0usize;
    for i in cs {
        let len = m.chunk_len(i) as usize;
        let piece = &bytes[off..off + len];
        if Some(Sum::of(piece)) != m.chunks[i].map(|r| r.sum) {
            return Err(RepoError::Corrupt { image: m.id(), chunk: i });
        }
        out[off..off + len].copy_from_slice(piece);
        off += len;
    }
    Ok(())
}

/// A random 128-bit id in hex.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RepoError {
    let path = path.display().to_string();
    move |source| RepoError::Io { what, path, source }
}

impl Repo {
    /// Opens the repository at `url` (see [`Store::open`]).
    pub fn open(url: &str) -> Result<Repo, RepoError> {
        Ok(Repo { store: Store::open(url)? })
    }

    /// Its location.
    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// Image names, sorted.
    pub fn images(&self) -> Result<Vec<String>, RepoError> {
        Ok(self.store.list_dir("images/")?.into_iter().filter(|n| crate::manifest::valid_name(n)).collect())
    }

    /// Versions of `name`, ascending (empty if there is no such image).
    pub fn versions(&self, name: &str) -> Result<Vec<u32>, RepoError> {
        let mut v: Vec<u32> = self
            .store
            .list(&format!("images/{name}/"))?
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&format!("images/{name}/v"))?.strip_suffix(".json")?.parse().ok())
            .filter(|&v| v > 0)
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// The manifest of `name` at `version` (the latest if `None`).
    pub fn manifest(&self, name: &str, version: Option<u32>) -> Result<Manifest, RepoError> {
        let have = self.versions(name)?;
        let Some(&latest) = have.last() else { return Err(RepoError::NoImage(name.to_string())) };
        let version = version.unwrap_or(latest);
        if !have.contains(&version) {
            let have = have.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            return Err(RepoError::NoVersion { name: name.to_string(), version, have });
        }
        let key = manifest_key(name, version);
        let m = Manifest::decode(&self.store.get(&key)?)
            .map_err(|source| RepoError::BadManifest { key: key.clone(), source })?;
        if m.name != name || m.version != version {
            return Err(RepoError::BadManifest {
                key,
                source: ManifestError::Invalid(format!("it describes {}", m.id())),
            });
        }
        Ok(m)
    }

    /// Reads chunk `c` of `m` into `buf` (exactly the chunk's length), checking its
    /// checksum; returns the bytes fetched from the store (0 for a zero chunk).
    pub fn read_chunk(&self, m: &Manifest, c: usize, buf: &mut [u8]) -> Result<u64, RepoError> {
        let len = m.chunk_len(c) as usize;
        if buf.len() != len {
            return Err(RepoError::Invalid(format!("chunk {c} is {len} bytes, not {}", buf.len())));
        }
        let Some(r) = m.chunks[c] else {
            buf.fill(0);
            return Ok(0);
        };
        let key = pack_key(&m.packs[r.pack as usize]);
        let b = self.store.get_range(&key, r.offset..r.offset + len as u64).map_err(|source| RepoError::Chunk {
            image: m.id(),
            chunk: c,
            source,
        })?;
        if Sum::of(&b) != r.sum {
            return Err(RepoError::Corrupt { image: m.id(), chunk: c });
        }
        buf.copy_from_slice(&b);
        Ok(len as u64)
    }

    /// Reads the consecutive chunks `cs` of `m` into `buf` (their bytes back to back, exactly
    /// that long): one ranged read for each stretch of chunks stored back to back in one
    /// pack, every chunk checked. Returns the bytes fetched from the store.
    pub fn read_chunks(&self, m: &Manifest, cs: std::ops::Range<usize>, buf: &mut [u8]) -> Result<u64, RepoError> {
        let want: u64 = cs.clone().map(|c| m.chunk_len(c) as u64).sum();
        if cs.end > m.len() || buf.len() as u64 != want {
            return Err(RepoError::Invalid(format!("chunks {cs:?} are {want} bytes, not {}", buf.len())));
        }
        let base = m.chunk_start(cs.start);
        let mut fetched = 0;
        let mut c = cs.start;
        while c < cs.end {
            let at = (m.chunk_start(c) - base) as usize;
            let Some(first) = m.chunks[c] else {
                buf[at..at + m.chunk_len(c) as usize].fill(0);
                c += 1;
                continue;
            };
            // The stretch: same pack, offsets back to back.
            let mut end = c + 1;
            let mut next_off = first.offset + m.chunk_len(c) as u64;
            while end < cs.end {
                match m.chunks[end] {
                    Some(r) if r.pack == first.pack && r.offset == next_off => {
                        next_off += m.chunk_len(end) as u64;
                        end += 1;
                    }
                    _ => break,
                }
            }
            let key = pack_key(&m.packs[first.pack as usize]);
            let bytes = self.store.get_range(&key, first.offset..next_off).map_err(|source| RepoError::Chunk {
                image: m.id(),
                chunk: c,
                source,
            })?;
            let dst = (m.chunk_start(c) - base) as usize;
            let n = (m.chunk_start(end - 1) + m.chunk_len(end - 1) as u64 - m.chunk_start(c)) as usize;
            place_stretch(m, c..end, &bytes, &mut buf[dst..dst + n])?;
            fetched += bytes.len() as u64;
            c = end;
        }
        Ok(fetched)
    }

    fn write_pack(&self, data: Vec<u8>) -> Result<String, RepoError> {
        let name = new_id();
        self.store.put(&pack_key(&name), data, true)?;
        Ok(name)
    }

    /// Makes `m` visible: create-only, then read back (a store whose conditional write is
    /// not atomic may let a second writer through; the read-back tells who won).
    fn publish(&self, m: &Manifest) -> Result<u64, RepoError> {
        m.validate().map_err(|source| RepoError::BadManifest { key: manifest_key(&m.name, m.version), source })?;
        let key = manifest_key(&m.name, m.version);
        let bytes = m.encode();
        let n = bytes.len() as u64;
        match self.store.put(&key, bytes, true) {
            Err(StoreError::Exists(_)) => return Err(RepoError::Conflict(m.id())),
            r => r?,
        }
        let back = Manifest::decode(&self.store.get(&key)?).map_err(|source| RepoError::BadManifest { key, source })?;
        if back.writer != m.writer {
            return Err(RepoError::Conflict(m.id()));
        }
        Ok(n)
    }

    /// Stripes the image file `file` into the repository as `name`, version 1, in chunks of
    /// `chunk` bytes (zero chunks are not stored), in packs of about `pack_max` bytes. `progress` gets the bytes read so far.
    pub fn push(
        &self,
        file: &Path,
        name: &str,
        chunk: u32,
        pack_max: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(Manifest, WriteSummary), RepoError> {
        if !crate::manifest::valid_name(name) {
            return Err(RepoError::Invalid(format!("{name:?} is not an image name")));
        }
        if !self.versions(name)?.is_empty() {
            return Err(RepoError::NameTaken(name.to_string()));
        }
        let mut f = File::open(file).map_err(io_err("opening", file))?;
        // Seeking to the end sizes block devices too (their metadata says 0).
        let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(io_err("sizing", file))?;
        if size == 0 {
            return Err(RepoError::Invalid(format!("{} is empty", file.display())));
        }
        let mut m = Manifest {
            format: FORMAT,
            name: name.to_string(),
            version: 1,
            size,
            chunk_size: chunk,
            parent: None,
            made_by: "push".into(),
            created_unix: now_unix(),
            writer: new_id(),
            packs: Vec::new(),
            chunks: vec![None; chunk_count(size, chunk) as usize],
        };
        m.validate().map_err(|e| RepoError::Invalid(e.to_string()))?;
        let mut sum = WriteSummary { image: m.id().to_string(), ..Default::default() };
        let mut pack: Vec<u8> = Vec::new();
        let mut pending: Vec<(usize, Sum)> = Vec::new();
        let mut buf = vec![0u8; chunk as usize];
        let flush = |pack: &mut Vec<u8>, pending: &mut Vec<(usize, Sum)>, m: &mut Manifest, sum: &mut WriteSummary| {
            if pending.is_empty() {
                return Ok::<(), RepoError>(());
            }
            let n = pack.len() as u64;
            let name = self.write_pack(std::mem::take(pack))?;
            m.packs.push(name);
            let idx = (m.packs.len() - 1) as u32;
            let mut off = 0u64;
            for (c, s) in pending.drain(..) {
                m.chunks[c] = Some(ChunkRef { pack: idx, offset: off, sum: s });
                off += m.chunk_len(c) as u64;
            }
            sum.packs_written += 1;
            sum.bytes_written += n;
            Ok(())
        };
        for c in 0..m.len() {
            let len = m.chunk_len(c) as usize;
            f.read_exact_at(&mut buf[..len], m.chunk_start(c)).map_err(io_err("reading", file))?;
            if buf[..len].iter().all(|&b| b == 0) {
                sum.zero_chunks += 1;
            } else {
                pack.extend_from_slice(&buf[..len]);
                pending.push((c, Sum::of(&buf[..len])));
                sum.chunks_written += 1;
                if pack.len() as u64 >= pack_max {
                    flush(&mut pack, &mut pending, &mut m, &mut sum)?;
                }
            }
            progress(m.chunk_start(c) + len as u64);
        }
        flush(&mut pack, &mut pending, &mut m, &mut sum)?;
        sum.bytes_written += self.publish(&m)?;
        Ok((m, sum))
    }

    /// CLONE: a new image `new` whose version 1 shares every chunk with `from` (metadata
    /// only; nothing is copied).
    pub fn clone_image(&self, from: &Manifest, new: &str) -> Result<Manifest, RepoError> {
        if !crate::manifest::valid_name(new) {
            return Err(RepoError::Invalid(format!("{new:?} is not an image name")));
        }
        if !self.versions(new)?.is_empty() {
            return Err(RepoError::NameTaken(new.to_string()));
        }
        let m = Manifest {
            name: new.to_string(),
            version: 1,
            parent: Some(from.id()),
            made_by: "clone".into(),
            created_unix: now_unix(),
            writer: new_id(),
            ..from.clone()
        };
        self.publish(&m)?;
        Ok(m)
    }

    /// COMMIT: writes `chunks` (sorted, distinct; their bytes from `read`) as the next version
    /// of `base`'s image, every run of consecutive chunks in one pack write; chunks that read
    /// as zeros are stored as nothing. Refused, with nothing visible, if another version of
    /// the image was made after `base`.
    pub fn commit(
        &self,
        base: &Manifest,
        chunks: &[usize],
        read: &mut ChunkSource<'_>,
    ) -> Result<(Manifest, WriteSummary), RepoError> {
        let Some(version) = base.version.checked_add(1) else {
            return Err(RepoError::Invalid(format!("{} is the last version there can be", base.id())));
        };
        let next = VersionRef { name: base.name.clone(), version };
        if self.versions(&base.name)?.last().is_some_and(|&v| v > base.version) {
            return Err(RepoError::Conflict(next));
        }
        if let Some(&c) = chunks.iter().find(|&&c| c >= base.len()) {
            return Err(RepoError::Invalid(format!("chunk {c} of a {}-chunk image", base.len())));
        }
        let mut m = Manifest {
            version: next.version,
            parent: Some(base.id()),
            made_by: "commit".into(),
            created_unix: now_unix(),
            writer: new_id(),
            ..base.clone()
        };
        let mut sum = WriteSummary { image: next.to_string(), ..Default::default() };
        let per_pack = (PACK_MAX / base.chunk_size as u64).max(1) as usize;
        let mut buf = Vec::new();
        for run in runs(chunks, per_pack) {
            let mut pack = Vec::new();
            let mut refs = Vec::new();
            for c in run {
                read(c, &mut buf).map_err(|e| RepoError::Invalid(format!("reading chunk {c} of the disk: {e}")))?;
                if buf.len() != m.chunk_len(c) as usize {
                    return Err(RepoError::Invalid(format!("chunk {c} read as {} bytes", buf.len())));
                }
                if buf.iter().all(|&b| b == 0) {
                    m.chunks[c] = None;
                    sum.zero_chunks += 1;
                    continue;
                }
                refs.push((c, pack.len() as u64, Sum::of(&buf)));
                pack.extend_from_slice(&buf);
            }
            if refs.is_empty() {
                continue;
            }
            sum.bytes_written += pack.len() as u64;
            let name = self.write_pack(pack)?;
            m.packs.push(name);
            let idx = (m.packs.len() - 1) as u32;
            for (c, offset, s) in refs {
                m.chunks[c] = Some(ChunkRef { pack: idx, offset, sum: s });
                sum.chunks_written += 1;
            }
            sum.packs_written += 1;
        }
        // Packs no chunk refers to any more are left out of the new manifest.
        let mut used = vec![false; m.packs.len()];
        for r in m.chunks.iter().flatten() {
            used[r.pack as usize] = true;
        }
        if used.iter().any(|u| !u) {
            let mut remap = vec![0u32; m.packs.len()];
            let mut packs = Vec::new();
            for (i, p) in m.packs.iter().enumerate() {
                if used[i] {
                    remap[i] = packs.len() as u32;
                    packs.push(p.clone());
                }
            }
            for r in m.chunks.iter_mut().flatten() {
                r.pack = remap[r.pack as usize];
            }
            m.packs = packs;
        }
        sum.bytes_written += self.publish(&m)?;
        Ok((m, sum))
    }

    /// Writes `m` as a raw image file at `out` (through `OUT.partial`, renamed when whole and
    /// synced: a failure leaves no half-written `out`). `progress` gets bytes done.
    pub fn export(&self, m: &Manifest, out: &Path, progress: &mut dyn FnMut(u64)) -> Result<u64, RepoError> {
        let mut tmp = out.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        let res = (|| {
            let f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.set_len(m.size).map_err(io_err("sizing", &tmp))?;
            let stored: Vec<usize> = (0..m.len()).filter(|&c| m.chunks[c].is_some()).collect();
            let per_read = ((4 << 20) / m.chunk_size as usize).max(1);
            let work = runs(&stored, per_read);
            // EXPORT_READERS runs in flight at once (a remote store answers each after a
            // round trip); the next run is taken from a shared counter.
            let next = std::sync::atomic::AtomicUsize::new(0);
            let done = std::sync::atomic::AtomicU64::new(0);
            let fetched = std::sync::atomic::AtomicU64::new(0);
            let failed = std::sync::Mutex::new(None::<RepoError>);
            let (f, tmp_ref) = (&f, &tmp);
            std::thread::scope(|s| {
                for _ in 0..EXPORT_READERS {
                    s.spawn(|| {
                        let mut buf = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(run) = work.get(i) else { return };
                            if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                                return;
                            }
                            let start = m.chunk_start(run.start);
                            let end = m.chunk_start(run.end - 1) + m.chunk_len(run.end - 1) as u64;
                            buf.resize((end - start) as usize, 0);
                            let r = self.read_chunks(m, run.clone(), &mut buf).and_then(|n| {
                                f.write_all_at(&buf, start).map_err(io_err("writing", tmp_ref))?;
                                Ok(n)
                            });
                            match r {
                                Ok(n) => {
                                    fetched.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                                    done.fetch_add(end - start, std::sync::atomic::Ordering::Relaxed);
                                }
                                Err(e) => {
                                    failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                                    return;
                                }
                            }
                        }
                    });
                }
                // Progress from this thread while the readers work.
                while next.load(std::sync::atomic::Ordering::Relaxed) < work.len() + EXPORT_READERS {
                    progress(done.load(std::sync::atomic::Ordering::Relaxed));
                    if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
            if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(e);
            }
            let fetched = fetched.into_inner();
            progress(m.size);
            f.sync_all().map_err(io_err("syncing", &tmp))?;
            std::fs::rename(&tmp, out).map_err(io_err("renaming to", out))?;
            Ok(fetched)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Bytes held in packs (every version's data, shared chunks once).
    pub fn stored_bytes(&self) -> Result<u64, RepoError> {
        Ok(self.store.list("packs/")?.iter().map(|(_, n)| n).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, chunks: usize, chunk: usize) -> std::path::PathBuf {
        let p = dir.join("src.img");
        let mut data = vec![0u8; chunks * chunk + 1000];
        for (i, b) in data.iter_mut().enumerate() {
            // Every other chunk holds data; the rest are zeros.
            if (i / chunk) % 2 == 0 {
                *b = (i * 7 + i / chunk) as u8 | 1;
            }
        }
        std::fs::write(&p, &data).unwrap();
        p
    }

    fn read_all(r: &Repo, m: &Manifest) -> Vec<u8> {
        let mut out = vec![0u8; m.size as usize];
        for c in 0..m.len() {
            let s = m.chunk_start(c) as usize;
            r.read_chunk(m, c, &mut out[s..s + m.chunk_len(c) as usize]).unwrap();
        }
        out
    }

    #[test]
    fn versions_share_unmodified_chunks_and_read_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let r = Repo::open(d.path().join("repo").to_str().unwrap()).unwrap();
        let src = image(d.path(), 9, 4096);
        let (m1, s) = r.push(&src, "base", 4096, PACK_MAX, &mut |_| {}).unwrap();
        assert_eq!((m1.len(), s.chunks_written, s.zero_chunks), (10, 5, 5));
        assert_eq!(read_all(&r, &m1), std::fs::read(&src).unwrap());
        assert!(matches!(r.push(&src, "base", 4096, PACK_MAX, &mut |_| {}), Err(RepoError::NameTaken(_))));

        let c1 = r.clone_image(&m1, "vm1").unwrap();
        assert_eq!(c1.chunks, m1.chunks, "a clone shares every chunk");
        let before = r.stored_bytes().unwrap();
        // Chunks 3 and 4 (consecutive) and 7 rewritten; chunk 0 zeroed.
        let new = |c: usize| if c == 0 { vec![0u8; 4096] } else { vec![c as u8 + 100; 4096] };
        let (c2, s) = r
            .commit(&c1, &[0, 3, 4, 7], &mut |c, buf| {
                *buf = new(c);
                Ok(())
            })
            .unwrap();
        assert_eq!((c2.version, s.chunks_written, s.zero_chunks, s.packs_written), (2, 3, 1, 2));
        assert_eq!(r.stored_bytes().unwrap() - before, 3 * 4096, "only the modified chunks are stored");
        let mut want = read_all(&r, &c1);
        for c in [0, 3, 4, 7] {
            want[c * 4096..(c + 1) * 4096].copy_from_slice(&new(c));
        }
        assert_eq!(read_all(&r, &c2), want);
        assert_eq!(read_all(&r, &r.manifest("vm1", Some(1)).unwrap()), read_all(&r, &m1), "older versions stay");
        assert_eq!(r.versions("vm1").unwrap(), vec![1, 2]);
        assert_eq!(r.manifest("vm1", None).unwrap().version, 2);
        assert!(matches!(r.manifest("vm1", Some(5)), Err(RepoError::NoVersion { .. })));
        assert!(matches!(r.manifest("nope", None), Err(RepoError::NoImage(_))));

        let out = d.path().join("out.img");
        r.export(&c2, &out, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), want);
    }

    #[test]
    fn a_second_commit_on_the_same_version_is_refused_and_a_failed_commit_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let r = Repo::open(d.path().join("repo").to_str().unwrap()).unwrap();
        let (m1, _) = r.push(&image(d.path(), 4, 4096), "img", 4096, PACK_MAX, &mut |_| {}).unwrap();
        let mut fill = |_: usize, buf: &mut Vec<u8>| {
            *buf = vec![9; 4096];
            Ok(())
        };
        let (m2, _) = r.commit(&m1, &[1], &mut fill).unwrap();
        // A second writer that also started from version 1.
        assert!(matches!(r.commit(&m1, &[2], &mut fill), Err(RepoError::Conflict(v)) if v.version == 2));
        // A commit whose reads fail part-way publishes nothing.
        let mut n = 0;
        let res = r.commit(&m2, &[0, 2], &mut |_, buf| {
            n += 1;
            if n == 2 {
                return Err("the disk vanished".into());
            }
            *buf = vec![1; 4096];
            Ok(())
        });
        assert!(res.is_err());
        assert_eq!(r.versions("img").unwrap(), vec![1, 2]);
        assert_eq!(r.manifest("img", None).unwrap(), m2);
    }

    #[test]
    fn a_corrupt_or_missing_pack_is_an_error_never_wrong_bytes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let r = Repo::open(root.to_str().unwrap()).unwrap();
        let (m, _) = r.push(&image(d.path(), 4, 4096), "img", 4096, PACK_MAX, &mut |_| {}).unwrap();
        let pack = root.join("packs").join(&m.packs[0]);
        let mut bytes = std::fs::read(&pack).unwrap();
        let at = m.chunks[2].unwrap().offset as usize + 17;
        bytes[at] ^= 0x40;
        std::fs::write(&pack, &bytes).unwrap();
        let mut buf = vec![0u8; 4096];
        r.read_chunk(&m, 0, &mut buf).unwrap();
        assert!(matches!(r.read_chunk(&m, 2, &mut buf), Err(RepoError::Corrupt { chunk: 2, .. })));
        let out = d.path().join("out.img");
        assert!(r.export(&m, &out, &mut |_| {}).is_err());
        assert!(!out.exists(), "a failed export leaves no file");
        std::fs::remove_file(&pack).unwrap();
        assert!(matches!(r.read_chunk(&m, 0, &mut buf), Err(RepoError::Chunk { .. })));
        // A manifest damaged in the store is refused, not trusted.
        let key = root.join("images/img/v0000000001.json");
        std::fs::write(&key, b"{\"format\":1}").unwrap();
        assert!(matches!(r.manifest("img", None), Err(RepoError::BadManifest { .. })));
    }
}
