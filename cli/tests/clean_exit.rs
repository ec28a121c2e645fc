//! Clean exits: `migrate --local --link` makes two network namespaces, a veth pair and two
//! child processes; a signal to the parent alone (what `timeout` sends) or Ctrl-C (SIGINT to
//! the whole foreground process group) must leave none of them behind. Needs root (`ip netns`);
//! skipped with a message otherwise.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let ppid = rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` still exists as a live (non-zombie) process.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            rest.split_whitespace().next() != Some("Z")
        }
        Err(_) => false,
    }
}

fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.ends_with(&format!("-{pid}")) && n.starts_with("livemig-"))
        .map(str::to_string)
        .collect()
}

/// Starts a long `migrate --local --link`, waits until its namespaces and children exist,
/// then sends `sig` (to the parent alone, or to its whole process group) and checks that
/// everything it made is gone.
fn signal_during_link_migration(sig: i32, to_group: bool, expect_code: i32) {
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces");
        return;
    }
    let mut child = Command::new(BIN)
        .args(["migrate", "--local", "--link", "1gbit", "--transport", "tcp", "--size", "32M"])
        .args(["--warmup", "60", "--no-progress"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("starting livemig");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = String::new();
    while !log.contains("link: veth") {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("no link line within 30 s:\n{log}")
        });
        log.push_str(&line);
        log.push('\n');
    }
    // The source child starts right after the line; wait until both children exist.
    let mut kids = Vec::new();
    while Instant::now() < deadline {
        kids = children_of(pid);
        if kids.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(kids.len() >= 2, "expected the destination and source children, got {kids:?}");
    assert_eq!(namespaces_of(pid).len(), 2, "both namespaces exist before the signal");
    let target = if to_group { -(pid as i32) } else { pid as i32 };
    // SAFETY: kill(2) on our own child (or its process group).
    assert_eq!(unsafe { libc::kill(target, sig) }, 0);
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "the parent did not exit within 20 s of signal {sig}");
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        log.push_str(&line);
        log.push('\n');
    }
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.code() == Some(expect_code) || status.signal() == Some(sig),
        "exit status {status:?} after signal {sig}:\n{log}"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while kids.iter().any(|&k| running(k)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    for k in &kids {
        assert!(!running(*k), "child {k} survived signal {sig}:\n{log}");
    }
    let left = namespaces_of(pid);
    assert!(left.is_empty(), "namespaces left behind after signal {sig}: {left:?}\n{log}");
}

#[test]
fn sigterm_to_the_parent_alone_removes_namespaces_and_children() {
    signal_during_link_migration(libc::SIGTERM, false, 128 + libc::SIGTERM);
}

#[test]
fn ctrl_c_to_the_process_group_removes_namespaces_and_children() {
    signal_during_link_migration(libc::SIGINT, true, 128 + libc::SIGINT);
}
