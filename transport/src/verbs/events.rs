//! Asynchronous device events (`ibv_get_async_event`): which ones end a connection.
//!
//! The device reports port state changes, queue-pair and completion-queue errors and fatal
//! device errors on its context's async event fd, independently of any work completion.
//! Without reading them, a port that goes down is only noticed when an outstanding work
//! request exhausts its RC retries, or never while a side merely waits for a message.
//!
//! This module is the pure half, testable without a device: the event-type numbers of
//! `enum ibv_event_type` (a stable ABI of verbs.h), which member of the event's element union
//! an event type carries, and [`classify`], which decides whether an event concerns a
//! connection's resources ([`Watched`]) and ends it. [`super::device::Context::next_async_event`]
//! reads (and acknowledges) the events; the transport polls the fd in its wait loops.
//!
//! | event                                            | concerns us when      | verdict |
//! |--------------------------------------------------|-----------------------|---------|
//! | `PORT_ERR`                                       | our port              | fatal   |
//! | `QP_FATAL`, `QP_REQ_ERR`, `QP_ACCESS_ERR`        | our queue pair        | fatal   |
//! | `CQ_ERR`                                         | one of our CQs        | fatal   |
//! | `DEVICE_FATAL`                                   | always (our context)  | fatal   |
//! | `PORT_ACTIVE`, `LID_CHANGE`, `PKEY_CHANGE`, `SM_CHANGE`, `CLIENT_REREGISTER`, `GID_CHANGE` | — | logged |
//! | `COMM_EST`, `SQ_DRAINED`, `PATH_MIG`, `PATH_MIG_ERR`, `QP_LAST_WQE_REACHED` | — | logged |
//! | `SRQ_ERR`, `SRQ_LIMIT_REACHED`, `WQ_FATAL` (no SRQ or WQ is used), unknown types | — | logged |
//!
//! A fatal event for another port, queue pair or CQ of the same context is logged too (the
//! backend opens one context per connection, so that does not happen in practice).

/// The values of `enum ibv_event_type` (verbs.h).
pub mod event_type {
    /// A completion queue overran or hit a protection error.
    pub const CQ_ERR: u32 = 0;
    /// Catastrophic error on a queue pair: it is in the error state.
    pub const QP_FATAL: u32 = 1;
    /// Invalid request (transport protocol violation) detected by a queue pair's responder.
    pub const QP_REQ_ERR: u32 = 2;
    /// Local access violation (a request broke memory access rights) on a queue pair.
    pub const QP_ACCESS_ERR: u32 = 3;
    /// Communication established (first packet received in RTR).
    pub const COMM_EST: u32 = 4;
    /// Send queue drained (SQD state).
    pub const SQ_DRAINED: u32 = 5;
    /// Automatic path migration completed.
    pub const PATH_MIG: u32 = 6;
    /// Automatic path migration failed (the primary path stays).
    pub const PATH_MIG_ERR: u32 = 7;
    /// The device failed: every resource of the context is unusable.
    pub const DEVICE_FATAL: u32 = 8;
    /// A port became ACTIVE.
    pub const PORT_ACTIVE: u32 = 9;
    /// A port left the ACTIVE state (link down).
    pub const PORT_ERR: u32 = 10;
    /// A port's LID changed.
    pub const LID_CHANGE: u32 = 11;
    /// A port's P_Key table changed.
    pub const PKEY_CHANGE: u32 = 12;
    /// The subnet manager changed.
    pub const SM_CHANGE: u32 = 13;
    /// Error on a shared receive queue.
    pub const SRQ_ERR: u32 = 14;
    /// A shared receive queue fell below its limit.
    pub const SRQ_LIMIT_REACHED: u32 = 15;
    /// Last WQE reached on a queue pair attached to an SRQ.
    pub const QP_LAST_WQE_REACHED: u32 = 16;
    /// The subnet manager asks clients to re-register.
    pub const CLIENT_REREGISTER: u32 = 17;
    /// A port's GID table changed.
    pub const GID_CHANGE: u32 = 18;
    /// Fatal error on a work queue.
    pub const WQ_FATAL: u32 = 19;
}

