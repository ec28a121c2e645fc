//! livemig-image: the image repository of the lazy-deployment paper (sections 3.1–3.3):
//! images striped into checksummed chunks, versions and clones that share unmodified
//! chunks, kept in a local directory or an S3-API object store; served to QEMU and other NBD
//! clients lazily through the mirroring module, with CLONE and COMMIT on a served disk.
//!
//! - [`manifest`]: a version's manifest (pure: encode, decode, validate).
//! - [`store`]: the object store (local directory or S3) behind blocking, time-bounded calls.
//! - [`repo`]: push, clone, commit, export, and checked chunk reads.
//! - [`base`]: an image version as the base a mirror reads from.
//! - [`cli`]: `livemig image push|ls|serve|clone|commit|export`.

pub mod base;
pub mod cli;
pub mod manifest;
pub mod repo;
pub mod store;
