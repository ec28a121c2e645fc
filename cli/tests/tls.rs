//! TLS from the command line: `--tls` on a local migration (both processes), and a daemon
//! with `--tls` that serves TLS peers and refuses plain ones.

use std::process::{Command, Stdio};

use livemig_tests::spawn_listening;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");
const SECRET: &str = "tls-cli-test-secret-tls-cli-test-secret";

fn livemig(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env("LIVEMIG_SECRET", SECRET).stdin(Stdio::null());
    c
}

#[test]
fn a_local_migration_over_tls() {
    let o = livemig(&["migrate", "--local", "--tls", "--transport", "tcp", "--size", "16M", "--wss", "2M"])
        .args(["--threads", "1", "--warmup", "0.3", "--after", "0.2", "--no-progress"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("migration completed") && out.contains("verified"), "{out}");
}

#[test]
fn a_tls_daemon_serves_tls_peers_and_refuses_plain_ones() {
    let mut d = spawn_listening(livemig(&["serve", "--tls", "--listen", "127.0.0.1:0"]).stderr(Stdio::null()));
    let bench = |tls: bool| {
        let mut c = livemig(&["bench", "pages", "--connect", &d.addr, "--transport", "tcp", "--size", "4M"]);
        c.args(["--duration", "0", "--io-timeout", "5"]);
        if tls {
            c.arg("--tls");
        }
        c.output().unwrap()
    };
    let plain = bench(false);
    assert!(!plain.status.success(), "a plain peer got a session from a TLS daemon");
    let o = bench(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = d.child.kill();
    let _ = d.child.wait();
}
