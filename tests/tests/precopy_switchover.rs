#![cfg(feature = "fault-injection")]
//! The switchover under failure: the workload runs at most once (no split brain) and no copy
//! is lost, whichever side's link dies at which step of Final / SourceChecksum / Verified /
//! Commit / Resumed, or freezes there.
//!
//! The failure is injected by `CutAt` (livemig_engine::precopy::cut), a wrapper around the
//! real TCP transport that drops the connection (the peer sees it close, as when a process
//! dies) — or first freezes with the connection open — instead of sending a chosen control
//! message. Every destination here sends `Alive` every millisecond while it hashes, so every
//! test also exercises the source skipping them. The migrations themselves are real: a running workload, userfaultfd
//! dirty tracking, the TCP backend over loopback.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use livemig_engine::integrity::region_digest;
use livemig_engine::policy::{KvmConfig, PolicyConfig};
use livemig_engine::precopy::cut::CutAt;
use livemig_engine::precopy::proto::{self, Msg};
use livemig_engine::precopy::{DestConfig, DestError, SourceConfig, SourceError};
use livemig_tests::{
    error_chain, makes_progress, migrate_workload, receive_workload, registered_region, workload_params, Conn,
    Received, Registered, Source,
};
use livemig_transport::{Access, Region, Transport};
use livemig_workload::{RunState, Workload, WorkloadKind, WorkloadParams};

const LEN: u64 = 16 << 20;

/// TCP over loopback, 10 s I/O timeout.
fn conn() -> Conn {
    Conn::tcp(Duration::from_secs(10))
}

type DestOut = (Arc<Region>, Result<Received, DestError>);

/// A destination on loopback whose transport is cut instead of sending `cut`.
fn spawn_dest(cut: Option<&'static str>) -> (String, JoinHandle<DestOut>) {
    spawn_dest_with(move |t| CutAt::new(t, cut), Duration::from_secs(20))
}

fn spawn_dest_with(
    wrap: impl FnOnce(Box<dyn Transport>) -> CutAt + Send + 'static,
    reply_timeout: Duration,
) -> (String, JoinHandle<DestOut>) {
    conn().spawn_dest(LEN, 4096, move |t, region| {
        let mut t = wrap(t);
        let cfg = DestConfig { reply_timeout, alive_every: Duration::from_millis(1) };
        let res = receive_workload(&mut t, &region, &cfg, &mut |_, _, _| {});
        (region, res)
    })
}

struct Run {
    region: Arc<Region>,
    workload: Workload,
    result: Result<livemig_engine::precopy::Summary, SourceError>,
    dest_region: Arc<Region>,
    dest: Result<Received, DestError>,
    /// The destination thread was still running when the source's `migrate` returned.
    dest_still_frozen: bool,
}

/// Migrates a running random writer (small working set, so kvm converges at once) with the
/// source cut at `src_cut` and the destination cut at `dst_cut`.
fn run(src_cut: Option<&'static str>, dst_cut: Option<&'static str>) -> Run {
    run_with(src_cut, spawn_dest(dst_cut), Duration::from_secs(20))
}

fn run_with(src_cut: Option<&'static str>, dest: (String, JoinHandle<DestOut>), switchover_idle: Duration) -> Run {
    let (addr, dst) = dest;
    let params = WorkloadParams { rate_pages_per_sec: 20_000, seed: 3, ..workload_params(WorkloadKind::Random, 64, 1) };
    let Source { region, reg: _reg, t, mut workload } = conn().start_source(&addr, LEN, 4096, params);
    let mut t = CutAt::new(t, src_cut);
    let cfg = SourceConfig {
        policy: PolicyConfig::Kvm(KvmConfig::default()),
        reply_timeout: Duration::from_secs(20),
        switchover_idle,
        ..Default::default()
    };
    let result = migrate_workload(&mut t, &region, Some(&mut workload), &cfg, &mut |_| {});
    let dest_still_frozen = !dst.is_finished();
    drop(t);
    let (dest_region, dest) = dst.join().unwrap();
    Run { region, workload, result, dest_region, dest, dest_still_frozen }
}

