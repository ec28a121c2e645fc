//! External RAM: QEMU's guest RAM moved by livemig's engine, QEMU's own stream carrying only
//! the device state (and its small non-shared RAM blocks: firmware, option ROMs).
//!
//! Needs QEMU with livemig's patch (`qemu-patch/qemu/`): guest RAM in shared memory
//! (`memory-backend-memfd,share=on`) and the `x-ignore-shared` capability on both QEMUs, so
//! QEMU's stream skips it. `x-livemig-attach` makes QEMU connect to a unix socket of this
//! process and send, with SCM_RIGHTS, the RAM blocks' descriptors and a userfaultfd of its
//! own address space ([`decode_attach`] reads the description). livemig maps the blocks
//! itself and runs the engine on them:
//!
//! - source: writes are tracked through QEMU's userfaultfd (asynchronous write-protect on
//!   QEMU's mappings, `PAGEMAP_SCAN` over `/proc/PID/pagemap`); the guest control is QMP —
//!   pausing is QEMU's `migrate` with `pause-before-switchover` (QEMU stops the guest and
//!   waits in `pre-switchover`), the hand-over is `migrate-continue` (QEMU sends the device
//!   state), resuming after a failure is `migrate_cancel`;
//! - destination: pre-copy writes pages straight into QEMU's memory (the same page cache);
//!   post-copy registers QEMU's mappings for missing and minor faults through its
//!   userfaultfd, and QEMU's vCPUs wait on livemig, never on a fault thread of QEMU's.
//!
//! At most one copy of the guest runs: the destination QEMU starts only from the device
//! state, which the source QEMU sends only once the engine handed the guest over.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig_engine::guest::{Foreign, GuestControl, GuestError, GuestMemory};
use livemig_transport::{Access, PageBitmap, Region};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::qmp::{Qmp, QmpError};

/// Largest description QEMU sends (a few hundred bytes per block).
pub const MAX_ATTACH: usize = 64 << 10;
/// Most RAM blocks taken from one QEMU (the patch sends at most 63).
pub const MAX_BLOCKS: usize = 63;

/// One shared RAM block of QEMU, as `x-livemig-attach` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Block {
    /// QEMU's RAM block name (`idstr`), e.g. the memory backend's id.
    pub name: String,
    /// Its address in QEMU's address space.
    pub host: u64,
    /// Bytes in use.
    pub length: u64,
    /// Its page size.
    pub page_size: u64,
    /// Where the block starts in its file.
    pub offset: u64,
}

/// What `x-livemig-attach` sends before its newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachMsg {
    /// Protocol version (1).
    pub version: u32,
    /// QEMU's process id.
    pub pid: u32,
    /// Whether a userfaultfd precedes the blocks' descriptors.
    pub uffd: bool,
    /// The shared RAM blocks, in the order of their descriptors.
    pub blocks: Vec<Block>,
}

/// Decodes and checks the description QEMU sent (without its newline).
pub fn decode_attach(b: &[u8]) -> Result<AttachMsg, String> {
    if b.len() > MAX_ATTACH {
        return Err(format!("a {}-byte description is larger than {MAX_ATTACH}", b.len()));
    }
    let m: AttachMsg = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    if m.version != 1 {
        return Err(format!("description version {} (this livemig reads 1)", m.version));
    }
    if m.blocks.is_empty() || m.blocks.len() > MAX_BLOCKS {
        return Err(format!("{} RAM blocks (1 to {MAX_BLOCKS} expected)", m.blocks.len()));
    }
    for (i, b) in m.blocks.iter().enumerate() {
        let ps = b.page_size;
        if b.name.is_empty() || b.name.len() > 255 {
            return Err(format!("block {i}: a name of {} bytes", b.name.len()));
        }
        if !ps.is_power_of_two() || !(4096..=1 << 30).contains(&ps) {
            return Err(format!("block {:?}: page size {ps}", b.name));
        }
        if b.length == 0 || b.length % ps != 0 || b.host % ps != 0 || b.host.checked_add(b.length).is_none() {
            return Err(format!("block {:?}: {} bytes at {:#x} with {ps}-byte pages", b.name, b.length, b.host));
        }
        if b.offset != 0 {
            return Err(format!("block {:?} starts at offset {} of its file (only 0 is supported)", b.name, b.offset));
        }
        if m.blocks[..i].iter().any(|o| o.name == b.name) {
            return Err(format!("block {:?} appears twice", b.name));
        }
    }
    Ok(m)
}

