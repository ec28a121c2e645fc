//! A page corrupted in flight during a post-copy push is caught by the digest comparison at
//! the end (needs the engine's `fault-injection` feature: `cargo test -p livemig-tests
//! --features livemig-tests/fault-injection --test postcopy_fault`). Its own test binary,
//! because the fault is switched on through the process environment.

use livemig_engine::postcopy::{PostcopyConfig, PostcopyDestError, PostcopyError, PushOrder};
use livemig_engine::precopy::FAULT_INJECTION;
use livemig_tests::postcopy_pair_filled;

#[test]
fn corrupted_page_is_detected_at_both_ends() {
    if !FAULT_INJECTION {
        eprintln!("skipped: build with --features livemig-tests/fault-injection");
        return;
    }
    std::env::set_var("LIVEMIG_CORRUPT_PAGE", "1000");
    let cfg = PostcopyConfig { order: PushOrder::Linear, ..Default::default() };
    // No guest threads at the destination: every data page is pushed, page 1000 included.
    let run = postcopy_pair_filled(16 << 20, None, &cfg, 2048, false);
    let err = run.source.unwrap_err();
    eprintln!("source: {}", livemig_tests::error_chain(&err));
    let PostcopyError::HandedOver(inner) = &err else { panic!("{err:?}") };
    let PostcopyError::ChecksumMismatch { source_sum, dest_sum } = inner.as_ref() else { panic!("{inner:?}") };
    assert_ne!(source_sum, dest_sum);
    assert_eq!(source_sum, &run.source_digest, "the source's digest is its memory's");
    let derr = run.dest.unwrap_err();
    eprintln!("destination: {}", livemig_tests::error_chain(&derr));
    let PostcopyDestError::GuestLost { source, .. } = &derr else { panic!("{derr:?}") };
    assert!(matches!(source.as_ref(), PostcopyDestError::ChecksumMismatch { .. }), "{source:?}");
}
