//! Dirty-page tracking for memory of this process (a [`Region`]) on real kernel mechanisms.
//!
//! Two userfaultfd write-protect trackers implement [`DirtySource`]:
//!
//! - [`UffdAsyncTracker`] (Linux 6.7+): `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`.
//!   The kernel resolves write faults itself and leaves the PTE "written"; each
//!   [`DirtySource::collect`] is one `PAGEMAP_SCAN` walk of `/proc/self/pagemap` with
//!   `PM_SCAN_WP_MATCHING`, which reports the written pages and write-protects them again in
//!   the same page-table walk, so no write can fall between reporting and re-arming. Writers
//!   never leave user space on behalf of the tracker except for the first write per round.
//! - [`UffdSyncTracker`] (fallback, 5.7+ for anonymous memory, 5.19+ for shmem): classic
//!   synchronous write-protect faults. A handler thread reads fault events, marks the page
//!   in a shared bitmap and un-protects it, which wakes the writer. Each write to a clean page
//!   costs a round trip through the handler thread.
//!
//! [`open_tracker`] picks the asynchronous one when the kernel has it.
//!
//! **Never-populated anonymous pages.** Write-protection lives in PTEs, and an untouched
//! anonymous page has none, so protecting it would do nothing and its first write would go
//! unseen. The async tracker relies on `WP_UNPOPULATED` (the kernel installs a PTE marker).
//! The sync tracker uses `WP_UNPOPULATED` too when the kernel offers it (6.4+); otherwise it
//! prefaults the region for reading before arming (never-written pages map the shared zero
//! page, so this costs no memory), see [`Unpopulated`]. Shmem (memfd) regions always get PTE
//! markers from the kernel and are never prefaulted.
//!
//! **Granularity.** The kernel tracks system pages; results are mapped to the region's page
//! size (a written system page marks every region page it overlaps, and a dirty region page
//! larger than a system page is re-armed whole).
//!
//! **Lifetime.** A tracker records the region's address range, not a borrow: the kernel ties
//! the registration to the mapping, so if the region is unmapped first, later calls fail
//! with an error instead of touching memory. Drop the tracker before the region anyway.
//!
//! All `unsafe` code outside the tests is in the private `sys` module.

pub(crate) mod sys;
mod uffd_async;
mod uffd_sync;

#[cfg(test)]
mod tests;

use std::io;

use livemig_transport::{PageBitmap, Region};

use crate::guest::{Foreign, GuestMemory};

pub use uffd_async::UffdAsyncTracker;
pub use uffd_sync::{UffdSyncTracker, Unpopulated};

/// A source of dirty-page information for one region.
///
/// Lifecycle: [`start`](DirtySource::start) arms tracking (every page clean and
/// write-protected); each [`collect`](DirtySource::collect) reports the pages written since
/// the previous collect (or start) and re-arms exactly those; [`stop`](DirtySource::stop)
/// disarms and leaves the region writable at full speed. A tracker can be started again.
pub trait DirtySource: Send + std::fmt::Debug {
    /// Arms tracking: write-protects the whole region and forgets earlier writes.
    fn start(&mut self) -> Result<(), DirtyError>;

    /// ORs into `into` exactly the pages written since the previous `collect` or `start`,
    /// re-arms them, and returns how many pages this round found. `into` must cover the
    /// region's pages (indexed by the region's page size).
    fn collect(&mut self, into: &mut PageBitmap) -> Result<usize, DirtyError>;

    /// Disarms tracking and releases writers. Idempotent; also done on drop.
    fn stop(&mut self);

    /// Name of the kernel mechanism in use, for logs and reports.
    fn mechanism(&self) -> &'static str;
}

/// A kernel operation the dirty trackers perform (named in [`DirtyError::Os`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirtyOp {
    /// `userfaultfd(2)` or `/dev/userfaultfd`.
    OpenUserfaultfd,
    /// `UFFDIO_API` feature negotiation.
    UffdApi,
    /// `UFFDIO_REGISTER` in write-protect mode.
    Register,
    /// `UFFDIO_UNREGISTER`.
    Unregister,
    /// `UFFDIO_WRITEPROTECT` (protect).
    WriteProtect,
    /// `UFFDIO_WRITEPROTECT` (un-protect and wake).
    Unprotect,
    /// Opening `/proc/self/pagemap` (or another process's).
    OpenPagemap,
    /// The `PAGEMAP_SCAN` ioctl.
    PagemapScan,
    /// Reading userfaultfd events.
    ReadEvents,
    /// `poll(2)` in the fault handler.
    Poll,
    /// Creating the handler's wake-up eventfd.
    Eventfd,
    /// Spawning the fault-handler thread.
    SpawnHandler,
    /// Prefaulting anonymous pages before arming.
    Prefault,
}