/// External RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// QMP failed (e.g. QEMU without livemig's patch: `x-livemig-attach` is unknown).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A socket or mapping failed.
    #[error("{what}")]
    Io {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU sent something this livemig does not accept.
    #[error("QEMU's RAM description: {0}")]
    Description(String),
    /// QEMU took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The guest control failed.
    #[error("{0}")]
    Guest(String),
    /// QEMU's dirty log (`x-livemig-dirty-*`) said something that does not add up.
    #[error("QEMU's dirty log: {0}")]
    DirtyLog(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExternalError {
    let what = what.into();
    move |source| ExternalError::Io { what, source }
}

/// QEMU's RAM, mapped here.
#[derive(Debug)]
pub struct Attached {
    /// QEMU's process id (checked against the socket's peer credentials).
    pub pid: u32,
    /// The blocks, as QEMU described them.
    pub blocks: Vec<Block>,
    /// The blocks mapped in this process (region ids 1, 2, … in QEMU's order).
    pub memory: GuestMemory,
    /// QEMU's userfaultfd, if asked for.
    pub uffd: Option<OwnedFd>,
}

impl Attached {
    /// The memory as the engine sees foreign memory (takes the userfaultfd).
    pub fn foreign(&mut self) -> Option<Foreign> {
        let uffd = self.uffd.take()?;
        Some(Foreign { pid: self.pid, uffd, addrs: self.blocks.iter().map(|b| b.host as usize).collect() })
    }
}

/// Asks QEMU (over `qmp`) for its shared RAM and, with `uffd`, a userfaultfd of its address
/// space; maps every block here with `access`. The socket QEMU connects to is created in
/// `dir` (a directory only this process's user can enter: QEMU must run as that user or as
/// root) and removed again. Only writes through QEMU's own mappings are tracked: guest RAM
/// that other processes or devices also write (vhost-user back-ends, ivshmem peers, VFIO
/// DMA) must not be moved this way.
pub fn attach(
    qmp: &mut Qmp,
    dir: &Path,
    uffd: bool,
    access: Access,
    timeout: Duration,
) -> Result<Attached, ExternalError> {
    let path = dir.join(format!("ram-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(io(format!("binding {}", path.display())))?;
    struct Unlink<'a>(&'a Path);
    impl Drop for Unlink<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _unlink = Unlink(&path);
    // QEMU connects and sends while it runs the command: the connection waits in the
    // listener's backlog until it is accepted below.
    qmp.execute("x-livemig-attach", json!({ "socket": path.display().to_string(), "uffd": uffd }))?;
    l.set_nonblocking(true).map_err(io("the attach socket"))?;
    let deadline = Instant::now() + timeout;
    let conn = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(ExternalError::Timeout("QEMU never connected to the attach socket".into()))
            }
            Err(e) => return Err(io("accepting QEMU's connection")(e)),
        }
    };
    conn.set_nonblocking(false).map_err(io("the attach connection"))?;
    let peer = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| io("reading the peer's credentials")(e.into()))?;
    let (line, fds) = recv_line_with_fds(&conn, deadline)?;
    let msg = decode_attach(&line).map_err(ExternalError::Description)?;
    if peer.pid() as u32 != msg.pid {
        return Err(ExternalError::Description(format!(
            "sent by process {} but claims to be QEMU's process {}",
            peer.pid(),
            msg.pid
        )));
    }
    let want = msg.blocks.len() + msg.uffd as usize;
    if fds.len() != want || msg.uffd != uffd {
        return Err(ExternalError::Description(format!(
            "{} descriptors for {} blocks{}",
            fds.len(),
            msg.blocks.len(),
            if msg.uffd { " and a userfaultfd" } else { "" }
        )));
    }
    let mut fds = fds.into_iter();
    let uffd = if msg.uffd { fds.next() } else { None };
    let mut regions = Vec::with_capacity(msg.blocks.len());
    for (i, (b, fd)) in msg.blocks.iter().zip(fds).enumerate() {
        let ps = u32::try_from(b.page_size).map_err(|_| ExternalError::Description("page size".into()))?;
        let r = Region::from_memfd(i as u32 + 1, File::from(fd), b.length, ps, access)
            .map_err(|e| io(format!("mapping QEMU's RAM block {:?}", b.name))(std::io::Error::other(e)))?;
        regions.push(Arc::new(r));
    }
    let memory = GuestMemory::new(regions).map_err(|e| ExternalError::Description(e.to_string()))?;
    Ok(Attached { pid: msg.pid, blocks: msg.blocks, memory, uffd })
}

