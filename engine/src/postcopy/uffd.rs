//! Post-copy placement through userfaultfd, without a copy.
//!
//! Each region of the destination's guest memory is a memfd (or a shared file) mapped twice:
//! the guest's view, registered with userfaultfd in missing and minor mode, and a staging
//! alias (`Region::alias`) that the transport writes arriving pages into. A page written into
//! the alias is in the page cache but not mapped in the guest's view; [`Placer::install`]
//! maps it there with `UFFDIO_CONTINUE`, which also wakes every thread waiting on it. A guest
//! access to a page not installed yet faults — missing if the page is nowhere, minor if it
//! arrived but is not installed — and the fault handler learns of it through
//! [`Placer::wait_faults`].
//!
//! Zero pages are made in the page cache (`fallocate` after punching the range, so old
//! contents of an embedder's memfd do not survive) and installed the same way.
//!
//! Anonymous memory has no second view; it would need `UFFDIO_COPY` from a staging buffer
//! and is refused here.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use livemig_transport::{Access, Backing, Region, RegionError, RegionId};

use crate::dirty::sys::{self, Uffd, UffdMsg};
use crate::guest::{Foreign, GuestMemory};

/// Why the placer could not be set up or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacerError {
    /// A region has no second view (anonymous or foreign memory).
    #[error("region {index} is {backing:?} memory: post-copy placement needs a memfd or shared file")]
    NotShared {
        /// Region index in page-space order.
        index: usize,
        /// Its backing.
        backing: Backing,
    },
    /// Mapping the staging alias failed.
    #[error("mapping the staging view of region {index}")]
    Alias {
        /// Region index.
        index: usize,
        /// Why.
        #[source]
        source: RegionError,
    },
    /// The kernel lacks minor faults on shared memory (Linux 5.13+).
    #[error("this kernel has no userfaultfd minor faults on shared memory (UFFD_FEATURE_MINOR_SHMEM)")]
    NoMinorShmem,
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed")]
    Os {
        /// What.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Foreign memory described inconsistently.
    #[error("foreign memory: {0}")]
    Layout(String),
    /// Pages outside the guest memory.
    #[error("pages [{first}, +{n}) are outside the guest memory")]
    Range {
        /// First page.
        first: usize,
        /// Pages.
        n: usize,
    },
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> PlacerError {
    move |source| PlacerError::Os { op, source }
}

#[derive(Debug)]
struct View {
    /// Where the guest sees the region: in this process, or in the VMM that handed over the
    /// userfaultfd (foreign memory).
    addr: usize,
    len: usize,
    alias: Arc<Region>,
    /// First page of the region in the page space.
    base: usize,
    pages: usize,
}

/// A staging alias of every region of `memory`, in page-space order: alias of region `i`
/// gets id `alias_id(i)` and `access` (remote write, to expose it to the source). Writes into
/// an alias are writes into the guest's memory (same pages); before the [`Placer`] is armed
/// they are visible to the guest at once, as pre-copy wants.
pub fn staging_aliases(
    memory: &GuestMemory,
    alias_id: impl Fn(usize) -> RegionId,
    access: Access,
) -> Result<Vec<Arc<Region>>, PlacerError> {
    memory
        .regions()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.fd().is_none() || matches!(r.backing(), Backing::Anonymous) {
                return Err(PlacerError::NotShared { index: i, backing: r.backing() });
            }
            r.alias(alias_id(i), access).map(Arc::new).map_err(|source| PlacerError::Alias { index: i, source })
        })
        .collect()
}

/// The destination's userfaultfd placement for a whole guest memory.
#[derive(Debug)]
pub struct Placer {
    uffd: Uffd,
    views: Vec<View>,
    page_size: usize,
    armed: bool,
    foreign: bool,
    /// The page tables of the process whose views these are (foreign memory).
    pagemap: Option<sys::Pagemap>,
}

