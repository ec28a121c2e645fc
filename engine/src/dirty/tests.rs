//! Real, in-process tests of both trackers on anonymous and memfd regions.
//!
//! Writes come from other threads, so the synchronous tracker's handler must resolve them;
//! every such thread is joined with a timeout so that a lost wake-up fails the test instead
//! of hanging it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use livemig_transport::{Access, Backing, PageBitmap, Region};

use super::*;

const PS: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(20);

fn region(backing: Backing, pages: usize, page_size: usize) -> Arc<Region> {
    let len = (pages * page_size) as u64;
    let r = match backing {
        Backing::Anonymous => Region::anonymous(1, len, page_size as u32, Access::LOCAL),
        Backing::Memfd => Region::memfd(1, len, page_size as u32, Access::LOCAL),
        other => panic!("no test region for {other:?}"),
    };
    Arc::new(r.expect("region"))
}

/// Runs `f` on a new thread and waits for it, failing the test on timeout.
fn on_thread(f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(TIMEOUT).expect("a thread touching the region never finished (writer left blocked?)");
}

/// Writes one byte into each of `pages` (region pages of `page_size`) from another thread.
fn write_pages(r: &Arc<Region>, pages: &[usize], page_size: usize, val: u8) {
    let (r, pages) = (r.clone(), pages.to_vec());
    on_thread(move || {
        for &p in &pages {
            // Vary the offset within the page; any byte dirties it.
            assert!(r.write_at((p * page_size + (p * 8) % page_size) as u64, &[val]));
        }
    });
}

/// Reads every page of the region from another thread.
fn read_all(r: &Arc<Region>) {
    let r = r.clone();
    on_thread(move || {
        let mut sum = 0u64;
        let mut b = [0u8; 1];
        for off in (0..r.len()).step_by(PS) {
            assert!(r.read_at(off, &mut b));
            sum += b[0] as u64;
        }
        std::hint::black_box(sum);
    });
}

fn collect_set(t: &mut dyn DirtySource, pages: usize) -> Vec<usize> {
    let mut bm = PageBitmap::new(pages);
    let n = t.collect(&mut bm).expect("collect");
    let got: Vec<usize> = bm.iter_ones().collect();
    assert_eq!(n, got.len(), "collect's count disagrees with the bits it set");
    got
}

/// The behaviour every tracker must have.
fn exercise(mut t: Box<dyn DirtySource>, r: &Arc<Region>) {
    let n = r.pages();
    // Populate the first pages before arming; the rest stays never-touched.
    write_pages(r, &(0..16).collect::<Vec<_>>(), PS, 0xAA);

    let mut bm = PageBitmap::new(n);
    assert!(matches!(t.collect(&mut bm), Err(DirtyError::NotStarted)));
    t.start().expect("start");
    assert_eq!(collect_set(t.as_mut(), n), Vec::<usize>::new(), "nothing written yet");

    let a = vec![1, 3, 5, 15, 17, 40, 63, 64, 65, 100, n - 1];
    write_pages(r, &a, PS, 1);
    assert_eq!(collect_set(t.as_mut(), n), a, "round A");

    let b = vec![2, 3, 64, 200, n - 2];
    write_pages(r, &b, PS, 2);
    write_pages(r, &b, PS, 3); // twice: still one page each
    assert_eq!(collect_set(t.as_mut(), n), b, "round B, no leftovers of A");

    assert_eq!(collect_set(t.as_mut(), n), Vec::<usize>::new(), "no writes");

    read_all(r);
    assert_eq!(collect_set(t.as_mut(), n), Vec::<usize>::new(), "reads are not writes");

    // collect ORs into the caller's bitmap and counts only this round.
    let mut acc = PageBitmap::new(n);
    acc.set(9);
    write_pages(r, &[7, 8], PS, 4);
    assert_eq!(t.collect(&mut acc).expect("collect"), 2);
    assert_eq!(acc.iter_ones().collect::<Vec<_>>(), vec![7, 8, 9]);

    let mut small = PageBitmap::new(n - 1);
    assert!(matches!(t.collect(&mut small), Err(DirtyError::BitmapTooSmall { .. })));

    // Stopped: writes run freely (no blocked writer) and are not tracked.
    t.stop();
    t.stop();
    write_pages(r, &[10, 11, 12], PS, 5);
    assert!(matches!(t.collect(&mut bm), Err(DirtyError::NotStarted)));

    // Restart: a clean slate.
    t.start().expect("restart");
    assert_eq!(collect_set(t.as_mut(), n), Vec::<usize>::new(), "clean after restart");
    write_pages(r, &[11], PS, 6);
    assert_eq!(collect_set(t.as_mut(), n), vec![11]);
    drop(t);
    write_pages(r, &[12], PS, 7); // dropped tracker leaves the region writable
}

