//! Synchronous userfaultfd write-protect faults (fallback for kernels before 6.7).
//!
//! Protocol between the handler thread and `collect`, both under the `shared` lock:
//! - handler: for a fault on page P: mark P dirty, then un-protect P (which wakes the writer);
//! - collect: take the dirty set, then re-protect exactly those pages.
//!
//! Holding the lock across both steps on each side makes them atomic with respect to each
//! other. So a page reported by `collect` is either protected again before its writer could
//! continue (the write is caught next round) or was written before `collect` re-protected it
//! (the caller's copy, made after `collect` returns, sees the write). No write is lost.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use livemig_transport::{Backing, PageBitmap, Region};

use super::sys::{self, EventFd, Uffd, UffdMsg};
use super::{DirtyError, DirtyOp, DirtySource, Geometry};

/// How the sync tracker makes sure never-populated anonymous pages are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unpopulated {
    /// Use `UFFD_FEATURE_WP_UNPOPULATED` when the kernel has it (6.4+), else prefault.
    #[default]
    Auto,
    /// Always prefault anonymous regions for reading before arming (maps the zero page,
    /// allocates nothing, does not change contents). Shmem regions are never prefaulted:
    /// the kernel protects their holes with PTE markers.
    Prefault,
}

#[derive(Debug)]
struct State {
    dirty: PageBitmap,
    /// First error the handler hit; reported by the next `collect`.
    error: Option<(DirtyOp, io::Error)>,
}

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    geo: Geometry,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked (bit sets only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Handler {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

/// Dirty tracking with synchronous write-protect faults handled by a thread.
///
/// The first write to each protected page blocks its writer until the handler thread has
/// recorded the page and un-protected it. [`DirtySource::collect`] swaps the recorded set out
/// and re-protects those pages. Works on anonymous (private) memory and on shmem (memfd);
/// never-populated anonymous pages are handled as [`Unpopulated`] says.
#[derive(Debug)]
pub struct UffdSyncTracker {
    shared: Arc<Shared>,
    prefault: bool,
    registered: bool,
    handler: Option<Handler>,
    taken: PageBitmap,
}

impl UffdSyncTracker {
    /// A sync tracker for `region` with [`Unpopulated::Auto`].
    pub fn new(region: &Region) -> Result<Self, DirtyError> {
        Self::with_unpopulated(region, Unpopulated::Auto)
    }

    /// A sync tracker for `region`, choosing how unpopulated anonymous pages are handled.
    pub fn with_unpopulated(region: &Region, unpopulated: Unpopulated) -> Result<Self, DirtyError> {
        let geo = Geometry::of(region)?;
        let support = super::kernel_support()?;
        if !support.has_sync() {
            return Err(DirtyError::Unsupported {
                mechanism: "uffd-wp-sync",
                missing: "UFFD_FEATURE_PAGEFAULT_FLAG_WP".into(),
            });
        }
        let anonymous = region.backing() == Backing::Anonymous;
        let mut features = 0;
        if !anonymous && support.uffd_features & sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0 {
            features |= sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        }
        let prefault = anonymous && (unpopulated == Unpopulated::Prefault || !support.has_wp_unpopulated());
        if anonymous && !prefault {
            features |= sys::UFFD_FEATURE_WP_UNPOPULATED;
        }
        // No user-mode-only fallback: kernel-mode writes (a read(2) into the region) must
        // block and be recorded too, not fail with EFAULT.
        let uffd = Uffd::open(features, false)?;
        Ok(UffdSyncTracker {
            shared: Arc::new(Shared {
                uffd,
                geo,
                state: Mutex::new(State { dirty: PageBitmap::new(geo.pages), error: None }),
            }),
            prefault,
            registered: false,
            handler: None,
            taken: PageBitmap::new(geo.pages),
        })
    }

    /// Whether this tracker prefaults the region at start (see [`Unpopulated`]).
    pub fn prefaults(&self) -> bool {
        self.prefault
    }

    fn spawn_handler(&mut self) -> Result<(), DirtyError> {
        let stop = Arc::new(EventFd::new()?);
        let shared = self.shared.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("livemig-uffd-wp".into())
            .spawn(move || handler_loop(&shared, &stop2))
            .map_err(|source| DirtyError::Os { op: DirtyOp::SpawnHandler, source })?;
        self.handler = Some(Handler { stop, thread });
        Ok(())
    }

    fn stop_handler(&mut self) {
        if let Some(h) = self.handler.take() {
            if let Err(e) = h.stop.signal() {
                // Cannot happen for an eventfd below its maximum; don't join a thread that
                // would never wake.
                tracing::warn!(error = %e, "could not signal the write-fault handler; leaking it");
                return;
            }
            if h.thread.join().is_err() {
                tracing::warn!("the write-fault handler thread panicked");
            }
        }
    }
}

fn handler_loop(shared: &Shared, stop: &EventFd) {
    let mut msgs = [UffdMsg::default(); 64];
    let record = |op, e: io::Error| {
        let mut st = shared.lock();
        st.error.get_or_insert((op, e));
    };
    loop {
        let ready = match sys::poll2(shared.uffd.raw(), stop.raw()) {
            Ok(r) => r,
            Err(e) => return record(DirtyOp::Poll, e),
        };
        if ready.b != 0 {
            return;
        }
        if ready.a & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return record(DirtyOp::Poll, io::Error::other("userfaultfd reported an error condition"));
        }
        loop {
            let n = match shared.uffd.read_msgs(&mut msgs) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return record(DirtyOp::ReadEvents, e),
            };
            let geo = shared.geo;
            let mut st = shared.lock();
            for m in msgs[..n].iter().filter(|m| m.event == sys::UFFD_EVENT_PAGEFAULT) {
                let page = (m.address as usize) & !(geo.os_page - 1);
                // Mark before un-protecting: the writer may run as soon as the page is open.
                geo.mark(&mut st.dirty, page, page + geo.os_page);
                if let Err(e) = shared.uffd.writeprotect(page, geo.os_page, false) {
                    // Release the writer regardless; the error surfaces at the next collect.
                    let _ = shared.uffd.wake(page, geo.os_page);
                    st.error.get_or_insert((DirtyOp::Unprotect, e));
                }
            }
        }
    }
}

