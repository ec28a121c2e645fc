//! livemig-qemu: livemig as the carrier of QEMU migrations, and a QMP controller.
//!
//! - [`relay`]: full-duplex `splice(2)` relay between two sockets.
//! - [`qmp`]: a small synchronous QMP client (bounded waits, events queued apart).
//! - [`carrier`]: QEMU's migration connections as byte channels of one livemig session, and
//!   the destination carrier that prepares its QEMU and reports how it ended.
//! - [`controller`]: livemig's convergence policies fed with QEMU's per-pass figures.
//! - Disks move with the migration through `livemig_storage::cli::together`, handed over
//!   while QEMU waits in `pre-switchover`.
//! - [`external`]: external RAM — QEMU's guest RAM moved by livemig's engine (needs QEMU with
//!   livemig's patch), QEMU's stream carrying the device state.
//! - [`migrate`]: `livemig qemu migrate` — the source QEMU driven over QMP through the carrier.
//! - [`ram`]: `livemig qemu migrate --ram livemig` — the engine moves QEMU's RAM, QEMU's
//!   stream the device state.
//! - [`cli`]: the commands.

pub mod carrier;
pub mod cli;
pub mod controller;
pub mod external;
pub mod migrate;
pub mod qmp;
pub mod ram;
pub mod relay;
