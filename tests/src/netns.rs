//! Two "hosts" on this machine for tests of the real binary: network namespaces joined by a
//! veth pair ([`Link`], deleted on drop), processes with their output drained ([`Proc`],
//! killed on drop), and the preconditions (root, iproute2, the binary).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::livemig_bin;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return false };
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

/// Whether iproute2's `ip` runs.
pub fn have_ip() -> bool {
    Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
}

/// Runs a command; `Err(stderr)` when it fails.
pub fn run(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog).args(args).output().map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{prog} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Runs `ip ARGS`; panics when it fails.
pub fn ip(args: &[&str]) {
    run("ip", args).unwrap_or_else(|e| panic!("{e}"));
}

/// Two namespaces A and B joined by a veth pair (10.213.CASE.1 in A, .2 in B); deleted on
/// drop.
#[derive(Debug)]
pub struct Link {
    /// Namespace A.
    pub ns_a: String,
    /// Namespace B.
    pub ns_b: String,
    /// A's end of the pair.
    pub veth_a: String,
    /// B's end of the pair.
    pub veth_b: String,
    /// B's address.
    pub addr_b: String,
    created: Vec<String>,
}

impl Link {
    /// Creates the pair for `case` (unique per test process and case).
    pub fn create(case: u8) -> Link {
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

    /// Runs `tc ARGS` in `ns`.
    pub fn tc(&self, ns: &str, args: &[&str]) -> Result<(), String> {
        let mut v = vec!["netns", "exec", ns, "tc"];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// Shapes both directions to `rate` (tc tbf, e.g. `1gbit`). Best effort.
    pub fn shape(&self, rate: &str) {
        for (ns, dev) in [(&self.ns_a, &self.veth_a), (&self.ns_b, &self.veth_b)] {
            let args = ["qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "128k", "latency", "50ms"];
            if let Err(e) = self.tc(ns, &args) {
                eprintln!("note: running unshaped ({e})");
                return;
            }
        }
    }

    /// Whether `sch_netem` can be attached (probed on A's veth and removed again).
    pub fn netem_available(&self) -> Result<(), String> {
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
#[derive(Debug)]
pub struct Proc {
    /// What it is (for messages).
    pub name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<JoinHandle<String>>,
    /// Its exit status and when the exit was first seen.
    pub exited: Option<(ExitStatus, Instant)>,
}

impl Proc {
    /// Starts `cmd` with `LIVEMIG_SECRET=secret`.
    pub fn spawn(name: &'static str, mut cmd: Command, secret: &str) -> Proc {
        let mut child = cmd
            .env("LIVEMIG_SECRET", secret)
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
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        let l = self.lines.recv_timeout(timeout).ok()?;
        self.stdout.push(l.clone());
        Some(l)
    }

    /// Reads stdout until a line satisfies `pred`; panics with the output after `timeout`.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
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
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some((st, Instant::now()));
            }
        }
        self.exited.map(|(st, _)| st)
    }

    /// Kills it unless it exited.
    pub fn kill(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Stdout and stderr (waits for the stderr reader; call after the process ended).
    pub fn output(&mut self) -> String {
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

/// Root, iproute2 and a `livemig` binary that has `migrate FLAG`; else `None` after
/// printing `skipped: …`.
pub fn preconditions(flag: &str) -> Option<PathBuf> {
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
    if !help.status.success() || !String::from_utf8_lossy(&help.stdout).contains(flag) {
        eprintln!("skipped: {} has no `migrate {flag}`", bin.display());
        return None;
    }
    Some(bin)
}