/// Pre-copy correctness with a concurrent writer: copying the reported pages after each
/// collect, plus once more after the writer stops, reproduces the region exactly.
fn precopy_converges(mut t: Box<dyn DirtySource>, r: &Arc<Region>) {
    let n = r.pages();
    let words = r.len() as usize / 8;
    let load = |r: &Region, w: usize| {
        // SAFETY: `w < words`, so the word is inside the mapping, which `r` keeps alive; the
        // mapping is page-aligned so the u64 is aligned; concurrent access is atomic.
        unsafe { AtomicU64::from_ptr(r.as_ptr().cast::<u64>().add(w)) }.load(Ordering::Relaxed)
    };
    let copy_page = |shadow: &mut [u64], p: usize| {
        let first = p * PS / 8;
        for (i, slot) in shadow[first..first + PS / 8].iter_mut().enumerate() {
            *slot = load(r, first + i);
        }
    };

    t.start().expect("start");
    let mut shadow = vec![0u64; words];
    (0..n).for_each(|p| copy_page(&mut shadow, p));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut count = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let w = (x % words as u64) as usize;
                count += 1;
                // SAFETY: as in `load`: in bounds, aligned, kept alive by the Arc, atomic.
                unsafe { AtomicU64::from_ptr(r.as_ptr().cast::<u64>().add(w)) }.store(count, Ordering::Relaxed);
            }
            count
        })
    };
    let mut reported = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(3));
        let mut bm = PageBitmap::new(n);
        reported += t.collect(&mut bm).expect("collect");
        bm.iter_ones().for_each(|p| copy_page(&mut shadow, p));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    let mut bm = PageBitmap::new(n);
    t.collect(&mut bm).expect("final collect");
    bm.iter_ones().for_each(|p| copy_page(&mut shadow, p));
    assert!(writes > 0 && reported > 0, "writes {writes}, reported {reported}");
    let mismatched = (0..words).filter(|&w| shadow[w] != load(r, w)).count();
    assert_eq!(mismatched, 0, "words missed by the tracker ({} writes)", writes);
    t.stop();
}

fn kernel_has_async() -> bool {
    kernel_support().map(|k| k.has_async()).unwrap_or(false)
}

fn async_tracker(r: &Region) -> Box<dyn DirtySource> {
    Box::new(UffdAsyncTracker::new(r).expect("async tracker"))
}

fn sync_tracker(r: &Region, u: Unpopulated) -> Box<dyn DirtySource> {
    Box::new(UffdSyncTracker::with_unpopulated(r, u).expect("sync tracker"))
}

#[test]
fn async_anonymous() {
    if !kernel_has_async() {
        eprintln!("skipped: kernel lacks WP_ASYNC/PAGEMAP_SCAN");
        return;
    }
    let r = region(Backing::Anonymous, 256, PS);
    exercise(async_tracker(&r), &r);
}

#[test]
fn async_memfd() {
    if !kernel_has_async() {
        eprintln!("skipped: kernel lacks WP_ASYNC/PAGEMAP_SCAN");
        return;
    }
    let r = region(Backing::Memfd, 256, PS);
    exercise(async_tracker(&r), &r);
}

#[test]
fn sync_anonymous() {
    let r = region(Backing::Anonymous, 256, PS);
    exercise(sync_tracker(&r, Unpopulated::Auto), &r);
}

