//! Asynchronous device events against the verbs backend: a port that goes down while a side
//! waits for a message or transfers must fail the connection at once with
//! `TransportError::DeviceEvent`, not after the I/O timeout.
//!
//! The port is taken down for real: each test creates its own Soft-RoCE device (`rxe_ev` on a
//! dummy netdev `lmev0`, 10.99.99.1/24), connects a pair on it (the out-of-band TCP
//! socket stays on 127.0.0.1/lo, untouched), sets `lmev0` down, checks the error and the time it
//! took, brings the link back up and deletes the device. The harness's `rxe0` on `lo` is never
//! touched, so the executables that run after this one in the same guest are not affected, and
//! the out-of-band socket cannot be the first to notice anything. Needs root, `ip` and `rdma`
//! (iproute2), all present in the guest of `tests/rxe/run-verbs-tests.sh`; on a host without an
//! RDMA device every test prints SKIPPED and passes.
//!
//! Compiled only when the verbs backend is: with a `verbs` feature of this crate, or with
//! `--cfg livemig_verbs`; otherwise the file is empty.
#![allow(unexpected_cfgs)]
#![cfg(any(feature = "verbs", livemig_verbs))]

use std::io::Write;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig_transport::auth::Secret;
use livemig_transport::conformance as conf;
use livemig_transport::verbs::{self, CompletionMode, VerbsConfig, VerbsListener, VerbsTransport};
use livemig_transport::{
    CoalesceConfig, Coalescer, PageBitmap, RegionTable, Segment, Transport, TransportError, WriteRequest,
};

/// The dedicated device and its netdev.
const DEV: &str = "rxe_ev";
const NETDEV: &str = "lmev0";
const ADDR: &str = "10.99.99.1/24";
/// What the port-down must beat by far.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound accepted for "at once" (TCG guest; includes spawning `ip`).
const PROMPT: Duration = Duration::from_secs(2);

/// The tests share the device names: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn say(s: String) {
    // Straight to fd 2: visible in the guest run's output without --nocapture.
    let _ = std::io::stderr().write_all(format!("{s}\n").as_bytes());
}

fn run_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn port_file(what: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/infiniband/{DEV}/ports/1/{what}")).unwrap_or_default()
}

/// `rxe_ev` on `lmev0`, removed on drop (drop every transport on it first: rxe has no
/// disassociate support, so deleting the device waits for its open contexts).
struct PrivateRxe;

impl PrivateRxe {
    fn create() -> PrivateRxe {
        // Leftovers of an aborted run.
        let _ = run_cmd(&["rdma", "link", "delete", DEV]);
        let _ = run_cmd(&["ip", "link", "del", NETDEV]);
        for c in [
            &["ip", "link", "add", NETDEV, "type", "dummy"][..],
            &["ip", "addr", "add", ADDR, "dev", NETDEV],
            &["ip", "link", "set", NETDEV, "up"],
            &["rdma", "link", "add", DEV, "type", "rxe", "netdev", NETDEV],
        ] {
            run_cmd(c).unwrap_or_else(|e| panic!("setting up {DEV} on {NETDEV}: {e}"));
        }
        let rig = PrivateRxe;
        rig.wait_active();
        rig
    }

