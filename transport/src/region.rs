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
    /// Memory the embedder mapped and owns ([`Region::from_raw`]).
    Foreign,
}

/// The memory behind a region.
enum Mapping {
    /// A mapping this region made and unmaps on drop.
    Map(MmapRaw),
    /// Memory someone else owns (see [`Region::from_raw`]).
    Raw { ptr: std::ptr::NonNull<u8>, len: usize },
}

impl Mapping {
    fn ptr(&self) -> *mut u8 {
        match self {
            Mapping::Map(m) => m.as_mut_ptr(),
            Mapping::Raw { ptr, .. } => ptr.as_ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Mapping::Map(m) => m.len(),
            Mapping::Raw { len, .. } => *len,
        }
    }
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
    map: Mapping,
    access: Access,
    backing: Backing,
    page_size: u32,
    _file: Option<File>,
    guard: std::sync::RwLock<Option<WriteGuard>>,
}

/// Decides, before the TCP transport places a peer's write into an exposed region, whether
/// `[offset, offset + len)` may be written now (see [`Region::set_write_guard`]).
pub type WriteGuard = std::sync::Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("addr", &self.map.ptr())
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
        let map = Mapping::Map(MmapRaw::from(map));
        Ok(Region { id, map, access, backing: Backing::Anonymous, page_size, _file: None, guard: Default::default() })
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
        let map = Mapping::Map(MmapOptions::new().len(len as usize).map_raw(&file).map_err(err)?);
        Ok(Region { id, map, access, backing: Backing::Memfd, page_size, _file: Some(file), guard: Default::default() })
    }

    /// The first `len` bytes of a memfd someone else created (an embedder sharing its guest
    /// memory), mapped shared. The memfd must already be at least `len` bytes long; it is
    /// never resized.
    pub fn from_memfd(
        id: RegionId,
        memfd: File,
        len: u64,
        page_size: u32,
        access: Access,
    ) -> Result<Self, RegionError> {
        Self::check_len(len, page_size)?;
        let err = |source| RegionError::Map { len, backing: Backing::Memfd, source };
        let cur = memfd.metadata().map_err(err)?.len();
        if cur < len {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the memfd holds {cur} bytes, fewer than {len}"),
            )));
        }
        let map = Mapping::Map(MmapOptions::new().len(len as usize).map_raw(&memfd).map_err(err)?);
        Ok(Region {
            id,
            map,
            access,
            backing: Backing::Memfd,
            page_size,
            _file: Some(memfd),
            guard: Default::default(),
        })
    }

    /// A second mapping of this region's memfd or file, as region `id` with `access`: the
    /// staging view of post-copy placement. The transport writes arriving pages into the
    /// alias (exposed to the peer) while the guest's view stays registered with userfaultfd
    /// in minor mode; `UFFDIO_CONTINUE` then maps the page, already in the page cache, into
    /// the guest's view without a copy. Both views see the same bytes. Anonymous and foreign
    /// memory have no second view (an error).
    pub fn alias(&self, id: RegionId, access: Access) -> Result<Self, RegionError> {
        let len = self.len();
        let err = |source| RegionError::Map { len, backing: self.backing, source };
        let file = match (&self._file, self.backing) {
            (Some(f), Backing::Memfd | Backing::File) => f.try_clone().map_err(err)?,
            _ => {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "only memfd- and file-backed regions have a second view",
                )))
            }
        };
        let map = Mapping::Map(MmapOptions::new().len(len as usize).map_raw(&file).map_err(err)?);
        Ok(Region {
            id,
            map,
            access,
            backing: self.backing,
            page_size: self.page_size,
            _file: Some(file),
            guard: Default::default(),
        })
    }

    /// Memory the caller mapped and owns, e.g. a VMM's guest RAM.
    ///
    /// # Safety
    /// - `[ptr, ptr + len)` must be a single mapping, readable (and writable if the region is
    ///   exposed for remote writes), and stay mapped until the region and every clone of its
    ///   `Arc` are dropped (including the transport's registration).
    /// - The memory may be written concurrently by others (the guest, devices): the region
    ///   only accesses it through volatile copies and hands raw pointers to the transport,
    ///   but anything the caller reads through references of its own must tolerate that.
    ///
    /// Zero pages of such memory are found by reading them (its backing is unknown, so
    /// page-presence information is not trusted), and zeroing writes every byte.
    pub unsafe fn from_raw(
        id: RegionId,
        ptr: *mut u8,
        len: u64,
        page_size: u32,
        access: Access,
    ) -> Result<Self, RegionError> {
        Self::check_len(len, page_size)?;
        let ptr = std::ptr::NonNull::new(ptr).ok_or(RegionError::Map {
            len,
            backing: Backing::Foreign,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "null pointer"),
        })?;
        let map = Mapping::Raw { ptr, len: len as usize };
        Ok(Region { id, map, access, backing: Backing::Foreign, page_size, _file: None, guard: Default::default() })
    }

    /// A regular file mapped shared; the file is extended to `len` if shorter.
    pub fn file(id: RegionId, file: File, len: u64, page_size: u32, access: Access) -> Result<Self, RegionError> {
        Self::check_len(len, page_size)?;
        let err = |source| RegionError::Map { len, backing: Backing::File, source };
        let cur = file.metadata().map_err(err)?.len();
        if cur < len {
            file.set_len(len).map_err(err)?;
        }
        let map = Mapping::Map(MmapOptions::new().len(len as usize).map_raw(&file).map_err(err)?);
        Ok(Region { id, map, access, backing: Backing::File, page_size, _file: Some(file), guard: Default::default() })
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
        self.map.ptr()
    }
    /// Installs (or removes) a check the TCP transport makes before placing each write of
    /// the peer into this region: a write it refuses is a protocol violation (nothing of the
    /// frame is placed, the connection is closed). A post-copy destination uses it so that
    /// a page, once hashed and installed, cannot be rewritten by the source. RDMA writes
    /// bypass the CPU and cannot be checked this way.
    pub fn set_write_guard(&self, guard: Option<WriteGuard>) {
        *self.guard.write().unwrap_or_else(|e| e.into_inner()) = guard;
    }

    /// Whether the write guard (if any) lets the peer write `[offset, offset + len)` now.
    pub fn write_allowed(&self, offset: u64, len: u64) -> bool {
        self.guard.read().unwrap_or_else(|e| e.into_inner()).as_ref().is_none_or(|g| g(offset, len))
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
    ///
    /// The copy uses volatile stores: the region is shared with writers the compiler cannot
    /// see (a guest, the transport's receive path, a NIC, another process), so it must not
    /// assume the bytes are unchanged or elide the accesses.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> bool {
        if !self.contains(offset, src.len() as u64) {
            return false;
        }
        // SAFETY: bounds checked above, so `[offset, offset+len)` lies in the live mapping;
        // `src` is a separate buffer (callers hold it apart from the region).
        unsafe { volatile::copy_to(self.as_ptr().add(offset as usize), src) };
        true
    }

    /// Fills `[offset, offset+len)` with zeros after a bounds check (volatile stores).
    pub fn zero_at(&self, offset: u64, len: u64) -> bool {
        if !self.contains(offset, len) {
            return false;
        }
        // SAFETY: bounds checked above.
        unsafe { volatile::fill_zero(self.as_ptr().add(offset as usize), len as usize) };
        true
    }

    /// Copies `[offset, offset+dst.len())` out of the region after a bounds check
    /// (volatile loads: a concurrent writer may change the bytes; the copy then holds old,
    /// new or mixed bytes, never undefined behaviour).
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> bool {
        if !self.contains(offset, dst.len() as u64) {
            return false;
        }
        // SAFETY: bounds checked above; `dst` is a separate buffer.
        unsafe { volatile::copy_from(self.as_ptr().add(offset as usize), dst) };
        true
    }

    /// Byte ranges inside `[offset, offset+len)` that may hold non-zero data; everything
    /// else in the range reads as zero for certain, known without reading it:
    /// - memfd and file backings: the file's holes (`SEEK_DATA`/`SEEK_HOLE`);
    /// - anonymous memory: pages neither present nor swapped (`/proc/self/pagemap`), which
    ///   the kernel fills with zeros on first touch;
    /// - memory of unknown backing ([`Region::from_raw`]): an `Unsupported` error.
    ///
    /// Ranges are page-aligned (system pages) and clipped to the request. Errors only when
    /// the kernel interface fails; the caller may then treat the whole range as data.
    pub fn data_ranges(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
        if !self.contains(offset, len) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "range outside the region"));
        }
        let end = offset + len;
        match (&self._file, self.backing) {
            (Some(f), _) => extents::file_data(f, offset, end),
            (None, Backing::Anonymous) => extents::anon_data(self.as_ptr() as usize, offset, end),
            (None, _) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no page-presence information for memory of unknown backing",
            )),
        }
    }

    /// Pages (of this region's page size) that are zero for certain without reading them
    /// (see [`data_ranges`](Self::data_ranges)).
    pub fn known_zero_pages(&self) -> std::io::Result<crate::PageBitmap> {
        let ps = self.page_size as u64;
        let mut zero = crate::PageBitmap::full(self.pages());
        for (start, len) in self.data_ranges(0, self.len())? {
            let first = start / ps;
            let last = (start + len).div_ceil(ps);
            for p in first..last {
                zero.clear(p as usize);
            }
        }
        Ok(zero)
    }

    /// Makes `[offset, offset+len)` read as zeros, writing only the parts that may hold
    /// data: on a fresh destination (nothing populated yet) this touches nothing. The memory
    /// is not released or remapped (a pinned RDMA registration stays valid).
    pub fn place_zero(&self, offset: u64, len: u64) -> bool {
        if !self.contains(offset, len) {
            return false;
        }
        match self.data_ranges(offset, len) {
            Ok(ranges) => ranges.into_iter().all(|(o, l)| self.zero_at(o, l)),
            Err(_) => self.zero_at(offset, len),
        }
    }
}

