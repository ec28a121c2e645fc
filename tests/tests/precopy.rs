//! Pre-copy live migration end to end, in process: the source and the destination run in two
//! threads connected by the TCP transport over loopback (the engine sees only `dyn
//! Transport`, so the same drivers run over verbs).

use std::num::NonZeroU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_engine::integrity::region_digest;
use livemig_engine::policy::{IbrahimConfig, KvmConfig, PolicyConfig};
use livemig_engine::precopy::proto::{self, Msg};
use livemig_engine::precopy::{dest, DestConfig, DestError, Mismatch, Outcome, RegionDesc, SourceConfig, SourceError};
use livemig_tests::{
    assert_still_running, error_chain, migrate_workload, receive_workload, registered_region, workload_params, Conn,
    Received, Registered, Source,
};
use livemig_transport::{Access, Region, RegionTable, Transport};
use livemig_workload::{RunState, WorkloadKind};

const MIB: u64 = 1 << 20;

/// TCP over loopback, 10 s I/O timeout.
fn conn() -> Conn {
    Conn::tcp(Duration::from_secs(10))
}

/// A destination listening on loopback; `serve` runs on the accepted transport.
fn spawn_dest<T: Send + 'static>(
    len: u64,
    page_size: u32,
    serve: impl FnOnce(&mut dyn Transport, &Arc<Region>) -> T + Send + 'static,
) -> (String, JoinHandle<T>) {
    conn().spawn_dest(len, page_size, move |mut t, r| serve(t.as_mut(), &r))
}

fn dest_receiver(len: u64, page_size: u32) -> (String, JoinHandle<Result<Received, DestError>>) {
    spawn_dest(len, page_size, |t, r| {
        let cfg = DestConfig { reply_timeout: Duration::from_secs(30), ..Default::default() };
        receive_workload(t, r, &cfg, &mut |_, _, _| {})
    })
}

/// A running workload (`kind` over `wss_pages` pages, 2 threads, flat out) connected to `addr`.
fn source(addr: &str, len: u64, page_size: u32, kind: WorkloadKind, wss_pages: u64) -> Source {
    conn().start_source(addr, len, page_size, workload_params(kind, wss_pages, 2))
}

fn cfg(policy: PolicyConfig) -> SourceConfig {
    SourceConfig { policy, reply_timeout: Duration::from_secs(30), ..Default::default() }
}

/// The destination's memory holds garbage before the migration (an embedder's memory is not
/// necessarily fresh): zero pages are placed explicitly, and the copy still equals the
/// source byte for byte.
#[test]
fn destination_memory_need_not_start_zeroed() {
    let len = 16 * MIB;
    let (addr, dst) = spawn_dest(len, 4096, move |t, r| {
        r.write_at(0, &vec![0xa5; len as usize]);
        let cfg = DestConfig { ..Default::default() };
        (receive_workload(t, r, &cfg, &mut |_, _, _| {}), r.clone())
    });
    let mut s = source(&addr, len, 4096, WorkloadKind::Random, 256);
    let summary =
        migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg(PolicyConfig::default()), &mut |_| {})
            .expect("migration");
    let (rep, dregion) = dst.join().unwrap();
    let rep = rep.expect("destination");
    assert!(summary.zero_pages > len / 4096 / 2, "{} zero pages", summary.zero_pages);
    let src = region_digest(&s.region, len);
    assert_eq!(rep.checksum, src.hex());
    let mut d = rep.workload.expect("resumed");
    d.stop().unwrap();
    // After stopping, the destination differs only by what its workload wrote; the untouched
    // tail is zero, not the garbage it held.
    let mut page = vec![1u8; 4096];
    assert!(dregion.read_at(len - 4096, &mut page));
    assert!(page.iter().all(|&b| b == 0), "a zero page kept the destination's old bytes");
}