/// The `IBV_EVENT_*` name of an event type (`"unknown"` for values this build does not know).
pub fn event_name(t: u32) -> &'static str {
    use event_type as e;
    match t {
        e::CQ_ERR => "IBV_EVENT_CQ_ERR",
        e::QP_FATAL => "IBV_EVENT_QP_FATAL",
        e::QP_REQ_ERR => "IBV_EVENT_QP_REQ_ERR",
        e::QP_ACCESS_ERR => "IBV_EVENT_QP_ACCESS_ERR",
        e::COMM_EST => "IBV_EVENT_COMM_EST",
        e::SQ_DRAINED => "IBV_EVENT_SQ_DRAINED",
        e::PATH_MIG => "IBV_EVENT_PATH_MIG",
        e::PATH_MIG_ERR => "IBV_EVENT_PATH_MIG_ERR",
        e::DEVICE_FATAL => "IBV_EVENT_DEVICE_FATAL",
        e::PORT_ACTIVE => "IBV_EVENT_PORT_ACTIVE",
        e::PORT_ERR => "IBV_EVENT_PORT_ERR",
        e::LID_CHANGE => "IBV_EVENT_LID_CHANGE",
        e::PKEY_CHANGE => "IBV_EVENT_PKEY_CHANGE",
        e::SM_CHANGE => "IBV_EVENT_SM_CHANGE",
        e::SRQ_ERR => "IBV_EVENT_SRQ_ERR",
        e::SRQ_LIMIT_REACHED => "IBV_EVENT_SRQ_LIMIT_REACHED",
        e::QP_LAST_WQE_REACHED => "IBV_EVENT_QP_LAST_WQE_REACHED",
        e::CLIENT_REREGISTER => "IBV_EVENT_CLIENT_REREGISTER",
        e::GID_CHANGE => "IBV_EVENT_GID_CHANGE",
        e::WQ_FATAL => "IBV_EVENT_WQ_FATAL",
        _ => "unknown",
    }
}

/// Which member of `ibv_async_event.element` an event type fills in (libibverbs'
/// `ibv_get_async_event`: everything without an object, unknown types included, gets
/// `port_num`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementKind {
    /// `element.cq`.
    Cq,
    /// `element.qp`.
    Qp,
    /// `element.srq`.
    Srq,
    /// `element.wq`.
    Wq,
    /// `element.port_num`.
    Port,
    /// Nothing meaningful (`IBV_EVENT_DEVICE_FATAL`).
    Device,
}

/// The element union member of event type `t`.
pub fn element_kind(t: u32) -> ElementKind {
    use event_type as e;
    match t {
        e::CQ_ERR => ElementKind::Cq,
        e::QP_FATAL
        | e::QP_REQ_ERR
        | e::QP_ACCESS_ERR
        | e::COMM_EST
        | e::SQ_DRAINED
        | e::PATH_MIG
        | e::PATH_MIG_ERR
        | e::QP_LAST_WQE_REACHED => ElementKind::Qp,
        e::SRQ_ERR | e::SRQ_LIMIT_REACHED => ElementKind::Srq,
        e::WQ_FATAL => ElementKind::Wq,
        e::DEVICE_FATAL => ElementKind::Device,
        _ => ElementKind::Port,
    }
}

/// What an event refers to. Objects are identified by their handle (the address of the
/// libibverbs object, see `handle()` of the device wrappers), compared, never dereferenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventElement {
    /// A completion queue.
    Cq(usize),
    /// A queue pair.
    Qp(usize),
    /// A shared receive queue.
    Srq(usize),
    /// A work queue.
    Wq(usize),
    /// A port number (or the raw element of an unknown event type).
    Port(i32),
    /// The whole device.
    Device,
}

/// One asynchronous event, copied out before it was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// `enum ibv_event_type` value ([`event_type`]).
    pub event_type: u32,
    /// What it refers to.
    pub element: EventElement,
}

impl AsyncEvent {
    /// The `IBV_EVENT_*` name.
    pub fn name(&self) -> &'static str {
        event_name(self.event_type)
    }
}

/// The resources of one connection: what "concerns us" means for [`classify`].
#[derive(Debug, Clone, Copy)]
pub struct Watched<'a> {
    /// Device name (for messages).
    pub device: &'a str,
    /// Port in use.
    pub port: u8,
    /// Handle and number of the queue pair.
    pub qp: (usize, u32),
    /// Handles of the completion queues, with a name for messages ("send", "receive").
    pub cqs: &'a [(usize, &'a str)],
}

/// The decision on one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The connection cannot continue: the reason, naming the device and port or queue.
    Fatal(String),
    /// Informational, or about a resource that is not ours: what to log.
    Ignore(String),
}

