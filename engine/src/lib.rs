//! livemig-engine: migration strategies on top of `livemig-transport`.
//!
//! - [`dirty`]: dirty-page tracking on real kernel mechanisms (userfaultfd write-protect,
//!   asynchronous with PAGEMAP_SCAN where the kernel has it, synchronous faults otherwise).
//! - [`workload`]: synthetic workloads that run inside the migrated region and keep their
//!   state there, so the destination resumes them.
//! - [`policy`]: convergence policies (ibrahim = Algorithm 2, kvm, xen) as pure state
//!   machines driven with `now` passed in.
//! - [`precopy`]: pre-copy live migration of a running workload (source and destination
//!   drivers, control protocol, `migrate`/`receive` commands); [`local`] runs both ends on
//!   one machine, optionally through shaped network namespaces.

pub mod args;
pub mod connect;
pub mod dirty;
pub mod guest;
pub mod integrity;
pub mod local;
pub mod policy;
pub mod precopy;
pub mod workload;

pub use livemig_transport::PageBitmap;