/// Copies to and from memory shared with writers the compiler cannot see. Word-sized
/// volatile accesses where alignment allows, bytes at the edges.
mod volatile {
    const W: usize = std::mem::size_of::<u64>();

    /// # Safety
    /// `src` must be valid for reading `dst.len()` bytes and must not overlap `dst`.
    pub(super) unsafe fn copy_from(src: *const u8, dst: &mut [u8]) {
        let n = dst.len();
        let mut i = 0;
        // Leading bytes until `src + i` is word-aligned.
        while i < n && (src as usize + i) % W != 0 {
            // SAFETY: i < n, within the caller's valid range.
            dst[i] = unsafe { src.add(i).read_volatile() };
            i += 1;
        }
        while i + W <= n {
            // SAFETY: `src + i` is aligned for u64 and `i + W <= n` keeps the read in range.
            let w = unsafe { (src.add(i) as *const u64).read_volatile() };
            dst[i..i + W].copy_from_slice(&w.to_ne_bytes());
            i += W;
        }
        while i < n {
            // SAFETY: i < n.
            dst[i] = unsafe { src.add(i).read_volatile() };
            i += 1;
        }
    }

    /// # Safety
    /// `dst` must be valid for writing `src.len()` bytes and must not overlap `src`.
    pub(super) unsafe fn copy_to(dst: *mut u8, src: &[u8]) {
        let n = src.len();
        let mut i = 0;
        while i < n && (dst as usize + i) % W != 0 {
            // SAFETY: i < n, within the caller's valid range.
            unsafe { dst.add(i).write_volatile(src[i]) };
            i += 1;
        }
        while i + W <= n {
            let w = u64::from_ne_bytes(src[i..i + W].try_into().expect("8 bytes"));
            // SAFETY: aligned and in range (`i + W <= n`).
            unsafe { (dst.add(i) as *mut u64).write_volatile(w) };
            i += W;
        }
        while i < n {
            // SAFETY: i < n.
            unsafe { dst.add(i).write_volatile(src[i]) };
            i += 1;
        }
    }

