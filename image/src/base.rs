//! An image version as the read-only base of a mirrored disk: each read brings whole chunks
//! from the repository and checks them; a chunk that fails its checksum or cannot be read is
//! an I/O error (the NBD client sees EIO), never wrong or zero bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use livemig_storage::base::Base;

use crate::manifest::Manifest;
use crate::repo::{Repo, RepoError};

/// An image version read from a repository.
#[derive(Debug)]
pub struct RepoBase {
    repo: Arc<Repo>,
    manifest: Manifest,
    fetched: Arc<FetchStats>,
}

/// What a disk's bases fetched from the repository.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Bytes.
    pub bytes: AtomicU64,
    /// Reads from the base (each one ranged read per stretch of chunks it covers).
    pub reads: AtomicU64,
    /// Time spent in them, ns.
    pub nanos: AtomicU64,
}

impl FetchStats {
    /// `N bytes fetched from the repository in R reads (mean M ms)`.
    pub fn summary(&self) -> String {
        let (b, r, n) = (
            self.bytes.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed),
        );
        let mean = if r == 0 { 0.0 } else { n as f64 / r as f64 / 1e6 };
        format!("{b} bytes fetched from the repository in {r} reads (mean {mean:.1} ms)")
    }
}

impl RepoBase {
    /// Reads `manifest`'s version from `repo`; bytes fetched from the store are added to
    /// `fetched` (shared across the bases a disk has over its life).
    pub fn new(repo: Arc<Repo>, manifest: Manifest, fetched: Arc<FetchStats>) -> RepoBase {
        RepoBase { repo, manifest, fetched }
    }

    /// The version.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

fn to_io(e: RepoError) -> std::io::Error {
    let kind = match &e {
        RepoError::Corrupt { .. } => std::io::ErrorKind::InvalidData,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e)
}

impl Base for RepoBase {
    fn size(&self) -> u64 {
        self.manifest.size
    }

    fn identity(&self) -> Option<Vec<u8>> {
        // The content, not the name: every chunk's checksum (zero chunks as zeros).
        let mut h = Vec::with_capacity(self.manifest.len() * 32);
        for c in &self.manifest.chunks {
            h.extend_from_slice(&c.map(|r| r.sum.0).unwrap_or([0; 32]));
        }
        Some(crate::manifest::Sum::of(&h).0.to_vec())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let t = std::time::Instant::now();
        let r = self.read_into(offset, buf);
        self.fetched.reads.fetch_add(1, Ordering::Relaxed);
        self.fetched.nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl RepoBase {
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let m = &self.manifest;
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= m.size).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} bytes at {offset} is past the image", buf.len()),
            )
        })?;
        let mut whole = Vec::new();
        let mut at = offset;
        while at < end {
            let c = (at / m.chunk_size as u64) as usize;
            let start = m.chunk_start(c);
            let len = m.chunk_len(c) as u64;
            let n = (start + len).min(end) - at;
            let out = &mut buf[(at - offset) as usize..(at - offset + n) as usize];
            if at == start && n == len {
                // Whole chunks from here: as many as the request covers, in one go.
                let mut last = c;
                while last + 1 < m.len() && m.chunk_start(last + 1) + m.chunk_len(last + 1) as u64 <= end {
                    last += 1;
                }
                let n = m.chunk_start(last) + m.chunk_len(last) as u64 - at;
                let out = &mut buf[(at - offset) as usize..(at - offset + n) as usize];
                let got = self.repo.read_chunks(m, c..last + 1, out).map_err(to_io)?;
                self.fetched.bytes.fetch_add(got, Ordering::Relaxed);
                at += n;
                continue;
            } else {
                // Part of a chunk: the whole chunk is read (its checksum covers all of it).
                whole.resize(len as usize, 0);
                let got = self.repo.read_chunk(m, c, &mut whole).map_err(to_io)?;
                self.fetched.bytes.fetch_add(got, Ordering::Relaxed);
                out.copy_from_slice(&whole[(at - start) as usize..(at - start + n) as usize]);
            }
            at += n;
        }
        Ok(())
    }
}
