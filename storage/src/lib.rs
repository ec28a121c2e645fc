//! livemig-storage: disks as a read-only base image plus locally held chunks (the mirroring
//! module of the lazy-deployment paper, section 3.3), served to real clients over NBD.
//!
//! - [`chunks`]: the pure per-chunk state (one contiguous local range per chunk, the
//!   ModifiedSet) and the fetch plans for reads and writes.
//! - [`base`]: where the base comes from (a local image file, a directory of chunks).
//! - [`mirror`]: the disk (local file + chunk map, persisted beside it).
//! - [`nbd`]: the NBD protocol and server.
//! - [`transfer`]: live storage transfer (hybrid push / prioritized prefetch) as pure
//!   source and destination state machines.
//! - [`disk`]: what the NBD server serves.
//! - [`live`]: live transfer drivers over a livemig session (source, destination, messages).
//! - [`cli`]: `livemig disk serve|migrate|switchover|status|receive`.

pub mod base;
pub mod chunks;
pub mod cli;
pub mod disk;
pub mod live;
pub mod mirror;
pub mod nbd;
pub mod transfer;
