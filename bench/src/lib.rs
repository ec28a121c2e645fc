//! Page and chunk transfer benchmarks behind `livemig bench pages|chunks`.
//!
//! One side (`--listen`) exposes a destination region; the other (`--connect`) fills the
//! dirty pages of a source region, coalesces them into work requests and posts them for
//! `--duration`, then both compare SHA-256 checksums of the whole region. `--loopback` runs
//! the listener as a child process of the same binary, so two processes take part.

pub mod pages;
pub mod urgent;
