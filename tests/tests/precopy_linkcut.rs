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

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_tests::{livemig_bin, parse_listening};

const SECRET: &str = "linkcut-test-secret-0123456789abcdef";
/// `--io-timeout` of both ends, seconds.
const IO_TIMEOUT: u64 = 3;
/// The source must have failed this long after the cut.
const SOURCE_BOUND: Duration = Duration::from_secs(30);
/// The destination gets this long after the cut before it is killed.
const DEST_BOUND: Duration = Duration::from_secs(30);
/// Time allowed from start until the line of iteration 2.
const ITER2_BOUND: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return false };
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

fn have_ip() -> bool {
    Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
}

/// Runs a command; `Err(stderr)` when it fails.
fn run(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog).args(args).output().map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{prog} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn ip(args: &[&str]) {
    run("ip", args).unwrap_or_else(|e| panic!("{e}"));
}

/// Two namespaces A and B joined by a veth pair; deleted on drop.
#[derive(Debug)]
struct Link {
    ns_a: String,
    ns_b: String,
    veth_a: String,
    veth_b: String,
    addr_b: String,
    created: Vec<String>,
}

impl Link {
    fn create(case: u8) -> Link {
        let pid = std::process::id();
        let mut l = Link {
            ns_a: format!("lmcut-a-{pid}-{case}"),
            ns_b: format!("lmcut-b-{pid}-{case}"),
            // Interface names are limited to 15 bytes; a pid has at most 7 digits.
            veth_a: format!("lcA{pid}x{case}"),
            veth_b: format!("lcB{pid}x{case}"),
            addr_b: format!("10.213.{case}.2"),
            created: Vec::new(),
        };
        for ns in [l.ns_a.clone(), l.ns_b.clone()] {
            ip(&["netns", "add", &ns]);
            l.created.push(ns);
        }
        ip(&["link", "add", &l.veth_a, "netns", &l.ns_a, "type", "veth", "peer", "name", &l.veth_b, "netns", &l.ns_b]);
        for (ns, dev, addr) in
            [(&l.ns_a, &l.veth_a, format!("10.213.{case}.1/24")), (&l.ns_b, &l.veth_b, format!("{}/24", l.addr_b))]
        {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        l
    }

    fn tc(&self, ns: &str, args: &[&str]) -> Result<(), String> {
        let mut v = vec!["netns", "exec", ns, "tc"];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// Shapes both directions to 1 Gbit/s (every interval of a 48 MiB working set then takes
    /// ~0.4 s, so the dirty set stays the whole working set). Best effort.
    fn shape(&self) {
        for (ns, dev) in [(&self.ns_a, &self.veth_a), (&self.ns_b, &self.veth_b)] {
            let args = ["qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit", "burst", "128k", "latency", "50ms"];
            if let Err(e) = self.tc(ns, &args) {
                eprintln!("note: running unshaped ({e})");
                return;
            }
        }
    }

    /// Whether `sch_netem` can be attached (probed on A's veth and removed again).
    fn netem_available(&self) -> Result<(), String> {
        self.tc(&self.ns_a, &["qdisc", "add", "dev", &self.veth_a, "root", "netem", "delay", "0ms"])?;
        self.tc(&self.ns_a, &["qdisc", "del", "dev", &self.veth_a, "root"])
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            if let Err(e) = run("ip", &["netns", "del", &ns]) {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// A child process with its output drained by threads; killed on drop.
struct Proc {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<JoinHandle<String>>,
    exited: Option<(ExitStatus, Instant)>,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("LIVEMIG_SECRET", SECRET)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {name}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Proc { name, child, lines, stdout: Vec::new(), stderr: Some(stderr), exited: None }
    }

    /// Next stdout line within `timeout` (`None` on timeout or end of output).
    fn line(&mut self, timeout: Duration) -> Option<String> {
        let l = self.lines.recv_timeout(timeout).ok()?;
        self.stdout.push(l.clone());
        Some(l)
    }

    /// Reads stdout until a line satisfies `pred`; panics with the output after `timeout`.
    fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.line(left) {
                Some(l) if pred(&l) => return l,
                Some(_) => {}
                None => {
                    self.kill();
                    let out = self.output();
                    panic!(
                        "{}: expected line not seen (output ended or {timeout:?} passed); output:\n{out}",
                        self.name
                    );
                }
            }
        }
    }

    /// Polls for the exit; records when it was first seen.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some((st, Instant::now()));
            }
        }
        self.exited.map(|(st, _)| st)
    }

    fn kill(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Stdout and stderr (waits for the stderr reader; call after the process ended).
    fn output(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.stdout.push(l);
        }
        let err = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let tail: Vec<&String> = self.stdout.iter().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
        let tail: Vec<&str> = tail.iter().map(|s| s.as_str()).collect();
        format!("--- stdout (last lines) ---\n{}\n--- stderr ---\n{err}", tail.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    LinkDown,
    NetemLoss,
}

fn preconditions() -> Option<PathBuf> {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return None;
    }
    if !have_ip() {
        eprintln!("skipped: needs iproute2 (`ip`)");
        return None;
    }
    let Some(bin) = livemig_bin() else {
        eprintln!("skipped: no livemig binary (cargo build -p livemig, or set LIVEMIG_BIN)");
        return None;
    };
    let help = Command::new(&bin).args(["migrate", "--help"]).output().expect("running livemig");
    if !help.status.success() || !String::from_utf8_lossy(&help.stdout).contains("--io-timeout") {
        eprintln!("skipped: {} has no `migrate --io-timeout`", bin.display());
        return None;
    }
    Some(bin)
}

/// The cases run one after the other: two migrations at once would compete for the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn link_cut(cut: Cut) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = preconditions() else { return };
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
    link.shape();
    let io_timeout = IO_TIMEOUT.to_string();

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.ns_b]).arg(&bin);
    cmd.args(["receive", "--listen", &format!("{}:0", link.addr_b), "--transport", "tcp", "--size", "64M"]);
    cmd.args(["--after", "0.2", "--io-timeout", &io_timeout]);
    let mut dst = Proc::spawn("destination", cmd);
    let first = dst.wait_line(Duration::from_secs(20), |l| l.starts_with("listening "));
    let (addr, kind) = parse_listening(&first).unwrap_or_else(|| panic!("no address: {first}"));
    assert_eq!(kind, "tcp", "{first}");

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.ns_a]).arg(&bin);
    cmd.args(["migrate", "--to", addr, "--transport", "tcp", "--size", "64M", "--wss", "48M"]);
    cmd.args(["--workload", "random", "--warmup", "0.2", "--policy", "kvm", "--downtime-ms", "1"]);
    cmd.args(["--max-time", "60", "--io-timeout", &io_timeout]);
    let mut src = Proc::spawn("source", cmd);
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
