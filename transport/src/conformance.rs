//! The transport conformance suite: the same checks run against every backend (TCP in the
//! host test suite, verbs inside the Soft-RoCE guest). A backend provides a function that
//! connects two endpoints given the region tables of each side.

use std::sync::Arc;
use std::time::Duration;

use crate::{
    Access, CoalesceConfig, Coalescer, PageBitmap, Region, RegionTable, Registration, Segment, Transport,
    TransportError, WriteRequest,
};

/// Connects a sender endpoint (first) to a receiver endpoint (second).
pub type Connect<'a> = &'a dyn Fn(&RegionTable, &RegionTable) -> (Box<dyn Transport>, Box<dyn Transport>);

/// A pair of regions of `len` bytes: source (id 1, local) and destination (id 2, exposed).
pub struct Regions {
    /// Sender's table.
    pub src_table: RegionTable,
    /// Receiver's table.
    pub dst_table: RegionTable,
    /// Source region.
    pub src: Arc<Region>,
    /// Destination region.
    pub dst: Arc<Region>,
    _regs: Vec<Registration>,
}

impl std::fmt::Debug for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regions").field("src", &self.src).field("dst", &self.dst).finish()
    }
}

/// Builds source and destination regions of `len` bytes.
pub fn regions(len: u64) -> Regions {
    let src = Arc::new(Region::anonymous(1, len, 4096, Access::LOCAL).expect("map source"));
    let dst = Arc::new(Region::anonymous(2, len, 4096, Access::REMOTE_WRITE).expect("map destination"));
    let (src_table, dst_table) = (RegionTable::new(), RegionTable::new());
    let regs =
        vec![src_table.register(src.clone()).expect("register"), dst_table.register(dst.clone()).expect("register")];
    Regions { src_table, dst_table, src, dst, _regs: regs }
}

pub use crate::testdata::fill_pages;

/// Posts the coalesced work requests for `bm` from region 1 to peer region 2.
pub fn send_bitmap(t: &mut dyn Transport, co: &Coalescer, bm: &PageBitmap) -> Result<u64, TransportError> {
    let mut wrs = Vec::new();
    co.coalesce(bm, &mut wrs);
    let reqs: Vec<WriteRequest<'_>> = wrs
        .iter()
        .map(|w| WriteRequest { local: 1, segments: &w.segments, remote: 2, remote_offset: w.offset })
        .collect();
    let mut last = 0;
    for chunk in reqs.chunks(256) {
        last = t.post_writes(chunk)?;
    }
    Ok(last)
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

/// Random dirty pages are transferred; the destination equals the source byte for byte, and
/// a message sent after the writes finds them placed.
pub fn transfer_random_pages(connect: Connect<'_>, len: u64) {
    let r = regions(len);
    let bm = random_bitmap(r.src.pages(), 42);
    fill_pages(&r.src, &bm, 7);
    let (mut a, mut b) = connect(&r.src_table, &r.dst_table);
    let co = Coalescer::new(CoalesceConfig::default()).expect("config");
    send_bitmap(a.as_mut(), &co, &bm).expect("post writes");
    a.send_message(b"done").expect("send message");
    let m = b.recv_message(Some(Duration::from_secs(60))).expect("receive").expect("message in time");
    assert_eq!(m, b"done");
    // SAFETY: the sender is idle (all writes placed: the message is ordered after them).
    let (s, d) = unsafe { (r.src.as_slice(), r.dst.as_slice()) };
    assert!(s == d, "destination differs from source");
    a.flush().expect("flush");
    let st = a.stats();
    assert_eq!(st.writes_completed, st.writes_posted);
    assert_eq!(b.stats().bytes_received, bm.count_ones() as u64 * 4096);
}

/// A small window still moves everything (back-pressure, selective signaling, flush).
pub fn window_back_pressure(connect: Connect<'_>) {
    let r = regions(8 << 20);
    let bm = PageBitmap::full(r.src.pages());
    fill_pages(&r.src, &bm, 3);
    let (mut a, mut b) = connect(&r.src_table, &r.dst_table);
    let co = Coalescer::new(CoalesceConfig::per_page(4096)).expect("config");
    let last = send_bitmap(a.as_mut(), &co, &bm).expect("post");
    a.flush().expect("flush");
    assert_eq!(a.poll_completions().expect("poll"), last);
    a.send_message(b"x").expect("msg");
    b.recv_message(Some(Duration::from_secs(60))).expect("recv").expect("in time");
    // SAFETY: writer idle, see above.
    assert!(unsafe { r.src.as_slice() == r.dst.as_slice() });
}

/// Requests outside what the peer exposed fail locally with a typed error.
pub fn remote_bounds_refused(connect: Connect<'_>) {
    let r = regions(1 << 20);
    let (mut a, _b) = connect(&r.src_table, &r.dst_table);
    let seg = [Segment { offset: 0, len: 4096 }];
    let past = WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: (1 << 20) - 100 };
    assert!(matches!(a.post_writes(&[past]), Err(TransportError::RemoteRange { .. })));
    let unknown = WriteRequest { local: 1, segments: &seg, remote: 99, remote_offset: 0 };
    assert!(matches!(a.post_writes(&[unknown]), Err(TransportError::RemoteRange { .. })));
    let local = [Segment { offset: (1 << 20) - 10, len: 4096 }];
    let bad_local = WriteRequest { local: 1, segments: &local, remote: 2, remote_offset: 0 };
    assert!(matches!(a.post_writes(&[bad_local]), Err(TransportError::LocalRange { .. })));
}

