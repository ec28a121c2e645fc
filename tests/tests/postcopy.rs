//! Post-copy migrations in process over TCP loopback: the guest resumes at the destination
//! at once, its pages follow (pushed, and demanded by its faults through userfaultfd), and
//! the migration ends with the destination's digest equal to the frozen source memory's.

use std::time::Duration;

use livemig_engine::postcopy::{Expansion, PostcopyConfig, PushOrder};
use livemig_tests::{hybrid_pair, makes_progress, postcopy_pair, workload_params};
use livemig_workload::{RunState, WorkloadKind, WorkloadParams};

const MIB: u64 = 1 << 20;

fn check(order: PushOrder, kind: WorkloadKind) {
    let cfg = PostcopyConfig { order, ..Default::default() };
    let p = WorkloadParams { rate_pages_per_sec: 0, ..workload_params(kind, 8192, 2) };
    let run = postcopy_pair(64 * MIB, Some(p), &cfg);
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    eprintln!("{}", s.render());
    eprintln!("{d:?}");
    // The digest both sides agreed on is the source memory's, computed independently.
    assert_eq!(s.checksum, run.source_digest);
    assert_eq!(d.checksum, run.source_digest);
    // Every page crossed exactly once (pushed, demanded or zero).
    assert_eq!(s.pushed_pages + s.demanded_pages + s.zero_pages, 64 * MIB / 4096);
    assert_eq!(d.pushed_pages + d.urgent_pages + d.zero_pages, 64 * MIB / 4096);
    assert_eq!(d.urgent_pages, s.demanded_pages);
    // The guest faulted on pages it had not got yet and asked for them.
    assert!(d.demand_requests > 0, "no demand request: {d:?}");
    assert!(d.fault_p50_us.is_some());
    // It runs at the destination.
    let w = run.workload.expect("the workload started at the destination");
    assert_eq!(w.state(), RunState::Running);
    assert!(makes_progress(&w, Duration::from_millis(100)));
}

#[test]
fn postcopy_bubbling_moves_a_running_writer() {
    check(PushOrder::Bubbling { pivots: 7, expansion: Expansion::Dual }, WorkloadKind::Random);
}

#[test]
fn postcopy_push_only_moves_a_running_writer() {
    check(PushOrder::Linear, WorkloadKind::Seq);
}

#[test]
fn postcopy_single_forward_pivot_moves_a_reader() {
    check(PushOrder::Bubbling { pivots: 1, expansion: Expansion::Forward }, WorkloadKind::Readonly);
}

#[test]
fn postcopy_idle_guest_is_mostly_zero_pages() {
    let run = postcopy_pair(32 * MIB, None, &PostcopyConfig::default());
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    assert_eq!(s.checksum, run.source_digest);
    assert_eq!(d.checksum, run.source_digest);
    assert_eq!(s.zero_pages, 32 * MIB / 4096, "a never-touched region is all zero pages");
    assert_eq!(s.pushed_pages + s.demanded_pages, 0);
}

#[test]
fn hybrid_sends_only_the_pages_written_during_the_pass_after_the_hand_over() {
    // A slow writer over part of the memory: most pages are current after the pass.
    let p = WorkloadParams { rate_pages_per_sec: 20_000, ..workload_params(WorkloadKind::Random, 4096, 1) };
    let run = hybrid_pair(64 * MIB, Some(p), &PostcopyConfig::default());
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    eprintln!("{}", s.render());
    eprintln!("{d:?}");
    assert_eq!(s.strategy, "hybrid");
    assert_eq!(s.checksum, run.source_digest);
    assert_eq!(d.checksum, run.source_digest);
    let pass = s.precopy_pages.expect("a pre-copy pass");
    let invalidated = s.invalidated_pages.expect("the pages written during the pass");
    assert!(pass > 0 && invalidated > 0, "{s:?}");
    // After the hand-over only the invalidated pages cross, pushed or demanded.
    assert_eq!(s.pushed_pages + s.demanded_pages, invalidated);
    assert_eq!(d.pushed_pages + d.urgent_pages, invalidated);
    let w = run.workload.expect("the workload started at the destination");
    assert_eq!(w.state(), RunState::Running);
    assert!(makes_progress(&w, Duration::from_millis(100)));
}

#[test]
fn precopy_rounds_hand_over_to_postcopy_when_the_policy_decides() {
    // A writer flat out over a working set: pre-copy rounds resend it until the policy sees
    // it does not converge; post-copy moves what is still dirty then.
    let p = workload_params(WorkloadKind::Random, 2048, 1);
    let cfg = PostcopyConfig {
        rounds: Some(livemig_engine::policy::PolicyKind::Ibrahim.default_config()),
        ..PostcopyConfig::default()
    };
    let run = hybrid_pair(64 * MIB, Some(p), &cfg);
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    eprintln!("{}", s.render());
    assert_eq!(s.checksum, run.source_digest);
    assert_eq!(d.checksum, run.source_digest);
    let by = s.decided_by.as_deref().expect("the policy ended pre-copy");
    let rounds = s.rounds.expect("rounds counted");
    assert!(rounds >= 1 && s.round_pages.unwrap() > 0, "the working set was sent again in rounds: {s:?}");
    assert!(!by.is_empty());
    // After the hand-over only the pages still dirty cross.
    let invalidated = s.invalidated_pages.expect("the pages still dirty");
    assert_eq!(s.pushed_pages + s.demanded_pages, invalidated);
    let w = run.workload.expect("the workload started at the destination");
    assert_eq!(w.state(), RunState::Running);
    assert!(makes_progress(&w, Duration::from_millis(100)));
}

#[test]
fn the_push_waits_for_the_destination_guest_to_run_within_a_bound() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use livemig_engine::postcopy::RunningGate;
    let filled = 2048;
    // The embedder says its guest runs a little later: `Running` goes then, not at the bound.
    let flag = Arc::new(AtomicBool::new(false));
    let setter = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let gate = RunningGate { running: flag, within: Duration::from_secs(8) };
    let run = livemig_tests::postcopy_pair_gated(16 * MIB, filled, gate);
    setter.join().unwrap();
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    assert_eq!(d.checksum, run.source_digest);
    assert!(!d.running_by_bound, "the flag opened the gate: {d:?}");
    assert_eq!(s.checksum, run.source_digest);
    // It never does: the destination sends `Running` at the bound, and the source pushed
    // nothing before (the push was held that long), yet every page arrived and verified.
    let within = Duration::from_millis(300);
    let gate = RunningGate { running: Arc::new(AtomicBool::new(false)), within };
    let run = livemig_tests::postcopy_pair_gated(16 * MIB, filled, gate);
    let s = run.source.unwrap_or_else(|e| panic!("source: {}", livemig_tests::error_chain(&e)));
    let d = run.dest.unwrap_or_else(|e| panic!("destination: {}", livemig_tests::error_chain(&e)));
    assert_eq!((s.checksum.as_str(), d.checksum.as_str()), (run.source_digest.as_str(), run.source_digest.as_str()));
    assert!(d.running_by_bound, "{d:?}");
    assert!(d.running_wait_ms >= within.as_secs_f64() * 1e3, "{d:?}");
    // (The source times from `Resumed`'s arrival, the destination from sending it.)
    assert!(s.push_held_ms >= within.as_secs_f64() * 1e3 - 100.0, "the source held its push until Running: {s:?}");
    assert_eq!(s.pushed_pages + s.demanded_pages, filled, "{s:?}");
}