#[test]
fn ibrahim_migrates_a_random_writer_and_the_workload_continues() {
    let len = 64 * MIB;
    let (addr, dst) = dest_receiver(len, 4096);
    let mut s = source(&addr, len, 4096, WorkloadKind::Random, 4096);
    let policy = PolicyConfig::Ibrahim(IbrahimConfig {
        sampling_period_ms: NonZeroU64::new(200).unwrap(),
        ..Default::default()
    });
    let mut lines = Vec::new();
    let summary =
        migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg(policy), &mut |l| lines.push(*l))
            .expect("migration");
    let rep = dst.join().unwrap().expect("destination");

    assert_eq!(summary.outcome, Outcome::Completed);
    assert_eq!(summary.policy, "ibrahim");
    assert!(!lines.is_empty() && lines.len() as u32 == summary.iterations);
    assert!(summary.downtime_ms.is_some_and(|d| d > 0.0));
    assert!(["a", "b", "c"].contains(&summary.end_rule.as_str()), "{}", summary.end_rule);
    // Zero pages went as flags: the untouched tail of the region was never written.
    assert!(summary.zero_pages >= (len / 4096 - 4097) - 16, "{} zero pages", summary.zero_pages);
    assert!(summary.guest_rate_during.is_some_and(|r| r > 0.0), "{:?}", summary.guest_rate_during);

    // The source stopped at the switchover; its memory is what the destination verified.
    assert_eq!(s.workload.state(), RunState::Idle);
    // The source workload is stopped and the transport idle: read the memory itself.
    let src_sum = region_digest(&s.region, s.region.len()).hex();
    assert_eq!(summary.checksum.as_deref(), Some(src_sum.as_str()));
    assert_eq!(rep.checksum, src_sum);

    // The destination continues the source's counters.
    let at_switch = s.workload.pages_written();
    let w = rep.workload.expect("resumed workload");
    assert_eq!(w.state(), RunState::Running);
    std::thread::sleep(Duration::from_millis(50));
    assert!(w.pages_written() > at_switch, "{} <= {at_switch}", w.pages_written());
}

#[test]
fn kvm_that_cannot_converge_aborts_and_the_source_keeps_running() {
    let len = 64 * MIB;
    let (addr, dst) = dest_receiver(len, 4096);
    let mut s = source(&addr, len, 4096, WorkloadKind::Random, 8192);
    // A zero downtime limit is unattainable with a running writer; the bandwidth cap keeps
    // intervals long (100 ms) and the backlog large, so even a workload thread starved by a
    // busy 2-core test machine cannot make one interval look clean.
    let policy = PolicyConfig::Kvm(KvmConfig {
        downtime_limit_ms: 0,
        max_bandwidth: NonZeroU64::new(40 << 20),
        max_time_ms: NonZeroU64::new(3000),
        ..Default::default()
    });
    let t0 = Instant::now();
    let summary = migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg(policy), &mut |_| {})
        .expect("aborted summary");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(summary.outcome, Outcome::Aborted);
    assert_eq!(summary.end_rule, "timeout");
    assert!(summary.downtime_ms.is_none());
    assert_still_running(&s.workload, Duration::from_millis(50));
    match dst.join().unwrap() {
        Err(DestError::SourceAborted(reason)) => assert!(reason.contains("timeout"), "{reason}"),
        other => panic!("destination: {other:?}"),
    }
}

#[test]
fn destination_dying_mid_precopy_is_a_clear_error_and_the_source_keeps_running() {
    let len = 64 * MIB;
    // A destination that accepts, then dies after the first interval.
    let (addr, dst) = spawn_dest(len, 4096, |t, _| {
        let m = proto::decode(&t.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap()).unwrap();
        assert!(matches!(m, Msg::Begin { .. }));
        t.send_message(&Msg::Accept.encode()).unwrap();
        loop {
            let m = t.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap();
            if let Ok(Msg::IterationDone { .. }) = proto::decode(&m) {
                return; // dropping the transport closes the connection
            }
        }
    });
    let mut s = source(&addr, len, 4096, WorkloadKind::Random, 8192);
    let policy = PolicyConfig::Kvm(KvmConfig { downtime_limit_ms: 0, ..Default::default() });
    let t0 = Instant::now();
    let err = migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg(policy), &mut |_| {}).unwrap_err();
    dst.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(25), "took {:?}", t0.elapsed());
    assert!(matches!(err, SourceError::Transport { .. }), "{err:?}");
    eprintln!("source error: {:#}", error_chain(&err));
    assert_still_running(&s.workload, Duration::from_millis(50));
}

