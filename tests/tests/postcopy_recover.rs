//! A real link cut during post-copy, with the real `livemig` binary, between two network
//! namespaces (see `livemig_tests::netns`), shaped so that the push takes seconds.
//!
//! Once the source says the guest runs at the destination, B's veth goes down: packets
//! vanish, nobody is told. Both ends notice within their I/O timeout; the guest's faults at
//! the destination block; the source dials again.
//!
//! * `…_is_recovered`: the link comes back after a few seconds; a new session takes the
//!   migration over, the destination's digest equals the source's, the guest runs on.
//! * `…_for_good_…`: it never comes back; after `--recover-within` both ends fail with a
//!   clear error and the destination names how many pages were missing (exit status 3).
//!
//! Needs root and iproute2; otherwise it prints `skipped: …` and passes.

use std::process::Command;
use std::time::{Duration, Instant};

use livemig_tests::netns::{ip, preconditions, Link, Proc};
use livemig_tests::parse_listening;

const SECRET: &str = "recover-test-secret-0123456789abcdef";
/// `--io-timeout` of both ends, seconds.
const IO_TIMEOUT: &str = "2";

/// One after the other: two migrations at once would compete for the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `livemig ARGS` in `ns`, its stderr merged into its stdout (the progress lines are read
/// as they come), with info logs.
fn in_ns(ns: &str, bin: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "exec \"$@\" 2>&1", "sh", "ip", "netns", "exec", ns]).arg(bin).args(args);
    c.env("LIVEMIG_LOG", "info");
    c
}

/// Starts the pair and waits until the guest runs at the destination; returns the link,
/// both processes, and that moment.
fn start(case: u8, recover_within: &str) -> Option<(Link, Proc, Proc)> {
    let bin = preconditions("--recover-within")?;
    let link = Link::create(case);
    // 200 Mbit/s: the push of ~96 MiB takes about 4 s.
    link.shape("200mbit");
    let listen = format!("{}:0", link.addr_b);
    let dst_args = [
        "receive",
        "--listen",
        &listen,
        "--transport",
        "tcp",
        "--size",
        "128M",
        "--after",
        "0.5",
        "--io-timeout",
        IO_TIMEOUT,
        "--recover-within",
        recover_within,
    ];
    let mut dst = Proc::spawn("destination", in_ns(&link.ns_b, &bin, &dst_args), SECRET);
    let first = dst.wait_line(Duration::from_secs(20), |l| l.starts_with("listening "));
    let (addr, _) = parse_listening(&first).unwrap_or_else(|| panic!("no address: {first}"));
    let src_args = [
        "migrate",
        "--to",
        addr,
        "--transport",
        "tcp",
        "--size",
        "128M",
        "--wss",
        "96M",
        "--workload",
        "random",
        "--warmup",
        "1",
        "--strategy",
        "postcopy",
        "--io-timeout",
        IO_TIMEOUT,
        "--recover-within",
        recover_within,
    ];
    let mut src = Proc::spawn("source", in_ns(&link.ns_a, &bin, &src_args), SECRET);
    src.wait_line(Duration::from_secs(60), |l| l.contains("the guest runs at the destination"));
    Some((link, src, dst))
}

/// Waits until both processes exited or `bound` passed.
fn wait_both(src: &mut Proc, dst: &mut Proc, bound: Duration) {
    let t0 = Instant::now();
    while (src.poll().is_none() || dst.poll().is_none()) && t0.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_link_cut_during_postcopy_is_recovered() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((link, mut src, mut dst)) = start(5, "30") else { return };
    // Into the push, then the cut, held longer than the I/O timeout of both ends.
    std::thread::sleep(Duration::from_millis(500));
    ip(&["-n", &link.ns_b, "link", "set", &link.veth_b, "down"]);
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    ip(&["-n", &link.ns_b, "link", "set", &link.veth_b, "up"]);
    eprintln!("link down for {:.1} s", cut.elapsed().as_secs_f64());
    wait_both(&mut src, &mut dst, Duration::from_secs(90));
    let (s, d) = (src.poll(), dst.poll());
    src.kill();
    dst.kill();
    let (so, dout) = (src.output(), dst.output());
    eprintln!("=== source ===\n{so}\n=== destination ===\n{dout}");
    assert!(s.is_some_and(|s| s.success()), "the source must complete after the recovery");
    assert!(d.is_some_and(|s| s.success()), "the destination must complete after the recovery");
    assert!(so.contains("the link broke 1 time(s); taken over on a new session"), "{so}");
    assert!(so.contains("(verified by the destination)"), "{so}");
    assert!(dout.contains("destination: post-copy verified"), "{dout}");
    // The guest went on at the destination after the migration.
    let rate = dout
        .split("workload runs at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no workload rate:\n{dout}"));
    assert!(rate > 0.0, "the guest must run on at the destination:\n{dout}");
}

#[test]
fn a_link_cut_for_good_during_postcopy_loses_the_guest_with_a_clear_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((link, mut src, mut dst)) = start(6, "3") else { return };
    std::thread::sleep(Duration::from_millis(500));
    ip(&["-n", &link.ns_b, "link", "set", &link.veth_b, "down"]);
    let cut = Instant::now();
    wait_both(&mut src, &mut dst, Duration::from_secs(60));
    let took = cut.elapsed();
    let (s, d) = (src.poll(), dst.poll());
    src.kill();
    dst.kill();
    let (so, dout) = (src.output(), dst.output());
    eprintln!(
        "=== source ===\n{so}\n=== destination ===\n{dout}\nboth ended {:.1} s after the cut",
        took.as_secs_f64()
    );
    assert!(s.is_some_and(|s| !s.success()), "the source must fail");
    assert!(so.contains("no new session took the migration over"), "{so}");
    assert!(so.contains("after the hand-over"), "the source copy is kept, never resumed: {so}");
    assert_eq!(d.and_then(|s| s.code()), Some(3), "the destination exits 3 when its guest is lost:\n{dout}");
    assert!(dout.contains("no session took the migration over"), "{dout}");
    assert!(dout.contains("pages installed); the guest cannot go on"), "{dout}");
}
