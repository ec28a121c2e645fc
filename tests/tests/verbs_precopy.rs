//! Pre-copy live migration end to end over the RDMA verbs backend, in process: the source and
//! the destination run in two threads connected through the engine's own `connect` /
//! `Listener` with `--transport verbs` (what the CLI does), so pages move as RDMA WRITEs and
//! the control protocol as ordered SENDs.
//!
//! Needs an RDMA device: run `tests/rxe/run-verbs-tests.sh` (Soft-RoCE guest, RXE_REQUIRED=1).
//! On a host without one every test prints SKIPPED and passes. The guest runs under TCG, so
//! regions are small and timeouts modest.
#![allow(unexpected_cfgs)]
#![cfg(any(feature = "verbs", livemig_verbs))]

use std::num::NonZeroU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_engine::connect::TransportChoice;
use livemig_engine::integrity::region_digest;
use livemig_engine::policy::{IbrahimConfig, KvmConfig, PolicyConfig};
use livemig_engine::precopy::proto::{self, Msg};
use livemig_engine::precopy::{DestConfig, DestError, Mismatch, Outcome, SourceConfig, SourceError};
use livemig_tests::{
    error_chain, makes_progress, migrate_workload, receive_workload, registered_region, workload_params, Conn,
    Received, Registered, Source,
};
use livemig_transport::conformance::fill_pages;
use livemig_transport::verbs;
use livemig_transport::{Access, PageBitmap, Region, Transport, TransportKind};
use livemig_workload::{RunState, Workload, WorkloadKind};

const MIB: u64 = 1 << 20;
const PAGE: u32 = 4096;
/// Any verbs wait (window, credits, flush) longer than this fails the transport.
const IO_TIMEOUT: Duration = Duration::from_secs(8);

fn run(test: &str) -> bool {
    verbs::device_test_guard(test)
}

/// `--transport verbs` with default device selection (rxe0 in the guest).
fn conn() -> Conn {
    let conn = Conn::new(TransportChoice::Verbs, IO_TIMEOUT);
    assert_eq!(conn.kind, TransportKind::Verbs);
    conn
}

/// A destination listening on loopback with a fresh exposed region; `serve` runs on the
/// accepted transport (checked to be verbs).
fn spawn_dest<T: Send + 'static>(
    len: u64,
    serve: impl FnOnce(&mut dyn Transport, &Arc<Region>) -> T + Send + 'static,
) -> (String, JoinHandle<T>) {
    conn().spawn_dest(len, PAGE, move |mut t, r| serve(t.as_mut(), &r))
}

fn dest_config() -> DestConfig {
    DestConfig { reply_timeout: Duration::from_secs(60), ..Default::default() }
}

/// What a destination thread running `receive` hands back: its report and its region.
type DestEnd = (Result<Received, DestError>, Arc<Region>);

/// A destination running the engine's `receive`.
fn dest_receiver(len: u64) -> (String, JoinHandle<DestEnd>) {
    spawn_dest(len, |t, r| (receive_workload(t, r, &dest_config(), &mut |_, _, _| {}), r.clone()))
}

/// The source side: its region (registered), the connected transport (checked to be verbs),
/// and a running workload (`kind` over `wss_pages` pages, 2 threads, flat out).
fn source(addr: &str, len: u64, kind: WorkloadKind, wss_pages: u64) -> Source {
    conn().start_source(addr, len, PAGE, workload_params(kind, wss_pages, 2))
}

fn src_config(policy: PolicyConfig) -> SourceConfig {
    SourceConfig { policy, reply_timeout: Duration::from_secs(60), ..Default::default() }
}

/// Ibrahim with short intervals and a time limit as a safety net for a slow guest (the
/// limit forces stop-and-copy; it does not abort).
fn ibrahim() -> PolicyConfig {
    PolicyConfig::Ibrahim(IbrahimConfig {
        sampling_period_ms: NonZeroU64::new(200).unwrap(),
        max_time_ms: NonZeroU64::new(20_000),
        ..Default::default()
    })
}

fn assert_still_running(w: &Workload) {
    livemig_tests::assert_still_running(w, Duration::from_millis(200));
}

/// The first page whose bytes differ between `a` and `b` (over `a`'s length), compared
/// directly (a debug-build SHA-256 runs at about 1 MB/s in the TCG guest).
fn first_differing_page(a: &Region, b: &Region) -> Option<usize> {
    let ps = a.page_size() as usize;
    let (mut x, mut y) = (vec![0u8; ps], vec![0u8; ps]);
    (0..a.pages()).find(|&p| {
        a.read_at((p * ps) as u64, &mut x);
        b.read_at((p * ps) as u64, &mut y);
        x != y
    })
}