impl std::fmt::Display for DirtyOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirtyOp::OpenUserfaultfd => "opening a userfaultfd",
            DirtyOp::UffdApi => "UFFDIO_API",
            DirtyOp::Register => "UFFDIO_REGISTER (write-protect mode)",
            DirtyOp::Unregister => "UFFDIO_UNREGISTER",
            DirtyOp::WriteProtect => "UFFDIO_WRITEPROTECT (protect)",
            DirtyOp::Unprotect => "UFFDIO_WRITEPROTECT (un-protect)",
            DirtyOp::OpenPagemap => "opening /proc/…/pagemap",
            DirtyOp::PagemapScan => "PAGEMAP_SCAN",
            DirtyOp::ReadEvents => "reading userfaultfd events",
            DirtyOp::Poll => "polling the userfaultfd",
            DirtyOp::Eventfd => "creating an eventfd",
            DirtyOp::SpawnHandler => "spawning the write-fault handler thread",
            DirtyOp::Prefault => "prefaulting anonymous pages",
        })
    }
}

/// Errors of the dirty trackers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// A system call or ioctl failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: DirtyOp,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks what this mechanism needs.
    #[error("the kernel does not support {mechanism}: {missing}")]
    Unsupported {
        /// The mechanism that was asked for.
        mechanism: &'static str,
        /// What is missing (feature names).
        missing: String,
    },
    /// The bitmap passed to `collect` is smaller than the region.
    #[error("bitmap covers {got} pages but the region has {need}")]
    BitmapTooSmall {
        /// Pages the bitmap covers.
        got: usize,
        /// Pages of the region.
        need: usize,
    },
    /// `collect` was called on a tracker that is not started.
    #[error("the tracker is not started")]
    NotStarted,
    /// The embedder's dirty log failed ([`ExternalDirtyLog`]).
    #[error("the embedder's dirty log failed")]
    External(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Memory of another process described inconsistently ([`MemoryTracker::foreign`]).
    #[error("foreign memory: {0}")]
    Foreign(String),
    /// The region's page size is not a multiple or divisor of the system page size.
    #[error("region page size {page} is incompatible with the system page size {os_page}")]
    PageSize {
        /// Region page size.
        page: usize,
        /// System page size.
        os_page: usize,
    },
}

/// What this kernel offers for dirty tracking (see [`kernel_support`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSupport {
    /// Feature bits reported by `UFFDIO_API`.
    pub uffd_features: u64,
    /// Whether `/proc/self/pagemap` implements `PAGEMAP_SCAN`.
    pub pagemap_scan: bool,
}

impl KernelSupport {
    /// Asynchronous write-protect with PAGEMAP_SCAN is usable.
    pub fn has_async(&self) -> bool {
        let need = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
        self.uffd_features & need == need && self.pagemap_scan
    }
    /// Synchronous write-protect faults are usable (on anonymous memory at least).
    pub fn has_sync(&self) -> bool {
        self.uffd_features & sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0
    }
    /// The kernel write-protects never-populated anonymous pages itself.
    pub fn has_wp_unpopulated(&self) -> bool {
        self.uffd_features & sys::UFFD_FEATURE_WP_UNPOPULATED != 0
    }
}

/// Probes the kernel: opens a throw-away userfaultfd to read its feature bits and tries an
/// empty `PAGEMAP_SCAN`.
pub fn kernel_support() -> Result<KernelSupport, DirtyError> {
    let probe = sys::Uffd::open(0, true)?;
    let pagemap_scan = sys::Pagemap::open().map(|p| p.supports_scan()).unwrap_or(false);
    Ok(KernelSupport { uffd_features: probe.supported_features(), pagemap_scan })
}

