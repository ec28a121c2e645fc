//! Registered memory regions and the registration cache.
//!
//! A [`Region`] is memory the transport may read from (to send) or expose for remote writes:
//! an anonymous mapping, a memfd, or a file, mapped with memmap2. It is accessed through raw
//! pointers only, like memory registered with an RDMA NIC: the workload, the transport's
//! receive path and the NIC may all touch it, and the migration protocol (not the borrow
//! checker) orders those accesses. Reading a consistent snapshot needs the writers quiesced.
//!
//! The [`RegionTable`] is the registration cache: regions are registered once, looked up by
//! id or by address range, and removed when their [`Registration`] is dropped. The verbs
//! backend pins (registers with the device) what this table holds, whole or chunk by chunk.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};
use serde::{Deserialize, Serialize};

/// Identifier of a region, unique per endpoint and carried on the wire.
pub type RegionId = u32;

/// What the peer may do with a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// The local transport may read it to send (always needed for a source region).
    pub local_read: bool,
    /// The peer may write into it (an exposed destination region).
    pub remote_write: bool,
    /// The peer may read it (RDMA READ, post-copy pulls).
    pub remote_read: bool,
}

impl Access {
    /// Source memory: only read locally.
    pub const LOCAL: Access = Access { local_read: true, remote_write: false, remote_read: false };
    /// Destination memory: the peer may write it.
    pub const REMOTE_WRITE: Access = Access { local_read: true, remote_write: true, remote_read: false };
    /// Bits used on the wire.
    pub fn bits(self) -> u8 {
        (self.local_read as u8) | (self.remote_write as u8) << 1 | (self.remote_read as u8) << 2
    }
    /// Inverse of [`Access::bits`].
    pub fn from_bits(b: u8) -> Self {
        Access { local_read: b & 1 != 0, remote_write: b & 2 != 0, remote_read: b & 4 != 0 }
    }
}

/// How the memory behind a region was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// `MAP_PRIVATE|MAP_ANONYMOUS`.
    Anonymous,
    /// A sealed-size memfd, mapped shared (can be handed to another process or QEMU).
    Memfd,
    /// A regular file, mapped shared.
    File,
}

/// Errors creating or registering regions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// mmap/memfd/ftruncate failed.
    #[error("could not map a {len}-byte {backing:?} region")]
    Map {
        /// Requested length.
        len: u64,
        /// Requested backing.
        backing: Backing,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Zero-length or not a multiple of the page size.
    #[error("region length {len} is not a positive multiple of the page size {page_size}")]
    BadLength {
        /// Requested length.
        len: u64,
        /// The page size.
        page_size: u32,
    },
    /// The id is already registered.
    #[error("region id {0} is already registered")]
    DuplicateId(RegionId),
}