/// Straight to fd 2: the libtest capture would hide it in the guest log.
fn note(s: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{s}");
}

#[test]
fn verbs_precopy_random_writer_migrates_and_resumes_at_the_destination() {
    if !run("verbs_precopy_random_writer_migrates_and_resumes_at_the_destination") {
        return;
    }
    // 16 MiB: both ends checksum the whole region during the downtime, at a few MB/s in a
    // debug build under TCG.
    let len = 16 * MIB;
    let (addr, dst) = dest_receiver(len);
    let mut s = source(&addr, len, WorkloadKind::Random, 512);
    let mut lines = Vec::new();
    let summary = migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &src_config(ibrahim()), &mut |l| {
        lines.push(*l)
    })
    .expect("migration over verbs");
    let (rep, _dregion) = dst.join().unwrap();
    let rep = rep.expect("destination");
    note(format!(
        "verbs pre-copy: {} iterations, ended by [{}], downtime {:.1} ms, {} pages sent, {} zero, total {:.2} s",
        summary.iterations,
        summary.end_rule,
        summary.downtime_ms.unwrap_or(-1.0),
        summary.pages_sent,
        summary.zero_pages,
        summary.total_s
    ));

    assert_eq!(summary.outcome, Outcome::Completed);
    assert_eq!(summary.transport, "verbs");
    assert_eq!(summary.policy, "ibrahim");
    assert!(!lines.is_empty() && lines.len() as u32 == summary.iterations);
    assert_eq!(rep.iterations, summary.iterations);
    assert!(summary.downtime_ms.is_some_and(|d| d > 0.0));
    // The untouched part of the region went as zero flags, not as RDMA writes.
    let untouched = len / PAGE as u64 - 513;
    assert!(summary.zero_pages >= untouched - 16, "{} zero pages", summary.zero_pages);
    assert_eq!(rep.zero_pages, summary.zero_pages);
    assert_eq!(rep.bytes_received, summary.bytes, "the destination's byte count (from the SEND headers)");

    // Both ends verified the same checksum, and it is the source memory's.
    assert_eq!(s.workload.state(), RunState::Idle, "the source workload must stop after the switchover");
    // The source workload is stopped and the transport idle (migration completed).
    let src_sum = region_digest(&s.region, s.region.len()).hex();
    assert_eq!(summary.checksum.as_deref(), Some(src_sum.as_str()));
    assert_eq!(rep.checksum, src_sum);

    // The source copy never runs again; the destination continues its counters.
    let at_switch = s.workload.pages_written();
    let w = rep.workload.expect("resumed workload");
    assert_eq!(w.state(), RunState::Running);
    assert!(makes_progress(&w, Duration::from_millis(200)), "the resumed workload does not progress");
    assert!(w.pages_written() > at_switch, "{} <= {at_switch}", w.pages_written());
    assert!(!makes_progress(&s.workload, Duration::from_millis(100)), "the source workload still writes");
    assert_eq!(s.workload.pages_written(), at_switch);
}