/// Opens the best tracker for `region`: [`UffdAsyncTracker`] when the kernel supports
/// asynchronous write-protect and PAGEMAP_SCAN, else [`UffdSyncTracker`]. The choice is
/// reported by [`DirtySource::mechanism`]. The tracker is not started.
pub fn open_tracker(region: &Region) -> Result<Box<dyn DirtySource>, DirtyError> {
    match UffdAsyncTracker::new(region) {
        Ok(t) => Ok(Box::new(t)),
        Err(DirtyError::Unsupported { mechanism, missing }) => {
            tracing::warn!(mechanism, %missing, "falling back to synchronous userfaultfd write-protect (slower)");
            Ok(Box::new(UffdSyncTracker::new(region)?))
        }
        Err(e) => Err(e),
    }
}

/// Userfaultfd tracking of every region of a [`GuestMemory`] (memory this process writes):
/// one tracker per region ([`open_tracker`]), reported in the memory's page space.
#[derive(Debug)]
pub struct MemoryTracker {
    parts: Vec<(usize, Box<dyn DirtySource>, PageBitmap)>,
}

impl MemoryTracker {
    /// Opens a tracker for each region of `memory`.
    pub fn open(memory: &GuestMemory) -> Result<Self, DirtyError> {
        let mut parts = Vec::with_capacity(memory.regions().len());
        for (i, r) in memory.regions().iter().enumerate() {
            parts.push((memory.base(i), open_tracker(r)?, PageBitmap::new(r.pages())));
        }
        Ok(Self { parts })
    }
}

impl DirtySource for MemoryTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        self.parts.iter_mut().try_for_each(|(_, t, _)| t.start())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<usize, DirtyError> {
        let mut n = 0;
        for (base, t, scratch) in &mut self.parts {
            if into.len() < *base + scratch.len() {
                return Err(DirtyError::BitmapTooSmall { got: into.len(), need: *base + scratch.len() });
            }
            scratch.clear_all();
            n += t.collect(scratch)?;
            for (start, len) in scratch.runs() {
                into.set_range(*base + start, len);
            }
        }
        Ok(n)
    }

    fn stop(&mut self) {
        self.parts.iter_mut().for_each(|(_, t, _)| t.stop());
    }

    fn mechanism(&self) -> &'static str {
        self.parts.first().map_or("none", |(_, t, _)| t.mechanism())
    }
}

impl MemoryTracker {
    /// Tracks writes to guest memory that another process maps — a VMM that shared its
    /// memory's files (`memory`'s regions are this process's mappings of them) and handed over
    /// a userfaultfd of its address space ([`Foreign`]): asynchronous write-protect registered
    /// through that descriptor on the VMM's own mappings, and `PAGEMAP_SCAN` over
    /// `/proc/PID/pagemap`, which reports and re-protects the pages its threads wrote. Needs
    /// the kernel's `WP_ASYNC` and `PAGEMAP_SCAN` (no synchronous fallback: a fault on
    /// another process's memory would stall its vCPUs on this one).
    pub fn foreign(memory: &GuestMemory, foreign: Foreign) -> Result<Self, DirtyError> {
        let Foreign { pid, uffd, addrs } = foreign;
        if addrs.len() != memory.regions().len() {
            return Err(DirtyError::Foreign(format!(
                "{} addresses for {} regions",
                addrs.len(),
                memory.regions().len()
            )));
        }
        let support = kernel_support()?;
        if !support.has_async() {
            return Err(DirtyError::Unsupported {
                mechanism: "uffd-wp-async on another process",
                missing: "UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, PAGEMAP_SCAN".into(),
            });
        }
        let uffd =
            std::sync::Arc::new(sys::Uffd::adopt(uffd, sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED)?);
        let pagemap = std::sync::Arc::new(sys::Pagemap::open_pid(pid)?);
        let mut parts = Vec::with_capacity(addrs.len());
        for (i, (r, &addr)) in memory.regions().iter().zip(&addrs).enumerate() {
            let geo = Geometry::new(addr, r.len() as usize, r.page_size() as usize, sys::os_page_size())?;
            let t = UffdAsyncTracker::with(uffd.clone(), pagemap.clone(), geo);
            parts.push((memory.base(i), Box::new(t) as Box<dyn DirtySource>, PageBitmap::new(r.pages())));
        }
        Ok(Self { parts })
    }
}