#[test]
fn sync_anonymous_prefault() {
    let r = region(Backing::Anonymous, 256, PS);
    let t = sync_tracker(&r, Unpopulated::Prefault);
    assert_eq!(t.mechanism(), "uffd-wp-sync(prefault)");
    exercise(t, &r);
}

#[test]
fn sync_memfd() {
    let r = region(Backing::Memfd, 256, PS);
    exercise(sync_tracker(&r, Unpopulated::Auto), &r);
}

#[test]
fn sync_memfd_prefault_mode_is_a_no_op() {
    let r = region(Backing::Memfd, 256, PS);
    let t = UffdSyncTracker::with_unpopulated(&r, Unpopulated::Prefault).expect("sync tracker");
    assert!(!t.prefaults(), "shmem is protected by PTE markers, never prefaulted");
    exercise(Box::new(t), &r);
}

#[test]
fn async_precopy_converges() {
    if !kernel_has_async() {
        return;
    }
    for backing in [Backing::Anonymous, Backing::Memfd] {
        let r = region(backing, 512, PS);
        precopy_converges(async_tracker(&r), &r);
    }
}

#[test]
fn sync_precopy_converges() {
    for (backing, u) in [
        (Backing::Anonymous, Unpopulated::Auto),
        (Backing::Anonymous, Unpopulated::Prefault),
        (Backing::Memfd, Unpopulated::Auto),
    ] {
        let r = region(backing, 512, PS);
        precopy_converges(sync_tracker(&r, u), &r);
    }
}

#[test]
fn open_tracker_prefers_async() {
    let r = region(Backing::Anonymous, 64, PS);
    let mut t = open_tracker(&r).expect("open_tracker");
    if kernel_has_async() {
        assert_eq!(t.mechanism(), "uffd-wp-async+pagemap-scan");
    } else {
        assert!(t.mechanism().starts_with("uffd-wp-sync"));
    }
    t.start().expect("start");
    write_pages(&r, &[4, 60], PS, 1);
    assert_eq!(collect_set(t.as_mut(), 64), vec![4, 60]);
}

#[test]
fn region_pages_larger_than_system_pages() {
    // 16 KiB region pages: a write to any 4 KiB piece dirties the whole region page, and a
    // collected region page is re-armed whole.
    const RPS: usize = 16384;
    let r = region(Backing::Anonymous, 32, RPS);
    let mut trackers = vec![sync_tracker(&r, Unpopulated::Auto)];
    if kernel_has_async() {
        trackers.push(async_tracker(&r));
    }
    for mut t in trackers {
        t.start().expect("start");
        let r2 = r.clone();
        on_thread(move || {
            assert!(r2.write_at((3 * RPS + 3 * PS + 5) as u64, &[1]));
            assert!(r2.write_at((31 * RPS) as u64, &[1]));
        });
        assert_eq!(collect_set(t.as_mut(), 32), vec![3, 31]);
        let r2 = r.clone();
        on_thread(move || assert!(r2.write_at((3 * RPS + PS) as u64, &[2])));
        assert_eq!(collect_set(t.as_mut(), 32), vec![3], "the whole region page was re-armed");
        assert_eq!(collect_set(t.as_mut(), 32), Vec::<usize>::new());
        t.stop();
    }
}

#[test]
fn prefault_without_madvise_maps_pages() {
    // The fallback for kernels without MADV_POPULATE_READ (< 5.14).
    let r = region(Backing::Anonymous, 64, PS);
    let base = r.as_ptr() as usize;
    assert!(!sys::page_present(base + 10 * PS, PS), "fresh anonymous memory is unpopulated");
    sys::populate_read_vm(base, 64 * PS, PS).expect("populate");
    assert!((0..64).all(|p| sys::page_present(base + p * PS, PS)));
    let mut b = [1u8; 1];
    assert!(r.read_at(10 * PS as u64, &mut b) && b[0] == 0, "contents unchanged");
}