/// When the peer goes away, pending operations fail instead of hanging.
pub fn peer_vanishes(connect: Connect<'_>) {
    let r = regions(4 << 20);
    let (mut a, b) = connect(&r.src_table, &r.dst_table);
    drop(b);
    let co = Coalescer::new(CoalesceConfig::per_page(4096)).expect("config");
    let bm = PageBitmap::full(r.src.pages());
    let mut failed = false;
    for _ in 0..50 {
        if send_bitmap(a.as_mut(), &co, &bm).and_then(|_| a.flush()).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "writes to a vanished peer kept succeeding");
    assert!(a.recv_message(Some(Duration::from_secs(5))).is_err());
}

/// The urgent channel: while the sender's main thread streams bulk writes over the first
/// half of the regions, the receiver asks for pages of the second half on the urgent
/// channel from another thread; a responder thread at the sender answers each with an urgent
/// write. Every answer is reported as placed with exactly the requested range and holds the
/// sender's bytes; the bulk data arrives intact too. Returns the request-to-placement times.
pub fn urgent_pages_during_bulk(connect: Connect<'_>, len: u64, requests: usize) -> Vec<Duration> {
    let rg = regions(len);
    let pages = (len / 4096) as usize;
    let half = pages / 2;
    let mut all = PageBitmap::new(pages);
    all.set_range(0, pages);
    fill_pages(&rg.src, &all, 0x0e6e);
    let (mut tx, rx) = connect(&rg.src_table, &rg.dst_table);
    let (su, du) = (tx.urgent().expect("sender's urgent channel"), rx.urgent().expect("receiver's urgent channel"));
    let remote = tx.peer_regions()[0].id;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let times = std::thread::scope(|s| {
        // Responder: serve page requests (8-byte page index) with urgent writes.
        let responder = s.spawn(|| {
            let mut served = 0;
            while served < requests {
                match su.recv(Some(Duration::from_secs(10))).expect("urgent recv at the sender") {
                    Some(crate::UrgentEvent::Message(m)) => {
                        let p = u64::from_le_bytes(m.as_slice().try_into().expect("an 8-byte request"));
                        let seg = [Segment { offset: p * 4096, len: 4096 }];
                        let w = WriteRequest { local: 1, segments: &seg, remote, remote_offset: p * 4096 };
                        su.post_write(&w).expect("urgent write");
                        served += 1;
                    }
                    other => panic!("the sender expected a request, got {other:?}"),
                }
            }
        });
        // Requester at the receiver: one request at a time, pages of the second half.
        let requester = s.spawn(|| {
            let mut times = Vec::with_capacity(requests);
            for i in 0..requests {
                let p = (half + (i * 7919) % (pages - half)) as u64;
                let t0 = std::time::Instant::now();
                du.send_message(&p.to_le_bytes()).expect("urgent request");
                match du.recv(Some(Duration::from_secs(10))).expect("urgent recv at the receiver") {
                    Some(crate::UrgentEvent::Placed { region, offset, len }) => {
                        times.push(t0.elapsed());
                        assert_eq!((region, offset, len), (2, p * 4096, 4096), "placed range");
                        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
                        rg.src.read_at(p * 4096, &mut a);
                        rg.dst.read_at(p * 4096, &mut b);
                        assert!(a == b, "urgent page {p} differs");
                    }
                    other => panic!("the receiver expected a placement, got {other:?}"),
                }
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            times
        });
        // Bulk: the first half, again and again, until the requests are done.
        let co = Coalescer::new(CoalesceConfig::default()).expect("coalescer");
        let mut bulk = PageBitmap::new(pages);
        bulk.set_range(0, half);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            send_bitmap(tx.as_mut(), &co, &bulk).expect("bulk writes");
            tx.flush().expect("bulk flush");
        }
        responder.join().expect("responder");
        requester.join().expect("requester")
    });
    let mut bulk_bytes = (vec![0u8; 4096], vec![0u8; 4096]);
    for p in [0, half / 2, half - 1] {
        rg.src.read_at(p as u64 * 4096, &mut bulk_bytes.0);
        rg.dst.read_at(p as u64 * 4096, &mut bulk_bytes.1);
        assert!(bulk_bytes.0 == bulk_bytes.1, "bulk page {p} differs");
    }
    drop(rx);
    times
}

