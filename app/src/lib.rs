//! livemig's command-line layer, beside the thin binary: argument parsing (clap), progress
//! bars (indicatif), signal handling, the `migrate`/`receive` commands and the
//! network-namespace and tc setup of `migrate --local`. The engine and the transport are
//! libraries without any of this.

pub mod args;
pub mod beside;
pub mod cleanup;
pub mod local;
pub mod open;
pub mod precopy;