/// Running and writing (over 100 ms).
fn running(w: &Workload) -> bool {
    makes_progress(w, Duration::from_millis(100)) && w.state() == RunState::Running
}

/// Both copies still hold the workload's memory as of the pause (nothing ran since).
fn copies_identical(r: &Run) {
    // The source workload is paused (checked by the caller), the destination's was never
    // started, and both transports are closed.
    let (a, b) = (region_digest(&r.region, LEN), region_digest(&r.dest_region, LEN));
    assert_eq!(a, b, "the two copies differ");
}

#[test]
fn baseline_without_a_cut_completes_and_runs_only_at_the_destination() {
    let mut r = run(None, None);
    let s = r.result.as_ref().unwrap_or_else(|e| panic!("{}", error_chain(e)));
    let d = r.dest.as_mut().unwrap_or_else(|e| panic!("{}", error_chain(e)));
    assert_eq!(s.checksum.as_deref(), Some(d.checksum.as_str()));
    assert!(s.downtime_ms.unwrap() >= d.switchover_ms, "{:?} {}", s.downtime_ms, d.switchover_ms);
    assert_eq!(r.workload.state(), RunState::Idle);
    assert!(running(d.workload.as_ref().expect("resumed at the destination")));
    d.workload.as_mut().unwrap().stop().unwrap();
}

#[test]
fn destination_gone_before_verified_resumes_the_source_only() {
    let r = run(None, Some("Verified"));
    let e = r.result.as_ref().expect_err("must fail");
    eprintln!("source: {}", error_chain(e));
    assert!(!e.in_doubt(), "before Commit the source knows it still owns the workload: {e:?}");
    assert!(matches!(e, SourceError::Transport { .. }), "{e:?}");
    assert!(running(&r.workload), "the source workload runs again");
    let de = r.dest.as_ref().expect_err("destination must not run");
    eprintln!("destination: {}", error_chain(de));
}

#[test]
fn commit_lost_leaves_both_copies_paused_and_identical() {
    // The source cuts its link where it would send Commit: it cannot know whether Commit got
    // out, so it must not resume; the destination never got Commit, so it must not run.
    let r = run(Some("Commit"), None);
    let e = r.result.as_ref().expect_err("must fail");
    eprintln!("source: {}", error_chain(e));
    assert!(e.in_doubt(), "{e:?}");
    assert_eq!(r.workload.state(), RunState::Paused, "an in-doubt source holds its copy paused");
    match &r.dest {
        Err(de @ DestError::NotCommitted(_)) => eprintln!("destination: {}", error_chain(de)),
        other => panic!("destination: {other:?}"),
    }
    copies_identical(&r);
}

#[test]
fn resumed_lost_runs_the_workload_once_at_the_destination() {
    // The destination resumed on Commit, then its link died before Resumed went out.
    let mut r = run(None, Some("Resumed"));
    let e = r.result.as_ref().expect_err("the source never heard Resumed");
    eprintln!("source: {}", error_chain(e));
    assert!(e.in_doubt(), "{e:?}");
    assert_eq!(r.workload.state(), RunState::Paused, "the source must not run a second copy");
    let d = r.dest.as_mut().expect("the destination keeps running what it resumed");
    assert!(running(d.workload.as_ref().expect("resumed")));
    d.workload.as_mut().unwrap().stop().unwrap();
}