/// Reads one newline-ended line and the descriptors that came with it, by `deadline`.
fn recv_line_with_fds(
    conn: &std::os::unix::net::UnixStream,
    deadline: Instant,
) -> Result<(Vec<u8>, Vec<OwnedFd>), ExternalError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let fd = conn.as_raw_fd();
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ExternalError::Timeout("QEMU's RAM description did not arrive in time".into()));
        }
        conn.set_read_timeout(Some(left)).map_err(io("the attach connection"))?;
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_BLOCKS + 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC);
        let (n, truncated) = match r {
            Ok(m) => {
                for c in m.cmsgs().map_err(|e| io("reading descriptors")(e.into()))? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: SCM_RIGHTS installed these descriptors in this process just
                        // now; nobody else owns them.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                (m.bytes, m.flags.contains(MsgFlags::MSG_CTRUNC))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(ExternalError::Timeout("QEMU's RAM description did not arrive".into()))
            }
            Err(e) => return Err(io("receiving QEMU's RAM description")(e.into())),
        };
        if truncated {
            return Err(ExternalError::Description("more descriptors than blocks allowed".into()));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&c| c == b'\n') {
            line.truncate(end);
            return Ok((line, fds));
        }
        if n == 0 {
            return Err(ExternalError::Description("the description ended before its newline".into()));
        }
        if line.len() > MAX_ATTACH {
            return Err(ExternalError::Description(format!("a description over {MAX_ATTACH} bytes")));
        }
    }
}

/// The source QEMU as the engine's guest: pausing is QEMU's `migrate` with
/// `pause-before-switchover` (QEMU sends its own small stream, stops the guest and waits),
/// the hand-over is `migrate-continue` (the device state goes), resuming after a failure is
/// `migrate_cancel` (QEMU resumes the guest).
#[derive(Debug)]
pub struct QemuSource<'a> {
    /// The source QEMU (shared with a [`QemuDirtyLog`], which syncs through it too).
    pub qmp: &'a Mutex<Qmp>,
    /// Where QEMU's stream goes (`fd:livemig`).
    pub uri: String,
    /// Bound on each wait.
    pub timeout: Duration,
    /// QEMU's timestamp of the guest's `STOP`.
    pub stopped_at: Option<f64>,
    /// `migrate` was issued.
    pub migrating: bool,
    /// `migrate-continue` was issued (and how it went).
    pub continued: Option<Result<(), String>>,
    /// When `pause` returned.
    pub paused: Option<Instant>,
}

impl<'a> QemuSource<'a> {
    /// Control of the QEMU behind `qmp`, which will migrate its device state to `uri`.
    pub fn new(qmp: &'a Mutex<Qmp>, uri: String, timeout: Duration) -> Self {
        QemuSource { qmp, uri, timeout, stopped_at: None, migrating: false, continued: None, paused: None }
    }

    fn q(&self) -> std::sync::MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&mut self) -> Result<String, QmpError> {
        let m = self.q().execute("query-migrate", json!({}))?;
        Ok(m.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string())
    }

    /// Waits until QEMU's migration status is one of `want` (events read on the way).
    fn wait_status(&mut self, want: &[&str], what: &str) -> Result<String, GuestError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let st = self.status().map_err(|e| GuestError::new("pause", e))?;
            if want.contains(&st.as_str()) {
                return Ok(st);
            }
            if Instant::now() > deadline {
                return Err(GuestError::new(
                    "pause",
                    format!("QEMU still {st:?} after {:?} waiting for {what}", self.timeout),
                ));
            }
            let ev = self.q().next_event(Duration::from_millis(20));
            match ev {
                Ok(Some(e)) if e.name == "STOP" => self.stopped_at = Some(e.at),
                Ok(_) => {}
                Err(e) => return Err(GuestError::new("pause", e)),
            }
        }
    }
}

