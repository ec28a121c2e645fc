//! Post-copy live migration: the guest runs at the destination before its memory has
//! arrived; missing pages are requested on demand while the source pushes the rest.
//!
//! - [`prepage`]: the source's push order (push-only, bubbling with one or several pivots),
//!   a pure scheduler.
//! - [`pages`]: the destination's per-page state shared by the fault handler and the
//!   installers (missing → requested → installed), lock-free.
//! - [`uffd`]: userfaultfd for a destination region: missing and minor faults on the
//!   guest's view of a memfd, pages written into a second mapping (the staging alias) and
//!   installed with `UFFDIO_CONTINUE`, without a copy.

pub mod pages;
pub mod prepage;
pub mod uffd;

pub use pages::{OnArrival, OnFault, PageStates};
pub use prepage::{Demand, Expansion, Prepager, PushOrder};
pub use uffd::{Placer, PlacerError};