#[test]
fn geometry_maps_ranges() {
    let g = Geometry::new(0x10000, 10 * 4096, 4096, 4096).unwrap();
    let mut bm = PageBitmap::new(10);
    g.mark(&mut bm, 0x10000 + 4096, 0x10000 + 3 * 4096);
    g.mark(&mut bm, 0, 0x10000 + 1); // clamped at the start, partial page counts
    g.mark(&mut bm, 0x10000 + 9 * 4096, usize::MAX / 2); // clamped at the end
    g.mark(&mut bm, 0x10000 + 20 * 4096, 0x10000 + 21 * 4096); // outside: ignored
    assert_eq!(bm.iter_ones().collect::<Vec<_>>(), vec![0, 1, 2, 9]);
    assert_eq!(g.os_range(2, 3), (0x10000 + 2 * 4096, 3 * 4096));

    // Region pages of 16 KiB on 4 KiB system pages.
    let g = Geometry::new(0x100000, 4 * 16384, 16384, 4096).unwrap();
    let mut bm = PageBitmap::new(4);
    g.mark(&mut bm, 0x100000 + 16384 + 4096, 0x100000 + 16384 + 8192);
    assert_eq!(bm.iter_ones().collect::<Vec<_>>(), vec![1]);
    assert_eq!(g.os_range(1, 2), (0x100000 + 16384, 2 * 16384));

    // Region pages of 1 KiB on 4 KiB system pages: a system page spans four region pages.
    let g = Geometry::new(0x100000, 10 * 1024, 1024, 4096).unwrap();
    assert_eq!(g.span, 3 * 4096);
    let mut bm = PageBitmap::new(10);
    g.mark(&mut bm, 0x100000 + 8192, 0x100000 + 12288);
    assert_eq!(bm.iter_ones().collect::<Vec<_>>(), vec![8, 9]);
    assert_eq!(g.os_range(5, 1), (0x100000 + 4096, 4096));
    assert_eq!(g.os_range(9, 1), (0x100000 + 8192, 4096));

    assert!(matches!(Geometry::new(0, 4096, 3000, 4096), Err(DirtyError::PageSize { .. })));
    assert!(matches!(Geometry::new(100, 4096, 4096, 4096), Err(DirtyError::PageSize { .. })));
}

#[test]
fn errors_name_the_operation() {
    let e = DirtyError::Os { op: DirtyOp::PagemapScan, source: std::io::Error::from_raw_os_error(libc::EPERM) };
    assert_eq!(e.to_string(), "PAGEMAP_SCAN failed");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn a_userfaultfds_features_are_read_from_fdinfo() {
    let info = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\npending:\t0\ntotal:\t0\nAPI:\taa:a800:c000000000000000\n";
    assert_eq!(super::sys::fdinfo_features(info), Some(0xa800));
    assert_eq!(super::sys::fdinfo_features("pending:\t0\n"), None);
    assert_eq!(super::sys::fdinfo_features("API:\tzz\n"), None);
}

/// A userfaultfd handed over twice: configured the first time, taken again the second with
/// the same features, refused for features it was not configured with.
#[test]
fn a_handed_over_userfaultfd_is_taken_again_only_with_its_features() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let wp = super::sys::UFFD_FEATURE_WP_ASYNC | super::sys::UFFD_FEATURE_WP_UNPOPULATED;
    if !super::kernel_support().unwrap().has_async() {
        eprintln!("SKIPPED: no asynchronous write-protect on this kernel");
        return;
    }
    // SAFETY: userfaultfd(2) takes one int flag argument and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(raw >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let again = fd.try_clone().unwrap();
    let other = fd.try_clone().unwrap();
    let first = super::sys::Uffd::adopt(fd, wp).unwrap();
    assert_eq!(first.supported_features() & wp, wp);
    let second = super::sys::Uffd::adopt(again, wp).unwrap();
    assert_eq!(second.supported_features() & wp, wp);
    assert!(matches!(
        super::sys::Uffd::adopt(other, super::sys::UFFD_FEATURE_MINOR_SHMEM),
        Err(DirtyError::Unsupported { .. })
    ));
}
