//! Asynchronous userfaultfd write-protect + PAGEMAP_SCAN (Linux 6.7+).

use std::sync::Arc;

use livemig_transport::{PageBitmap, Region};

use super::sys::{self, PageRegion, Pagemap, Uffd};
use super::{DirtyError, DirtyOp, DirtySource, Geometry};

/// Regions returned per PAGEMAP_SCAN call; the walk resumes at `walk_end` when it fills.
const SCAN_VEC: usize = 1024;

/// Dirty tracking with `UFFD_FEATURE_WP_ASYNC`: writes to protected pages are resolved by
/// the kernel without a fault message, and `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`
/// reports and re-protects the written pages in one atomic page-table walk.
///
/// Works on anonymous (private) and shmem (memfd) regions; with `WP_UNPOPULATED`
/// never-touched pages are protected too, so their first write is seen.
#[derive(Debug)]
pub struct UffdAsyncTracker {
    uffd: Arc<Uffd>,
    pagemap: Arc<Pagemap>,
    geo: Geometry,
    registered: bool,
    armed: bool,
    vec: Vec<PageRegion>,
    round: PageBitmap,
}

impl UffdAsyncTracker {
    /// Opens the userfaultfd and `/proc/self/pagemap` for `region`. Fails with
    /// [`DirtyError::Unsupported`] on kernels without `WP_ASYNC`, `WP_UNPOPULATED` or
    /// `PAGEMAP_SCAN`. Tracking starts with [`DirtySource::start`].
    pub fn new(region: &Region) -> Result<Self, DirtyError> {
        let geo = Geometry::of(region)?;
        let support = super::kernel_support()?;
        let mut missing = Vec::new();
        if support.uffd_features & sys::UFFD_FEATURE_WP_ASYNC == 0 {
            missing.push("UFFD_FEATURE_WP_ASYNC");
        }
        if support.uffd_features & sys::UFFD_FEATURE_WP_UNPOPULATED == 0 {
            missing.push("UFFD_FEATURE_WP_UNPOPULATED");
        }
        if !support.pagemap_scan {
            missing.push("PAGEMAP_SCAN");
        }
        if !missing.is_empty() {
            return Err(DirtyError::Unsupported { mechanism: "uffd-wp-async", missing: missing.join(", ") });
        }
        // Async faults are resolved in the kernel, so restricting the fd to user-mode faults
        // (the unprivileged fallback) loses nothing.
        let uffd = Uffd::open(sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED, true)?;
        let pagemap = Pagemap::open()?;
        Ok(Self::with(Arc::new(uffd), Arc::new(pagemap), geo))
    }

    /// A tracker of the range `geo` through a configured `uffd` and the pagemap of the
    /// address space it belongs to (this process's or another's; several trackers may share
    /// both).
    pub(super) fn with(uffd: Arc<Uffd>, pagemap: Arc<Pagemap>, geo: Geometry) -> Self {
        UffdAsyncTracker {
            uffd,
            pagemap,
            geo,
            registered: false,
            armed: false,
            vec: vec![PageRegion::default(); SCAN_VEC],
            round: PageBitmap::new(geo.pages),
        }
    }
}

impl DirtySource for UffdAsyncTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        if !self.registered {
            self.uffd.register_wp(self.geo.base, self.geo.span)?;
            self.registered = true;
        }
        self.uffd
            .writeprotect(self.geo.base, self.geo.span, true)
            .map_err(|source| DirtyError::Os { op: DirtyOp::WriteProtect, source })?;
        self.armed = true;
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<usize, DirtyError> {
        if !self.armed {
            return Err(DirtyError::NotStarted);
        }
        self.geo.check_bitmap(into)?;
        self.round.clear_all();
        let end = self.geo.base + self.geo.span;
        let mut start = self.geo.base;
        while start < end {
            let scan = self.pagemap.scan_into(
                start,
                end,
                sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                sys::PAGE_IS_WRITTEN,
                &mut self.vec,
            );
            let (n, walk_end) = match scan {
                Ok(r) => r,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(source) => return Err(DirtyError::Os { op: DirtyOp::PagemapScan, source }),
            };
            for r in &self.vec[..n] {
                self.geo.mark(&mut self.round, r.start as usize, r.end as usize);
            }
            // The walk stops early only when the vector is full; everything before walk_end
            // has been reported and re-protected.
            if walk_end <= start {
                if n == 0 {
                    break;
                }
                // Defensive: never loop without progress.
                start = self.vec[n - 1].end as usize;
            } else {
                start = walk_end;
            }
        }
        into.or_assign(&self.round);
        Ok(self.round.count_ones())
    }

    fn stop(&mut self) {
        self.armed = false;
        if !self.registered {
            return;
        }
        if let Err(e) = self.uffd.writeprotect(self.geo.base, self.geo.span, false) {
            tracing::warn!(error = %e, "un-protecting the region failed");
        }
        if let Err(e) = self.uffd.unregister(self.geo.base, self.geo.span) {
            tracing::warn!(error = %e, "unregistering the region failed");
        }
        self.registered = false;
    }

    fn mechanism(&self) -> &'static str {
        "uffd-wp-async+pagemap-scan"
    }
}

impl Drop for UffdAsyncTracker {
    fn drop(&mut self) {
        self.stop();
    }
}
