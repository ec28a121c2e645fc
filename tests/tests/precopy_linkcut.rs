//! A real link cut in the middle of pre-copy, with the real `livemig` binary.
//!
//! Two network namespaces (unique per test process and case) are joined by a veth pair,
//! shaped to 1 Gbit/s with tc tbf when available so that every interval takes a few hundred
//! milliseconds and the dirty set of a flat-out random writer never converges. The
//! destination (`livemig receive`) runs in namespace B, the source (`livemig migrate`) in A,
//! both with `--io-timeout 3`. Once the source printed the line of iteration 2 the link is
//! cut silently — no RST, no FIN, the packets just vanish:
//!
//! * `link_down`: `ip -n B link set <vethB> down`;
//! * `netem_loss`: `tc qdisc replace dev <vethA> root netem loss 100%` (skipped when the
//!   kernel has no `sch_netem`).
//!
//! The source must notice within a bound, fail with "transport failed during pre-copy" and
//! report its workload as still running. The destination must fail too (it is killed at the
//! end if it does not; the test says which). Measured detection times are printed.
//!
//! Needs root and iproute2; otherwise it prints `skipped: …` and passes. The namespaces are
//! deleted by a drop guard on every exit path, panics included.

use std::process::Command;
use std::time::{Duration, Instant};

use livemig_tests::netns::{ip, preconditions, Link, Proc};
use livemig_tests::parse_listening;

const SECRET: &str = "linkcut-test-secret-0123456789abcdef";
/// `--io-timeout` of both ends, seconds.
const IO_TIMEOUT: u64 = 3;
/// The source must have failed this long after the cut.
const SOURCE_BOUND: Duration = Duration::from_secs(30);
/// The destination gets this long after the cut before it is killed.
const DEST_BOUND: Duration = Duration::from_secs(30);
/// Time allowed from start until the line of iteration 2.
const ITER2_BOUND: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    LinkDown,
    NetemLoss,
}

/// The cases run one after the other: two migrations at once would compete for the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn link_cut(cut: Cut) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = preconditions("--io-timeout") else { return };
    let case = match cut {
        Cut::LinkDown => 1,
        Cut::NetemLoss => 2,
    };
    // Declared before the processes: dropped after them, so nothing runs in a deleted netns.
    let link = Link::create(case);
    if cut == Cut::NetemLoss {
        if let Err(e) = link.netem_available() {
            eprintln!("skipped: sch_netem is not available ({e})");
            return;
        }
    }
    // 1 Gbit/s: every interval of a 48 MiB working set takes ~0.4 s, so the dirty set stays
    // the whole working set.
    link.shape("1gbit");
    let io_timeout = IO_TIMEOUT.to_string();

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.ns_b]).arg(&bin);
    cmd.args(["receive", "--listen", &format!("{}:0", link.addr_b), "--transport", "tcp", "--size", "64M"]);
    cmd.args(["--after", "0.2", "--io-timeout", &io_timeout]);
    let mut dst = Proc::spawn("destination", cmd, SECRET);
    let first = dst.wait_line(Duration::from_secs(20), |l| l.starts_with("listening "));
    let (addr, kind) = parse_listening(&first).unwrap_or_else(|| panic!("no address: {first}"));
    assert_eq!(kind, "tcp", "{first}");

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.ns_a]).arg(&bin);
    cmd.args(["migrate", "--to", addr, "--transport", "tcp", "--size", "64M", "--wss", "48M"]);
    cmd.args(["--workload", "random", "--warmup", "0.2", "--policy", "kvm", "--downtime-ms", "1"]);
    cmd.args(["--max-time", "60", "--io-timeout", &io_timeout]);
    let mut src = Proc::spawn("source", cmd, SECRET);
    let started = Instant::now();
    let l2 = src.wait_line(ITER2_BOUND, |l| l.starts_with("iter   2"));
    eprintln!("{l2}");

    // The cut: packets vanish, nobody is told.
    let cut_at = Instant::now();
    match cut {
        Cut::LinkDown => ip(&["-n", &link.ns_b, "link", "set", &link.veth_b, "down"]),
        Cut::NetemLoss => link
            .tc(&link.ns_a, &["qdisc", "replace", "dev", &link.veth_a, "root", "netem", "loss", "100%"])
            .unwrap_or_else(|e| panic!("{e}")),
    }
    eprintln!("{cut:?}: cut {:.2} s after the source started", cut_at.duration_since(started).as_secs_f64());

    // Wait for both ends, each within its bound.
    loop {
        let s = src.poll();
        let d = dst.poll();
        let waited = cut_at.elapsed();
        if (s.is_some() || waited > SOURCE_BOUND) && (d.is_some() || waited > DEST_BOUND) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let src_exit = src.exited;
    src.kill();
    let src_out = src.output();
    let Some((src_status, src_at)) = src_exit else {
        dst.kill();
        panic!(
            "{cut:?}: the source did not fail within {SOURCE_BOUND:?} of a silent link cut (io-timeout {IO_TIMEOUT} s)\n{src_out}\n=== destination ===\n{}",
            dst.output()
        );
    };
    let src_detect = src_at.duration_since(cut_at);
    eprintln!(
        "{cut:?}: source exited ({src_status}) {:.2} s after the cut (io-timeout {IO_TIMEOUT} s)",
        src_detect.as_secs_f64()
    );

    let dst_exit = dst.exited;
    dst.kill();
    let dst_out = dst.output();
    match dst_exit {
        Some((st, at)) => eprintln!(
            "{cut:?}: destination exited ({st}) {:.2} s after the cut",
            at.duration_since(cut_at).as_secs_f64()
        ),
        None => eprintln!("{cut:?}: destination did not exit within {DEST_BOUND:?} of the cut; killed"),
    }
    eprintln!("=== source ===\n{src_out}\n=== destination ===\n{dst_out}");

    assert!(!src_status.success(), "the source must fail after the cut\n{src_out}");
    assert!(src_detect <= SOURCE_BOUND, "source detection took {src_detect:?}");
    assert!(src_out.contains("transport failed during pre-copy"), "source stderr must name the phase:\n{src_out}");
    assert!(src_out.contains("source workload: running"), "the source workload must keep running:\n{src_out}");
    assert!(!src_out.contains("migration completed"), "{src_out}");
    if let Some((st, _)) = dst_exit {
        assert!(!st.success(), "the destination must fail after the cut:\n{dst_out}");
        assert!(dst_out.contains("receiving the migration"), "{dst_out}");
    }
}

#[test]
fn link_down_during_precopy_fails_both_ends() {
    link_cut(Cut::LinkDown);
}

#[test]
fn netem_loss_during_precopy_fails_both_ends() {
    link_cut(Cut::NetemLoss);
}