/// Without a workload, the destination ends up byte-identical to the source. Two thirds of
/// the pattern are written only after the connection is set up, i.e. after the source region
/// was registered (pinned) with the device while those pages were still unpopulated, as
/// memory a guest first touches while its migration channel is open; zero pages travel as
/// flags.
#[test]
fn verbs_precopy_without_workload_copies_every_byte() {
    if !run("verbs_precopy_without_workload_copies_every_byte") {
        return;
    }
    let len = 16 * MIB;
    let pages = (len / PAGE as u64) as usize;
    // Zero pages: every 7th page and one 1 MiB run in the middle; the rest is pattern.
    let zero_run = pages / 2..pages / 2 + 256;
    let is_zero = |p: usize| p % 7 == 3 || zero_run.contains(&p);
    let (mut early, mut late) = (PageBitmap::new(pages), PageBitmap::new(pages));
    for p in (0..pages).filter(|&p| !is_zero(p)) {
        if p < pages / 3 {
            early.set(p);
        } else {
            late.set(p);
        }
    }
    let zeros = (0..pages).filter(|&p| is_zero(p)).count() as u64;

    let (addr, dst) = dest_receiver(len);
    let Registered { region, table, reg: _reg } = registered_region(1, len, PAGE, Access::LOCAL);
    fill_pages(&region, &early, 0x5eed_0001);
    let mut t = conn().connect(&addr, &table);
    fill_pages(&region, &late, 0x5eed_0002);
    // The expected image, built independently of the source (never registered, never sent).
    let expected = Region::anonymous(3, len, PAGE, Access::LOCAL).unwrap();
    fill_pages(&expected, &early, 0x5eed_0001);
    fill_pages(&expected, &late, 0x5eed_0002);

    let summary = migrate_workload(t.as_mut(), &region, None, &src_config(ibrahim()), &mut |_| {}).expect("migration");
    let (rep, dregion) = dst.join().unwrap();
    let rep = rep.expect("destination");
    note(format!(
        "verbs pre-copy (no workload): {} iterations, {} pages sent, {} zero pages as flags, {:.2} s",
        summary.iterations, summary.pages_sent, summary.zero_pages, summary.total_s
    ));

    assert_eq!(summary.outcome, Outcome::Completed);
    assert!(rep.workload.is_none());
    assert_eq!(summary.zero_pages, zeros, "every zero page went as a flag");
    assert_eq!(rep.zero_pages, zeros);
    assert_eq!(summary.pages_sent, pages as u64 - zeros, "every other page went exactly once");
    assert_eq!(summary.bytes, (pages as u64 - zeros) * PAGE as u64);
    assert_eq!(rep.bytes_received, summary.bytes);
    assert_eq!(rep.checksum, summary.checksum.clone().unwrap());
    // The bytes themselves, independently of the engine's checksum.
    assert_eq!(first_differing_page(&expected, &region), None, "the source changed");
    assert_eq!(first_differing_page(&expected, &dregion), None, "the destination differs from the source");
}

/// The destination accepts, takes the first interval, then dies (drops its transport: CLOSE
/// on the setup socket, QP to error) while a workload that cannot converge under `kvm` keeps
/// the source in pre-copy. The source fails with a transport error within the I/O timeout
/// and its workload keeps running.
#[test]
fn verbs_precopy_destination_dying_is_an_error_and_the_source_keeps_running() {
    if !run("verbs_precopy_destination_dying_is_an_error_and_the_source_keeps_running") {
        return;
    }
    let len = 16 * MIB;
    let (addr, dst) = spawn_dest(len, |t, _| {
        let m = proto::decode(&t.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap()).unwrap();
        assert!(matches!(m, Msg::Begin { .. }), "{m:?}");
        t.send_message(&Msg::Accept.encode()).unwrap();
        loop {
            let m = t.recv_message(Some(Duration::from_secs(30))).unwrap().expect("an IterationDone in time");
            if let Ok(Msg::IterationDone { .. }) = proto::decode(&m) {
                return Instant::now(); // the caller drops the transport: the destination is gone
            }
        }
    });
    let mut s = source(&addr, len, WorkloadKind::Random, 2048);
    let policy = PolicyConfig::Kvm(KvmConfig { downtime_limit_ms: 0, ..Default::default() });
    let err =
        migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &src_config(policy), &mut |_| {}).unwrap_err();
    let failed_at = Instant::now();
    let died_at = dst.join().unwrap();
    let detect = failed_at.saturating_duration_since(died_at);
    note(format!("verbs pre-copy: destination death detected after {detect:?}: {}", error_chain(&err)));
    assert!(matches!(err, SourceError::Transport { .. }), "{err:?}");
    assert!(detect < IO_TIMEOUT + Duration::from_secs(2), "took {detect:?} (io timeout {IO_TIMEOUT:?})");
    assert_still_running(&s.workload);
}

/// A destination region smaller than the source's is refused from the regions the verbs
/// handshake exposed, before any page or message is sent.
#[test]
fn verbs_precopy_smaller_destination_is_refused() {
    if !run("verbs_precopy_smaller_destination_is_refused") {
        return;
    }
    let (addr, dst) = dest_receiver(8 * MIB);
    let mut s = source(&addr, 16 * MIB, WorkloadKind::Seq, 256);
    let err = migrate_workload(s.t.as_mut(), &s.region, Some(&mut s.workload), &src_config(ibrahim()), &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(err, SourceError::Incompatible { index: 0, source: Mismatch::TooSmall { src, dst } } if src == 16 * MIB && dst == 8 * MIB),
        "{err:?}"
    );
    assert_eq!(s.t.stats().bytes_posted, 0);
    assert_eq!(s.t.stats().messages_sent, 0);
    assert_still_running(&s.workload);
    drop(s);
    // The source closed without Begin: the destination fails instead of waiting for it.
    let t0 = Instant::now();
    let (rep, _) = dst.join().unwrap();
    assert!(rep.is_err(), "{rep:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}