    /// Until port 1 is ACTIVE and has the RoCE v2 GID of ADDR.
    fn wait_active(&self) {
        let t0 = Instant::now();
        loop {
            let gids = (0..4).map(|i| port_file(&format!("gids/{i}"))).collect::<Vec<_>>().join(" ");
            if port_file("state").contains("ACTIVE") && gids.contains("ffff:0a63:6301") {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{DEV} port 1 not ACTIVE: {} {gids}", port_file("state"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ip link set lmev0 down|up`; returns when the command was started.
    fn set_link(&self, up: bool) -> Instant {
        let t = Instant::now();
        run_cmd(&["ip", "link", "set", NETDEV, if up { "up" } else { "down" }]).unwrap();
        if up {
            self.wait_active();
        }
        t
    }
}

impl Drop for PrivateRxe {
    fn drop(&mut self) {
        let _ = run_cmd(&["ip", "link", "set", NETDEV, "up"]);
        if let Err(e) = run_cmd(&["rdma", "link", "delete", DEV]) {
            say(format!("cleanup: {e}"));
        }
        if let Err(e) = run_cmd(&["ip", "link", "del", NETDEV]) {
            say(format!("cleanup: {e}"));
        }
    }
}

fn secret() -> Secret {
    Secret::new("verbs-events-secret-verbs-events-secret").unwrap()
}

fn cfg(mode: CompletionMode) -> VerbsConfig {
    VerbsConfig { device: Some(DEV.into()), completion: mode, io_timeout: IO_TIMEOUT, ..Default::default() }
}

fn pair(c: &VerbsConfig, src: &RegionTable, dst: &RegionTable) -> (VerbsTransport, VerbsTransport) {
    let l = VerbsListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (dst, cb) = (dst.clone(), c.clone());
    let t = std::thread::spawn(move || l.accept(&cb, &secret(), &dst).unwrap());
    let a = VerbsTransport::connect(addr, c, &secret(), src).unwrap();
    let b = t.join().unwrap();
    assert_eq!(a.device().0, DEV);
    (a, b)
}

/// The port-down error, with the reason naming our device and port.
fn assert_port_down(e: &TransportError, what: &str) {
    match e {
        TransportError::DeviceEvent { event, reason } => {
            assert_eq!(*event, "IBV_EVENT_PORT_ERR", "{what}: {e}");
            assert!(reason.contains(&format!("port 1 of {DEV}")), "{what}: {e}");
        }
        other => panic!("{what}: expected DeviceEvent(IBV_EVENT_PORT_ERR), got {other:?}"),
    }
}

fn mode_name(m: CompletionMode) -> &'static str {
    match m {
        CompletionMode::Event => "event",
        CompletionMode::BusyPoll => "busy-poll",
    }
}

/// A connection on the device still works (the link is back, nothing is left broken).
fn still_works(c: &VerbsConfig) {
    let r = conf::regions(256 << 10);
    let (mut a, mut b) = pair(c, &r.src_table, &r.dst_table);
    let co = Coalescer::new(a.coalesce_config(CoalesceConfig::default())).unwrap();
    conf::send_bitmap(&mut a, &co, &PageBitmap::full(64)).unwrap();
    a.send_message(b"again").unwrap();
    assert_eq!(b.recv_message(Some(IO_TIMEOUT)).unwrap().unwrap(), b"again");
    a.flush().unwrap();
}

#[test]
fn verbs_port_down_fails_a_blocked_recv_message() {
    if !verbs::device_test_guard("verbs_port_down_fails_a_blocked_recv_message") {
        return;
    }
    let _g = serial();
    let rig = PrivateRxe::create();
    for mode in [CompletionMode::Event, CompletionMode::BusyPoll] {
        let c = cfg(mode);
        let r = conf::regions(1 << 20);
        let (mut a, mut b) = pair(&c, &r.src_table, &r.dst_table);
        a.send_message(b"hello").unwrap();
        assert_eq!(b.recv_message(Some(IO_TIMEOUT)).unwrap().unwrap(), b"hello");

        // b blocks in recv_message (nothing outstanding anywhere); the link goes down.
        let rig_ref = &rig;
        let (res, t_err, t_down) = std::thread::scope(|s| {
            let downer = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                rig_ref.set_link(false)
            });
            let res = b.recv_message(Some(IO_TIMEOUT));
            (res, Instant::now(), downer.join().unwrap())
        });
        let e = match res {
            Err(e) => e,
            Ok(m) => panic!("{}: recv_message returned {m:?} instead of failing", mode_name(mode)),
        };
        assert_port_down(&e, "the blocked recv_message");
        let took = t_err.saturating_duration_since(t_down);
        say(format!(
            "VERBS_EVENTS recv_message mode={}: link down -> error after {} ms (io_timeout {} s): {e}",
            mode_name(mode),
            took.as_millis(),
            IO_TIMEOUT.as_secs()
        ));
        assert!(took < PROMPT, "{}: the port-down took {took:?} to surface", mode_name(mode));

        // Sticky, on every call of both ends (the other end is on the same port), and nothing
        // waits for a timeout.
        let t0 = Instant::now();
        assert_port_down(&b.recv_message(Some(IO_TIMEOUT)).unwrap_err(), "b.recv_message again");
        assert_port_down(&b.send_message(b"x").unwrap_err(), "b.send_message");
        assert_port_down(&b.poll_completions().unwrap_err(), "b.poll_completions");
        assert_port_down(&b.flush().unwrap_err(), "b.flush");
        let seg = [Segment { offset: 0, len: 4096 }];
        let w = [WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: 0 }];
        assert_port_down(&a.post_writes(&w).unwrap_err(), "a.post_writes");
        assert_port_down(&a.send_message(b"x").unwrap_err(), "a.send_message");
        assert_port_down(&a.flush().unwrap_err(), "a.flush");
        assert_port_down(&a.poll_completions().unwrap_err(), "a.poll_completions");
        assert_port_down(&a.recv_message(None).unwrap_err(), "a.recv_message");
        assert!(t0.elapsed() < PROMPT, "later calls took {:?}", t0.elapsed());
        let t0 = Instant::now();
        drop(a);
        drop(b);
        assert!(t0.elapsed() < Duration::from_secs(10), "teardown took {:?}", t0.elapsed());