/// Decides whether `ev` ends the connection that owns `w`.
pub fn classify(ev: &AsyncEvent, w: &Watched<'_>) -> Verdict {
    use event_type as e;
    let dev = w.device;
    let (qp_handle, qpn) = w.qp;
    let name = ev.name();
    match (ev.event_type, ev.element) {
        (e::PORT_ERR, EventElement::Port(p)) if p == i32::from(w.port) => {
            Verdict::Fatal(format!("port {p} of {dev} went down"))
        }
        (e::PORT_ERR, EventElement::Port(p)) => {
            Verdict::Ignore(format!("port {p} of {dev} went down (this connection uses port {})", w.port))
        }
        (e::QP_FATAL | e::QP_REQ_ERR | e::QP_ACCESS_ERR, EventElement::Qp(h)) if h == qp_handle => {
            let what = match ev.event_type {
                e::QP_FATAL => "catastrophic error",
                e::QP_REQ_ERR => "invalid request error (transport protocol violation)",
                _ => "local access violation",
            };
            Verdict::Fatal(format!("queue pair {qpn} on {dev} entered the error state: {what}"))
        }
        (e::CQ_ERR, EventElement::Cq(h)) => match w.cqs.iter().find(|(c, _)| *c == h) {
            Some((_, which)) => {
                Verdict::Fatal(format!("the {which} completion queue on {dev} failed (overrun or protection error)"))
            }
            None => Verdict::Ignore(format!("{name} for a completion queue of {dev} this connection does not use")),
        },
        (e::DEVICE_FATAL, _) => Verdict::Fatal(format!("{dev} reported a fatal device error")),
        (e::QP_FATAL | e::QP_REQ_ERR | e::QP_ACCESS_ERR, _) => {
            Verdict::Ignore(format!("{name} for a queue pair of {dev} this connection does not use"))
        }
        (
            e::PORT_ACTIVE | e::LID_CHANGE | e::PKEY_CHANGE | e::SM_CHANGE | e::CLIENT_REREGISTER | e::GID_CHANGE,
            EventElement::Port(p),
        ) => Verdict::Ignore(format!("{name} on port {p} of {dev}")),
        (e::COMM_EST | e::SQ_DRAINED | e::PATH_MIG | e::PATH_MIG_ERR | e::QP_LAST_WQE_REACHED, EventElement::Qp(h)) => {
            let whose = if h == qp_handle { format!("queue pair {qpn}") } else { "another queue pair".to_owned() };
            Verdict::Ignore(format!("{name} on {whose} of {dev}"))
        }
        (e::SRQ_ERR | e::SRQ_LIMIT_REACHED | e::WQ_FATAL, _) => {
            Verdict::Ignore(format!("{name} on {dev} (this connection uses no SRQ or WQ)"))
        }
        (t, el) => Verdict::Ignore(format!("event type {t} ({name}) on {dev}, element {el:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::event_type as e;
    use super::*;

    const QP: usize = 0x1000;
    const SCQ: usize = 0x2000;
    const RCQ: usize = 0x3000;

    fn w() -> Watched<'static> {
        Watched { device: "rxe0", port: 1, qp: (QP, 17), cqs: &[(SCQ, "send"), (RCQ, "receive")] }
    }

    fn ev(t: u32) -> AsyncEvent {
        let element = match element_kind(t) {
            ElementKind::Cq => EventElement::Cq(SCQ),
            ElementKind::Qp => EventElement::Qp(QP),
            ElementKind::Srq => EventElement::Srq(0x4000),
            ElementKind::Wq => EventElement::Wq(0x5000),
            ElementKind::Port => EventElement::Port(1),
            ElementKind::Device => EventElement::Device,
        };
        AsyncEvent { event_type: t, element }
    }

    fn fatal(v: Verdict) -> String {
        match v {
            Verdict::Fatal(r) => r,
            other => panic!("expected Fatal, got {other:?}"),
        }
    }

    fn ignored(v: Verdict) -> String {
        match v {
            Verdict::Ignore(r) => r,
            other => panic!("expected Ignore, got {other:?}"),
        }
    }

    #[test]
    fn fatal_events_for_our_resources() {
        assert_eq!(fatal(classify(&ev(e::PORT_ERR), &w())), "port 1 of rxe0 went down");
        for t in [e::QP_FATAL, e::QP_REQ_ERR, e::QP_ACCESS_ERR] {
            let r = fatal(classify(&ev(t), &w()));
            assert!(r.starts_with("queue pair 17 on rxe0 entered the error state"), "{r}");
        }
        assert!(fatal(classify(&ev(e::CQ_ERR), &w())).contains("send completion queue"));
        let rcq = AsyncEvent { event_type: e::CQ_ERR, element: EventElement::Cq(RCQ) };
        assert!(fatal(classify(&rcq, &w())).contains("receive completion queue"));
        assert_eq!(fatal(classify(&ev(e::DEVICE_FATAL), &w())), "rxe0 reported a fatal device error");
    }

    #[test]
    fn the_same_events_for_other_resources_are_ignored() {
        let other_port = AsyncEvent { event_type: e::PORT_ERR, element: EventElement::Port(2) };
        assert!(ignored(classify(&other_port, &w())).contains("port 2 of rxe0 went down"));
        for t in [e::QP_FATAL, e::QP_REQ_ERR, e::QP_ACCESS_ERR] {
            let other_qp = AsyncEvent { event_type: t, element: EventElement::Qp(QP + 8) };
            ignored(classify(&other_qp, &w()));
        }
        let other_cq = AsyncEvent { event_type: e::CQ_ERR, element: EventElement::Cq(0x9000) };
        ignored(classify(&other_cq, &w()));
    }

    #[test]
    fn informational_events_are_ignored() {
        for t in [
            e::PORT_ACTIVE,
            e::LID_CHANGE,
            e::PKEY_CHANGE,
            e::SM_CHANGE,
            e::CLIENT_REREGISTER,
            e::GID_CHANGE,
            e::COMM_EST,
            e::SQ_DRAINED,
            e::PATH_MIG,
            e::PATH_MIG_ERR,
            e::QP_LAST_WQE_REACHED,
            e::SRQ_ERR,
            e::SRQ_LIMIT_REACHED,
            e::WQ_FATAL,
        ] {
            let note = ignored(classify(&ev(t), &w()));
            assert!(note.contains(event_name(t)), "{t}: {note}");
        }
        // A type from a newer kernel: logged, not fatal, not a panic.
        let new = AsyncEvent { event_type: 42, element: EventElement::Port(7) };
        assert!(ignored(classify(&new, &w())).contains("event type 42 (unknown)"));
    }

    #[test]
    fn names_and_element_kinds_follow_verbs_h() {
        let fatal_types = [e::CQ_ERR, e::QP_FATAL, e::QP_REQ_ERR, e::QP_ACCESS_ERR, e::DEVICE_FATAL, e::PORT_ERR];
        for t in 0..=e::WQ_FATAL {
            assert!(event_name(t).starts_with("IBV_EVENT_"), "{t}");
            let v = classify(&ev(t), &w());
            assert_eq!(matches!(v, Verdict::Fatal(_)), fatal_types.contains(&t), "{t}: {v:?}");
        }
        assert_eq!(event_name(e::PORT_ERR), "IBV_EVENT_PORT_ERR");
        assert_eq!(event_name(99), "unknown");
        assert_eq!(element_kind(e::QP_LAST_WQE_REACHED), ElementKind::Qp);
        assert_eq!(element_kind(e::GID_CHANGE), ElementKind::Port);
        assert_eq!(element_kind(99), ElementKind::Port, "libibverbs' default branch");
    }

    #[test]
    fn constants_match_the_bindings() {
        use rdma_sys::ibv_event_type as s;
        let pairs = [
            (e::CQ_ERR, s::IBV_EVENT_CQ_ERR),
            (e::QP_FATAL, s::IBV_EVENT_QP_FATAL),
            (e::QP_REQ_ERR, s::IBV_EVENT_QP_REQ_ERR),
            (e::QP_ACCESS_ERR, s::IBV_EVENT_QP_ACCESS_ERR),
            (e::COMM_EST, s::IBV_EVENT_COMM_EST),
            (e::SQ_DRAINED, s::IBV_EVENT_SQ_DRAINED),
            (e::PATH_MIG, s::IBV_EVENT_PATH_MIG),
            (e::PATH_MIG_ERR, s::IBV_EVENT_PATH_MIG_ERR),
            (e::DEVICE_FATAL, s::IBV_EVENT_DEVICE_FATAL),
            (e::PORT_ACTIVE, s::IBV_EVENT_PORT_ACTIVE),
            (e::PORT_ERR, s::IBV_EVENT_PORT_ERR),
            (e::LID_CHANGE, s::IBV_EVENT_LID_CHANGE),
            (e::PKEY_CHANGE, s::IBV_EVENT_PKEY_CHANGE),
            (e::SM_CHANGE, s::IBV_EVENT_SM_CHANGE),
            (e::SRQ_ERR, s::IBV_EVENT_SRQ_ERR),
            (e::SRQ_LIMIT_REACHED, s::IBV_EVENT_SRQ_LIMIT_REACHED),
            (e::QP_LAST_WQE_REACHED, s::IBV_EVENT_QP_LAST_WQE_REACHED),
            (e::CLIENT_REREGISTER, s::IBV_EVENT_CLIENT_REREGISTER),
            (e::GID_CHANGE, s::IBV_EVENT_GID_CHANGE),
            (e::WQ_FATAL, s::IBV_EVENT_WQ_FATAL),
        ];
        for (ours, theirs) in pairs {
            assert_eq!(ours, theirs as u32, "{theirs:?}");
        }
    }
}
