//! Opening a service on a host daemon (`livemig serve`): the client side of
//! [`livemig_engine::open`].

use std::time::Duration;

use anyhow::{bail, Context, Result};
pub use livemig_engine::open::{OpenError, OpenReply, OpenRequest, Service, MAX_REQUEST, OPEN_VERSION};
use livemig_transport::Transport;

/// Whether the peer of `t` is a daemon waiting for a request (it exposed nothing).
pub fn peer_is_daemon(t: &dyn Transport) -> bool {
    t.peer_regions().is_empty()
}

/// Asks the daemon at the other end of `t` for `req`; returns its session number once the
/// memory is exposed (the peer's regions are known to `t` then).
pub fn open(t: &mut dyn Transport, req: &OpenRequest, timeout: Duration) -> Result<u64> {
    t.send_message(&req.encode()).context("sending the service request to the daemon")?;
    let m = t
        .recv_message(Some(timeout))
        .context("waiting for the daemon's answer")?
        .with_context(|| format!("the daemon did not answer the service request within {timeout:?}"))?;
    match OpenReply::decode(&m).context("the daemon's answer")? {
        OpenReply::Opened { session } => Ok(session),
        OpenReply::Refused { reason } => bail!("the daemon refused the session: {reason}"),
    }
}