impl Placer {
    /// A placer for `memory`, whose staging views are `aliases` ([`staging_aliases`], in
    /// page-space order), not armed yet: pages may be staged, punched and hashed, and
    /// [`arm`](Self::arm) registers the guest's views with userfaultfd.
    pub fn new(memory: &GuestMemory, aliases: &[Arc<Region>]) -> Result<Self, PlacerError> {
        let mut views = Vec::with_capacity(memory.regions().len());
        for (i, r) in memory.regions().iter().enumerate() {
            let alias =
                aliases.get(i).filter(|a| a.len() == r.len() && a.fd().is_some()).ok_or(PlacerError::Alias {
                    index: i,
                    source: RegionError::Map {
                        len: r.len(),
                        backing: r.backing(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, "no staging alias of this region's size"),
                    },
                })?;
            views.push(View {
                addr: r.as_ptr() as usize,
                len: r.len() as usize,
                alias: alias.clone(),
                base: memory.base(i),
                pages: r.pages(),
            });
        }
        // Not the user-mode-only fallback: kernel accesses to guest memory (system calls on
        // its buffers, futexes) must block on missing pages too, not fail with EFAULT.
        let uffd = Uffd::open(sys::UFFD_FEATURE_MINOR_SHMEM, false)
            .map_err(|e| PlacerError::Os { op: "open", source: io::Error::other(crate::precopy::error_chain(&e)) })?;
        if uffd.supported_features() & sys::UFFD_FEATURE_MINOR_SHMEM == 0 {
            return Err(PlacerError::NoMinorShmem);
        }
        Ok(Placer { uffd, views, page_size: memory.page_size() as usize, armed: false, foreign: false, pagemap: None })
    }

    /// A placer for guest memory another process maps ([`Foreign`]): `memory`'s regions are
    /// this process's mappings of the same files and serve as the staging views (what the
    /// transport exposes, writable by the peer); the guest's views are the VMM's mappings, at
    /// `foreign.addrs`, registered through its userfaultfd by [`arm`](Self::arm). Unlike local
    /// memory, pages the VMM maps already cannot be unmapped from here: the caller punches
    /// every page that has not arrived once armed ([`punch`](Self::punch) unmaps them
    /// everywhere), and an arrived page the VMM maps already counts as installed.
    pub fn foreign(memory: &GuestMemory, foreign: Foreign) -> Result<Self, PlacerError> {
        let Foreign { uffd, addrs, pid } = foreign;
        if addrs.len() != memory.regions().len() {
            return Err(PlacerError::Layout(format!(
                "{} addresses for {} regions",
                addrs.len(),
                memory.regions().len()
            )));
        }
        let pagemap = sys::Pagemap::open_pid(pid)
            .map_err(|e| PlacerError::Os { op: "open pagemap", source: io::Error::other(e.to_string()) })?;
        let mut views = Vec::with_capacity(addrs.len());
        for (i, (r, &addr)) in memory.regions().iter().zip(&addrs).enumerate() {
            if r.fd().is_none() || matches!(r.backing(), Backing::Anonymous) {
                return Err(PlacerError::NotShared { index: i, backing: r.backing() });
            }
            views.push(View { addr, len: r.len() as usize, alias: r.clone(), base: memory.base(i), pages: r.pages() });
        }
        let uffd = Uffd::adopt(uffd, sys::UFFD_FEATURE_MINOR_SHMEM).map_err(|e| PlacerError::Os {
            op: "UFFDIO_API",
            source: io::Error::other(crate::precopy::error_chain(&e)),
        })?;
        if uffd.supported_features() & sys::UFFD_FEATURE_MINOR_SHMEM == 0 {
            return Err(PlacerError::NoMinorShmem);
        }
        Ok(Placer {
            uffd,
            views,
            page_size: memory.page_size() as usize,
            armed: false,
            foreign: true,
            pagemap: Some(pagemap),
        })
    }

    /// The pages another process's views map at the moment (present in its page tables),
    /// from one `PAGEMAP_SCAN` walk, or from the classic pagemap entries on kernels without
    /// it; `None` for local memory.
    pub fn mapped_in_views(&self) -> Result<Option<crate::PageBitmap>, PlacerError> {
        let Some(pm) = &self.pagemap else { return Ok(None) };
        let total = self.views.last().map_or(0, |v| v.base + v.pages);
        let mut out = crate::PageBitmap::new(total);
        if !pm.supports_scan() {
            let base = sys::os_page_size();
            let mut present = vec![false; 4096];
            for v in &self.views {
                let mut off = 0;
                while off < v.len {
                    let n = ((v.len - off) / base).min(present.len());
                    if n == 0 {
                        break;
                    }
                    pm.present_entries(v.addr + off, &mut present[..n])
                        .map_err(|e| PlacerError::Os { op: "reading pagemap (present pages)", source: e })?;
                    for (k, _) in present[..n].iter().enumerate().filter(|(_, p)| **p) {
                        out.set(v.base + (off + k * base) / self.page_size);
                    }
                    off += n * base;
                }
            }
            return Ok(Some(out));
        }
        let mut vec = vec![sys::PageRegion::default(); 1024];
        for v in &self.views {
            let (mut start, end) = (v.addr, v.addr + v.len);
            while start < end {
                let (n, walk_end) = match pm.scan_into(start, end, 0, sys::PAGE_IS_PRESENT, &mut vec) {
                    Ok(r) => r,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(PlacerError::Os { op: "PAGEMAP_SCAN (present pages)", source: e }),
                };
                for r in &vec[..n] {
                    let s = (r.start as usize).max(v.addr) - v.addr;
                    let e = (r.end as usize).min(end) - v.addr;
                    let (first, last) = (s / self.page_size, e.div_ceil(self.page_size).min(v.pages));
                    if last > first {
                        out.set_range(v.base + first, last - first);
                    }
                }
                start = if walk_end > start {
                    walk_end
                } else if n > 0 {
                    vec[n - 1].end as usize
                } else {
                    break;
                };
            }
        }
        Ok(Some(out))
    }

