//! Post-copy live migration: the guest runs at the destination before its memory has
//! arrived; missing pages are requested on demand while the source pushes the rest.
//!
//! - [`prepage`]: the source's push order (push-only, bubbling with one or several pivots),
//!   a pure scheduler.
//! - [`pages`]: the destination's per-page state shared by the fault handler and the
//!   installers (missing → requested → installed), lock-free.
//! - [`source`] and [`dest`]: the drivers — hand-over, push with a demand responder, fault
//!   handling and installation, and the digest comparison that ends the migration.
//! - [`uffd`]: userfaultfd for a destination region: missing and minor faults on the
//!   guest's view of a memfd, pages written into a second mapping (the staging alias) and
//!   installed with `UFFDIO_CONTINUE`, without a copy.
//! - [`recover`]: a migration whose link broke after the hand-over taken over by a new
//!   session, as QEMU's `migrate-recover` does.

pub mod dest;
pub mod pages;
pub mod prepage;
pub mod recover;
pub mod source;
pub mod uffd;

pub use dest::{receive, receive_foreign, PostcopyDestConfig, PostcopyDestError, PostcopyDestReport, RunningGate};
pub use pages::{OnArrival, OnFault, OnLanded, OnZero, PageStates};
pub use prepage::{Demand, Expansion, Prepager, PushOrder};
pub use recover::{id_hex, new_id as new_migration_id, parse_id, Recovery, Relink, Relinked};
pub use source::{
    check_push, migrate, migrate_hybrid, take_over, PostcopyConfig, PostcopyError, PostcopyPhase, PostcopySummary,
    PushProgress, PushSettingsError, DEFAULT_BATCH_PAGES, DEFAULT_PUSH_WINDOW,
};
pub use uffd::{staging_aliases, Placer, PlacerError};