#[test]
fn smaller_destination_is_refused_before_anything_is_sent() {
    let (addr, dst) = dest_receiver(32 * MIB, 4096);
    let mut s = source(&addr, 64 * MIB, 4096, WorkloadKind::Seq, 1024);
    let err =
        migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg(PolicyConfig::default()), &mut |_| {})
            .unwrap_err();
    assert!(matches!(err, SourceError::Incompatible { index: 0, source: Mismatch::TooSmall { .. } }), "{err:?}");
    assert_eq!(s.t.stats().bytes_posted, 0);
    assert_eq!(s.t.stats().messages_sent, 0);
    assert_still_running(&s.workload, Duration::from_millis(50));
    drop(s);
    assert!(dst.join().unwrap().is_err());
}

#[test]
fn page_size_mismatch_is_refused() {
    let (addr, dst) = dest_receiver(64 * MIB, 8192);
    let mut s = source(&addr, 64 * MIB, 4096, WorkloadKind::Seq, 1024);
    let err =
        migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &cfg(PolicyConfig::default()), &mut |_| {})
            .unwrap_err();
    assert!(
        matches!(err, SourceError::Incompatible { index: 0, source: Mismatch::PageSize { src: 4096, dst: 8192 } }),
        "{err:?}"
    );
    assert_still_running(&s.workload, Duration::from_millis(50));
    drop(s);
    assert!(dst.join().unwrap().is_err());
}

/// The destination checks `Begin` itself too (a source that skipped its own check).
#[test]
fn destination_refuses_a_bad_begin() {
    for (begin, want) in [
        (
            Msg::Begin {
                strategy: proto::Strategy::Precopy,
                regions: vec![RegionDesc { len: 64 * MIB, page_size: 4096 }],
            },
            "smaller",
        ),
        (
            Msg::Begin {
                strategy: proto::Strategy::Precopy,
                regions: vec![RegionDesc { len: 16 * MIB, page_size: 8192 }],
            },
            "page size",
        ),
        (
            Msg::Begin {
                strategy: proto::Strategy::Precopy,
                regions: vec![RegionDesc { len: 4 * MIB, page_size: 4096 }; 2],
            },
            "regions",
        ),
        (
            Msg::Begin {
                strategy: proto::Strategy::Postcopy,
                regions: vec![RegionDesc { len: 16 * MIB, page_size: 4096 }],
            },
            "pre-copy only",
        ),
    ] {
        let (addr, dst) = dest_receiver(32 * MIB, 4096);
        let Registered { table, reg: _reg, .. } = registered_region(1, MIB, 4096, Access::LOCAL);
        let mut t = conn().connect(&addr, &table);
        t.send_message(&begin.encode()).unwrap();
        let reply = proto::decode(&t.recv_message(Some(Duration::from_secs(10))).unwrap().unwrap()).unwrap();
        let Msg::Refuse { reason } = reply else { panic!("{reply:?}") };
        assert!(reason.contains(want), "{reason}");
        assert!(matches!(
            dst.join().unwrap(),
            Err(DestError::Refused { .. } | DestError::RegionCount { .. } | DestError::Strategy(_))
        ));
    }
}

/// Garbage instead of `Begin` is a typed protocol error, not a panic.
#[test]
fn destination_rejects_garbage() {
    let (addr, dst) = dest_receiver(MIB, 4096);
    let table = RegionTable::new();
    let mut t = conn().connect(&addr, &table);
    t.send_message(b"LMPC\x01\x01short").unwrap();
    assert!(matches!(dst.join().unwrap(), Err(DestError::Protocol { .. })));
    let _ = dest::DestConfig::default();
}