/// A region exposed after the handshake (a disk, a second guest region): once the peer has
/// read a message sent after the announcement, it can write the region with bulk writes
/// and, when the session has an urgent channel, with urgent writes; both land, and both are
/// bounds-checked like any exposed region. An id is registered once.
pub fn regions_exposed_mid_session(connect: Connect<'_>) {
    let rg = regions(1 << 20);
    let (mut a, mut b) = connect(&rg.src_table, &rg.dst_table);
    assert_eq!(a.peer_regions().len(), 1);
    // The receiver adds a region and tells the sender.
    let disk = Arc::new(Region::memfd(7, 256 << 10, 4096, crate::Access::REMOTE_WRITE).expect("memfd region"));
    let _reg = b.expose(disk.clone()).expect("expose");
    assert!(matches!(b.expose(disk.clone()), Err(TransportError::Register(_))), "an id is registered once");
    b.send_message(b"disk 7 is exposed").expect("message");
    assert_eq!(
        a.recv_message(Some(Duration::from_secs(20))).expect("receive").as_deref(),
        Some(&b"disk 7 is exposed"[..])
    );
    assert!(a.peer_regions().iter().any(|r| r.id == 7 && r.len == 256 << 10 && r.access.remote_write));
    rg.src.write_at(0, &[0x5a; 8192]);
    let seg = [Segment { offset: 0, len: 8192 }];
    a.post_writes(&[WriteRequest { local: 1, segments: &seg, remote: 7, remote_offset: 4096 }]).expect("write");
    a.flush().expect("flush");
    let mut got = vec![0u8; 8192];
    disk.read_at(4096, &mut got);
    assert!(got.iter().all(|&x| x == 0x5a), "bulk write into the new region");
    // Still bounds-checked like any exposed region.
    let w = WriteRequest { local: 1, segments: &seg, remote: 7, remote_offset: 250 << 10 };
    assert!(matches!(a.post_writes(&[w]), Err(TransportError::RemoteRange { .. })));
    if let (Ok(ua), Ok(ub)) = (a.urgent(), b.urgent()) {
        rg.src.write_at(65536, &[0xc3; 4096]);
        let seg = [Segment { offset: 65536, len: 4096 }];
        ua.post_write(&WriteRequest { local: 1, segments: &seg, remote: 7, remote_offset: 128 << 10 })
            .expect("urgent write into the new region");
        match ub.recv(Some(Duration::from_secs(20))).expect("urgent recv") {
            Some(crate::UrgentEvent::Placed { region, offset, len }) => {
                assert_eq!((region, offset, len), (7, 128 << 10, 4096));
            }
            other => panic!("expected a placement, got {other:?}"),
        }
        let mut got = vec![0u8; 4096];
        disk.read_at(128 << 10, &mut got);
        assert!(got.iter().all(|&x| x == 0xc3), "urgent write into the new region");
        let past = WriteRequest { local: 1, segments: &seg, remote: 7, remote_offset: 254 << 10 };
        assert!(matches!(ua.post_write(&past), Err(TransportError::RemoteRange { .. })));
    }
}

