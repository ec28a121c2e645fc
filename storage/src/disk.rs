//! What the NBD server serves: a [`Disk`]. A [`Mirror`] is one; during a live transfer the
//! source and destination wrap theirs (`live::SourceDisk`, `live::DestDisk`) to count writes,
//! hand I/O over, and pull chunks that have not arrived yet.

use crate::chunks::Range;
use crate::mirror::{DiskError, Mirror};

/// A block device served to clients.
pub trait Disk: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `data` at `offset`; with `fua`, stable before this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError>;
    /// Writes `len` zero bytes at `offset` (a hole if `hole` and the file system allows).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, hole: bool) -> Result<(), DiskError>;
    /// Makes every acknowledged write stable.
    fn flush(&self) -> Result<(), DiskError>;
    /// `(length, is_hole)` runs covering `r`.
    fn allocation(&self, r: Range) -> Result<Vec<(u64, bool)>, DiskError>;
}

impl Disk for Mirror {
    fn size(&self) -> u64 {
        Mirror::size(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        Mirror::read(self, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        Mirror::write(self, offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, hole: bool) -> Result<(), DiskError> {
        Mirror::write_zeroes(self, offset, len, fua, hole)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Mirror::flush(self)
    }
    fn allocation(&self, r: Range) -> Result<Vec<(u64, bool)>, DiskError> {
        Mirror::allocation(self, r)
    }
}

/// A disk that is served before it exists here: the destination of a migration exports it as
/// soon as it starts (a QEMU started with `-incoming` opens its drives then), and the disk
/// arrives at the handover. A request made before then waits for it, at most `wait` (which
/// may be zero); after a failed transfer, or past the wait, it fails (EIO), never reads as
/// zeroes.
#[derive(Debug)]
pub struct Deferred {
    size: u64,
    wait: std::time::Duration,
    slot: std::sync::Mutex<Slot>,
    cv: std::sync::Condvar,
}

#[derive(Debug)]
enum Slot {
    Waiting,
    Ready(std::sync::Arc<dyn Disk>),
    Failed(String),
}

impl Deferred {
    /// A disk of `size` bytes still to come; requests wait for it at most `wait`.
    pub fn new(size: u64, wait: std::time::Duration) -> Deferred {
        Deferred { size, wait, slot: std::sync::Mutex::new(Slot::Waiting), cv: std::sync::Condvar::new() }
    }

    /// The disk has arrived: requests go to it from now on. It must be `size` bytes.
    pub fn arrive(&self, disk: std::sync::Arc<dyn Disk>) -> Result<(), String> {
        if disk.size() != self.size {
            return Err(format!("a {}-byte disk arrived where {} bytes are served", disk.size(), self.size));
        }
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Slot::Ready(disk);
        self.cv.notify_all();
        Ok(())
    }

    /// The disk will not come: requests fail with `why`.
    pub fn fail(&self, why: String) {
        let mut g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*g, Slot::Waiting) {
            *g = Slot::Failed(why);
        }
        self.cv.notify_all();
    }

    fn get(&self) -> Result<std::sync::Arc<dyn Disk>, DiskError> {
        let g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) =
            self.cv.wait_timeout_while(g, self.wait, |s| matches!(s, Slot::Waiting)).unwrap_or_else(|e| e.into_inner());
        match &*g {
            Slot::Ready(d) => Ok(d.clone()),
            Slot::Failed(why) => Err(DiskError::NotYet(why.clone())),
            Slot::Waiting => Err(DiskError::NotYet(format!("no handover within {:?}", self.wait))),
        }
    }
}

impl Disk for Deferred {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.get()?.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        self.get()?.write(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, hole: bool) -> Result<(), DiskError> {
        self.get()?.write_zeroes(offset, len, fua, hole)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.get()?.flush()
    }
    fn allocation(&self, r: Range) -> Result<Vec<(u64, bool)>, DiskError> {
        self.get()?.allocation(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn plain(size: u64) -> Arc<Mirror> {
        let d = std::env::temp_dir().join(format!("livemig-deferred-{}-{size}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&d).unwrap();
        let _ = std::fs::remove_file(&d);
        f.set_len(size).unwrap();
        Arc::new(Mirror::plain(f).unwrap())
    }

    #[test]
    fn a_deferred_disk_waits_for_its_arrival_then_serves_it() {
        let d = Arc::new(Deferred::new(1 << 20, Duration::from_secs(10)));
        let m = plain(1 << 20);
        m.write(4096, b"here", false).unwrap();
        let reader = {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 4];
                d.read(4096, &mut b).map(|_| b)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "a read before the arrival waits");
        d.arrive(m).unwrap();
        assert_eq!(&reader.join().unwrap().unwrap(), b"here");
    }

    #[test]
    fn a_deferred_disk_fails_requests_after_a_failure_or_past_its_wait() {
        let d = Deferred::new(1 << 20, Duration::from_millis(30));
        let mut b = [0u8; 4];
        assert!(matches!(d.read(0, &mut b), Err(DiskError::NotYet(_))), "past the wait");
        d.fail("the transfer failed".into());
        let e = d.write(0, b"x", false).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("the transfer failed"));
        assert!(Deferred::new(1 << 20, Duration::ZERO).arrive(plain(2 << 20)).is_err(), "a disk of another size");
    }
}
