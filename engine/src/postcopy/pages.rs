//! The destination's per-page state in post-copy, shared without locks by the fault handler
//! (which asks for pages) and the installers (which place what arrives on the urgent channel
//! and in the background push).
//!
//! ```text
//!   Missing ──fault──▶ Requested ──arrives──▶ Installing ──mapped──▶ Installed
//!      └────────────────────arrives (pushed)────────┘
//! ```
//!
//! A fault on a requested or installing page waits (the installation wakes it); a fault on an
//! installed page — one whose event was queued before the installation — is only woken.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const MISSING: u8 = 0;
const REQUESTED: u8 = 1;
const INSTALLING: u8 = 2;
const INSTALLED: u8 = 3;

/// What the fault handler does with a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFault {
    /// First fault on a missing page: ask the source for it.
    Request,
    /// Already asked for, or arriving: wait for its installation.
    Wait,
    /// Installed meanwhile: wake the faulting thread.
    Wake,
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

    /// Whether `page` is installed.
    pub fn is_installed(&self, page: usize) -> bool {
        self.s.get(page).is_some_and(|s| s.load(Ordering::Acquire) == INSTALLED)
    }

    /// A fault on `page`.
    pub fn on_fault(&self, page: usize) -> OnFault {
        let Some(s) = self.s.get(page) else { return OnFault::OutOfRange };
        match s.compare_exchange(MISSING, REQUESTED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => OnFault::Request,
            Err(INSTALLED) => OnFault::Wake,
            Err(_) => OnFault::Wait,
        }
    }

    /// `page` arrived: claims its installation (exactly one caller gets `Install`).
    pub fn on_arrival(&self, page: usize) -> OnArrival {
        let Some(s) = self.s.get(page) else { return OnArrival::OutOfRange };
        match s.swap(INSTALLING, Ordering::AcqRel) {
            MISSING => OnArrival::Install { requested: false },
            REQUESTED => OnArrival::Install { requested: true },
            prev => {
                // Put back what was there: the earlier arrival owns the page.
                s.store(prev, Ordering::Release);
                OnArrival::Duplicate
            }
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

    /// The first page not installed, if any (for error messages).
    pub fn first_missing(&self) -> Option<usize> {
        self.s.iter().position(|s| s.load(Ordering::Acquire) != INSTALLED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