/// A dirty log the embedder keeps — KVM's dirty bitmap or ring, QEMU's migration bitmap,
/// a VMM's own write tracking — fed to the engine each round.
///
/// `sync` is called at every [`collect`](DirtySource::collect): it ORs into the bitmap (the
/// memory's page space) the pages written since its previous call, clears its own log, and
/// returns how many it reported. [`start`](DirtySource::start) calls it once and discards
/// the result, so writes before the migration are forgotten (the first pass sends every page
/// anyway). The embedder arms and disarms its logging itself.
pub struct ExternalDirtyLog<F> {
    pages: usize,
    name: &'static str,
    sync: F,
}

impl<F> ExternalDirtyLog<F>
where
    F: FnMut(&mut PageBitmap) -> Result<usize, DirtyError> + Send,
{
    /// A log over `pages` pages; `name` appears in reports (e.g. `kvm-dirty-log`).
    pub fn new(pages: usize, name: &'static str, sync: F) -> Self {
        Self { pages, name, sync }
    }
}

impl<F> std::fmt::Debug for ExternalDirtyLog<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalDirtyLog").field("pages", &self.pages).field("name", &self.name).finish()
    }
}

impl<F> DirtySource for ExternalDirtyLog<F>
where
    F: FnMut(&mut PageBitmap) -> Result<usize, DirtyError> + Send,
{
    fn start(&mut self) -> Result<(), DirtyError> {
        let mut scratch = PageBitmap::new(self.pages);
        (self.sync)(&mut scratch).map(|_| ())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<usize, DirtyError> {
        if into.len() < self.pages {
            return Err(DirtyError::BitmapTooSmall { got: into.len(), need: self.pages });
        }
        (self.sync)(into)
    }

    fn stop(&mut self) {}

    fn mechanism(&self) -> &'static str {
        self.name
    }
}

/// Address geometry of a tracked region: maps the kernel's byte ranges (system pages) to
/// region pages and back. Pure arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Base address (system-page aligned).
    pub base: usize,
    /// Region length in bytes.
    pub len: usize,
    /// `len` rounded up to system pages: the span registered with the kernel.
    pub span: usize,
    /// Region page size.
    pub page: usize,
    /// System page size.
    pub os_page: usize,
    /// Number of region pages.
    pub pages: usize,
}

impl Geometry {
    /// Geometry of `[base, base+len)` indexed by `page`-byte pages on a system with
    /// `os_page`-byte pages. One page size must be a multiple of the other.
    pub fn new(base: usize, len: usize, page: usize, os_page: usize) -> Result<Self, DirtyError> {
        let compatible = page > 0 && os_page > 0 && (page % os_page == 0 || os_page % page == 0);
        if !compatible || base % os_page != 0 {
            return Err(DirtyError::PageSize { page, os_page });
        }
        Ok(Geometry { base, len, span: len.div_ceil(os_page) * os_page, page, os_page, pages: len / page })
    }

    /// Geometry of a region on this system.
    pub fn of(region: &Region) -> Result<Self, DirtyError> {
        Self::new(region.as_ptr() as usize, region.len() as usize, region.page_size() as usize, sys::os_page_size())
    }

    /// Marks in `bm` every region page overlapping the kernel range `[start, end)`
    /// (absolute addresses, clamped to the region).
    pub fn mark(&self, bm: &mut PageBitmap, start: usize, end: usize) {
        let s = start.max(self.base) - self.base;
        let e = end.min(self.base + self.len).saturating_sub(self.base);
        if s >= e {
            return;
        }
        let first = s / self.page;
        let last = e.div_ceil(self.page).min(self.pages);
        bm.set_range(first, last - first);
    }

    /// The system-page-aligned absolute range `(addr, len)` covering region pages
    /// `first..first+n`, clamped to the registered span.
    pub fn os_range(&self, first: usize, n: usize) -> (usize, usize) {
        let s = (first * self.page) / self.os_page * self.os_page;
        let e = ((first + n) * self.page).div_ceil(self.os_page) * self.os_page;
        let e = e.min(self.span);
        (self.base + s, e.saturating_sub(s))
    }

    /// Checks that `bm` covers the region.
    pub fn check_bitmap(&self, bm: &PageBitmap) -> Result<(), DirtyError> {
        if bm.len() < self.pages {
            return Err(DirtyError::BitmapTooSmall { got: bm.len(), need: self.pages });
        }
        Ok(())
    }
}
