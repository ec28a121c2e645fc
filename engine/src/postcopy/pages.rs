//! The destination's per-page state in post-copy, shared without locks by the fault handler
//! (which asks for pages) and the installers (which place what arrives on the urgent channel
//! and in the background push).
//!
//! ```text
//!   Missing ──fault──▶ Requested ──arrives──▶ Installing ──mapped──▶ Installed
//!      ├────────────────────arrives (urgent)────────┘                   ▲
//!      └──pushed (Placed)──▶ Landed ──fault, or the installer's turn──▶ Installing
//!      ├──announced zero──▶ Zero ──fault──▶ Installing (zero) ──────────┤
//!      └──pre-copied─────▶ Staged ─fault──▶ Installing (staged) ────────┘
//!   Zero / Staged ──invalidated (written again at the source)──▶ Missing
//! ```
//!
//! A pushed page is *landed* as soon as its `Placed` message is read (its bytes are in the
//! staging alias; nothing may write it again) and installed in turn by the control loop,
//! unless a fault gets there first and installs it at once: a fault never waits behind the
//! push's backlog of pages to hash and map. A page a fault had already requested is
//! installed as soon as it lands.
//!
//! A fault on a requested or installing page waits (the installation wakes it); a fault on an
//! installed page — one whose event was queued before the installation — is only woken. A
//! page announced as zero counts as arrived at once but is installed lazily, by the first
//! fault on it (or never: when placement ends, the page is a hole of the memfd and reads as
//! zeros anyway), so idle memory costs no zero-filling. A page pre-copied before the hand-over
//! (hybrid) is staged the same way: its content is in the page cache, the first fault maps it.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const MISSING: u8 = 0;
const REQUESTED: u8 = 1;
const INSTALLING: u8 = 2;
const INSTALLED: u8 = 3;
const ZERO: u8 = 4;
const STAGED: u8 = 5;
const LANDED: u8 = 6;

/// What the fault handler does with a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFault {
    /// First fault on a missing page: ask the source for it.
    Request,
    /// Already asked for, or arriving: wait for its installation.
    Wait,
    /// Installed meanwhile: wake the faulting thread.
    Wake,
    /// A zero page not installed yet: install it now (claimed by this call), then
    /// [`PageStates::lazy_installed`].
    InstallZero,
    /// A staged page (its content is in the page cache): map it now (claimed by this
    /// call), then [`PageStates::lazy_installed`].
    InstallStaged,
    /// A landed page (pushed, its bytes in the staging alias, not installed yet): hash and
    /// install it now (claimed by this call), then [`PageStates::installed_now`].
    InstallLanded,
    /// Not a page of the guest memory.
    OutOfRange,
}

/// What an arriving page finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnArrival {
    /// Install it; `requested` tells whether a fault was waiting for it.
    Install {
        /// A demand request was sent for it.
        requested: bool,
    },
    /// It arrived before (the source sent a page twice: a protocol violation).
    Duplicate,
    /// Not a page of the guest memory.
    OutOfRange,
}

/// What a pushed page finds when its `Placed` message is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLanded {
    /// Landed: installed later by the installer's turn or by the first fault.
    Landed,
    /// A fault asked for it: install it now (claimed), then [`PageStates::installed_now`].
    InstallNow,
    /// It arrived before (a protocol violation).
    Duplicate,
    /// Not a page of the guest memory.
    OutOfRange,
}

/// What a page announced as zero finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnZero {
    /// Nobody waits: it stays uninstalled until a fault (counted as arrived).
    Lazy,
    /// A fault asked for it: install it now (claimed), then [`PageStates::installed_now`].
    InstallNow,
    /// It arrived before (a protocol violation).
    Duplicate,
    /// Not a page of the guest memory.
    OutOfRange,
}

/// Per-page states of the guest memory at the destination.
#[derive(Debug)]
pub struct PageStates {
    s: Box<[AtomicU8]>,
    installed: AtomicUsize,
}

impl PageStates {
    /// `pages` pages, all missing.
    pub fn new(pages: usize) -> Self {
        PageStates { s: (0..pages).map(|_| AtomicU8::new(MISSING)).collect(), installed: AtomicUsize::new(0) }
    }

    /// Pages.
    pub fn pages(&self) -> usize {
        self.s.len()
    }