    /// Whether the guest's views are another process's ([`Placer::foreign`]).
    pub fn is_foreign(&self) -> bool {
        self.foreign
    }

    /// Registers the guest's views with userfaultfd (missing and minor faults). From now on,
    /// guest accesses to pages not installed block until they are installed.
    pub fn arm(&mut self) -> Result<(), PlacerError> {
        for v in &self.views {
            self.uffd
                .register_modes(v.addr, v.len, sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_MINOR)
                .map_err(os("register (missing + minor)"))?;
            self.armed = true;
            // Pages the guest's view maps already (an embedder's memory that was touched)
            // would never fault: unmap them from the view (after registering, so that no
            // access slips in between), and every access comes to us. Another process's
            // view is the caller's to clear (see `foreign`).
            if !self.foreign {
                sys::zap_mapping(v.addr, v.len).map_err(os("unmap (MADV_DONTNEED)"))?;
            }
        }
        Ok(())
    }

    /// The staging aliases, in page-space order (what the transport exposes).
    pub fn aliases(&self) -> Vec<Arc<Region>> {
        self.views.iter().map(|v| v.alias.clone()).collect()
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The region index and local page of page-space page `page`.
    fn locate(&self, page: usize) -> Option<(usize, usize)> {
        let i = self.views.partition_point(|v| v.base + v.pages <= page);
        let v = self.views.get(i)?;
        (page >= v.base).then(|| (i, page - v.base))
    }

    /// Splits `[first, first+n)` into per-region pieces: (region, local first page, pages).
    fn pieces(&self, first: usize, n: usize) -> Result<Vec<(usize, usize, usize)>, PlacerError> {
        let mut out = Vec::new();
        let (mut p, end) = (first, first.checked_add(n).ok_or(PlacerError::Range { first, n })?);
        while p < end {
            let (i, local) = self.locate(p).ok_or(PlacerError::Range { first, n })?;
            let k = (self.views[i].pages - local).min(end - p);
            out.push((i, local, k));
            p += k;
        }
        Ok(out)
    }

    /// The staging alias holding page-space page `page`, and the page's index in it.
    pub fn alias_of(&self, page: usize) -> Option<(&Arc<Region>, usize)> {
        self.locate(page).map(|(i, local)| (&self.views[i].alias, local))
    }

    /// Page-space page of a byte offset in the alias of region `index`.
    pub fn page_of_alias(&self, index: usize, offset: u64) -> Option<usize> {
        let v = self.views.get(index)?;
        let local = (offset / self.page_size as u64) as usize;
        (local < v.pages).then_some(v.base + local)
    }

    /// Region index of the alias with id `id`.
    pub fn alias_index(&self, id: RegionId) -> Option<usize> {
        self.views.iter().position(|v| v.alias.id() == id)
    }

    /// Maps pages `[first, first+n)`, whose content is in their staging alias, into the
    /// guest's view and wakes the threads waiting on them. A page already mapped is an
    /// error (EEXIST): every page is installed once.
    pub fn install(&self, first: usize, n: usize) -> Result<(), PlacerError> {
        for (i, local, k) in self.pieces(first, n)? {
            let start = self.views[i].addr + local * self.page_size;
            self.continue_range(start, k)?;
        }
        Ok(())
    }

    /// UFFDIO_CONTINUE over `k` pages at `start` of a guest's view. In another process's view
    /// a page may be mapped already (it touched the page before the placer was armed, and
    /// the page arrived before that): it shows the page cache, the arrived content, so it
    /// counts as installed and the rest of the range is installed page by page.
    fn continue_range(&self, start: usize, k: usize) -> Result<(), PlacerError> {
        match self.uffd.continue_range(start, k * self.page_size) {
            Err(e) if self.foreign && e.raw_os_error() == Some(libc::EEXIST) => {
                for j in 0..k {
                    match self.uffd.continue_range(start + j * self.page_size, self.page_size) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                            self.uffd.wake(start + j * self.page_size, self.page_size).map_err(os("wake"))?
                        }
                        Err(e) => return Err(PlacerError::Os { op: "continue", source: e }),
                    }
                }
                Ok(())
            }
            r => r.map_err(os("continue")),
        }
    }

    /// Makes pages `[first, first+n)` zero in the page cache (whatever they held before) and
    /// installs them.
    pub fn install_zero(&self, first: usize, n: usize) -> Result<(), PlacerError> {
        for (i, local, k) in self.pieces(first, n)? {
            let v = &self.views[i];
            let fd = v.alias.fd().ok_or(PlacerError::NotShared { index: i, backing: v.alias.backing() })?;
            let ps = self.page_size as u64;
            sys::fallocate_zero(fd, local as u64 * ps, k as u64 * ps).map_err(os("zero (fallocate)"))?;
            self.continue_range(v.addr + local * self.page_size, k)?;
        }
        Ok(())
    }

    /// Drops whatever the page cache holds for pages `[first, first+n)` (they read as zeros
    /// once installed or once placement ends). The pages must not be installed: punching
    /// unmaps them from the guest's view too.
    pub fn punch(&self, first: usize, n: usize) -> Result<(), PlacerError> {
        for (i, local, k) in self.pieces(first, n)? {
            let v = &self.views[i];
            let fd = v.alias.fd().ok_or(PlacerError::NotShared { index: i, backing: v.alias.backing() })?;
            let ps = self.page_size as u64;
            sys::punch_hole(fd, local as u64 * ps, k as u64 * ps).map_err(os("zero (punch)"))?;
        }
        Ok(())
    }

    /// A fault on `page`, installed already: maps it again if it lost its mapping (from the
    /// page cache, or as a zero page if its page cache entry is gone too), else wakes the
    /// threads waiting on it.
    pub fn reinstall(&self, page: usize) -> Result<(), PlacerError> {
        let (i, local) = self.locate(page).ok_or(PlacerError::Range { first: page, n: 1 })?;
        let start = self.views[i].addr + local * self.page_size;
        match self.uffd.continue_range(start, self.page_size) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.wake(page),
            // No page in the cache (a hole punched by the embedder): it reads as zeros.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => self.install_zero(page, 1),
            Err(e) => Err(PlacerError::Os { op: "continue", source: e }),
        }
    }

    /// Wakes the threads waiting on `page` (a fault whose page was installed meanwhile).
    pub fn wake(&self, page: usize) -> Result<(), PlacerError> {
        let (i, local) = self.locate(page).ok_or(PlacerError::Range { first: page, n: 1 })?;
        let start = self.views[i].addr + local * self.page_size;
        self.uffd.wake(start, self.page_size).map_err(os("wake"))
    }

    /// Waits up to `timeout` for faults and appends the page-space pages that faulted to
    /// `out` (a page may appear more than once: several threads fault on it).
    pub fn wait_faults(&self, timeout: Duration, out: &mut Vec<usize>) -> Result<(), PlacerError> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        if !sys::poll_in(self.uffd.raw(), ms).map_err(os("poll"))? {
            return Ok(());
        }
        let mut buf = [UffdMsg::default(); 64];
        loop {
            let n = self.uffd.read_msgs(&mut buf).map_err(os("read events"))?;
            for m in &buf[..n] {
                if m.event != sys::UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = m.address as usize;
                if let Some(page) = self.views.iter().find_map(|v| {
                    (addr >= v.addr && addr < v.addr + v.len).then(|| v.base + (addr - v.addr) / self.page_size)
                }) {
                    out.push(page);
                }
            }
            if n < buf.len() {
                return Ok(());
            }
        }
    }
}

