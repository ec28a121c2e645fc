//! A page corrupted in flight is caught by the switchover checksum (needs the engine's
//! `fault-injection` feature: `cargo test -p livemig-tests --features
//! livemig-engine/fault-injection --test precopy_fault`). Its own test binary, because the
//! fault is switched on through the process environment.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use livemig_engine::connect::{connect, Listener, TransportChoice, TransportOptions};
use livemig_engine::precopy::{receive, DestConfig, DestError, SourceConfig, SourceError, FAULT_INJECTION};
use livemig_engine::workload::{RunState, Workload, WorkloadKind, WorkloadParams};
use livemig_transport::auth::Secret;
use livemig_transport::{Access, Region, RegionTable, TcpConfig, TransportKind};

#[test]
fn corrupted_page_is_detected_and_the_source_resumes() {
    if !FAULT_INJECTION {
        eprintln!("skipped: build with --features livemig-engine/fault-injection");
        return;
    }
    std::env::set_var("LIVEMIG_CORRUPT_PAGE", "5");
    let len = 16u64 << 20;
    let secret = Secret::new("fault-test-secret").unwrap();
    let opts = TransportOptions {
        choice: TransportChoice::Tcp,
        io_timeout: Duration::from_secs(10),
        tcp: TcpConfig::default(),
        verbs: Default::default(),
    };

    let dregion = Arc::new(Region::anonymous(2, len, 4096, Access::REMOTE_WRITE).unwrap());
    let dtable = RegionTable::new();
    let dreg = dtable.register(dregion.clone()).unwrap();
    let l = Listener::bind(TransportKind::Tcp, "127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (o2, s2) = (opts.clone(), Secret::new("fault-test-secret").unwrap());
    let dst = std::thread::spawn(move || {
        let _reg = dreg;
        let mut t = l.accept(&o2, &s2, &dtable).unwrap();
        receive(t.as_mut(), &dregion, &DestConfig::default(), &mut |_, _, _| {})
    });

    let region = Arc::new(Region::anonymous(1, len, 4096, Access::LOCAL).unwrap());
    let table = RegionTable::new();
    let _reg = table.register(region.clone()).unwrap();
    let p = WorkloadParams {
        kind: WorkloadKind::Seq,
        working_set_pages: NonZeroU64::new(512).unwrap(),
        rate_pages_per_sec: 2000,
        threads: NonZeroU32::new(1).unwrap(),
        seed: 1,
    };
    let mut w = Workload::init(region.clone(), p).unwrap();
    w.start().unwrap();
    let mut t = connect(TransportKind::Tcp, &addr, &opts, &secret, &table).unwrap();
    let cfg = SourceConfig { warmup: Duration::ZERO, ..Default::default() };
    let err = livemig_engine::precopy::migrate(t.as_mut(), &region, Some(&mut w), &cfg, &mut |_| {}).unwrap_err();
    let SourceError::ChecksumMismatch { source_sum, dest_sum } = &err else { panic!("{err:?}") };
    assert_ne!(source_sum, dest_sum);
    eprintln!("source: {err}");
    // The destination did not take over, so the source workload runs again.
    assert_eq!(w.state(), RunState::Running);
    let n = w.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(w.pages_written() > n);
    match dst.join().unwrap() {
        Err(e @ DestError::ChecksumMismatch { .. }) => eprintln!("destination: {e}"),
        other => panic!("destination: {other:?}"),
    }
}
