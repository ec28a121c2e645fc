//! A session with a maximum duration: a [`Transport`] (and its urgent channel) that refuses
//! every call once its deadline has passed, and never waits past it — what a daemon wraps
//! each session in, so that an authenticated peer cannot hold a session (and its memory)
//! forever by staying busy.
//!
//! A call already blocked inside the backend when the deadline passes returns on its own
//! bounds (the I/O timeout at most); the next call fails. Byte channels are handed out as
//! they are (their user owns them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    ByteChannel, RegionInfo, RegionTable, Registration, Transport, TransportError, TransportKind, TransportStats,
    UrgentChannel, UrgentEvent, WriteRequest,
};

/// What the error of an expired session says it waited for.
pub const EXPIRED: &str = "the session to end within its maximum duration";

/// A transport whose session ends at a deadline.
pub struct SessionDeadline {
    inner: Box<dyn Transport>,
    deadline: Instant,
    limit: Duration,
}

impl std::fmt::Debug for SessionDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionDeadline").field("kind", &self.inner.kind()).field("limit", &self.limit).finish()
    }
}

impl SessionDeadline {
    /// Wraps `inner`; its session may last `limit` from now.
    pub fn new(inner: Box<dyn Transport>, limit: Duration) -> Self {
        SessionDeadline { inner, deadline: Instant::now() + limit, limit }
    }

    fn live(&self) -> Result<(), TransportError> {
        check(self.deadline, self.limit)
    }
}

fn check(deadline: Instant, limit: Duration) -> Result<(), TransportError> {
    if Instant::now() >= deadline {
        Err(TransportError::Timeout(limit, EXPIRED))
    } else {
        Ok(())
    }
}

/// `timeout`, shortened to what is left before `deadline`.
fn capped(timeout: Option<Duration>, deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    timeout.map_or(left, |t| t.min(left))
}

impl Transport for SessionDeadline {
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }
    fn peer_regions(&self) -> &[RegionInfo] {
        self.inner.peer_regions()
    }
    fn post_writes(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError> {
        self.live()?;
        self.inner.post_writes(wrs)
    }
    fn send_message(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        self.live()?;
        self.inner.send_message(msg)
    }
    fn recv_message(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, TransportError> {
        self.live()?;
        let m = self.inner.recv_message(Some(capped(timeout, self.deadline)))?;
        if m.is_none() {
            self.live()?;
        }
        Ok(m)
    }
    fn poll_completions(&mut self) -> Result<u64, TransportError> {
        self.live()?;
        self.inner.poll_completions()
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.live()?;
        self.inner.flush()
    }
    fn stats(&self) -> TransportStats {
        self.inner.stats()
    }
    fn regions(&self) -> &RegionTable {
        self.inner.regions()
    }
    fn expose(&mut self, region: Arc<crate::Region>) -> Result<Registration, TransportError> {
        self.live()?;
        self.inner.expose(region)
    }
    fn byte_channel(&mut self, i: usize) -> Result<Box<dyn ByteChannel>, TransportError> {
        self.live()?;
        self.inner.byte_channel(i)
    }
    fn shutdown(&mut self) {
        self.inner.shutdown();
    }
    fn urgent(&self) -> Result<Arc<dyn UrgentChannel>, TransportError> {
        let inner = self.inner.urgent()?;
        Ok(Arc::new(UrgentDeadline { inner, deadline: self.deadline, limit: self.limit }))
    }
}

/// The urgent channel of a [`SessionDeadline`] session.
#[derive(Debug)]
struct UrgentDeadline {
    inner: Arc<dyn UrgentChannel>,
    deadline: Instant,
    limit: Duration,
}

impl UrgentChannel for UrgentDeadline {
    fn send_message(&self, msg: &[u8]) -> Result<(), TransportError> {
        check(self.deadline, self.limit)?;
        self.inner.send_message(msg)
    }
    fn post_write(&self, w: &WriteRequest<'_>) -> Result<(), TransportError> {
        check(self.deadline, self.limit)?;
        self.inner.post_write(w)
    }
    fn recv(&self, timeout: Option<Duration>) -> Result<Option<UrgentEvent>, TransportError> {
        check(self.deadline, self.limit)?;
        let e = self.inner.recv(Some(capped(timeout, self.deadline)))?;
        if e.is_none() {
            check(self.deadline, self.limit)?;
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance as conf;
    use crate::{TcpConfig, TcpListener, TcpTransport};

    #[test]
    fn calls_fail_once_the_deadline_passes_and_waits_stop_there() {
        let r = conf::regions(1 << 20);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let secret = crate::auth::Secret::new("deadline-test-secret-deadline-test-secret").unwrap();
        let cfg = TcpConfig { urgent_stream: true, ..Default::default() };
        let (c, s, d) = (cfg.clone(), secret.clone(), r.dst_table.clone());
        let acc = std::thread::spawn(move || l.accept(&c, &s, &d).unwrap());
        let mut a = TcpTransport::connect(addr, &cfg, &secret, &r.src_table).unwrap();
        let b = acc.join().unwrap();
        let mut b = SessionDeadline::new(Box::new(b), Duration::from_millis(600));
        let u = b.urgent().unwrap();
        // Within the limit: a session like any other.
        a.send_message(b"hello").unwrap();
        assert_eq!(b.recv_message(Some(Duration::from_secs(5))).unwrap().as_deref(), Some(&b"hello"[..]));
        // A wait asked to outlast the deadline ends at it, with the session's error.
        let t0 = Instant::now();
        let e = b.recv_message(Some(Duration::from_secs(30))).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "waited {:?}", t0.elapsed());
        assert!(matches!(e, TransportError::Timeout(_, EXPIRED)), "{e:?}");
        // Every later call fails at once, the urgent channel's too.
        assert!(matches!(b.send_message(b"x"), Err(TransportError::Timeout(_, EXPIRED))));
        assert!(matches!(b.flush(), Err(TransportError::Timeout(_, EXPIRED))));
        assert!(matches!(u.send_message(b"x"), Err(TransportError::Timeout(_, EXPIRED))));
        assert!(matches!(u.recv(None), Err(TransportError::Timeout(_, EXPIRED))));
        // And the peer learns that the session is over once it is dropped.
        drop((u, b));
        assert!(a.recv_message(Some(Duration::from_secs(10))).is_err());
    }
}
