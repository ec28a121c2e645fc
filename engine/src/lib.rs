//! livemig-engine: migration strategies on top of `livemig-transport`, as a library a VMM
//! embeds (no command-line, progress-bar or signal handling here: that is `livemig-app`).
//!
//! - [`guest`]: the embedding API — guest memory of N regions, guest control with device
//!   state; the engine migrates memory it does not own.
//! - [`dirty`]: dirty-page sources: userfaultfd write-protect (asynchronous with
//!   PAGEMAP_SCAN where the kernel has it, synchronous faults otherwise) or a log the
//!   embedder hands over.
//! - [`integrity`]: order-independent page digests kept as pages move.
//! - [`policy`]: convergence policies (ibrahim = Algorithm 2, kvm, xen) as pure state
//!   machines driven with `now` passed in.
//! - [`precopy`]: pre-copy live migration (send schedule, source and destination drivers,
//!   control protocol, switchover state machine).
//! - [`connect`]: choosing and connecting a transport backend.
//! - [`open`]: the request that opens a service on a host daemon.

pub mod connect;
pub mod dirty;
pub mod guest;
pub mod integrity;
pub mod open;
pub mod policy;
pub mod postcopy;
pub mod precopy;

pub use livemig_transport::PageBitmap;
