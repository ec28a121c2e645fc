//! Verbs backend tests. Pure ones run everywhere; device tests need an RDMA device (rxe0 in
//! the Soft-RoCE guest of `tests/rxe/run-verbs-tests.sh`) and skip visibly without one,
//! unless `RXE_REQUIRED=1`, which turns a missing device into a failure.
//! Sizes are small (a few MiB): rxe under TCG moves tens of MB/s.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::auth::Secret;
use crate::conformance as conf;
use crate::region::{Access, Region, RegionTable};
use crate::{CoalesceConfig, Coalescer, PageBitmap, Segment, Transport, TransportError, WindowConfig, WriteRequest};

fn secret() -> Secret {
    Secret::new("verbs-test-secret-verbs-test-secret").unwrap()
}

fn cfg() -> VerbsConfig {
    VerbsConfig { io_timeout: Duration::from_secs(30), ..Default::default() }
}

/// Connects a client (first) to a server (second) in one process over 127.0.0.1.
fn pair(ca: &VerbsConfig, cb: &VerbsConfig, src: &RegionTable, dst: &RegionTable) -> (VerbsTransport, VerbsTransport) {
    let (a, b) = try_pair(ca, cb, src, dst, &secret(), &secret());
    (a.expect("client connects"), b.expect("server accepts"))
}

type Res = Result<VerbsTransport, TransportError>;

fn try_pair(
    ca: &VerbsConfig,
    cb: &VerbsConfig,
    src: &RegionTable,
    dst: &RegionTable,
    sa: &Secret,
    sb: &Secret,
) -> (Res, Res) {
    let l = VerbsListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (dst, cb, sb, sb_again) = (dst.clone(), cb.clone(), sb.clone(), sb.clone());
    let t = std::thread::spawn(move || l.accept(&cb, &sb, &dst));
    let a = VerbsTransport::connect(addr, ca, sa, src);
    if a.is_err() {
        // A refused connector does not end the listener: let one with its secret in.
        let _ = VerbsTransport::connect(addr, ca, &sb_again, src);
    }
    (a, t.join().unwrap())
}

fn boxed(
    ca: VerbsConfig,
    cb: VerbsConfig,
) -> impl Fn(&RegionTable, &RegionTable) -> (Box<dyn Transport>, Box<dyn Transport>) {
    move |src, dst| {
        let (a, b) = pair(&ca, &cb, src, dst);
        (Box::new(a) as Box<dyn Transport>, Box::new(b) as Box<dyn Transport>)
    }
}

fn random_bitmap(pages: usize, seed: u64) -> PageBitmap {
    let mut bm = PageBitmap::new(pages);
    let mut x = seed | 1;
    for p in 0..pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 3 != 0 {
            bm.set(p);
        }
    }
    bm
}

/// Posts the coalesced writes of `bm` from local region 1 to peer region 2 (the shared
/// conformance helper, so both backends are driven the same way).
fn send_bitmap(t: &mut VerbsTransport, co: &Coalescer, bm: &PageBitmap) -> Result<u64, TransportError> {
    crate::conformance::send_bitmap(t, co, bm)
}

fn same(a: &Region, b: &Region) -> bool {
    // SAFETY: callers only compare once the writer is idle (flushed or message-ordered).
    unsafe { a.as_slice() == b.as_slice() }
}

macro_rules! device_test {
    () => {
        // libtest names the thread after the test.
        let name =
            std::thread::current().name().map_or_else(|| format!("{}:{}", module_path!(), line!()), str::to_owned);
        if !device_test_guard(&name) {
            return;
        }
    };
}

// ---- pure --------------------------------------------------------------------------------

#[test]
fn config_defaults_and_serde() {
    let c = VerbsConfig::default();
    assert_eq!(c.registration, RegistrationMode::PinAll);
    assert_eq!(c.completion, CompletionMode::Event);
    assert_eq!(c.sge_boundary(), 0);
    let od =
        VerbsConfig { registration: RegistrationMode::OnDemand { chunk_size: NonZeroU64::new(1 << 20).unwrap() }, ..c };
    assert_eq!(od.sge_boundary(), 1 << 20);
}

