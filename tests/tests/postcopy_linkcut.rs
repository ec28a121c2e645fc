//! Post-copy with the link cut at each step of the hand-over and during the push (needs the
//! engine's `fault-injection` feature, as `scripts/test.sh` builds). At most one copy of the
//! guest runs: before `Commit` the source resumes; from `Commit` on it stays paused, and a
//! destination whose guest started but whose pages stopped coming reports the guest lost.

use livemig_engine::postcopy::{PostcopyConfig, PostcopyDestError, PostcopyError};
use livemig_engine::precopy::FAULT_INJECTION;
use livemig_tests::{postcopy_pair_with, workload_params};
use livemig_workload::{RunState, WorkloadKind, WorkloadParams};

#[cfg(feature = "fault-injection")]
fn cut(
    at: &'static str,
) -> impl FnOnce(Box<dyn livemig_transport::Transport>) -> Box<dyn livemig_transport::Transport> {
    move |t| Box::new(livemig_engine::precopy::cut::CutAt::new(t, Some(at)))
}
#[cfg(not(feature = "fault-injection"))]
fn cut(_: &'static str) -> impl FnOnce(Box<dyn livemig_transport::Transport>) -> Box<dyn livemig_transport::Transport> {
    |t| t
}

fn params() -> WorkloadParams {
    WorkloadParams { rate_pages_per_sec: 50_000, ..workload_params(WorkloadKind::Seq, 2048, 2) }
}

#[test]
fn cut_before_commit_resumes_the_source() {
    if !FAULT_INJECTION {
        eprintln!("skipped: build with --features livemig-tests/fault-injection");
        return;
    }
    let run = postcopy_pair_with(16 << 20, Some(params()), &PostcopyConfig::default(), 0, false, cut("DeviceState"));
    let err = run.source.unwrap_err();
    assert!(matches!(err, PostcopyError::Transport { .. }), "{err:?}");
    assert_eq!(run.source_workload.unwrap().state(), RunState::Running, "the source copy runs again");
    assert!(run.dest.is_err());
    assert!(run.workload.is_none(), "nothing started at the destination");
}

#[test]
fn cut_at_commit_leaves_the_source_paused() {
    if !FAULT_INJECTION {
        return;
    }
    let run = postcopy_pair_with(16 << 20, Some(params()), &PostcopyConfig::default(), 0, false, cut("Commit"));
    let err = run.source.unwrap_err();
    assert!(matches!(err, PostcopyError::InDoubt(_)), "{err:?}");
    assert_eq!(run.source_workload.unwrap().state(), RunState::Paused, "in doubt: held paused");
    assert!(run.workload.is_none(), "the destination never got Commit");
}

#[test]
fn cut_during_the_push_loses_the_destination_guest_and_keeps_the_source_paused() {
    if !FAULT_INJECTION {
        return;
    }
    let run = postcopy_pair_with(16 << 20, Some(params()), &PostcopyConfig::default(), 0, false, cut("Placed"));
    let err = run.source.unwrap_err();
    eprintln!("source: {}", livemig_tests::error_chain(&err));
    assert!(matches!(err, PostcopyError::HandedOver(_)), "{err:?}");
    assert_eq!(run.source_workload.unwrap().state(), RunState::Idle, "handed over: never resumed");
    // Its threads wait for pages that will never come (the process would exit, as
    // `livemig receive` does): never join them, whatever the assertions below say.
    let dest_workload = std::mem::ManuallyDrop::new(run.workload);
    assert!(dest_workload.is_some(), "the guest started at the destination");
    let derr = run.dest.unwrap_err();
    eprintln!("destination: {}", livemig_tests::error_chain(&derr));
    let PostcopyDestError::GuestLost { installed, pages, .. } = derr else { panic!("{derr:?}") };
    assert!(installed < pages, "pages were missing when the source went away");
}