impl Drop for Placer {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Pages never installed would block their faulting threads forever once nobody
        // serves the descriptor; unregistering turns later accesses into plain page-cache
        // faults (the memory is then whatever the page cache holds).
        for v in &self.views {
            let _ = self.uffd.unregister(v.addr, v.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_transport::Access;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn memory(pages: &[u64]) -> GuestMemory {
        let regions = pages
            .iter()
            .enumerate()
            .map(|(i, &p)| Arc::new(Region::memfd(i as u32 + 1, p * 4096, 4096, Access::LOCAL).unwrap()))
            .collect();
        GuestMemory::new(regions).unwrap()
    }

    /// A guest thread reads pages that fault; the handler places each through the alias and
    /// installs it; the guest sees exactly what was placed (missing faults), then old data
    /// in the page cache is replaced before installation (minor faults), and zero pages
    /// become zero whatever they held.
    #[test]
    fn faults_are_served_through_the_alias_without_a_copy() {
        let mem = memory(&[8, 8]);
        // Old content in region 1's page cache (an embedder's memfd is not fresh).
        mem.regions()[1].write_at(0, &[0xEE; 4096 * 8]);
        let aliases = staging_aliases(&mem, |i| 100 + i as u32, Access::LOCAL).unwrap();
        let mut placer = Placer::new(&mem, &aliases).unwrap();
        placer.arm().unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let guest = s.spawn(|| {
                let mut seen = Vec::new();
                for p in 0..16usize {
                    let (i, local) = mem.locate(p).unwrap();
                    let mut b = [0u8; 8];
                    assert!(mem.regions()[i].read_at(local as u64 * 4096 + 8, &mut b));
                    seen.push(u64::from_le_bytes(b));
                }
                done.store(true, Ordering::SeqCst);
                seen
            });
            let mut faults = Vec::new();
            let mut served = 0;
            while !done.load(Ordering::SeqCst) {
                faults.clear();
                placer.wait_faults(Duration::from_millis(50), &mut faults).unwrap();
                for &p in &faults {
                    let (alias, local) = placer.alias_of(p).unwrap();
                    if p % 4 == 3 {
                        placer.install_zero(p, 1).unwrap();
                    } else {
                        let mut page = vec![0u8; 4096];
                        page[8..16].copy_from_slice(&(p as u64 * 1000).to_le_bytes());
                        assert!(alias.write_at(local as u64 * 4096, &page));
                        placer.install(p, 1).unwrap();
                    }
                    served += 1;
                }
            }
            let seen = guest.join().unwrap();
            let want: Vec<u64> = (0..16u64).map(|p| if p % 4 == 3 { 0 } else { p * 1000 }).collect();
            assert_eq!(seen, want);
            assert_eq!(served, 16, "one fault per page");
        });
        // Installing twice is refused.
        assert!(placer.install(0, 1).is_err());
        assert!(matches!(placer.install(15, 2), Err(PlacerError::Range { .. })));
    }