impl QemuSource<'_> {
    fn pause_inner(&mut self) -> Result<(), GuestError> {
        self.q().execute("migrate", json!({ "uri": self.uri })).map_err(|e| GuestError::new("pause", e))?;
        self.migrating = true;
        let st = self.wait_status(&["pre-switchover", "failed", "cancelled"], "pre-switchover")?;
        if st != "pre-switchover" {
            return Err(GuestError::new("pause", format!("QEMU's migration {st} before the switchover")));
        }
        // QEMU sends the STOP event before the status change, so it was read before the reply
        // that reported `pre-switchover`. No wait here: the guest is stopped, and a socket
        // timeout is rounded up to the kernel's tick (4 ms and more).
        loop {
            let Some(e) = self.q().queued_event() else { break };
            if e.name == "STOP" {
                self.stopped_at = Some(e.at);
            }
        }
        self.paused = Some(Instant::now());
        Ok(())
    }

    /// Cancels QEMU's migration and makes sure the guest runs here again — only while the
    /// device state has not been let go (`migrate-continue` not sent, or refused), when no
    /// destination can run the guest.
    pub fn cancel(&mut self) -> Result<(), GuestError> {
        if matches!(self.continued, Some(Ok(()))) {
            return Err(GuestError::new("resume", "the device state went to the destination: not resuming here"));
        }
        if self.migrating {
            let _ = self.q().execute("migrate_cancel", json!({}));
            let deadline = Instant::now() + self.timeout;
            loop {
                let st = self.status().map_err(|e| GuestError::new("resume", e))?;
                if matches!(st.as_str(), "cancelled" | "failed" | "completed") || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // QEMU resumes a guest whose migration was cancelled if it ran before; one left in
        // the migration's own stop state is started here (a guest the user paused stays so).
        let st = self.q().execute("query-status", json!({})).map_err(|e| GuestError::new("resume", e))?;
        let running = st.get("running").and_then(|r| r.as_bool()).unwrap_or(false);
        let status = st.get("status").and_then(|s| s.as_str()).unwrap_or("");
        if !running && self.migrating && status == "finish-migrate" {
            self.q().execute("cont", json!({})).map_err(|e| GuestError::new("resume", e))?;
        }
        Ok(())
    }
}

impl GuestControl for QemuSource<'_> {
    fn pause(&mut self) -> Result<(), GuestError> {
        let r = self.pause_inner();
        if let Err(e) = &r {
            // `migrate` may be under way: QEMU would stop the guest in `pre-switchover` and
            // wait there for good.
            if let Err(c) = self.cancel() {
                tracing::error!(error = %e, cancel = %c, "pausing failed and cancelling QEMU's migration failed");
            }
        }
        r
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.cancel()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        // The device state travels on QEMU's own stream, after the hand-over.
        Ok(Vec::new())
    }

    fn handed_over(&mut self) {
        let r = self.q().execute("migrate-continue", json!({ "state": "pre-switchover" }));
        if let Err(e) = &r {
            tracing::error!(error = %e, "migrate-continue failed: the device state is not sent");
        }
        self.continued = Some(r.map(|_| ()).map_err(|e| e.to_string()));
    }
}

/// QEMU's own dirty log of the shared RAM, read through livemig's patch
/// (`x-livemig-dirty-start`/`-sync`/`-stop`) into a bitmap this process shares with QEMU: the
/// dirty tracking of external RAM on kernels without asynchronous userfaultfd write-protect
/// and `PAGEMAP_SCAN` (before 6.7), and with KVM's dirty log as with TCG. One bit per page of
/// the attached blocks, in their order (the engine's page space).
#[derive(Debug)]
pub struct QemuDirtyLog {
    bitmap: Region,
    pages: usize,
}