#[test]
fn no_device_is_reported_not_panicking() {
    // On a host without RDMA this must be a clean false / a typed error, never a crash.
    if active_device_present() {
        return;
    }
    let r = conf::regions(1 << 20);
    let (a, b) = try_pair(&cfg(), &cfg(), &r.src_table, &r.dst_table, &secret(), &secret());
    assert!(matches!(a, Err(TransportError::Device(_))), "{a:?}");
    assert!(b.is_err(), "{b:?}");
    // A device that does not exist is named in the error.
    let c = VerbsConfig { device: Some("nosuchdev0".into()), ..cfg() };
    let e = super::device::Context::open(&c.selection()).unwrap_err();
    assert!(matches!(e, VerbsError::NoDevice | VerbsError::DeviceNotFound { .. }), "{e:?}");
}

// ---- device ------------------------------------------------------------------------------

#[test]
fn transfer_random_pages_pin_all() {
    device_test!();
    let r = conf::regions(4 << 20);
    let bm = random_bitmap(r.src.pages(), 42);
    conf::fill_pages(&r.src, &bm, 7);
    let (mut a, mut b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    assert!(a.path_mtu() >= 256);
    let co = Coalescer::new(a.coalesce_config(CoalesceConfig::default())).unwrap();
    let last = send_bitmap(&mut a, &co, &bm).unwrap();
    a.send_message(b"done").unwrap();
    let m = b.recv_message(Some(Duration::from_secs(30))).unwrap().expect("message in time");
    assert_eq!(m, b"done");
    assert!(same(&r.src, &r.dst), "destination differs from source");
    a.flush().unwrap();
    assert_eq!(a.poll_completions().unwrap(), last);
    let st = a.stats();
    assert_eq!(st.writes_completed, st.writes_posted);
    assert!(st.signaled < st.writes_posted, "selective signaling: {st:?}");
    assert_eq!(b.stats().bytes_received, bm.count_ones() as u64 * 4096);
    assert_eq!(b.stats().messages_received, 1);
}

#[test]
fn transfer_busy_poll_small_window() {
    device_test!();
    let mut c = cfg();
    c.completion = CompletionMode::BusyPoll;
    c.window = WindowConfig {
        max_wrs: NonZeroUsize::new(8).unwrap(),
        max_bytes: 64 << 10,
        signal_every: NonZeroU32::new(4).unwrap(),
    };
    let r = conf::regions(2 << 20);
    let bm = PageBitmap::full(r.src.pages());
    conf::fill_pages(&r.src, &bm, 3);
    let (mut a, mut b) = pair(&c, &c, &r.src_table, &r.dst_table);
    let co = Coalescer::new(CoalesceConfig::per_page(4096)).unwrap();
    let last = send_bitmap(&mut a, &co, &bm).unwrap();
    a.flush().unwrap();
    assert_eq!(a.poll_completions().unwrap(), last);
    assert!(a.stats().window_stalls > 0, "a window of 8 must stall 512 writes");
    a.send_message(b"x").unwrap();
    b.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap();
    assert!(same(&r.src, &r.dst));
}

#[test]
fn on_demand_registration_small_chunks() {
    device_test!();
    let chunk = 64 << 10;
    let mut c = cfg();
    c.registration = RegistrationMode::OnDemand { chunk_size: NonZeroU64::new(chunk).unwrap() };
    let r = conf::regions(4 << 20);
    let mut bm = random_bitmap(r.src.pages(), 9);
    bm.set_range(0, 100); // a long run crossing several chunk boundaries
    conf::fill_pages(&r.src, &bm, 11);
    let (mut a, mut b) = pair(&c, &c, &r.src_table, &r.dst_table);
    assert_eq!(a.registered_chunks(), 0, "nothing registered before first use");
    let cc = a.coalesce_config(CoalesceConfig::default());
    assert_eq!(cc.sge_boundary, chunk, "the coalescer cuts SGEs at the chunk size");
    let co = Coalescer::new(cc).unwrap();
    send_bitmap(&mut a, &co, &bm).unwrap();
    a.flush().unwrap();
    let chunks = a.registered_chunks();
    assert!(chunks > 1 && chunks <= 64, "{chunks} chunks of 64 KiB for a 4 MiB region");
    let pinned = a.pinned_bytes();
    // Same pages again: every chunk is cached, nothing new is pinned.
    send_bitmap(&mut a, &co, &bm).unwrap();
    assert_eq!((a.pinned_bytes(), a.registered_chunks()), (pinned, chunks));
    // A segment crossing chunk boundaries without the boundary rule is split into SGEs.
    let seg = [Segment { offset: chunk - 4096, len: (2 * chunk) as u32 }];
    a.post_writes(&[WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: chunk - 4096 }]).unwrap();
    a.flush().unwrap();
    a.send_message(b"done").unwrap();
    b.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap();
    assert!(same(&r.src, &r.dst));
}