    /// # Safety
    /// `dst` must be valid for writing `n` bytes.
    pub(super) unsafe fn fill_zero(dst: *mut u8, n: usize) {
        let mut i = 0;
        while i < n && (dst as usize + i) % W != 0 {
            // SAFETY: i < n.
            unsafe { dst.add(i).write_volatile(0) };
            i += 1;
        }
        while i + W <= n {
            // SAFETY: aligned and in range.
            unsafe { (dst.add(i) as *mut u64).write_volatile(0) };
            i += W;
        }
        while i < n {
            // SAFETY: i < n.
            unsafe { dst.add(i).write_volatile(0) };
            i += 1;
        }
    }
}

/// Where a region may hold data (see [`Region::data_ranges`]).
mod extents {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn os_page() -> u64 {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            p as u64
        } else {
            4096
        }
    }

    fn lseek(f: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset, which nothing
        // else uses (the region is accessed through its mapping).
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
        }
        Ok(Some(r as u64))
    }

    pub(super) fn file_data(f: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let Some(data) = lseek(f, pos, libc::SEEK_DATA)? else { break };
            if data >= end {
                break;
            }
            let hole = lseek(f, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            out.push((data.max(start), hole - data.max(start)));
            pos = hole;
        }
        Ok(out)
    }

    /// Whether a pagemap entry may map data: present (bit 63), or swapped (bit 62) unless
    /// it is a PTE marker. A marker (for example the uffd-wp marker that write-protect
    /// tracking installs on never-populated pages) is reported as a swap entry whose type
    /// (bits 0-4) is the last one, `SWP_PTE_MARKER`; real swap devices use lower types.
    /// Should a kernel number the marker differently, markers count as data: the pages are
    /// then read instead of skipped, which is slower but never wrong.
    fn may_hold_data(e: u64) -> bool {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const TYPE_MASK: u64 = 0x1f;
        e & PRESENT != 0 || (e & SWAPPED != 0 && e & TYPE_MASK != TYPE_MASK)
    }

    /// Pages of the anonymous mapping at `base` that may hold data (see `may_hold_data`).
    pub(super) fn anon_data(base: usize, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let ps = os_page();
        let pagemap = File::open("/proc/self/pagemap")?;
        let first = (base as u64 + start) / ps;
        let last = (base as u64 + end).div_ceil(ps);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut buf = vec![0u8; 8 * 8192];
        let mut vpn = first;
        while vpn < last {
            let n = ((last - vpn) as usize).min(8192);
            pagemap.read_exact_at(&mut buf[..n * 8], vpn * 8)?;
            for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
                let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                if !may_hold_data(e) {
                    continue;
                }
                let page = (vpn + i as u64) * ps - base as u64;
                let (s, e) = (page.max(start), (page + ps).min(end));
                match out.last_mut() {
                    Some((o, l)) if *o + *l == s => *l += e - s,
                    _ => out.push((s, e - s)),
                }
            }
            vpn += n as u64;
        }
        Ok(out)
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
        assert!(r.write_at(4095, &[1; 1]) && !r.write_at(8192, &[1; 1]));
        r.zero_at(4095, 1);
        assert!(!r.write_at(4097, &[1; 4096]));
        assert!(!r.contains(u64::MAX, 2));
        let mut b = [0u8; 4];
        assert!(r.read_at(4096, &mut b));
        assert_eq!(b, [1; 4]);
        assert!(matches!(Region::anonymous(1, 100, 4096, Access::LOCAL), Err(RegionError::BadLength { .. })));
    }

    #[test]
    fn volatile_copies_at_every_alignment() {
        let r = Region::anonymous(2, 16384, 4096, Access::LOCAL).unwrap();
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
        for off in 0..17u64 {
            for len in [0usize, 1, 7, 8, 9, 63, 200] {
                assert!(r.write_at(100 + off, &src[..len]));
                let mut back = vec![0u8; len];
                assert!(r.read_at(100 + off, &mut back));
                assert_eq!(back, &src[..len], "off {off} len {len}");
                assert!(r.zero_at(100 + off, len as u64));
                assert!(r.read_at(100 + off, &mut back));
                assert!(back.iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn known_zero_pages_without_reading() {
        for make in [Region::anonymous, Region::memfd] {
            let r = make(3, 64 * 4096, 4096, Access::LOCAL).unwrap();
            assert_eq!(r.known_zero_pages().unwrap().count_ones(), 64, "{:?}", r.backing());
            r.write_at(5 * 4096 + 17, &[9]);
            r.write_at(40 * 4096, &[0; 4096]); // populated, so no longer known zero
            let z = r.known_zero_pages().unwrap();
            assert!(!z.get(5) && !z.get(40) && z.get(4) && z.get(41), "{:?}", r.backing());
            assert_eq!(z.count_ones(), 62);
            // place_zero writes only where data may be.
            assert!(r.place_zero(0, 64 * 4096));
            let mut b = [1u8; 1];
            r.read_at(5 * 4096 + 17, &mut b);
            assert_eq!(b, [0]);
            assert!(!r.place_zero(60 * 4096, 8 * 4096));
        }
    }

    #[test]
    fn an_alias_sees_the_same_bytes() {
        let r = Region::memfd(1, 4 * 4096, 4096, Access::LOCAL).unwrap();
        let a = r.alias(2, Access::REMOTE_WRITE).unwrap();
        assert_ne!(r.as_ptr(), a.as_ptr());
        assert!(a.write_at(4096, b"placed through the alias"));
        let mut b = [0u8; 24];
        r.read_at(4096, &mut b);
        assert_eq!(&b, b"placed through the alias");
        let anon = Region::anonymous(3, 4096, 4096, Access::LOCAL).unwrap();
        assert!(anon.alias(4, Access::LOCAL).is_err());
    }
}
