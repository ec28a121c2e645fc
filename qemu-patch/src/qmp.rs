//! A small synchronous QMP client: the greeting and `qmp_capabilities`, commands matched to
//! their replies by id, and asynchronous events queued apart. Every read is bounded.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line accepted from QEMU.
const MAX_LINE: usize = 16 << 20;

/// A QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket {path}")]
    Io {
        /// The QMP socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU said nothing in time.
    #[error("QEMU did not answer {what} within {secs} s")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
    /// QEMU answered with an error.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU closed the socket (it exited).
    #[error("QEMU closed its QMP socket")]
    Closed,
}

/// An event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its name (`MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`, …).
    pub name: String,
    /// Its data (`null` when none).
    pub data: Value,
    /// QEMU's timestamp, seconds.
    pub at: f64,
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    path: String,
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: VecDeque<Event>,
    next_id: u64,
    timeout: Duration,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode; every later wait is bounded by
    /// `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let p = path.display().to_string();
        let io = |source| QmpError::Io { path: p.clone(), source };
        let w = UnixStream::connect(path).map_err(io)?;
        let r = BufReader::new(w.try_clone().map_err(io)?);
        let mut q = Qmp { path: p.clone(), w, r, events: VecDeque::new(), next_id: 1, timeout, partial: Vec::new() };
        let greeting = q.read_value(Instant::now() + timeout, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected the greeting, got {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_value(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(QmpError::Timeout { what: what.into(), secs: self.timeout.as_secs() });
        }
        self.r
            .get_ref()
            .set_read_timeout(Some(deadline - now))
            .map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        // A line cut by the timeout is kept and completed by the next read.
        let room = (MAX_LINE as u64).saturating_sub(self.partial.len() as u64);
        let n = match (&mut self.r).take(room).read_until(b'\n', &mut self.partial) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(QmpError::Timeout { what: what.into(), secs: self.timeout.as_secs() })
            }
            Err(source) => return Err(QmpError::Io { path: self.path.clone(), source }),
        };
        if n == 0 && self.partial.is_empty() {
            return Err(QmpError::Closed);
        }
        if self.partial.last() != Some(&b'\n') {
            if n == 0 || self.partial.len() >= MAX_LINE {
                return Err(QmpError::Protocol("a QMP line that does not end".into()));
            }
            return Err(QmpError::Timeout { what: what.into(), secs: self.timeout.as_secs() });
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_slice(&line)
            .map_err(|e| QmpError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&line))))
    }

    fn queue_event(&mut self, v: &Value) -> bool {
        let Some(name) = v.get("event").and_then(|e| e.as_str()) else { return false };
        let at = v
            .get("timestamp")
            .map(|t| {
                t.get("seconds").and_then(|s| s.as_f64()).unwrap_or(0.0)
                    + t.get("microseconds").and_then(|s| s.as_f64()).unwrap_or(0.0) / 1e6
            })
            .unwrap_or(0.0);
        tracing::debug!(qmp = %self.path, event = name, at, "QMP event");
        self.events.push_back(Event { name: name.into(), data: v.get("data").cloned().unwrap_or(Value::Null), at });
        true
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, None)
    }

    /// Runs `command` with `fd` passed alongside (SCM_RIGHTS), as `getfd` expects.
    pub fn execute_with_fd(&mut self, command: &str, arguments: Value, fd: RawFd) -> Result<Value, QmpError> {
        self.execute_inner(command, arguments, Some(fd))
    }

    fn execute_inner(&mut self, command: &str, arguments: Value, fd: Option<RawFd>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&req).expect("JSON values serialise");
        line.push(b'\n');
        let sent = match fd {
            None => self.w.write_all(&line),
            Some(fd) => send_with_fd(&self.w, &line, fd),
        };
        sent.map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        tracing::debug!(qmp = %self.path, command, "QMP command sent");
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.read_value(deadline, command)?;
            if self.queue_event(&v) {
                continue;
            }
            if v.get("id").and_then(|i| i.as_u64()) != Some(id) {
                continue; // a reply to nothing we asked
            }
            if let Some(r) = v.get("return") {
                tracing::debug!(qmp = %self.path, command, "QMP command returned");
                return Ok(r.clone());
            }
            let e = v.get("error").cloned().unwrap_or_default();
            return Err(QmpError::Command {
                command: command.into(),
                class: e.get("class").and_then(|c| c.as_str()).unwrap_or("?").into(),
                desc: e.get("desc").and_then(|c| c.as_str()).unwrap_or("?").into(),
            });
        }
    }

    /// The next event already read (while a command waited for its reply), without waiting.
    pub fn queued_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Puts `e` back: the next [`Qmp::queued_event`] or [`Qmp::next_event`] returns it.
    pub fn requeue_event(&mut self, e: Event) {
        self.events.push_front(e);
    }

    /// The next event, waiting up to `wait`; `None` if none came.
    pub fn next_event(&mut self, wait: Duration) -> Result<Option<Event>, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        match self.read_value(Instant::now() + wait, "an event") {
            Ok(v) => {
                self.queue_event(&v);
                Ok(self.events.pop_front())
            }
            Err(QmpError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether this QEMU has the QMP command `name` (`query-commands`).
    pub fn has_command(&mut self, name: &str) -> Result<bool, QmpError> {
        let list = self.execute("query-commands", json!({}))?;
        Ok(list.as_array().is_some_and(|l| l.iter().any(|c| c["name"] == name)))
    }

    /// Sets migration capabilities.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps.iter().map(|(c, s)| json!({ "capability": c, "state": s })).collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list })).map(|_| ())
    }
}

/// Writes `data` on `sock` with `fd` attached to its first byte (SCM_RIGHTS).
fn send_with_fd(sock: &UnixStream, data: &[u8], fd: RawFd) -> std::io::Result<()> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: a zeroed msghdr is a valid empty header; every pointer set below refers to
    // buffers (iov, data, cbuf) that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds exactly one header with room for one descriptor
    // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    let n = loop {
        // SAFETY: sendmsg on our connected socket with the header built above.
        let n = unsafe { libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(sock), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // The descriptor went with the first byte; the rest of the line follows plainly.
    let mut w = sock;
    w.write_all(&data[n as usize..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A fake QEMU on a socket pair: greeting, an event between a command and its reply, an
    /// error reply, then silence.
    #[test]
    fn replies_are_matched_events_queued_errors_named_and_silence_bounded() {
        let dir = std::env::temp_dir().join(format!("livemig-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("q.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            c.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("query-status"));
            c.write_all(b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 5, \"microseconds\": 500000}}\n").unwrap();
            c.write_all(b"{\"return\": {\"status\": \"paused\"}, \"id\": 2}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            c.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 3}\n").unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let mut q = Qmp::connect(&path, Duration::from_millis(500)).unwrap();
        assert_eq!(q.execute("query-status", json!({})).unwrap()["status"], "paused");
        let e = q.next_event(Duration::ZERO).unwrap().unwrap();
        assert_eq!((e.name.as_str(), e.at), ("STOP", 5.5));
        let err = q.execute("migrate", json!({"uri": "x"})).unwrap_err();
        assert!(err.to_string().contains("GenericError: nope"), "{err}");
        assert!(q.next_event(Duration::from_millis(50)).unwrap().is_none());
        assert!(matches!(q.execute("query-status", json!({})), Err(QmpError::Timeout { .. })));
        drop(q);
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
