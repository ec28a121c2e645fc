//! A page corrupted in flight is caught by the switchover checksum (needs the engine's
//! `fault-injection` feature: `cargo test -p livemig-tests --features
//! livemig-tests/fault-injection --test precopy_fault`). Its own test binary, because the
//! fault is switched on through the process environment.

use std::time::Duration;

use livemig_engine::precopy::{DestConfig, DestError, SourceConfig, SourceError, FAULT_INJECTION};
use livemig_tests::{makes_progress, receive_workload, workload_params, Conn};
use livemig_transport::TcpConfig;
use livemig_workload::{RunState, WorkloadKind, WorkloadParams};

#[test]
fn corrupted_page_is_detected_and_the_source_resumes() {
    if !FAULT_INJECTION {
        eprintln!("skipped: build with --features livemig-tests/fault-injection");
        return;
    }
    std::env::set_var("LIVEMIG_CORRUPT_PAGE", "5");
    let len = 16u64 << 20;
    // TCP with the backend's default I/O timeout.
    let conn = Conn::tcp(TcpConfig::default().io_timeout);

    let (addr, dst) = conn.spawn_dest(len, 4096, |mut t, dregion| {
        receive_workload(t.as_mut(), &dregion, &DestConfig::default(), &mut |_, _, _| {})
    });

    let p = WorkloadParams { rate_pages_per_sec: 2000, seed: 1, ..workload_params(WorkloadKind::Seq, 512, 1) };
    let mut s = conn.start_source(&addr, len, 4096, p);
    let cfg = SourceConfig { ..Default::default() };
    let err =
        livemig_tests::migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg, &mut |_| {}).unwrap_err();
    let SourceError::ChecksumMismatch { source_sum, dest_sum } = &err else { panic!("{err:?}") };
    assert_ne!(source_sum, dest_sum);
    eprintln!("source: {err}");
    // The destination did not take over, so the source workload runs again.
    let w = &s.workload;
    assert_eq!(w.state(), RunState::Running);
    assert!(makes_progress(w, Duration::from_millis(100)));
    match dst.join().unwrap() {
        Err(e @ DestError::ChecksumMismatch { .. }) => eprintln!("destination: {e}"),
        other => panic!("destination: {other:?}"),
    }
}
