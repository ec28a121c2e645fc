//! Raw Linux interfaces used by the dirty trackers: userfaultfd, the PAGEMAP_SCAN ioctl on
//! `/proc/self/pagemap`, eventfd and poll. Every `unsafe` of the dirty module lives here.
//!
//! Debian 12's kernel headers predate `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN` (Linux 6.7),
//! so the ABI is spelled out below; the numbers were checked against the C headers of a 6.x
//! kernel (see the `ioctl_numbers` test) and match /work/shared/probes/uffd-wp-async-pagemap-scan.c.
//!
//! None of these wrappers dereferences the tracked memory: they hand addresses to the kernel,
//! which checks them against its own VMA list and the userfaultfd registration. So a tracker
//! that outlives its region gets errors (ENOENT, EPERM, ENOMEM), never undefined behaviour.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{DirtyError, DirtyOp};

// ---- userfaultfd ABI (include/uapi/linux/userfaultfd.h) ----

/// `UFFD_API`: the only API version.
pub(super) const UFFD_API: u64 = 0xAA;
/// Flag for `userfaultfd(2)`: only trap faults raised in user mode.
pub(super) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Write-protect faults are reported (i.e. UFFDIO_REGISTER_MODE_WP works).
pub(super) const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write-protect on shmem and hugetlbfs (5.19+).
pub(super) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// UFFDIO_WRITEPROTECT also marks never-populated anonymous PTEs (6.4+).
pub(super) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves write-protect faults itself and records them (6.7+).
pub(super) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages with no page (cache) entry.
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_MINOR`: faults on pages in the page cache but not mapped here.
pub(crate) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shmem (memfd) mappings.
pub(crate) const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `uffd_msg.event` of a page fault.
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, ty, nr, size)` of asm-generic/ioctl.h (x86-64, arm64, riscv64 share it).
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg` (32 bytes), page-fault view of its union.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `arg.pagefault.flags`.
    pub flags: u64,
    /// `arg.pagefault.address` (page-aligned unless EXACT_ADDRESS was asked for).
    pub address: u64,
    /// `arg.pagefault.feat` (thread id) and padding.
    pub feat: u64,
}

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0xAA, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0xAA, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_CONTINUE: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x07, std::mem::size_of::<UffdioContinue>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>());
/// `_IO(0xAA, 0)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0xAA, 0x00, 0);

// ---- PAGEMAP_SCAN ABI (include/uapi/linux/fs.h, 6.7+) ----

/// Category: the page is write-protect-async capable.
#[allow(dead_code)]
pub(super) const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Category: the page was written since it was last write-protected.
pub(super) const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// PAGEMAP_SCAN category: the page is present (mapped) in the page table.
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Write-protect the pages that match (atomically with reporting them).
pub(super) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM unless every VMA in range is registered for async write-protect.
pub(super) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: a run `[start, end)` of pages sharing `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PageRegion {
    /// First byte address.
    pub start: u64,
    /// One past the last byte address.
    pub end: u64,
    /// `PAGE_IS_*` bits (masked by `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    /// Out: where the walk stopped (== `end` when it completed).
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

const PAGEMAP_SCAN: u64 = ioc(IOC_READ | IOC_WRITE, b'f', 16, std::mem::size_of::<PmScanArg>());

fn os_err(op: DirtyOp) -> impl FnOnce(io::Error) -> DirtyError {
    move |source| DirtyError::Os { op, source }
}

/// Returns `Err(last_os_error)` when a libc call returned a negative value.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The system page size (also the unit of pagemap entries).
pub(crate) fn os_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

