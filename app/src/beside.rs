//! Work that moves beside a memory migration and switches over with it: the guest's disks.
//!
//! [`Beside`] is what `migrate` needs of it; [`WithBeside`] ties it to the guest's pause, so
//! the switchover of both is one: the guest stops, everything beside is handed over, and only
//! then do the memory's last pages go. Something that cannot be handed over fails the
//! migration before the destination may run; the guest then runs on at the source only if
//! everything beside is still there.

use livemig_engine::guest::{GuestControl, GuestError};

/// Why the switchover of the work beside failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct SwitchoverFailed {
    /// What failed.
    pub reason: String,
    /// Everything is still at the source: the guest may run on there.
    pub all_at_source: bool,
}

/// Work moving beside the guest's memory.
pub trait Beside: Send {
    /// Called with the guest paused, before its last pages go: hand everything over and
    /// return once the destination serves it.
    fn switch_over(&mut self) -> Result<(), SwitchoverFailed>;
    /// The memory migration failed before the switchover: stop, leaving everything at the
    /// source.
    fn cancel(&mut self);
    /// Short names of what moves, for the log.
    fn describe(&self) -> String;
    /// After the memory migration ended (and [`cancel`](Self::cancel) if nothing was handed
    /// over): waits for everything beside to end and reports how it did, for the summary.
    fn finish(&mut self) -> serde_json::Value;
}

/// A guest whose pause also switches over the work beside it.
pub struct WithBeside<'a> {
    guest: &'a mut dyn GuestControl,
    beside: &'a mut dyn Beside,
    handed_over: bool,
    /// How long the switchover of the work beside took (inside the downtime).
    pub switchover: Option<std::time::Duration>,
}

impl std::fmt::Debug for WithBeside<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithBeside")
            .field("beside", &self.beside.describe())
            .field("handed_over", &self.handed_over)
            .field("switchover", &self.switchover)
            .finish()
    }
}

impl<'a> WithBeside<'a> {
    /// `guest`, with `beside` switched over at its pause.
    pub fn new(guest: &'a mut dyn GuestControl, beside: &'a mut dyn Beside) -> Self {
        Self { guest, beside, handed_over: false, switchover: None }
    }

    /// Whether the work beside was handed over (then the guest must not run at the source).
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }
}

impl GuestControl for WithBeside<'_> {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.guest.pause()?;
        let t0 = std::time::Instant::now();
        match self.beside.switch_over() {
            Ok(()) => {
                self.handed_over = true;
                self.switchover = Some(t0.elapsed());
                Ok(())
            }
            Err(e) if e.all_at_source => {
                // Nothing left the source: the guest runs on there with everything intact.
                self.beside.cancel();
                self.guest.resume()?;
                Err(GuestError::new("pause", format!("{} (the guest runs on at the source)", e.reason)))
            }
            Err(e) => {
                self.handed_over = true;
                Err(GuestError::new(
                    "pause",
                    format!("{} (part of it was handed over: the guest stays paused at the source)", e.reason),
                ))
            }
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        if self.handed_over {
            return Err(GuestError::new(
                "resume",
                format!("{} was handed over: the guest must not run at the source without it", self.beside.describe()),
            ));
        }
        self.beside.cancel();
        self.guest.resume()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        self.guest.save_state()
    }

    fn handed_over(&mut self) {
        self.guest.handed_over()
    }

    fn progress(&self) -> Option<u64> {
        self.guest.progress()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_engine::guest::Idle;

    struct Fake {
        fail: Option<SwitchoverFailed>,
        cancelled: bool,
    }
    impl Beside for Fake {
        fn switch_over(&mut self) -> Result<(), SwitchoverFailed> {
            self.fail.clone().map_or(Ok(()), Err)
        }
        fn cancel(&mut self) {
            self.cancelled = true;
        }
        fn describe(&self) -> String {
            "disk".into()
        }
        fn finish(&mut self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    #[test]
    fn a_guest_whose_disks_were_handed_over_never_resumes_at_the_source() {
        let (mut g, mut b) = (Idle, Fake { fail: None, cancelled: false });
        let mut w = WithBeside::new(&mut g, &mut b);
        w.pause().unwrap();
        assert!(w.handed_over() && w.switchover.is_some());
        assert!(w.resume().is_err());
    }

    #[test]
    fn a_failed_switchover_resumes_the_guest_only_with_everything_at_the_source() {
        let fail = SwitchoverFailed { reason: "refused".into(), all_at_source: true };
        let (mut g, mut b) = (Idle, Fake { fail: Some(fail), cancelled: false });
        let mut w = WithBeside::new(&mut g, &mut b);
        let e = w.pause().unwrap_err();
        assert!(e.source.to_string().contains("runs on at the source"), "{e}");
        assert!(!w.handed_over());
        assert!(b.cancelled);

        let fail = SwitchoverFailed { reason: "half".into(), all_at_source: false };
        let (mut g, mut b) = (Idle, Fake { fail: Some(fail), cancelled: false });
        let mut w = WithBeside::new(&mut g, &mut b);
        assert!(w.pause().is_err());
        assert!(w.handed_over());
        assert!(w.resume().is_err());
        assert!(!b.cancelled);
    }

    #[test]
    fn a_migration_that_fails_before_the_pause_cancels_the_work_beside() {
        let (mut g, mut b) = (Idle, Fake { fail: None, cancelled: false });
        let mut w = WithBeside::new(&mut g, &mut b);
        w.resume().unwrap();
        assert!(b.cancelled);
    }
}
