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

/// Fills the pages of `bm` in `r` with pseudo-random bytes (seeded).
pub fn fill_pages(r: &Region, bm: &PageBitmap, seed: u64) {
    let ps = r.page_size() as usize;
    let mut x = seed | 1;
    let mut page = vec![0u8; ps];
    for p in bm.iter_ones() {
        for c in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        r.write_at((p * ps) as u64, &page);
    }
}

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