#[test]
fn garbage_instead_of_commit_is_refused_and_nothing_runs_at_the_destination() {
    // A source that answers Verified with something other than Commit: the destination
    // refuses to run. (Driven by hand: the control messages are public.)
    let (addr, dst) = spawn_dest(None);
    let Registered { region, table, reg: _reg } = registered_region(1, LEN, 4096, Access::LOCAL);
    let mut t = conn().connect(&addr, &table);
    let send = |t: &mut Box<dyn Transport>, m: Msg| t.send_message(&m.encode()).unwrap();
    send(
        &mut t,
        Msg::Begin {
            strategy: proto::Strategy::Precopy,
            regions: vec![proto::RegionDesc { len: LEN, page_size: 4096 }],
        },
    );
    assert_eq!(proto::decode(&t.recv_message(Some(Duration::from_secs(10))).unwrap().unwrap()), Ok(Msg::Accept));
    // Every page "placed" (both regions are fresh and zero): the destination hashes them all.
    send(&mut t, Msg::Placed { runs: vec![proto::PageRun { first: 0, pages: (LEN / 4096) as u32 }] });
    send(&mut t, Msg::DeviceState { last: true, bytes: vec![] });
    send(&mut t, Msg::Final);
    let sum = region_digest(&region, LEN).to_bytes();
    send(&mut t, Msg::SourceChecksum { checksum: sum });
    let (alive, v) = skip_alive(&mut t);
    assert!(alive > 0, "the destination hashes 16 MiB and sends Alive every 1 ms meanwhile");
    assert_eq!(v, Msg::Verified { ok: true, checksum: sum });
    send(&mut t, Msg::Done);
    let (_, res) = dst.join().unwrap();
    match res {
        Err(DestError::Unexpected { got: "Done", .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_frozen_source_is_given_up_by_the_destination() {
    // The source opens the migration, then stays connected but sends nothing (a stopped
    // process: its kernel still acknowledges). The destination must not wait forever.
    let (addr, dst) = spawn_dest_with(|t| CutAt::new(t, None), Duration::from_millis(1500));
    let Registered { table, reg: _reg, .. } = registered_region(1, LEN, 4096, Access::LOCAL);
    let mut t = conn().connect(&addr, &table);
    t.send_message(
        &Msg::Begin {
            strategy: proto::Strategy::Precopy,
            regions: vec![proto::RegionDesc { len: LEN, page_size: 4096 }],
        }
        .encode(),
    )
    .unwrap();
    assert_eq!(proto::decode(&t.recv_message(Some(Duration::from_secs(10))).unwrap().unwrap()), Ok(Msg::Accept));
    let t0 = std::time::Instant::now();
    let (_, res) = dst.join().unwrap();
    let waited = t0.elapsed();
    match res {
        Err(e @ DestError::ReplyTimeout { .. }) => eprintln!("destination gave up after {waited:?}: {e}"),
        other => panic!("{other:?}"),
    }
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    drop(t);
}

/// Receives messages until one that is not `Alive`; returns how many `Alive` came first.
fn skip_alive(t: &mut Box<dyn Transport>) -> (usize, Msg) {
    let mut n = 0;
    loop {
        match proto::decode(&t.recv_message(Some(Duration::from_secs(10))).unwrap().expect("a reply")).unwrap() {
            Msg::Alive => n += 1,
            m => return (n, m),
        }
    }
}

#[test]
fn a_frozen_destination_at_the_switchover_costs_at_most_the_idle_bound() {
    // The destination hashes, then freezes (connection open, nothing sent) instead of sending
    // Verified. The source must give up after `switchover_idle` and resume its workload —
    // while the destination is still frozen, not after the 60 s reply timeout.
    let dest = spawn_dest_with(|t| CutAt::freeze(t, "Verified", Duration::from_secs(8)), Duration::from_secs(20));
    let r = run_with(None, dest, Duration::from_secs(1));
    let e = r.result.as_ref().expect_err("must fail");
    eprintln!("source: {}", error_chain(e));
    assert!(matches!(e, SourceError::Timeout { expected: "Verified", .. }), "{e:?}");
    assert!(!e.in_doubt());
    assert!(r.dest_still_frozen, "the source gave up only after the destination unfroze");
    assert!(running(&r.workload), "the source workload runs again");
    assert!(r.dest.is_err(), "{:?}", r.dest.as_ref().map(|d| &d.checksum));
}