        rig.set_link(true);
        still_works(&c);
    }
}

#[test]
fn verbs_port_down_fails_a_transfer_in_flight() {
    if !verbs::device_test_guard("verbs_port_down_fails_a_transfer_in_flight") {
        return;
    }
    let _g = serial();
    let rig = PrivateRxe::create();
    for mode in [CompletionMode::Event, CompletionMode::BusyPoll] {
        let c = cfg(mode);
        let r = conf::regions(4 << 20);
        let (mut a, mut b) = pair(&c, &r.src_table, &r.dst_table);
        let co = Coalescer::new(a.coalesce_config(CoalesceConfig::per_page(4096))).unwrap();
        let bm = PageBitmap::full(r.src.pages());
        // One round first: the link goes down in the middle of a later one.
        conf::send_bitmap(&mut a, &co, &bm).unwrap();
        a.flush().unwrap();

        let rig_ref = &rig;
        let (sender, receiver, t_down) = std::thread::scope(|s| {
            // The destination waits for the "round done" message that never comes.
            let rx = s.spawn(|| {
                let res = b.recv_message(Some(IO_TIMEOUT));
                (res, Instant::now())
            });
            let downer = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                rig_ref.set_link(false)
            });
            let t0 = Instant::now();
            let mut rounds = 0;
            let sent = loop {
                let res = conf::send_bitmap(&mut a, &co, &bm).and_then(|_| a.flush());
                rounds += 1;
                if let Err(e) = res {
                    break (e, Instant::now(), rounds);
                }
                assert!(t0.elapsed() < IO_TIMEOUT * 2, "writes kept completing with the port down");
            };
            (sent, rx.join().unwrap(), downer.join().unwrap())
        });
        let (e, t_err, rounds) = sender;
        assert_port_down(&e, "the sender's post_writes/flush");
        let took = t_err.saturating_duration_since(t_down);
        let st = a.stats();
        say(format!(
            "VERBS_EVENTS transfer mode={}: link down -> sender error after {} ms in round {rounds} \
             ({} of {} writes completed, io_timeout {} s): {e}",
            mode_name(mode),
            took.as_millis(),
            st.writes_completed,
            st.writes_posted,
            IO_TIMEOUT.as_secs()
        ));
        assert!(took < PROMPT, "{}: the port-down took {took:?} to reach the sender", mode_name(mode));
        let (res, t_rx) = receiver;
        let re = match res {
            Err(e) => e,
            Ok(m) => panic!("{}: the receiver got {m:?} instead of an error", mode_name(mode)),
        };
        assert_port_down(&re, "the receiver's recv_message");
        let took_rx = t_rx.saturating_duration_since(t_down);
        say(format!(
            "VERBS_EVENTS transfer mode={}: link down -> receiver error after {} ms: {re}",
            mode_name(mode),
            took_rx.as_millis()
        ));
        assert!(took_rx < PROMPT, "{}: the port-down took {took_rx:?} to reach the receiver", mode_name(mode));
        assert_port_down(&a.post_writes(&[]).unwrap_err(), "a.post_writes after the error");
        drop(a);
        drop(b);

        rig.set_link(true);
        still_works(&c);
    }
}
