//! The embedding API: the guest a migration moves, as the engine sees it.
//!
//! - [`GuestMemory`]: the guest's memory as N regions ([`Region`]s the embedder allocated
//!   through livemig, shares by file descriptor, or owns and hands over with
//!   `Region::from_raw`). The migration addresses it as one page space: region 0's pages
//!   first, then region 1's, and so on.
//! - [`GuestControl`]: pause, resume and the device state at the source.
//! - At the destination a closure receives the device state once the memory is verified and
//!   committed, and starts the guest.
//! - Which pages were written comes from a [`DirtySource`](crate::dirty::DirtySource)
//!   chosen per migration: userfaultfd write-protect for memory this process writes
//!   ([`crate::dirty::MemoryTracker`]), or a bitmap the embedder hands over each round
//!   ([`crate::dirty::ExternalDirtyLog`]: KVM's dirty log or ring, QEMU's migration bitmap).

use std::sync::Arc;

use livemig_transport::{PageBitmap, Region, RegionId};

/// Why a [`GuestMemory`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// No region.
    #[error("guest memory needs at least one region")]
    Empty,
    /// Regions must share one page size (the migration indexes one page space).
    #[error("region {id} has {page_size}-byte pages, region {first_id} {first}-byte pages; all regions must use one page size")]
    PageSize {
        /// The offending region.
        id: RegionId,
        /// Its page size.
        page_size: u32,
        /// The first region.
        first_id: RegionId,
        /// Its page size.
        first: u32,
    },
    /// Two regions share an id.
    #[error("region id {0} appears twice")]
    DuplicateId(RegionId),
}

/// Where each region's pages lie in a page space: region 0's first, then region 1's, …
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageLayout {
    /// First page of each region, plus the total at the end.
    bases: Vec<usize>,
}

impl PageLayout {
    /// The layout of regions with these page counts, in order.
    pub fn new(pages: impl IntoIterator<Item = usize>) -> Self {
        let mut bases = vec![0];
        for n in pages {
            bases.push(bases.last().copied().unwrap_or(0) + n);
        }
        Self { bases }
    }

    /// Regions.
    pub fn regions(&self) -> usize {
        self.bases.len() - 1
    }

    /// Pages in all regions.
    pub fn pages(&self) -> usize {
        self.bases[self.regions()]
    }

    /// First page of region `i`.
    pub fn base(&self, i: usize) -> usize {
        self.bases[i]
    }

    /// The region holding `page`, as (region index, page within it).
    pub fn locate(&self, page: usize) -> Option<(usize, usize)> {
        if page >= self.pages() {
            return None;
        }
        // The last base not above `page` (empty regions share a base with the next).
        let i = self.bases.partition_point(|&b| b <= page) - 1;
        Some((i, page - self.bases[i]))
    }
}

/// A guest's memory: regions in a fixed order, one page size.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    regions: Vec<Arc<Region>>,
    layout: PageLayout,
}

impl GuestMemory {
    /// Memory made of `regions`, in this order.
    pub fn new(regions: Vec<Arc<Region>>) -> Result<Self, MemoryError> {
        let first = regions.first().ok_or(MemoryError::Empty)?;
        let (first_id, first_ps) = (first.id(), first.page_size());
        for (i, r) in regions.iter().enumerate() {
            if r.page_size() != first_ps {
                return Err(MemoryError::PageSize { id: r.id(), page_size: r.page_size(), first_id, first: first_ps });
            }
            if regions[..i].iter().any(|o| o.id() == r.id()) {
                return Err(MemoryError::DuplicateId(r.id()));
            }
        }
        let layout = PageLayout::new(regions.iter().map(|r| r.pages()));
        Ok(Self { regions, layout })
    }

    /// Memory of a single region.
    pub fn single(region: Arc<Region>) -> Self {
        Self::new(vec![region]).expect("one region is always valid")
    }

    /// The regions, in order.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// The page size shared by every region.
    pub fn page_size(&self) -> u32 {
        self.regions[0].page_size()
    }

    /// Pages in all regions.
    pub fn pages(&self) -> usize {
        self.layout.pages()
    }

    /// The page-space layout.
    pub fn layout(&self) -> &PageLayout {
        &self.layout
    }

    /// Bytes in all regions.
    pub fn len(&self) -> u64 {
        self.regions.iter().map(|r| r.len()).sum()
    }

    /// Always false (regions are never empty).
    pub fn is_empty(&self) -> bool {
        self.pages() == 0
    }

    /// First global page of region `i`.
    pub fn base(&self, i: usize) -> usize {
        self.layout.base(i)
    }

    /// The region holding global page `page`, as (region index, page within it).
    pub fn locate(&self, page: usize) -> Option<(usize, usize)> {
        self.layout.locate(page)
    }

