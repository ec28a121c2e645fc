//! Fault injection at a protocol step: [`CutAt`] wraps a real transport and, instead of
//! sending a chosen pre-copy control message, drops the transport underneath (its connection
//! closes and the peer sees it go, as when a process dies) and fails that call and every
//! later one. Tests use it to break the switchover at each step; builds with the
//! `fault-injection` feature also apply it from `LIVEMIG_CUT_AT=<message name>` (see
//! [`from_env`]).

use std::time::Duration;

use livemig_transport::{
    RegionInfo, RegionTable, Transport, TransportError, TransportKind, TransportStats, WriteRequest,
};

use super::proto;

/// A transport that, instead of sending the control message named `at`, drops the real
/// transport underneath (closing its connection) and fails that call and every later one.
pub struct CutAt {
    inner: Option<Box<dyn Transport>>,
    at: Option<String>,
    /// Cut at this occurrence of `at` (1: the first).
    nth: u32,
    seen: u32,
    /// Freeze (send nothing, keep the connection open) this long before cutting.
    freeze: Duration,
    kind: TransportKind,
    peer: Vec<RegionInfo>,
    table: RegionTable,
}

impl CutAt {
    /// Wraps `inner`; `at` is a message name as in [`proto::Msg::name`], optionally with
    /// `#N` to cut at its N-th occurrence instead of the first (`None`: never cut).
    pub fn new(inner: Box<dyn Transport>, at: Option<&str>) -> Self {
        let (at, nth) = match at.map(|a| a.split_once('#').unwrap_or((a, "1"))) {
            Some((name, n)) => (Some(name.to_string()), n.parse().unwrap_or(1).max(1)),
            None => (None, 1),
        };
        CutAt {
            kind: inner.kind(),
            peer: inner.peer_regions().to_vec(),
            table: inner.regions().clone(),
            inner: Some(inner),
            at,
            nth,
            seen: 0,
            freeze: Duration::ZERO,
        }
    }

    /// Like [`CutAt::new`], but at `at` first freezes for `d` — the connection stays open
    /// and nothing is sent, as from a stopped process whose kernel still acknowledges — and
    /// only then cuts.
    pub fn freeze(inner: Box<dyn Transport>, at: &str, d: Duration) -> Self {
        CutAt { freeze: d, ..CutAt::new(inner, Some(at)) }
    }
    fn live(&mut self) -> Result<&mut Box<dyn Transport>, TransportError> {
        self.inner.as_mut().ok_or_else(|| TransportError::Disconnected("the link was cut (fault injection)".into()))
    }
}

impl std::fmt::Debug for CutAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutAt")
            .field("kind", &self.kind)
            .field("at", &self.at)
            .field("freeze", &self.freeze)
            .field("cut", &self.inner.is_none())
            .finish()
    }
}

impl Transport for CutAt {
    fn kind(&self) -> TransportKind {
        self.kind
    }
    fn peer_regions(&self) -> &[RegionInfo] {
        &self.peer
    }
    fn post_writes(&mut self, wrs: &[WriteRequest<'_>]) -> Result<u64, TransportError> {
        self.live()?.post_writes(wrs)
    }
    fn send_message(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        let name = proto::decode(msg).map(|m| m.name()).unwrap_or("?");
        if self.at.as_deref() == Some(name) && self.inner.is_some() {
            self.seen += 1;
        }
        if self.at.as_deref() == Some(name) && self.seen == self.nth && self.inner.is_some() {
            if !self.freeze.is_zero() {
                tracing::warn!(message = name, freeze = ?self.freeze, "fault injection: freezing instead of sending it");
                std::thread::sleep(self.freeze);
            }
            tracing::warn!(message = name, "fault injection: cutting the link instead of sending it");
            self.inner = None;
        }
        self.live()?.send_message(msg)
    }
    fn recv_message(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, TransportError> {
        let t = self.live()?;
        let m = t.recv_message(timeout)?;
        // The peer may have exposed regions before this message.
        self.peer = t.peer_regions().to_vec();
        Ok(m)
    }
    fn poll_completions(&mut self) -> Result<u64, TransportError> {
        self.live()?.poll_completions()
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        self.live()?.flush()
    }
    fn stats(&self) -> TransportStats {
        self.inner.as_ref().map(|t| t.stats()).unwrap_or_default()
    }
    fn regions(&self) -> &RegionTable {
        &self.table
    }
    fn expose(
        &mut self,
        region: std::sync::Arc<livemig_transport::Region>,
    ) -> Result<livemig_transport::Registration, TransportError> {
        let t = self.live()?;
        let reg = t.expose(region)?;
        self.peer = t.peer_regions().to_vec();
        Ok(reg)
    }
    fn byte_channel(&mut self, i: usize) -> Result<Box<dyn livemig_transport::ByteChannel>, TransportError> {
        self.live()?.byte_channel(i)
    }
    fn shutdown(&mut self) {
        if let Some(t) = self.inner.as_mut() {
            t.shutdown();
        }
    }
    fn urgent(&self) -> Result<std::sync::Arc<dyn livemig_transport::UrgentChannel>, TransportError> {
        self.inner.as_ref().ok_or(TransportError::Disconnected("fault injection cut the link".into()))?.urgent()
    }
}

/// `LIVEMIG_CUT_AT=<message name>` wraps `t` in a [`CutAt`].
pub fn from_env(t: Box<dyn Transport>) -> Box<dyn Transport> {
    match std::env::var("LIVEMIG_CUT_AT") {
        Ok(name) if !name.is_empty() => Box::new(CutAt::new(t, Some(&name))),
        _ => t,
    }
}