impl DirtySource for UffdSyncTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        let geo = self.shared.geo;
        if !self.registered {
            if self.prefault {
                sys::populate_read(geo.base, geo.span, geo.os_page)?;
            }
            self.shared.uffd.register_wp(geo.base, geo.span)?;
            self.registered = true;
        }
        {
            let mut st = self.shared.lock();
            self.shared
                .uffd
                .writeprotect(geo.base, geo.span, true)
                .map_err(|source| DirtyError::Os { op: DirtyOp::WriteProtect, source })?;
            st.dirty.clear_all();
            st.error = None;
        }
        if self.handler.is_none() {
            self.spawn_handler()?;
        }
        Ok(())
    }

    fn collect(&mut self, into: &mut PageBitmap) -> Result<usize, DirtyError> {
        if self.handler.is_none() {
            return Err(DirtyError::NotStarted);
        }
        let geo = self.shared.geo;
        geo.check_bitmap(into)?;
        self.taken.clear_all();
        {
            let mut st = self.shared.lock();
            if let Some((op, source)) = st.error.take() {
                return Err(DirtyError::Os { op, source });
            }
            std::mem::swap(&mut st.dirty, &mut self.taken);
            for (first, n) in self.taken.runs() {
                let (addr, len) = geo.os_range(first, n);
                self.shared
                    .uffd
                    .writeprotect(addr, len, true)
                    .map_err(|source| DirtyError::Os { op: DirtyOp::WriteProtect, source })?;
            }
        }
        into.or_assign(&self.taken);
        Ok(self.taken.count_ones())
    }

    fn stop(&mut self) {
        // Handler first, so it never sees the registration vanish under a pending event;
        // un-protecting then wakes any writer still blocked on a fault.
        self.stop_handler();
        if !self.registered {
            return;
        }
        let geo = self.shared.geo;
        if let Err(e) = self.shared.uffd.writeprotect(geo.base, geo.span, false) {
            tracing::warn!(error = %e, "un-protecting the region failed");
            let _ = self.shared.uffd.wake(geo.base, geo.span);
        }
        if let Err(e) = self.shared.uffd.unregister(geo.base, geo.span) {
            tracing::warn!(error = %e, "unregistering the region failed");
        }
        self.registered = false;
    }

    fn mechanism(&self) -> &'static str {
        if self.prefault {
            "uffd-wp-sync(prefault)"
        } else {
            "uffd-wp-sync"
        }
    }
}

impl Drop for UffdSyncTracker {
    fn drop(&mut self) {
        self.stop();
    }
}