/// A mapped memory region.
pub struct Region {
    id: RegionId,
    map: MmapRaw,
    access: Access,
    backing: Backing,
    page_size: u32,
    _file: Option<File>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("addr", &self.map.as_ptr())
            .field("len", &self.map.len())
            .field("access", &self.access)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Region {
    fn check_len(len: u64, page_size: u32) -> Result<(), RegionError> {
        if len == 0 || page_size == 0 || len % page_size as u64 != 0 {
            return Err(RegionError::BadLength { len, page_size });
        }
        Ok(())
    }

    /// An anonymous private mapping of `len` bytes (zero-filled, populated lazily).
    pub fn anonymous(id: RegionId, len: u64, page_size: u32, access: Access) -> Result<Self, RegionError> {
        Self::check_len(len, page_size)?;
        let map = MmapOptions::new().len(len as usize).map_anon().map_err(|source| RegionError::Map {
            len,
            backing: Backing::Anonymous,
            source,
        })?;
        Ok(Region { id, map: MmapRaw::from(map), access, backing: Backing::Anonymous, page_size, _file: None })
    }

    /// A memfd of `len` bytes mapped shared.
    pub fn memfd(id: RegionId, len: u64, page_size: u32, access: Access) -> Result<Self, RegionError> {
        Self::check_len(len, page_size)?;
        let err = |source| RegionError::Map { len, backing: Backing::Memfd, source };
        // SAFETY: the name is a NUL-terminated literal; memfd_create has no other preconditions.
        let fd = unsafe { libc::memfd_create(c"livemig-region".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).map_err(err)?;
        let map = MmapOptions::new().len(len as usize).map_raw(&file).map_err(err)?;
        Ok(Region { id, map, access, backing: Backing::Memfd, page_size, _file: Some(file) })
    }

    /// A regular file mapped shared; the file is extended to `len` if shorter.
    pub fn file(id: RegionId, file: File, len: u64, page_size: u32, access: Access) -> Result<Self, RegionError> {
        Self::check_len(len, page_size)?;
        let err = |source| RegionError::Map { len, backing: Backing::File, source };
        let cur = file.metadata().map_err(err)?.len();
        if cur < len {
            file.set_len(len).map_err(err)?;
        }
        let map = MmapOptions::new().len(len as usize).map_raw(&file).map_err(err)?;
        Ok(Region { id, map, access, backing: Backing::File, page_size, _file: Some(file) })
    }

    /// The region id.
    pub fn id(&self) -> RegionId {
        self.id
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    /// Always false (regions have a positive length).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }
    /// Page size used to index this region.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }
    /// Number of pages.
    pub fn pages(&self) -> usize {
        (self.len() / self.page_size as u64) as usize
    }
    /// Access rights.
    pub fn access(&self) -> Access {
        self.access
    }
    /// Backing kind.
    pub fn backing(&self) -> Backing {
        self.backing
    }
    /// Base address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    /// File descriptor of a memfd/file backing.
    pub fn fd(&self) -> Option<i32> {
        self._file.as_ref().map(|f| f.as_raw_fd())
    }

    /// True when `[offset, offset+len)` lies inside the region (overflow-safe).
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len())
    }

    /// Views the whole region as bytes.
    ///
    /// # Safety
    /// No one (workload thread, transport receive path, NIC) may write the region while the
    /// returned slice is alive.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for the lifetime of `self`; the caller
        // guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.map.len()) }
    }

    /// Views the whole region as mutable bytes.
    ///
    /// # Safety
    /// The caller must be the only accessor of the region while the slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: valid mapping of `len` bytes; exclusivity is the caller's obligation.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.map.len()) }
    }

    /// Copies `src` into the region at `offset` after a bounds check.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> bool {
        if !self.contains(offset, src.len() as u64) {
            return false;
        }
        // SAFETY: bounds checked above; the region is raw shared memory (see module doc), and
        // `src` cannot overlap it because callers hold it as a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(offset as usize), src.len()) };
        true
    }

    /// Fills `[offset, offset+len)` with zeros after a bounds check.
    pub fn zero_at(&self, offset: u64, len: u64) -> bool {
        if !self.contains(offset, len) {
            return false;
        }
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset as usize), 0, len as usize) };
        true
    }

    /// Copies `[offset, offset+dst.len())` out of the region after a bounds check.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> bool {
        if !self.contains(offset, dst.len() as u64) {
            return false;
        }
        // SAFETY: bounds checked above; `dst` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr().add(offset as usize), dst.as_mut_ptr(), dst.len()) };
        true
    }
}

// SAFETY: a Region is a mapping plus plain metadata; all access to the mapped bytes goes through
// raw pointers whose ordering the migration protocol defines (like device-shared memory).
unsafe impl Send for Region {}
// SAFETY: see above; `&Region` hands out only raw pointers and bounds-checked copies.
unsafe impl Sync for Region {}

/// Public description of an exposed region, as sent to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Region id.
    pub id: RegionId,
    /// Length in bytes.
    pub len: u64,
    /// Page size.
    pub page_size: u32,
    /// Access granted to the peer.
    pub access: Access,
    /// Remote virtual address (verbs only; 0 for TCP).
    pub addr: u64,
    /// Remote key (verbs only; 0 for TCP).
    pub rkey: u32,
}