/// Byte-stream channels (the session has at least two): raw bytes both ways at once, far
/// beyond the message cap when `big` is, beside bulk writes; one direction ends cleanly; the
/// channel is taken once; the descriptor takes a zero-copy `splice` as a carrier's relay
/// does.
pub fn byte_channels_beside_bulk(connect: Connect<'_>, big: usize) {
    use std::io::{Read, Write};
    let rg = regions(8 << 20);
    let (mut a, mut b) = connect(&rg.src_table, &rg.dst_table);
    let (mut a0, mut b0) = (a.byte_channel(0).expect("channel 0"), b.byte_channel(0).expect("channel 0"));
    let (mut a1, mut b1) = (a.byte_channel(1).expect("channel 1"), b.byte_channel(1).expect("channel 1"));
    assert!(matches!(a.byte_channel(0), Err(TransportError::Unsupported(_))), "taken once");
    let big: Vec<u8> = (0..big as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let small: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::thread::scope(|s| {
        // A → B on channel 0, then end of stream.
        s.spawn(|| {
            a0.write_all(&big).expect("write channel 0");
            a0.shutdown_write().expect("end channel 0");
        });
        let got0 = s.spawn(|| {
            let mut v = Vec::new();
            b0.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
            b0.read_to_end(&mut v).expect("read channel 0");
            v
        });
        // B → A on channel 1, at the same time.
        s.spawn(|| b1.write_all(&small).expect("write channel 1"));
        let got1 = s.spawn(|| {
            let mut v = vec![0u8; small.len()];
            a1.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
            a1.read_exact(&mut v).expect("read channel 1");
            v
        });
        // Bulk writes on the session meanwhile.
        let mut all = PageBitmap::new(2048);
        all.set_range(0, 2048);
        fill_pages(&rg.src, &all, 9);
        let co = Coalescer::new(CoalesceConfig::default()).expect("coalescer");
        send_bitmap(a.as_mut(), &co, &all).expect("bulk");
        a.flush().expect("flush");
        assert!(got0.join().expect("reader 0") == big, "channel 0 bytes");
        assert!(got1.join().expect("reader 1") == small, "channel 1 bytes");
    });
    let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
    rg.src.read_at(4096 * 77, &mut x);
    rg.dst.read_at(4096 * 77, &mut y);
    assert_eq!(x, y, "bulk data beside the channels");
    // The descriptor is a socket a caller can splice into, as a carrier does.
    let fd = b1.raw_fd().expect("a channel has a descriptor");
    let mut p = [0; 2];
    let msg = b"spliced, not copied";
    // SAFETY: raw calls on descriptors this function owns (a fresh pipe) or borrows for the
    // call (the channel's socket); the buffer outlives the calls.
    unsafe {
        assert_eq!(libc::pipe(p.as_mut_ptr()), 0);
        assert_eq!(libc::write(p[1], msg.as_ptr().cast(), msg.len()), msg.len() as isize);
        let n = libc::splice(p[0], std::ptr::null_mut(), fd, std::ptr::null_mut(), msg.len(), 0);
        assert_eq!(n, msg.len() as isize);
        libc::close(p[0]);
        libc::close(p[1]);
    }
    let mut got = [0u8; 19];
    a1.read_exact(&mut got).expect("spliced bytes");
    assert_eq!(&got, msg);
    drop((a, b));
}

/// A burst of demand requests sent before any answer is read (more than the channel has
/// receive buffers on verbs), answered by a responder that writes each page: every answer
/// arrives, none waits on the other side's unread messages.
pub fn urgent_burst(connect: Connect<'_>, requests: usize) {
    let rg = regions(4 << 20);
    let pages = rg.src.pages();
    let mut all = PageBitmap::new(pages);
    all.set_range(0, pages);
    fill_pages(&rg.src, &all, 0xb0b);
    let (tx, rx) = connect(&rg.src_table, &rg.dst_table);
    let (su, du) = (tx.urgent().expect("sender's urgent channel"), rx.urgent().expect("receiver's urgent channel"));
    let remote = tx.peer_regions()[0].id;
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..requests {
                match su.recv(Some(Duration::from_secs(30))).expect("urgent recv at the sender") {
                    Some(crate::UrgentEvent::Message(m)) => {
                        let p = u64::from_le_bytes(m.as_slice().try_into().expect("an 8-byte request"));
                        let seg = [Segment { offset: p * 4096, len: 4096 }];
                        su.post_write(&WriteRequest { local: 1, segments: &seg, remote, remote_offset: p * 4096 })
                            .expect("urgent write");
                    }
                    other => panic!("the sender expected a request, got {other:?}"),
                }
            }
        });
        for i in 0..requests {
            du.send_message(&((i % pages) as u64).to_le_bytes()).expect("urgent request in a burst");
        }
        let mut placed = std::collections::BTreeSet::new();
        for _ in 0..requests {
            match du.recv(Some(Duration::from_secs(30))).expect("urgent recv at the receiver") {
                Some(crate::UrgentEvent::Placed { offset, len: 4096, .. }) => {
                    placed.insert(offset / 4096);
                }
                other => panic!("the receiver expected a placement, got {other:?}"),
            }
        }
        assert_eq!(placed.len(), requests.min(pages), "every requested page placed");
    });
    // SAFETY: both ends are idle now (every write was reported placed).
    let (a, b) = unsafe { (rg.src.as_slice(), rg.dst.as_slice()) };
    assert!(a[..requests.min(pages) * 4096] == b[..requests.min(pages) * 4096], "placed pages hold the source's bytes");
}
