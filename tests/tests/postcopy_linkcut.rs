//! Post-copy with the link cut at each step of the hand-over and during the push (needs the
//! engine's `fault-injection` feature, as `scripts/test.sh` builds). At most one copy of the
//! guest runs: before `Commit` the source resumes; from `Commit` on it stays paused, and a
//! destination whose guest started but whose pages stopped coming reports the guest lost.

use livemig_engine::postcopy::{PostcopyConfig, PostcopyDestError, PostcopyError};
use livemig_engine::precopy::FAULT_INJECTION;
use livemig_tests::{postcopy_pair_with, workload_params, Recover};
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
    let run = postcopy_pair_with(
        16 << 20,
        Some(params()),
        &PostcopyConfig::default(),
        0,
        false,
        Recover::Off,
        cut("DeviceState"),
    );
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
    let run =
        postcopy_pair_with(16 << 20, Some(params()), &PostcopyConfig::default(), 0, false, Recover::Off, cut("Commit"));
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
    let run =
        postcopy_pair_with(16 << 20, Some(params()), &PostcopyConfig::default(), 0, false, Recover::Off, cut("Placed"));
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

/// Recovery within this long in the tests below.
const RECOVER_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

/// A recovered migration: both sides report one recovery, the destination verified the
/// source's frozen memory, and its guest goes on.
fn assert_recovered(run: livemig_tests::PostcopyRun) -> (u64, u64) {
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    eprintln!("source: {}", s.render());
    eprintln!("destination: {d:?}");
    assert_eq!((s.recoveries, d.recoveries), (1, 1), "one break, one recovery on both sides");
    assert_eq!(s.checksum, d.checksum);
    assert_eq!(s.checksum, run.source_digest, "the digest covers the frozen source memory");
    assert_eq!(run.source_workload.unwrap().state(), RunState::Idle, "handed over: never resumed");
    let w = run.workload.expect("the guest runs at the destination");
    livemig_tests::assert_still_running(&w, std::time::Duration::from_millis(300));
    (s.resent_pages, s.pushed_pages)
}

#[test]
fn a_link_cut_during_the_push_is_recovered_by_a_new_session() {
    if !FAULT_INJECTION {
        return;
    }
    let cfg = PostcopyConfig::default();
    let run = postcopy_pair_with(
        32 << 20,
        Some(params()),
        &cfg,
        2048,
        false,
        Recover::Within(RECOVER_WITHIN),
        cut("Placed#20"),
    );
    let (resent, pushed) = assert_recovered(run);
    // The batch whose Placed never went was written but not announced: sent again.
    assert!(resent >= 1, "{resent} pages sent again");
    assert!(pushed > 0);
}

#[test]
fn a_link_cut_before_the_verification_is_recovered_by_a_new_session() {
    if !FAULT_INJECTION {
        return;
    }
    let run = postcopy_pair_with(
        16 << 20,
        Some(params()),
        &PostcopyConfig::default(),
        1024,
        false,
        Recover::Within(RECOVER_WITHIN),
        cut("Final"),
    );
    assert_recovered(run);
}

#[test]
fn a_hybrid_link_cut_after_the_hand_over_is_recovered() {
    if !FAULT_INJECTION {
        return;
    }
    let run = postcopy_pair_with(
        16 << 20,
        Some(params()),
        &PostcopyConfig::default(),
        0,
        true,
        Recover::Within(RECOVER_WITHIN),
        cut("Final"),
    );
    assert_recovered(run);
}

#[test]
fn a_source_process_gone_after_the_hand_over_is_taken_over_from_its_frozen_memory() {
    if !FAULT_INJECTION {
        return;
    }
    let run = postcopy_pair_with(
        32 << 20,
        Some(params()),
        &PostcopyConfig::default(),
        2048,
        false,
        Recover::TakeOver(RECOVER_WITHIN),
        cut("Placed#10"),
    );
    let err = run.source.as_ref().unwrap_err();
    assert!(matches!(err, PostcopyError::HandedOver(_)), "the first source fails: {err:?}");
    let s =
        run.taken_over.expect("taken over").unwrap_or_else(|e| panic!("take-over: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    eprintln!("{}", s.render());
    assert_eq!((s.recoveries, d.recoveries), (1, 1));
    assert!(s.resent_pages > 0, "the pages the destination missed were sent by the new source");
    assert_eq!(s.checksum, d.checksum);
    assert_eq!(s.checksum, run.source_digest, "the digest covers the frozen source memory");
    let w = run.workload.expect("the guest runs at the destination");
    livemig_tests::assert_still_running(&w, std::time::Duration::from_millis(300));
}
