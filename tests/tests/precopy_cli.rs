//! The real `livemig` binary: `livemig migrate --local` runs a destination child process and
//! migrates a running workload to it. Skipped (with a message) when the binary is not built
//! next to this test or does not have the `migrate` command yet.

use std::path::PathBuf;
use std::process::Command;

fn livemig() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEMIG_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/precopy_cli-… → target/<profile>/livemig
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("livemig");
    p.exists().then_some(p)
}

#[test]
fn migrate_local_completes_with_a_summary() {
    let Some(bin) = livemig() else {
        eprintln!("skipped: no livemig binary (cargo build -p livemig, or set LIVEMIG_BIN)");
        return;
    };
    let help = Command::new(&bin).args(["migrate", "--help"]).output().unwrap();
    if !help.status.success() {
        eprintln!("skipped: {} has no `migrate` command", bin.display());
        return;
    }
    let out = Command::new(&bin)
        .args(["migrate", "--local", "--transport", "tcp", "--size", "32M", "--wss", "8M", "--workload", "random"])
        .args(["--warmup", "0.3", "--after", "0.3", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("\"outcome\": \"completed\""), "{stdout}");
    assert!(stdout.contains("\"downtime_ms\""), "{stdout}");
    assert!(stderr.contains("iter   1"), "one progress line per iteration:\n{stderr}");
    assert!(stderr.contains("\"verify_ms\""), "destination report:\n{stderr}");
}

#[test]
fn migrate_refuses_a_smaller_destination_at_handshake() {
    let Some(bin) = livemig() else { return };
    if !Command::new(&bin).args(["migrate", "--help"]).output().unwrap().status.success() {
        return;
    }
    let mut dst = Command::new(&bin)
        .args(["receive", "--listen", "127.0.0.1:0", "--size", "16M", "--transport", "tcp"])
        .env("LIVEMIG_SECRET", "cli-test-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(dst.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.split_whitespace().nth(1).unwrap().to_string();
    let out = Command::new(&bin)
        .args(["migrate", "--to", &addr, "--transport", "tcp", "--size", "32M", "--warmup", "0"])
        .env("LIVEMIG_SECRET", "cli-test-secret")
        .output()
        .unwrap();
    let _ = dst.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("smaller than the source region"), "{stderr}");
}