    /// Pages known to be zero without reading them, over the whole page space (see
    /// `Region::known_zero_pages`). A region without that information contributes none.
    pub fn known_zero_pages(&self) -> PageBitmap {
        let mut out = PageBitmap::new(self.pages());
        for (i, r) in self.regions.iter().enumerate() {
            if let Ok(z) = r.known_zero_pages() {
                for (start, n) in z.runs() {
                    out.set_range(self.layout.base(i) + start, n);
                }
            }
        }
        out
    }
}

/// Guest memory mapped by another process: a VMM (QEMU with livemig's patch) that shares
/// its memory's files with this process, which maps them itself (the regions of a
/// [`GuestMemory`]), and hands over a userfaultfd of its own address space. The ioctls on
/// that descriptor act on the VMM's mappings whoever issues them: livemig registers the
/// ranges it needs, write-protects them to track the guest's writes at a source
/// ([`crate::dirty::MemoryTracker::foreign`]), or serves the guest's faults at a destination
/// ([`crate::postcopy::Placer::foreign`]).
#[derive(Debug)]
pub struct Foreign {
    /// The VMM's process id (its `/proc/PID/pagemap` is scanned for written pages).
    pub pid: u32,
    /// A userfaultfd of the VMM's address space, created there and not configured yet
    /// (or configured by an earlier receiver of the same kind).
    pub uffd: std::os::fd::OwnedFd,
    /// Where each region of the memory is mapped in the VMM, in page-space order.
    pub addrs: Vec<usize>,
}

/// A failure of the embedder's guest (pausing, resuming, saving or loading its state).
#[derive(Debug, thiserror::Error)]
#[error("{op} failed")]
pub struct GuestError {
    /// What the engine asked for (`pause`, `resume`, `save state`, `start`).
    pub op: &'static str,
    /// The embedder's error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl GuestError {
    /// Wraps an embedder error for operation `op`.
    pub fn new(op: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { op, source: source.into() }
    }
}

/// The guest at the source, as the engine drives it.
///
/// Order of calls in a completed migration: [`pause`](Self::pause) (downtime starts),
/// [`save_state`](Self::save_state), then [`handed_over`](Self::handed_over) once the
/// destination runs. If the migration fails before the handover, [`resume`](Self::resume)
/// follows `pause`. A migration that cannot know whether the destination took over (in
/// doubt) leaves the guest paused and calls neither.
pub trait GuestControl: Send {
    /// Stops every writer of guest memory; when this returns, nothing writes it until
    /// `resume`.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets the guest run again after a failed migration.
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The device state (vCPU registers, device models, anything outside guest memory),
    /// taken while paused and given to the destination's start closure.
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;
    /// The destination runs the guest, or is ready to (pre-copy: its memory is verified;
    /// post-copy: it resumed, and pages still follow): this paused copy must never run
    /// again. A VMM that moves its device state outside the engine (QEMU with external RAM
    /// sends it on its own migration stream) lets it go now.
    fn handed_over(&mut self) {}
    /// A monotonic count of the guest's work (pages touched, instructions, requests) for the
    /// rate figures of the summary; `None` when the embedder has none.
    fn progress(&self) -> Option<u64> {
        None
    }
}

/// A guest with no activity and no device state: plain memory (a checkpoint, a buffer).
#[derive(Debug, Default, Clone, Copy)]
pub struct Idle;

impl GuestControl for Idle {
    fn pause(&mut self) -> Result<(), GuestError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_transport::Access;

    fn region(id: RegionId, pages: u64, ps: u32) -> Arc<Region> {
        Arc::new(Region::anonymous(id, pages * ps as u64, ps, Access::LOCAL).unwrap())
    }

    #[test]
    fn page_space_spans_regions_in_order() {
        let m = GuestMemory::new(vec![region(1, 3, 4096), region(7, 5, 4096)]).unwrap();
        assert_eq!((m.pages(), m.len(), m.base(1)), (8, 8 * 4096, 3));
        assert_eq!(m.locate(0), Some((0, 0)));
        assert_eq!(m.locate(2), Some((0, 2)));
        assert_eq!(m.locate(3), Some((1, 0)));
        assert_eq!(m.locate(7), Some((1, 4)));
        assert_eq!(m.locate(8), None);
        m.regions()[1].write_at(4096, &[1]);
        let z = m.known_zero_pages();
        assert_eq!(z.count_ones(), 7);
        assert!(!z.get(4));
    }

    #[test]
    fn bad_memory_is_refused() {
        assert_eq!(GuestMemory::new(vec![]).unwrap_err(), MemoryError::Empty);
        assert!(matches!(
            GuestMemory::new(vec![region(1, 2, 4096), region(2, 1, 8192)]),
            Err(MemoryError::PageSize { id: 2, .. })
        ));
        assert_eq!(
            GuestMemory::new(vec![region(1, 2, 4096), region(1, 1, 4096)]).unwrap_err(),
            MemoryError::DuplicateId(1)
        );
    }
}