    /// A page installed, then unmapped from the guest's view (reclaim, an embedder's
    /// MADV_DONTNEED), faults again: `reinstall` maps it again with its content.
    #[test]
    fn a_page_that_lost_its_mapping_is_mapped_again() {
        let mem = memory(&[4]);
        let aliases = staging_aliases(&mem, |_| 100, Access::LOCAL).unwrap();
        let mut placer = Placer::new(&mem, &aliases).unwrap();
        placer.arm().unwrap();
        assert!(aliases[0].write_at(4096, &[7u8; 4096]));
        placer.install(1, 1).unwrap();
        let view = &mem.regions()[0];
        sys::zap_mapping(view.as_ptr() as usize + 4096, 4096).unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut b = [0u8; 1];
                assert!(view.read_at(4096 + 9, &mut b));
                done.store(true, Ordering::SeqCst);
                b[0]
            });
            let mut faults = Vec::new();
            while !done.load(Ordering::SeqCst) {
                faults.clear();
                placer.wait_faults(Duration::from_millis(50), &mut faults).unwrap();
                for &p in &faults {
                    assert_eq!(p, 1);
                    placer.reinstall(p).unwrap();
                }
            }
            assert_eq!(reader.join().unwrap(), 7);
        });
        // Mapped: a second reinstall only wakes (EEXIST).
        placer.reinstall(1).unwrap();
    }

    #[test]
    fn anonymous_memory_is_refused() {
        let r = Arc::new(Region::anonymous(1, 4 * 4096, 4096, Access::LOCAL).unwrap());
        let mem = GuestMemory::single(r);
        assert!(matches!(staging_aliases(&mem, |_| 9, Access::LOCAL), Err(PlacerError::NotShared { index: 0, .. })));
    }
}