/// An open userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// Opens a non-blocking, close-on-exec userfaultfd and negotiates `features` with
    /// UFFDIO_API. Tries `userfaultfd(2)` first, then `/dev/userfaultfd` when the syscall is
    /// refused (`vm.unprivileged_userfaultfd = 0` without CAP_SYS_PTRACE), then, only if
    /// `user_mode_only_ok`, the syscall restricted to user-mode faults (which the sysctl
    /// allows).
    pub(crate) fn open(features: u64, user_mode_only_ok: bool) -> Result<Self, DirtyError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match Self::syscall(flags) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => match Self::dev_userfaultfd(flags) {
                Ok(fd) => fd,
                Err(_) if user_mode_only_ok => Self::syscall(flags | UFFD_USER_MODE_ONLY)
                    .map_err(|_| DirtyError::Os { op: DirtyOp::OpenUserfaultfd, source: e })?,
                Err(_) => return Err(DirtyError::Os { op: DirtyOp::OpenUserfaultfd, source: e }),
            },
            Err(e) => return Err(DirtyError::Os { op: DirtyOp::OpenUserfaultfd, source: e }),
        };
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: `fd` is a userfaultfd we own; UFFDIO_API reads and writes exactly one
        // `struct uffdio_api`, which `api` is (repr(C), three u64).
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api as *mut UffdioApi) } as _)
            .map_err(os_err(DirtyOp::UffdApi))?;
        Ok(Uffd { fd, features: api.features })
    }

    /// Takes a userfaultfd another process created (of that process's address space: every
    /// ioctl on it acts there, whoever issues it) and negotiates `features` with UFFDIO_API.
    /// A descriptor configured before (handed over again) is refused by UFFDIO_API with
    /// EINVAL, as is a feature this kernel lacks: the features it has are then read from
    /// `/proc/self/fdinfo`, and it is taken only if it has all of `features`.
    pub(crate) fn adopt(fd: OwnedFd, features: u64) -> Result<Self, DirtyError> {
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api` (repr(C), three
        // u64) on a descriptor we own; on anything but a userfaultfd it fails (ENOTTY).
        match cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api as *mut UffdioApi) } as _) {
            Ok(_) => Ok(Uffd { fd, features: api.features }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                    .map_err(os_err(DirtyOp::UffdApi))?;
                match fdinfo_features(&info) {
                    Some(have) if have & features == features => Ok(Uffd { fd, features: have }),
                    Some(have) => Err(DirtyError::Unsupported {
                        mechanism: "a handed-over userfaultfd",
                        missing: format!(
                            "features {:#x} (it has {have:#x}: configured for another use, or this kernel lacks them)",
                            features & !have
                        ),
                    }),
                    None => Err(DirtyError::Os { op: DirtyOp::UffdApi, source: e }),
                }
            }
            Err(e) => Err(DirtyError::Os { op: DirtyOp::UffdApi, source: e }),
        }
    }

    fn syscall(flags: libc::c_int) -> io::Result<OwnedFd> {
        // SAFETY: userfaultfd(2) takes one int flag argument and returns a new fd or -1.
        let fd = cvt(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })?;
        // SAFETY: the syscall succeeded, so `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn dev_userfaultfd(flags: libc::c_int) -> io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the userfaultfd(2) flags by value and returns a
        // new fd or -1; `dev` stays open for the call.
        let fd = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) } as _)?;
        // SAFETY: the ioctl succeeded, so `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// The feature bits UFFDIO_API reported: every feature the kernel supports (the ones
    /// enabled on this fd are those requested in [`Uffd::open`]).
    pub(crate) fn supported_features(&self) -> u64 {
        self.features
    }

    /// The raw fd (for poll).
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// UFFDIO_REGISTER `[start, start+len)` in write-protect mode.
    pub(super) fn register_wp(&self, start: usize, len: usize) -> Result<(), DirtyError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: start as u64, len: len as u64 },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; the kernel
        // validates the range against this process's VMAs.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister) } as _)
            .map_err(os_err(DirtyOp::Register))?;
        Ok(())
    }

    /// UFFDIO_REGISTER `[start, start+len)` with the `UFFDIO_REGISTER_MODE_*` bits `mode`.
    pub(crate) fn register_modes(&self, start: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister { range: UffdioRange { start: start as u64, len: len as u64 }, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; the kernel
        // validates the range against this process's VMAs.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister) } as _)?;
        Ok(())
    }

    /// UFFDIO_CONTINUE `[start, start+len)`: maps the pages, present in the page cache, into
    /// the registered range and wakes the threads waiting on them. Retries EAGAIN. An
    /// EEXIST error means a page of the range is mapped already.
    pub(crate) fn continue_range(&self, start: usize, len: usize) -> io::Result<()> {
        let mut done = 0usize;
        let mut tries = 0;
        while done < len {
            let mut arg = UffdioContinue {
                range: UffdioRange { start: (start + done) as u64, len: (len - done) as u64 },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE reads and writes one `struct uffdio_continue`; the kernel
            // validates the range against the registration.
            let r = cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_CONTINUE as _, &mut arg as *mut UffdioContinue) } as _);
            if arg.mapped > 0 {
                done += arg.mapped as usize;
            }
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 1000 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// UFFDIO_UNREGISTER `[start, start+len)`.
    pub(crate) fn unregister(&self, start: usize, len: usize) -> Result<(), DirtyError> {
        let mut range = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`; the kernel validates it.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_UNREGISTER as _, &mut range as *mut UffdioRange) } as _)
            .map_err(os_err(DirtyOp::Unregister))?;
        Ok(())
    }

    /// UFFDIO_WRITEPROTECT `[start, start+len)`: protect (`wp`) or un-protect and wake the
    /// threads blocked on a write-protect fault in the range. Retries EAGAIN (the kernel
    /// returns it while the address space is changing under a non-cooperative event).
    pub(super) fn writeprotect(&self, start: usize, len: usize, wp: bool) -> io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start: start as u64, len: len as u64 },
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        let mut tries = 0;
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`; the kernel
            // validates the range against the registration.
            let r =
                cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_WRITEPROTECT as _, &mut arg as *mut UffdioWriteprotect) }
                    as _);
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 100 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// UFFDIO_WAKE `[start, start+len)`: last resort to release a writer when un-protecting
    /// its page failed.
    pub(crate) fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE as _, &mut range as *mut UffdioRange) } as _)?;
        Ok(())
    }

    /// Reads pending events into `buf`; returns how many (0 when none is pending).
    pub(crate) fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `size_of_val(buf)` bytes and UffdMsg is
            // plain old data for which any byte pattern is valid.
            let r = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), std::mem::size_of_val(buf)) };
            if r >= 0 {
                return Ok(r as usize / std::mem::size_of::<UffdMsg>());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(0),
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// The features a userfaultfd was configured with, from its `/proc/PID/fdinfo` text (the
/// kernel's `API:\t<api>:<features>:<ioctls>` line, hexadecimal).
pub(crate) fn fdinfo_features(info: &str) -> Option<u64> {
    let api = info.lines().find_map(|l| l.strip_prefix("API:"))?.trim();
    u64::from_str_radix(api.split(':').nth(1)?, 16).ok()
}

/// `/proc/self/pagemap`, for PAGEMAP_SCAN.
#[derive(Debug)]
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap` read-only.
    pub(crate) fn open() -> Result<Self, DirtyError> {
        let file = File::open("/proc/self/pagemap").map_err(os_err(DirtyOp::OpenPagemap))?;
        Ok(Pagemap { file })
    }

    /// Opens `/proc/PID/pagemap` of another process read-only (needs ptrace read access to
    /// it: the same user without restrictions, or CAP_SYS_PTRACE). PAGEMAP_SCAN on it walks
    /// that process's page tables.
    pub(crate) fn open_pid(pid: u32) -> Result<Self, DirtyError> {
        let file = File::open(format!("/proc/{pid}/pagemap")).map_err(os_err(DirtyOp::OpenPagemap))?;
        Ok(Pagemap { file })
    }

    /// True when the kernel implements PAGEMAP_SCAN: an empty scan succeeds there, while
    /// older kernels have no ioctl on pagemap at all (ENOTTY).
    pub(crate) fn supports_scan(&self) -> bool {
        let mut arg = PmScanArg { size: std::mem::size_of::<PmScanArg>() as u64, ..Default::default() };
        self.scan(&mut arg).is_ok()
    }

    /// Whether each base page of `[start, start + 8 * out.len() pages)` is present, from the
    /// classic pagemap interface (one 64-bit entry per base page, bit 63 = present): for
    /// kernels without PAGEMAP_SCAN (before 6.7). `start` is base-page aligned.
    pub(crate) fn present_entries(&self, start: usize, out: &mut [bool]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let base = os_page_size();
        let mut buf = vec![0u8; out.len() * 8];
        self.file.read_exact_at(&mut buf, (start / base * 8) as u64)?;
        for (o, e) in out.iter_mut().zip(buf.chunks_exact(8)) {
            *o = u64::from_ne_bytes(e.try_into().expect("8 bytes")) >> 63 == 1;
        }
        Ok(())
    }

    /// One PAGEMAP_SCAN call; `arg.vec`/`arg.vec_len` must describe a writable array of
    /// [`PageRegion`] (see [`Pagemap::scan_into`]). Returns the number of regions filled.
    fn scan(&self, arg: &mut PmScanArg) -> io::Result<usize> {
        // SAFETY: PAGEMAP_SCAN reads and writes one `struct pm_scan_arg` and writes at most
        // `vec_len` `struct page_region`s at `vec`; every caller passes either vec_len 0 or
        // the buffer of `scan_into`.
        let r = cvt(unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, arg as *mut PmScanArg) } as _)?;
        Ok(r as usize)
    }

    /// One PAGEMAP_SCAN over `[start, end)` with `flags`, reporting pages whose categories
    /// include all of `category_mask`, into `out`. Returns (regions filled, walk_end).
    pub(crate) fn scan_into(
        &self,
        start: usize,
        end: usize,
        flags: u64,
        category_mask: u64,
        out: &mut [PageRegion],
    ) -> io::Result<(usize, usize)> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start: start as u64,
            end: end as u64,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask,
            category_anyof_mask: 0,
            return_mask: category_mask,
        };
        let n = self.scan(&mut arg)?;
        Ok((n.min(out.len()), arg.walk_end as usize))
    }
}

/// An eventfd used to tell the fault-handler thread to exit.
#[derive(Debug)]
pub(super) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A non-blocking, close-on-exec eventfd.
    pub(super) fn new() -> Result<Self, DirtyError> {
        // SAFETY: eventfd(2) has no pointer arguments.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) } as _)
            .map_err(os_err(DirtyOp::Eventfd))?;
        // SAFETY: fresh descriptor owned by nobody else.
        Ok(EventFd { fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) } })
    }

    /// Makes the eventfd readable.
    pub(super) fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64, as eventfd requires.
        cvt(unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) } as _)?;
        Ok(())
    }

    /// The raw fd (for poll).
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Readiness of two fds after [`poll2`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Ready {
    /// revents of the first fd.
    pub a: i16,
    /// revents of the second fd.
    pub b: i16,
}

/// Blocks until `a` or `b` is readable (or in error); retries EINTR.
pub(super) fn poll2(a: RawFd, b: RawFd) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd { fd: a, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: b, events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(Ready { a: fds[0].revents, b: fds[1].revents });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Waits up to `timeout_ms` for `fd` to become readable; `Ok(false)` on timeout or EINTR.
pub(crate) fn poll_in(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EINTR) { Ok(false) } else { Err(e) };
    }
    Ok(r > 0)
}

/// Drops this process's page-table entries for `[start, start+len)` of a shared mapping
/// (`MADV_DONTNEED`): the page cache keeps the contents, the next access faults.
pub(crate) fn zap_mapping(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: on a shared file mapping MADV_DONTNEED only removes page-table entries; the
    // contents stay in the page cache and later accesses see them again. No Rust reference
    // into the range is invalidated (the memory stays mapped).
    if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Punches `[offset, offset+len)` out of the file `fd`: the range reads as zeros, holds no
/// pages, and its pages disappear from every mapping.
pub(crate) fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes a descriptor and a byte range; it touches no memory of ours.
    let r = unsafe {
        libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `[offset, offset+len)` of the file `fd` zero-filled pages present in the page
/// cache: the range is punched out (dropping whatever it held), then allocated again, which
/// gives fresh zeroed pages. Mappings of the range see zeros afterwards.
pub(crate) fn fallocate_zero(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes a descriptor and a byte range; it touches no memory of ours.
    let r = unsafe {
        libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fallocate(fd, 0, offset as i64, len as i64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `MADV_POPULATE_READ` (5.14+), absent from older libc crates' constants on some targets.
const MADV_POPULATE_READ: libc::c_int = 22;

/// Maps every page of `[start, start+len)` for reading without changing its contents, so
/// that a later UFFDIO_WRITEPROTECT finds a PTE to protect (anonymous memory without
/// UFFD_FEATURE_WP_UNPOPULATED). Never-written anonymous pages get the shared zero page, so
/// this costs no memory. Uses MADV_POPULATE_READ, or on kernels without it
/// `process_vm_readv` of one byte per page from this process (the kernel faults the pages in;
/// bad addresses give EFAULT rather than a crash).
pub(super) fn populate_read(start: usize, len: usize, os_page: usize) -> Result<(), DirtyError> {
    // SAFETY: madvise with MADV_POPULATE_READ does not change memory contents or the mapping;
    // the kernel validates the range (ENOMEM when unmapped).
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, MADV_POPULATE_READ) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(DirtyError::Os { op: DirtyOp::Prefault, source: e });
    }
    populate_read_vm(start, len, os_page)
}

/// The pre-5.14 path of [`populate_read`]: the kernel reads one byte per page of this
/// process with `process_vm_readv`, faulting each page in for reading.
pub(super) fn populate_read_vm(start: usize, len: usize, os_page: usize) -> Result<(), DirtyError> {
    const BATCH: usize = 1024; // IOV_MAX
    let mut sink = [0u8; BATCH];
    let sink_ptr = sink.as_mut_ptr();
    let pages = len.div_ceil(os_page);
    let mut p = 0;
    while p < pages {
        let n = (pages - p).min(BATCH);
        let local: Vec<libc::iovec> =
            (0..n).map(|i| libc::iovec { iov_base: sink_ptr.wrapping_add(i).cast(), iov_len: 1 }).collect();
        let remote: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec { iov_base: (start + (p + i) * os_page) as *mut libc::c_void, iov_len: 1 })
            .collect();
        // SAFETY: `local` points into `sink`, valid for `n` one-byte writes; `remote` holds
        // addresses of this process that the kernel reads through its page tables and
        // validates (EFAULT), never through our own loads.
        let r = unsafe { libc::process_vm_readv(libc::getpid(), local.as_ptr(), n as _, remote.as_ptr(), n as _, 0) };
        if r < 0 {
            return Err(DirtyError::Os { op: DirtyOp::Prefault, source: io::Error::last_os_error() });
        }
        p += n;
    }
    Ok(())
}

/// Whether the page at `addr` is present in this process's page tables (pagemap bit 63).
#[cfg(test)]
pub(super) fn page_present(addr: usize, os_page: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let f = File::open("/proc/self/pagemap").expect("pagemap");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / os_page * 8) as u64).expect("pagemap read");
    u64::from_ne_bytes(b) >> 63 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        // Values printed by a C program including <linux/userfaultfd.h> on this kernel.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::offset_of!(UffdMsg, address), 16);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
    }

    #[test]
    fn present_entries_agree_with_pagemap_scan() {
        let base = os_page_size();
        let len = 64 * base;
        // SAFETY: a fresh private anonymous mapping owned by this test, written only within
        // its length and unmapped at the end.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(m, libc::MAP_FAILED);
        let touched = [3usize, 10, 11, 12, 19, 63];
        for &p in &touched {
            // SAFETY: inside the mapping above.
            unsafe { *(m as *mut u8).add(p * base) = 1 };
        }
        let pm = Pagemap::open().expect("pagemap");
        let start = m as usize;
        let mut present = vec![false; 64];
        pm.present_entries(start, &mut present).expect("entries");
        let by_entries: Vec<usize> = (0..64).filter(|&i| present[i]).collect();
        assert_eq!(by_entries, touched, "pagemap entries");
        if pm.supports_scan() {
            let mut v = vec![PageRegion::default(); 64];
            let (n, _) = pm.scan_into(start, start + 64 * base, 0, PAGE_IS_PRESENT, &mut v).expect("scan");
            let by_scan: Vec<usize> = v[..n]
                .iter()
                .flat_map(|r| (r.start as usize - start) / base..(r.end as usize - start) / base)
                .collect();
            assert_eq!(by_scan, by_entries, "PAGEMAP_SCAN and the pagemap entries agree");
        }
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(m, len) };
    }
}