#[test]
fn messages_ordered_after_writes_and_fragmented() {
    device_test!();
    let r = conf::regions(1 << 20);
    let (mut a, mut b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    let dst = r.dst.clone();
    // Receiver thread: after message i, the destination must hold round i's pattern.
    let rx: JoinHandle<Vec<usize>> = std::thread::spawn(move || {
        let mut sizes = Vec::new();
        for round in 0..20u8 {
            let m = b.recv_message(Some(Duration::from_secs(30))).unwrap().expect("message in time");
            assert_eq!(m[0], round, "messages in order");
            let mut page = [0u8; 64];
            for p in 0..256u64 {
                dst.read_at(p * 4096, &mut page);
                assert!(page.iter().all(|&x| x == round), "round {round}: page {p} not placed before the message");
            }
            assert!(m[1..].iter().enumerate().all(|(i, &x)| x == (i % 251) as u8), "payload intact");
            sizes.push(m.len());
            b.send_message(&[round]).unwrap(); // checked: the sender may overwrite the pages
        }
        // Many small messages, more than the ring of 32 credits: flow control.
        for i in 0..200u32 {
            let m = b.recv_message(Some(Duration::from_secs(30))).unwrap().expect("message in time");
            assert_eq!(m, i.to_le_bytes());
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(100)); // let the sender run out of credits
            }
        }
        drop(b);
        sizes
    });
    let full = PageBitmap::full(256);
    let co = Coalescer::new(a.coalesce_config(CoalesceConfig::default())).unwrap();
    for round in 0..20u8 {
        r.src.write_at(0, &vec![round; 1 << 20]);
        send_bitmap(&mut a, &co, &full).unwrap();
        // No flush: the SEND itself is ordered after the writes. Some messages are larger than
        // the 16 KiB receive buffers and go in fragments.
        let len = 1 + [0usize, 100, 16 << 10, 100 << 10][round as usize % 4];
        let mut msg = vec![round; len];
        for (i, x) in msg[1..].iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        a.send_message(&msg).unwrap();
        a.flush().unwrap();
        assert_eq!(a.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap(), [round]);
    }
    for i in 0..200u32 {
        a.send_message(&i.to_le_bytes()).unwrap();
    }
    let sizes = rx.join().unwrap();
    assert!(sizes.contains(&(1 + (100 << 10))));
    assert_eq!(a.stats().messages_sent, 220);
}

#[test]
fn wrong_secret_refused() {
    device_test!();
    let r = conf::regions(1 << 20);
    let (a, b) = try_pair(
        &cfg(),
        &cfg(),
        &r.src_table,
        &r.dst_table,
        &Secret::new("right-secret-right-secret-right-secret").unwrap(),
        &Secret::new("wrong-secret-wrong-secret-wrong-secret").unwrap(),
    );
    assert!(matches!(a, Err(TransportError::Handshake { .. })), "{a:?}");
    assert!(b.is_ok(), "the listener goes on after a refused peer: {b:?}");
}