impl QemuDirtyLog {
    /// Starts QEMU's logging for the `pages` pages of the attached memory; writes before now
    /// are forgotten.
    pub fn start(qmp: &mut Qmp, pages: usize) -> Result<QemuDirtyLog, ExternalError> {
        let bytes = (pages.div_ceil(64) * 8).next_multiple_of(4096) as u64;
        let bitmap = Region::memfd(u32::MAX, bytes, 4096, Access::LOCAL)
            .map_err(|e| io("the dirty bitmap")(std::io::Error::other(e)))?;
        let fd = bitmap.fd().ok_or_else(|| ExternalError::DirtyLog("the bitmap has no descriptor".into()))?;
        qmp.execute_with_fd("getfd", json!({ "fdname": "livemig-dirty" }), fd)?;
        let info = qmp.execute("x-livemig-dirty-start", json!({ "fdname": "livemig-dirty" }))?;
        let theirs = info.get("pages").and_then(|p| p.as_u64()).unwrap_or(0);
        if theirs != pages as u64 {
            let _ = qmp.execute("x-livemig-dirty-stop", json!({}));
            return Err(ExternalError::DirtyLog(format!(
                "QEMU tracks {theirs} pages of shared RAM, the attached memory has {pages}"
            )));
        }
        Ok(QemuDirtyLog { bitmap, pages })
    }

    /// ORs into `into` the pages written since the previous sync (QEMU clears its log);
    /// returns how many.
    pub fn sync(&self, qmp: &mut Qmp, into: &mut PageBitmap) -> Result<usize, ExternalError> {
        let info = qmp.execute("x-livemig-dirty-sync", json!({}))?;
        let mut raw = vec![0u8; self.pages.div_ceil(64) * 8];
        if !self.bitmap.read_at(0, &mut raw) {
            return Err(ExternalError::DirtyLog("reading the bitmap failed".into()));
        }
        let mut n = 0;
        for (w, b) in raw.chunks_exact(8).enumerate() {
            let mut word = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            while word != 0 {
                let page = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                if page < self.pages && page < into.len() {
                    into.set(page);
                    n += 1;
                }
            }
        }
        let said = info.get("dirty").and_then(|d| d.as_u64()).unwrap_or(0);
        if said != n as u64 {
            return Err(ExternalError::DirtyLog(format!("QEMU reported {said} dirty pages, the bitmap holds {n}")));
        }
        Ok(n)
    }

    /// Stops QEMU's logging.
    pub fn stop(&self, qmp: &mut Qmp) {
        let _ = qmp.execute("x-livemig-dirty-stop", json!({}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(blocks: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({ "version": 1, "pid": 7, "uffd": true, "blocks": blocks })).unwrap()
    }

    #[test]
    fn qemus_description_is_read_and_checked() {
        let good = msg(
            json!([{ "name": "mem0", "host": 0x7f00_0000_0000u64, "length": 1 << 30, "page-size": 4096, "offset": 0 }]),
        );
        let m = decode_attach(&good).unwrap();
        assert_eq!((m.pid, m.blocks.len(), m.blocks[0].length), (7, 1, 1 << 30));
        let bad = [
            msg(json!([])),
            msg(json!([{ "name": "", "host": 0, "length": 4096, "page-size": 4096, "offset": 0 }])),
            msg(json!([{ "name": "a", "host": 0, "length": 4095, "page-size": 4096, "offset": 0 }])),
            msg(json!([{ "name": "a", "host": 1, "length": 4096, "page-size": 4096, "offset": 0 }])),
            msg(json!([{ "name": "a", "host": 0, "length": 4096, "page-size": 3000, "offset": 0 }])),
            msg(json!([{ "name": "a", "host": 0, "length": 4096, "page-size": 4096, "offset": 4096 }])),
            msg(json!([{ "name": "a", "host": u64::MAX - 4095, "length": 8192, "page-size": 4096, "offset": 0 }])),
            msg(json!([
                { "name": "a", "host": 0, "length": 4096, "page-size": 4096, "offset": 0 },
                { "name": "a", "host": 8192, "length": 4096, "page-size": 4096, "offset": 0 }
            ])),
            br#"{"version":2,"pid":1,"uffd":false,"blocks":[]}"#.to_vec(),
            br#"{"version":1,"pid":1,"uffd":false,"blocks":[],"extra":1}"#.to_vec(),
            b"not json".to_vec(),
            vec![b' '; MAX_ATTACH + 1],
        ];
        for b in bad {
            assert!(decode_attach(&b).is_err(), "{}", String::from_utf8_lossy(&b));
        }
    }
}
