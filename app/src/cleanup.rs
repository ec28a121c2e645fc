//! Clean exits for commands that make things outside their own process (child processes,
//! network namespaces and the veth pair inside them): every exit path removes them.
//!
//! - Normal returns and errors: the owners' drop guards ([`ChildGuard`], and the namespace
//!   guard of `--local --link`) remove what they made.
//! - `SIGINT`, `SIGTERM`, `SIGHUP` to this process (Ctrl-C, `timeout`, a closed terminal):
//!   [`install`] starts a thread that, on the first such signal, stops every registered child
//!   (`SIGTERM`, then `SIGKILL` after a grace period), deletes every registered namespace,
//!   and exits with status 128 + the signal number.
//! - This process killed outright (`SIGKILL`): children started through [`dies_with_parent`]
//!   get `SIGTERM` from the kernel (`PR_SET_PDEATHSIG`); namespaces cannot be removed then.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

#[derive(Debug, Default)]
struct Registry {
    children: Vec<u32>,
    namespaces: Vec<String>,
    /// The signal thread has taken the lists: anything registered from now on is removed
    /// at once.
    closing: bool,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    registry().lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the signal thread (idempotent).
pub fn install() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    static ONCE: OnceLock<()> = OnceLock::new();
    if ONCE.get().is_some() {
        return Ok(());
    }
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Set in the handler itself, before any child can die of the same Ctrl-C.
        signal_hook::flag::register(sig, interrupted_flag().clone()).context("installing signal handlers")?;
    }
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("livemig-cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let (children, namespaces) = clean_all();
                eprintln!(
                    "interrupted (signal {sig}): stopped {children} child process(es), removed {namespaces} network namespace(s)"
                );
                std::process::exit(128 + sig);
            }
        })
        .context("starting the cleanup thread")?;
    let _ = ONCE.set(());
    Ok(())
}

fn interrupted_flag() -> &'static std::sync::Arc<std::sync::atomic::AtomicBool> {
    static F: OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = OnceLock::new();
    F.get_or_init(Default::default)
}

/// Called where a child's failure is noticed: if a signal is ending this process, the
/// child most likely died of the same signal (Ctrl-C reaches the whole process group), and
/// the signal thread is about to clean up and exit — wait for it instead of reporting the
/// child's death as the error.
pub fn yield_to_signal() {
    if interrupted_flag().load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(30));
    }
}

/// Stops every registered child and deletes every registered namespace; returns the counts.
/// The first signals go out under the registry lock: an owner unregisters a child before it
/// reaps it ([`OwnedChild`]), so no pid signalled here can have been reaped and reused.
fn clean_all() -> (usize, usize) {
    let (children, namespaces) = {
        let mut r = lock();
        r.closing = true;
        for &pid in &r.children {
            signal(pid, libc::SIGTERM);
        }
        (std::mem::take(&mut r.children), std::mem::take(&mut r.namespaces))
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    for &pid in &children {
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            signal(pid, libc::SIGKILL);
        }
    }
    for ns in &namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    (children.len(), namespaces.len())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH, which is ignored.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether `pid` is still a running child of ours (reaps it if it exited).
fn alive(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`, a live local.
    let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    rc == 0
}

/// Makes `cmd`'s process receive `SIGTERM` when this process dies, however it dies.
pub fn dies_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only prctl, getppid
    // and _exit, all async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(143);
            }
            Ok(())
        })
    }
}

/// A registered child process: stopped by the signal thread if a signal ends this process
/// first; unregistered on drop.
#[derive(Debug)]
pub struct ChildGuard(u32);

impl ChildGuard {
    /// Registers `pid` (a child this process spawned). Unregister it (drop the guard) before
    /// reaping the child.
    pub fn new(pid: u32) -> ChildGuard {
        let mut r = lock();
        if r.closing {
            signal(pid, libc::SIGTERM);
        } else {
            r.children.push(pid);
        }
        ChildGuard(pid)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        lock().children.retain(|&p| p != self.0);
    }
}

/// Registers a network namespace this process created (see [`forget_namespace`]).
pub fn register_namespace(name: &str) {
    let mut r = lock();
    if r.closing {
        drop(r);
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    } else {
        r.namespaces.push(name.to_string());
    }
}

/// Unregisters a namespace its owner deleted.
pub fn forget_namespace(name: &str) {
    lock().namespaces.retain(|n| n != name);
}

/// A child process this process owns: registered with the signal thread, and stopped
/// (`SIGKILL`) if still running when dropped, so an error return leaves nothing behind.
#[derive(Debug)]
pub struct OwnedChild {
    child: std::process::Child,
    guard: Option<ChildGuard>,
}

impl OwnedChild {
    /// Spawns `cmd`, which dies with this process ([`dies_with_parent`]).
    pub fn spawn(cmd: &mut Command) -> std::io::Result<OwnedChild> {
        let child = dies_with_parent(cmd).spawn()?;
        let guard = ChildGuard::new(child.id());
        Ok(OwnedChild { child, guard: Some(guard) })
    }

    /// The child (reap it only through [`wait`](Self::wait) or [`try_wait`](Self::try_wait)).
    pub fn child(&mut self) -> &mut std::process::Child {
        &mut self.child
    }

    /// Its exit status if it has exited (reaped then, after unregistering), else `None`.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        // SAFETY: `info` is a zeroed siginfo_t that waitid fills; the pid is our child's.
        let (rc, pid) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc =
                libc::waitid(libc::P_PID, self.child.id(), &mut info, libc::WEXITED | libc::WNOWAIT | libc::WNOHANG);
            (rc, info.si_pid())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            return Ok(None);
        }
        self.wait().map(Some)
    }

    /// Waits for it to exit: first without reaping it (`waitid` with `WNOWAIT`), then
    /// unregisters it, then reaps it — its pid stays its own while the signal thread may use it.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if self.guard.is_some() {
            loop {
                // SAFETY: `info` is a zeroed siginfo_t that waitid fills; the pid is our child's.
                let rc = unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::waitid(libc::P_PID, self.child.id(), &mut info, libc::WEXITED | libc::WNOWAIT)
                };
                if rc == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            self.guard = None;
        }
        self.child.wait()
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        // Not reaped yet (a zombie's pid is still ours): kill is safe either way.
        let _ = self.child.kill();
        // Unregistered before it is reaped (see `wait`).
        let _ = self.wait();
    }
}
