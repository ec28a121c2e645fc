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
