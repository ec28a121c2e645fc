//! Post-copy over the RDMA verbs backend, in process, with the link cut during the push and
//! the migration taken over by a new session (queue pairs, registrations and the urgent
//! channel all new), as over TCP in `postcopy_linkcut.rs`.
//!
//! Needs an RDMA device and the engine's fault injection (the file is empty without the
//! `fault-injection` feature): `tests/rxe/run-verbs-tests.sh` builds it so (Soft-RoCE guest).
//! On a host without a device every test prints SKIPPED and passes.
#![allow(unexpected_cfgs)]
#![cfg(all(any(feature = "verbs", livemig_verbs), feature = "fault-injection"))]

use std::time::Duration;

use livemig_engine::postcopy::PostcopyConfig;
use livemig_tests::{postcopy_pair_over, workload_params, Recover};
use livemig_transport::verbs;
use livemig_transport::TransportKind;
use livemig_workload::{RunState, WorkloadKind, WorkloadParams};

fn params() -> WorkloadParams {
    WorkloadParams { rate_pages_per_sec: 20_000, ..workload_params(WorkloadKind::Seq, 512, 1) }
}

fn cut(
    at: &'static str,
) -> impl FnOnce(Box<dyn livemig_transport::Transport>) -> Box<dyn livemig_transport::Transport> {
    move |t| Box::new(livemig_engine::precopy::cut::CutAt::new(t, Some(at)))
}

#[test]
fn verbs_postcopy_link_cut_during_the_push_is_recovered() {
    if !verbs::device_test_guard("verbs_postcopy_link_cut_during_the_push_is_recovered") {
        return;
    }
    let run = postcopy_pair_over(
        TransportKind::Verbs,
        8 << 20,
        Some(params()),
        &PostcopyConfig::default(),
        1024,
        false,
        Recover::Within(Duration::from_secs(30)),
        cut("Placed#4"),
        None,
    );
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    eprintln!("{}", s.render());
    assert_eq!(s.transport, "verbs");
    assert_eq!((s.recoveries, d.recoveries), (1, 1));
    assert_eq!(s.checksum, d.checksum);
    assert_eq!(s.checksum, run.source_digest, "the digest covers the frozen source memory");
    assert_eq!(run.source_workload.unwrap().state(), RunState::Idle);
    let w = run.workload.expect("the guest runs at the destination");
    livemig_tests::assert_still_running(&w, Duration::from_millis(500));
}
