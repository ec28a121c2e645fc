//! Where a mirrored disk's base image comes from: the seam the image repository plugs into.
//! Today: a local image file, or a directory of chunk files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A read-only base image.
pub trait Base: Send + Sync + std::fmt::Debug {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (the caller keeps within `size`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// What identifies the base's whole content, where it is known without reading it (an
    /// image version's chunk checksums); none for a plain file.
    fn identity(&self) -> Option<Vec<u8>> {
        None
    }
}

/// A local image file.
#[derive(Debug)]
pub struct FileBase {
    file: File,
    size: u64,
}

impl FileBase {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<FileBase> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBase { file, size })
    }
}

impl Base for FileBase {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// A directory of chunks: `manifest.json` (`{"size": N, "chunk_size": C}`) and one file per
/// chunk, `chunks/<index as 8 hex digits>`; a missing chunk file reads as zeros.
#[derive(Debug)]
pub struct ChunkDirBase {
    dir: PathBuf,
    size: u64,
    chunk: u64,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    size: u64,
    chunk_size: u64,
}

impl ChunkDirBase {
    /// Opens the directory `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ChunkDirBase> {
        let m: Manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if m.chunk_size == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "chunk_size 0"));
        }
        Ok(ChunkDirBase { dir: dir.to_path_buf(), size: m.size, chunk: m.chunk_size })
    }

    /// Writes `image` as a chunk directory at `dir` (chunks of zeros are left out).
    pub fn create(dir: &Path, image: &Path, chunk_size: u64) -> std::io::Result<()> {
        let f = File::open(image)?;
        let size = f.metadata()?.len();
        std::fs::create_dir_all(dir.join("chunks"))?;
        let mut buf = vec![0u8; chunk_size as usize];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(chunk_size) as usize;
            f.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                std::fs::write(dir.join("chunks").join(format!("{:08x}", at / chunk_size)), &buf[..n])?;
            }
            at += n as u64;
        }
        let m = serde_json::to_vec(&Manifest { size, chunk_size }).expect("serialises");
        std::fs::write(dir.join("manifest.json"), m)
    }
}

impl Base for ChunkDirBase {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let idx = at / self.chunk;
            let within = at % self.chunk;
            let n = ((self.chunk - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match File::open(self.dir.join("chunks").join(format!("{idx:08x}"))) {
                Ok(f) => {
                    let len = f.metadata()?.len();
                    out.fill(0);
                    if within < len {
                        let m = ((len - within) as usize).min(n);
                        f.read_exact_at(&mut out[..m], within)?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.fill(0),
                Err(e) => return Err(e),
            }
            done += n;
        }
        Ok(())
    }
}