    /// Pages installed so far.
    pub fn installed(&self) -> usize {
        self.installed.load(Ordering::Acquire)
    }

    /// Whether every page is installed.
    pub fn complete(&self) -> bool {
        self.installed() == self.pages()
    }

    /// Whether `page` is installed (mapped into the guest's view).
    pub fn is_installed(&self, page: usize) -> bool {
        self.s.get(page).is_some_and(|s| s.load(Ordering::Acquire) == INSTALLED)
    }

    /// A fault on `page`.
    pub fn on_fault(&self, page: usize) -> OnFault {
        let Some(s) = self.s.get(page) else { return OnFault::OutOfRange };
        match s.compare_exchange(MISSING, REQUESTED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => OnFault::Request,
            Err(INSTALLED) => OnFault::Wake,
            Err(lazy @ (ZERO | STAGED | LANDED)) => {
                match s.compare_exchange(lazy, INSTALLING, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) if lazy == ZERO => OnFault::InstallZero,
                    Ok(_) if lazy == LANDED => OnFault::InstallLanded,
                    Ok(_) => OnFault::InstallStaged,
                    Err(INSTALLED) => OnFault::Wake,
                    Err(_) => OnFault::Wait,
                }
            }
            Err(_) => OnFault::Wait,
        }
    }

    /// `page` arrived: claims its installation (exactly one caller gets `Install`).
    pub fn on_arrival(&self, page: usize) -> OnArrival {
        let Some(s) = self.s.get(page) else { return OnArrival::OutOfRange };
        let mut cur = s.load(Ordering::Acquire);
        loop {
            let requested = match cur {
                MISSING => false,
                REQUESTED => true,
                _ => return OnArrival::Duplicate,
            };
            match s.compare_exchange(cur, INSTALLING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return OnArrival::Install { requested },
                // A fault turned Missing into Requested meanwhile: try again.
                Err(now) => cur = now,
            }
        }
    }

    /// Pushed `page`'s `Placed` message was read: its bytes are in the staging alias.
    pub fn on_landed(&self, page: usize) -> OnLanded {
        let Some(s) = self.s.get(page) else { return OnLanded::OutOfRange };
        match s.compare_exchange(MISSING, LANDED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => OnLanded::Landed,
            Err(REQUESTED) => match s.compare_exchange(REQUESTED, INSTALLING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => OnLanded::InstallNow,
                Err(_) => OnLanded::Duplicate,
            },
            Err(_) => OnLanded::Duplicate,
        }
    }

    /// Claims landed `page` for installation (then [`installed_now`](Self::installed_now));
    /// false if a fault claimed it first (or it is not landed).
    pub fn claim_landed(&self, page: usize) -> bool {
        self.s
            .get(page)
            .is_some_and(|s| s.compare_exchange(LANDED, INSTALLING, Ordering::AcqRel, Ordering::Acquire).is_ok())
    }

    /// The runs of landed pages not installed yet, in order (what a broken session left to
    /// install).
    pub fn landed_runs(&self) -> Vec<(usize, usize)> {
        self.runs_where(|st| st == LANDED)
    }

    fn runs_where(&self, pick: impl Fn(u8) -> bool) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (p, s) in self.s.iter().enumerate() {
            if pick(s.load(Ordering::Acquire)) {
                match runs.last_mut() {
                    Some((f, n)) if *f + *n == p => *n += 1,
                    _ => runs.push((p, 1)),
                }
            }
        }
        runs
    }

    /// Whether `page` has arrived (or is arriving): a second arrival would be a duplicate.
    pub fn has_arrived(&self, page: usize) -> bool {
        self.s.get(page).is_some_and(|s| !matches!(s.load(Ordering::Acquire), MISSING | REQUESTED))
    }

    /// `page` was announced as zero.
    pub fn on_zero(&self, page: usize) -> OnZero {
        let Some(s) = self.s.get(page) else { return OnZero::OutOfRange };
        if s.compare_exchange(MISSING, ZERO, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.installed.fetch_add(1, Ordering::AcqRel);
            return OnZero::Lazy;
        }
        match s.compare_exchange(REQUESTED, INSTALLING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => OnZero::InstallNow,
            Err(_) => OnZero::Duplicate,
        }
    }

    /// `page` was pre-copied (before the guest runs here): staged, installed by its first
    /// fault. False (nothing changed) if it had arrived already or is out of range.
    pub fn on_staged(&self, page: usize) -> bool {
        let Some(s) = self.s.get(page) else { return false };
        let ok = s.compare_exchange(MISSING, STAGED, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if ok {
            self.installed.fetch_add(1, Ordering::AcqRel);
        }
        ok
    }

    /// `page` changed at the source after it was staged or announced zero: it is missing
    /// again (it will be sent again). False if it was not staged or zero.
    pub fn invalidate(&self, page: usize) -> bool {
        let Some(s) = self.s.get(page) else { return false };
        let ok = [STAGED, ZERO]
            .iter()
            .any(|&from| s.compare_exchange(from, MISSING, Ordering::AcqRel, Ordering::Acquire).is_ok());
        if ok {
            self.installed.fetch_sub(1, Ordering::AcqRel);
        }
        ok
    }

    /// A page claimed by [`OnFault::InstallZero`] or [`OnFault::InstallStaged`] is mapped.
    pub fn lazy_installed(&self, page: usize) {
        if let Some(s) = self.s.get(page) {
            s.store(INSTALLED, Ordering::Release);
        }
    }

    /// The page claimed by [`on_arrival`](Self::on_arrival) is mapped.
    pub fn installed_now(&self, page: usize) {
        if let Some(s) = self.s.get(page) {
            if s.swap(INSTALLED, Ordering::AcqRel) == INSTALLING {
                self.installed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// The first page that has not arrived, if any (for error messages).
    pub fn first_missing(&self) -> Option<usize> {
        self.s.iter().position(|s| !matches!(s.load(Ordering::Acquire), INSTALLED | ZERO | STAGED))
    }

    /// The runs of pages that have not arrived (missing or requested), in order: what a
    /// source that takes the migration over must send again. Meaningful while no page is
    /// arriving (between sessions).
    pub fn missing_runs(&self) -> Vec<(usize, usize)> {
        self.runs_where(|st| matches!(st, MISSING | REQUESTED))
    }

    /// Pages a fault asked for that have not arrived: their demand requests must be sent
    /// again on a new session.
    pub fn requested(&self) -> Vec<usize> {
        self.s.iter().enumerate().filter(|(_, s)| s.load(Ordering::Acquire) == REQUESTED).map(|(p, _)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runs_and_requested_pages_are_what_has_not_arrived() {
        let p = PageStates::new(10);
        assert_eq!(p.missing_runs(), vec![(0, 10)]);
        assert_eq!(p.on_fault(3), OnFault::Request);
        assert_eq!(p.on_arrival(4), OnArrival::Install { requested: false });
        p.installed_now(4);
        assert_eq!(p.on_zero(5), OnZero::Lazy);
        assert!(p.on_staged(8));
        assert_eq!(p.missing_runs(), vec![(0, 4), (6, 2), (9, 1)]);
        assert_eq!(p.requested(), vec![3]);
        assert!(p.invalidate(8));
        assert_eq!(p.missing_runs(), vec![(0, 4), (6, 4)]);
    }

    #[test]
    fn a_page_is_requested_once_installed_once_and_then_only_woken() {
        let p = PageStates::new(4);
        assert_eq!(p.on_fault(1), OnFault::Request);
        assert_eq!(p.on_fault(1), OnFault::Wait, "a second fault waits for the first request");
        assert_eq!(p.on_arrival(1), OnArrival::Install { requested: true });
        assert_eq!(p.on_fault(1), OnFault::Wait, "installing: the installation wakes it");
        assert_eq!(p.on_arrival(1), OnArrival::Duplicate);
        p.installed_now(1);
        assert_eq!(p.on_fault(1), OnFault::Wake);
        assert_eq!(p.on_arrival(1), OnArrival::Duplicate);
        assert!(p.is_installed(1));
        assert_eq!(p.on_arrival(2), OnArrival::Install { requested: false });
        p.installed_now(2);
        assert_eq!(p.installed(), 2);
        assert_eq!(p.first_missing(), Some(0));
        assert_eq!(p.on_fault(9), OnFault::OutOfRange);
        assert_eq!(p.on_arrival(9), OnArrival::OutOfRange);
    }

    #[test]
    fn zero_pages_are_installed_by_their_first_fault_or_at_once_if_awaited() {
        let p = PageStates::new(4);
        assert_eq!(p.on_zero(0), OnZero::Lazy);
        assert_eq!(p.installed(), 1, "a lazy zero page has arrived");
        assert!(!p.is_installed(0));
        assert_eq!(p.on_fault(0), OnFault::InstallZero);
        assert_eq!(p.on_fault(0), OnFault::Wait, "a second fault waits for the first one's install");
        p.lazy_installed(0);
        assert_eq!(p.on_fault(0), OnFault::Wake);
        assert_eq!(p.installed(), 1);
        assert_eq!(p.on_fault(1), OnFault::Request);
        assert_eq!(p.on_zero(1), OnZero::InstallNow, "a fault waits: install now");
        p.installed_now(1);
        assert_eq!(p.installed(), 2);
        assert_eq!(p.on_zero(1), OnZero::Duplicate);
        assert_eq!(p.on_zero(0), OnZero::Duplicate);
        assert_eq!(p.on_arrival(0), OnArrival::Duplicate);
        assert_eq!(p.on_zero(7), OnZero::OutOfRange);
        assert_eq!(p.first_missing(), Some(2));
    }

    #[test]
    fn staged_pages_are_mapped_by_their_first_fault_unless_invalidated() {
        let p = PageStates::new(4);
        assert!(p.on_staged(0) && p.on_staged(1));
        assert!(!p.on_staged(1), "staged twice");
        assert_eq!(p.on_zero(2), OnZero::Lazy);
        assert_eq!(p.installed(), 3);
        assert!(p.invalidate(1) && p.invalidate(2), "written again at the source");
        assert!(!p.invalidate(3), "never arrived");
        assert_eq!(p.installed(), 1);
        assert_eq!(p.on_fault(0), OnFault::InstallStaged);
        p.lazy_installed(0);
        assert!(p.is_installed(0));
        assert_eq!(p.on_fault(1), OnFault::Request, "invalidated: asked for again");
        assert_eq!(p.on_arrival(1), OnArrival::Install { requested: true });
        assert_eq!(p.on_arrival(2), OnArrival::Install { requested: false });
        assert!(!p.invalidate(0), "installed pages are not invalidated");
    }

    #[test]
    fn landed_pages_are_installed_by_their_turn_or_by_a_fault_and_requested_ones_at_once() {
        let p = PageStates::new(5);
        assert_eq!(p.on_fault(1), OnFault::Request);
        for q in 0..4 {
            let expect = if q == 1 { OnLanded::InstallNow } else { OnLanded::Landed };
            assert_eq!(p.on_landed(q), expect, "page {q}");
        }
        assert_eq!(p.on_landed(2), OnLanded::Duplicate, "landed twice");
        assert_eq!(p.on_landed(9), OnLanded::OutOfRange);
        assert_eq!(p.on_arrival(3), OnArrival::Duplicate, "pushed, then sent urgently");
        assert!(p.has_arrived(0), "nothing may write a landed page");
        assert_eq!(p.landed_runs(), vec![(0, 1), (2, 2)]);
        assert_eq!(p.missing_runs(), vec![(4, 1)], "landed pages are not sent again");
        // A fault takes page 2 first; the installer's turn then skips it.
        assert_eq!(p.on_fault(2), OnFault::InstallLanded);
        assert!(!p.claim_landed(2));
        assert!(p.claim_landed(0) && p.claim_landed(3));
        assert!(!p.claim_landed(4), "missing, not landed");
        for q in 0..4 {
            p.installed_now(q);
        }
        assert_eq!(p.installed(), 4);
        assert_eq!(p.on_fault(2), OnFault::Wake);
        assert!(p.landed_runs().is_empty());
    }

    #[test]
    fn racing_arrivals_install_each_page_exactly_once() {
        let p = std::sync::Arc::new(PageStates::new(10_000));
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let p = &p;
                    s.spawn(move || {
                        let mut won = 0;
                        for q in 0..10_000 {
                            let _ = p.on_fault(q);
                            if let OnArrival::Install { .. } = p.on_arrival(q) {
                                p.installed_now(q);
                                won += 1;
                            }
                        }
                        won
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 10_000);
        assert!(p.complete());
    }
}