#[test]
fn out_of_range_remote_write_is_a_typed_completion_error() {
    device_test!();
    let r = conf::regions(1 << 20);
    let (mut a, mut b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    // check_remote refuses it locally...
    let seg = [Segment { offset: 0, len: 8192 }];
    let past = WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: (1 << 20) - 4096 };
    assert!(matches!(a.post_writes(&[past]), Err(TransportError::RemoteRange { .. })));
    // ...so bypass it: the responder's MR bounds check fails the write.
    a.post_writes_unchecked(&[past]).unwrap();
    let t0 = Instant::now();
    let e = a.flush().unwrap_err();
    match &e {
        TransportError::Completion { wr_id, opcode, status, status_str } => {
            assert_eq!((*wr_id, *opcode), (1, "RDMA_WRITE"));
            assert_eq!(*status, device::status::REM_ACCESS_ERR, "{status_str}");
        }
        other => panic!("expected a Completion error, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
    // Sticky: later calls fail the same way, nothing hangs.
    assert!(matches!(
        a.post_writes(&[WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: 0 }]),
        Err(TransportError::Completion { .. })
    ));
    assert!(b.recv_message(Some(Duration::from_secs(2))).map(|m| m.is_none()).unwrap_or(true));
    let t0 = Instant::now();
    drop(a);
    drop(b);
    assert!(t0.elapsed() < Duration::from_secs(10), "teardown took {:?}", t0.elapsed());
}

#[test]
fn bad_rkey_is_a_typed_completion_error() {
    device_test!();
    let r = conf::regions(1 << 20);
    let (mut a, b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    for p in a.peer_regions_mut() {
        p.rkey ^= 0x5a5a_0000;
    }
    let seg = [Segment { offset: 0, len: 4096 }];
    a.post_writes_unchecked(&[WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: 0 }]).unwrap();
    match a.flush() {
        Err(TransportError::Completion { status, .. }) => assert_eq!(status, device::status::REM_ACCESS_ERR),
        other => panic!("expected a Completion error, got {other:?}"),
    }
    drop(b);
    drop(a);
}

#[test]
fn peer_disconnect_mid_transfer_is_an_error_not_a_hang() {
    device_test!();
    let r = conf::regions(4 << 20);
    let (mut a, mut b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    let server = std::thread::spawn(move || {
        let m = b.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap();
        assert_eq!(m, b"start");
        drop(b); // the destination goes away while writes are in flight
    });
    a.send_message(b"start").unwrap();
    let bm = PageBitmap::full(r.src.pages());
    let co = Coalescer::new(CoalesceConfig::per_page(4096)).unwrap();
    let t0 = Instant::now();
    let mut err = None;
    for _ in 0..100 {
        if let Err(e) = send_bitmap(&mut a, &co, &bm).and_then(|_| a.flush()) {
            err = Some(e);
            break;
        }
    }
    server.join().unwrap();
    let e = err.expect("writes to a vanished peer kept succeeding");
    assert!(matches!(e, TransportError::Disconnected(_) | TransportError::PeerAborted(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}", t0.elapsed());
    assert!(a.recv_message(Some(Duration::from_secs(5))).is_err());
    assert!(a.send_message(b"x").is_err());
}

#[test]
fn peer_disconnect_while_waiting_for_a_message() {
    device_test!();
    let r = conf::regions(1 << 20);
    let (mut a, b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(b);
    });
    let t0 = Instant::now();
    let e = a.recv_message(None).unwrap_err();
    assert!(matches!(e, TransportError::Disconnected(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    t.join().unwrap();
}

#[test]
fn last_message_before_drop_is_delivered() {
    device_test!();
    let r = conf::regions(1 << 20);
    let (mut a, mut b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    a.send_message(&vec![7u8; 40 << 10]).unwrap();
    a.send_message(b"bye").unwrap();
    drop(a);
    assert_eq!(b.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap().len(), 40 << 10);
    assert_eq!(b.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap(), b"bye");
    assert!(matches!(b.recv_message(Some(Duration::from_secs(10))), Err(TransportError::Disconnected(_))));
}

#[test]
fn both_directions_share_one_connection() {
    device_test!();
    // Each side exposes one region and sends from another: both write and message.
    let (ta, tb) = (RegionTable::new(), RegionTable::new());
    let mk = |id, acc| Arc::new(Region::anonymous(id, 256 << 10, 4096, acc).unwrap());
    let (a_src, a_dst, b_src, b_dst) =
        (mk(1, Access::LOCAL), mk(2, Access::REMOTE_WRITE), mk(1, Access::LOCAL), mk(2, Access::REMOTE_WRITE));
    let _g = [
        ta.register(a_src.clone()).unwrap(),
        ta.register(a_dst.clone()).unwrap(),
        tb.register(b_src.clone()).unwrap(),
        tb.register(b_dst.clone()).unwrap(),
    ];
    a_src.write_at(0, &[0xaa; 256 << 10]);
    b_src.write_at(0, &[0xbb; 256 << 10]);
    let (mut a, mut b) = pair(&cfg(), &cfg(), &ta, &tb);
    let bm = PageBitmap::full(64);
    let co = Coalescer::new(CoalesceConfig::default()).unwrap();
    send_bitmap(&mut a, &co, &bm).unwrap();
    send_bitmap(&mut b, &co, &bm).unwrap();
    a.send_message(b"a").unwrap();
    b.send_message(b"b").unwrap();
    assert_eq!(b.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap(), b"a");
    assert_eq!(a.recv_message(Some(Duration::from_secs(30))).unwrap().unwrap(), b"b");
    assert!(same(&a_src, &b_dst) && same(&b_src, &a_dst));
}

#[test]
fn conformance_suite() {
    device_test!();
    conf::transfer_random_pages(&boxed(cfg(), cfg()), 4 << 20);
    conf::window_back_pressure(&boxed(cfg(), cfg()));
    conf::remote_bounds_refused(&boxed(cfg(), cfg()));
    conf::peer_vanishes(&boxed(cfg(), cfg()));
}

#[test]
fn memlock_limit_is_checked_before_pinning() {
    device_test!();
    use super::device::{Context, ProtectionDomain};
    use super::registration::MrCache;
    let ctx = Context::open(&cfg().selection()).unwrap();
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let r = conf::regions(4 << 20);
    // Pin-all: the exposed 4 MiB region does not fit a 1 MiB limit.
    let mut c = MrCache::new(pd.clone(), RegistrationMode::PinAll, r.dst_table.clone());
    c.set_limit_for_test(Some(1 << 20));
    match c.setup() {
        Err(TransportError::Device(m)) => assert!(m.contains("ulimit -l 4096"), "{m}"),
        other => panic!("expected a memlock Device error, got {other:?}"),
    }
    assert_eq!(c.pinned(), 0, "nothing pinned after the refusal");
    // On demand: 64 KiB chunks fit a 128 KiB limit twice, the third chunk is refused.
    let chunk = NonZeroU64::new(64 << 10).unwrap();
    let mut c = MrCache::new(pd, RegistrationMode::OnDemand { chunk_size: chunk }, r.src_table.clone());
    c.set_limit_for_test(Some(128 << 10));
    assert!(c.setup().unwrap().is_empty(), "a source table exposes nothing");
    let mut sges = vec![];
    c.sges(1, Segment { offset: 0, len: 4096 }, &mut sges).unwrap();
    c.sges(1, Segment { offset: 4096, len: 4096 }, &mut sges).unwrap(); // same chunk: cached
    c.sges(1, Segment { offset: 64 << 10, len: 4096 }, &mut sges).unwrap();
    assert_eq!((c.chunk_count(), sges.len()), (2, 3));
    assert_eq!(sges[0].lkey, sges[1].lkey);
    let e = c.sges(1, Segment { offset: 128 << 10, len: 4096 }, &mut sges).unwrap_err();
    assert!(matches!(&e, TransportError::Device(m) if m.contains("ulimit -l 192")), "{e:?}");
    // Out of range is a LocalRange error, not a registration.
    let e = c.sges(1, Segment { offset: 4 << 20, len: 4096 }, &mut sges).unwrap_err();
    assert!(matches!(e, TransportError::LocalRange { .. }));
}

#[test]
fn cq_overrun_raises_a_cq_error_event() {
    device_test!();
    // A real asynchronous event through the FFI path (read, decode, ack) and the mapping: a
    // send CQ of one entry overrun by signaled writes of a queue pair connected to itself.
    use super::device::{
        CompletionQueue, Context, MemoryRegion, MrAccess, PreparedQueuePair, ProtectionDomain, QpCaps, SendBatch,
        SendOp,
    };
    use super::events::{classify, event_type, EventElement, Verdict, Watched};
    let ctx = Context::open(&cfg().selection()).unwrap();
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let mem = Arc::new(Region::anonymous(9, 4096, 4096, Access::REMOTE_WRITE).unwrap());
    let mr = MemoryRegion::register(&pd, mem, 0, 4096, MrAccess::RemoteWrite).unwrap();
    let scq = CompletionQueue::new(&ctx, 1, None).unwrap();
    let rcq = CompletionQueue::new(&ctx, 4, None).unwrap();
    let caps = QpCaps { max_send_wr: 64, max_recv_wr: 4, max_send_sge: 1, max_recv_sge: 1, max_inline: 0 };
    let qp = PreparedQueuePair::new(&pd, &scq, &rcq, caps).unwrap();
    let ep = qp.endpoint();
    let qp = qp.connect(ep).unwrap();
    assert_eq!(ctx.next_async_event().unwrap(), None, "nothing queued before the overrun");
    let mut batch = SendBatch::new();
    for i in 0..32 {
        batch.push(i, SendOp::Write { remote_addr: mr.addr(), rkey: mr.rkey() }, &[], true, false);
    }
    // SAFETY: zero-length writes, no SGE; the target MR outlives the QP (dropped after it).
    unsafe { qp.post_send(&mut batch) }.unwrap();
    let cqs = [(scq.handle(), "send"), (rcq.handle(), "receive")];
    let w = Watched { device: ctx.name(), port: ctx.port(), qp: (qp.handle(), qp.local().qpn), cqs: &cqs };
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let verdict = loop {
        match ctx.next_async_event().unwrap() {
            Some(ev) if ev.event_type == event_type::CQ_ERR => {
                assert_eq!(ev.element, EventElement::Cq(scq.handle()), "the overrun CQ is named");
                break classify(&ev, &w);
            }
            Some(ev) => seen.push(ev),
            None => {
                assert!(t0.elapsed() < Duration::from_secs(10), "no CQ_ERR within 10 s; other events: {seen:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    match verdict {
        Verdict::Fatal(r) => assert!(r.contains("send completion queue"), "{r}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    qp.set_error().unwrap();
    drop(qp);
    drop(mr);
}

#[test]
fn hostile_urgent_placements_and_announcements_are_refused() {
    device_test!();
    use crate::verbs::ctrl::UrgentMsg;
    let u = VerbsConfig { urgent_channel: true, ..cfg() };
    let r = conf::regions(1 << 20);
    // A placement naming bytes outside what the receiver exposed breaks the channel.
    for bad in [
        UrgentMsg::Placed { region: 2, offset: (1 << 20) - 4096, len: 8192 },
        UrgentMsg::Placed { region: 1, offset: 0, len: 4096 }, // the sender's own, not exposed
        UrgentMsg::Placed { region: 99, offset: 0, len: 4096 },
    ] {
        let (a, b) = pair(&u, &u, &r.src_table, &r.dst_table);
        a.urgent_raw_for_test(&bad.encode()).unwrap();
        let e = b.urgent().unwrap().recv(Some(Duration::from_secs(30))).unwrap_err();
        assert!(matches!(e, TransportError::Protocol(_)), "{bad:?}: {e:?}");
    }
    // An unknown tag, too.
    let (a, b) = pair(&u, &u, &r.src_table, &r.dst_table);
    a.urgent_raw_for_test(&[7, 1, 2, 3]).unwrap();
    let e = b.urgent().unwrap().recv(Some(Duration::from_secs(30))).unwrap_err();
    assert!(matches!(e, TransportError::Protocol(_)), "{e:?}");
    // A region announced twice (an id is never redefined) breaks the connection.
    let (mut a, mut b) = pair(&cfg(), &cfg(), &r.src_table, &r.dst_table);
    let again = a.peer_regions()[0]; // what b exposed at the handshake
    b.announce_for_test(&[again]).unwrap();
    let e = a.recv_message(Some(Duration::from_secs(30))).unwrap_err();
    assert!(matches!(e, TransportError::Protocol(_)), "{e:?}");
}