#[derive(Debug, Default)]
struct Table {
    by_id: BTreeMap<RegionId, Arc<Region>>,
    by_addr: BTreeMap<usize, RegionId>,
}

/// The registration cache: every region the endpoint may send from or expose.
#[derive(Debug, Clone, Default)]
pub struct RegionTable {
    inner: Arc<Mutex<Table>>,
}

/// Keeps a region registered; dropping it deregisters the region.
#[derive(Debug)]
pub struct Registration {
    table: RegionTable,
    id: RegionId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.remove(self.id);
    }
}

impl Registration {
    /// The registered region id.
    pub fn id(&self) -> RegionId {
        self.id
    }
}

impl RegionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means another thread panicked mid-insert; the maps stay valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `region`; it stays registered while the returned guard lives.
    pub fn register(&self, region: Arc<Region>) -> Result<Registration, RegionError> {
        let mut t = self.lock();
        let id = region.id();
        if t.by_id.contains_key(&id) {
            return Err(RegionError::DuplicateId(id));
        }
        t.by_addr.insert(region.as_ptr() as usize, id);
        t.by_id.insert(id, region);
        Ok(Registration { table: self.clone(), id })
    }

    fn remove(&self, id: RegionId) {
        let mut t = self.lock();
        if let Some(r) = t.by_id.remove(&id) {
            t.by_addr.remove(&(r.as_ptr() as usize));
        }
    }

    /// Looks a region up by id.
    pub fn get(&self, id: RegionId) -> Option<Arc<Region>> {
        self.lock().by_id.get(&id).cloned()
    }

    /// Finds the region holding `[addr, addr+len)` and the offset of `addr` in it.
    pub fn lookup_addr(&self, addr: usize, len: usize) -> Option<(Arc<Region>, u64)> {
        let t = self.lock();
        let (&base, id) = t.by_addr.range(..=addr).next_back()?;
        let r = t.by_id.get(id)?;
        let off = (addr - base) as u64;
        r.contains(off, len as u64).then(|| (r.clone(), off))
    }

    /// All registered regions.
    pub fn all(&self) -> Vec<Arc<Region>> {
        self.lock().by_id.values().cloned().collect()
    }

    /// Descriptions of regions the peer may write or read.
    pub fn exposed(&self) -> Vec<RegionInfo> {
        self.lock()
            .by_id
            .values()
            .filter(|r| r.access().remote_write || r.access().remote_read)
            .map(|r| RegionInfo {
                id: r.id(),
                len: r.len(),
                page_size: r.page_size(),
                access: r.access(),
                addr: 0,
                rkey: 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_lookup_deregister() {
        let t = RegionTable::new();
        let r = Arc::new(Region::anonymous(7, 1 << 20, 4096, Access::REMOTE_WRITE).unwrap());
        let base = r.as_ptr() as usize;
        let reg = t.register(r.clone()).unwrap();
        assert!(matches!(t.register(r.clone()), Err(RegionError::DuplicateId(7))));
        let (found, off) = t.lookup_addr(base + 8192, 4096).unwrap();
        assert_eq!((found.id(), off), (7, 8192));
        assert!(t.lookup_addr(base + (1 << 20) - 10, 4096).is_none());
        assert_eq!(t.exposed().len(), 1);
        drop(reg);
        assert!(t.get(7).is_none());
    }

    #[test]
    fn bounds_checks() {
        let r = Region::memfd(1, 8192, 4096, Access::LOCAL).unwrap();
        assert!(r.write_at(4096, &[1; 4096]));
        assert!(!r.write_at(4097, &[1; 4096]));
        assert!(!r.contains(u64::MAX, 2));
        let mut b = [0u8; 4];
        assert!(r.read_at(4096, &mut b));
        assert_eq!(b, [1; 4]);
        assert!(matches!(Region::anonymous(1, 100, 4096, Access::LOCAL), Err(RegionError::BadLength { .. })));
    }
}
