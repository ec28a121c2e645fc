//! The real `livemig` binary: `livemig migrate --local` runs a destination child process and
//! migrates a running workload to it. Skipped (with a message) when the binary is not built
//! next to this test or does not have the `migrate` command yet.

use std::process::Command;

use livemig_tests::{livemig_bin, receive_command, spawn_listening, Listening};

#[test]
fn migrate_local_completes_with_a_summary() {
    let Some(bin) = livemig_bin() else {
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
    let Some(bin) = livemig_bin() else { return };
    if !Command::new(&bin).args(["migrate", "--help"]).output().unwrap().status.success() {
        return;
    }
    let secret = "cli-test-secret-cli-test-secret-cli-test";
    let args = ["--listen", "127.0.0.1:0", "--size", "16M", "--transport", "tcp"];
    let mut dst = spawn_listening(&mut receive_command(&bin, secret, &args));
    let out = Command::new(&bin)
        .args(["migrate", "--to", &dst.addr, "--transport", "tcp", "--size", "32M", "--warmup", "0"])
        .env("LIVEMIG_SECRET", secret)
        .output()
        .unwrap();
    let _ = dst.child.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("smaller than the source region"), "{stderr}");
}

/// Runs a destination and a source process with `LIVEMIG_CUT_AT` set on one of them, waits
/// until the source holds its copy (switchover in doubt), sends it `signal`, and returns
/// (source status, source stderr, destination status, destination stderr). `None` when the
/// binary cannot inject faults (built without the engine's `fault-injection` feature).
fn in_doubt_run(
    cut_source: Option<&str>,
    cut_dest: Option<&str>,
    signal: &str,
) -> Option<(bool, String, bool, String)> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let bin = livemig_bin()?;
    let secret = "in-doubt-secret-in-doubt-secret-in-doubt";
    let args = ["--listen", "127.0.0.1:0", "--size", "16M", "--transport", "tcp", "--after", "0.2"];
    let mut cmd = receive_command(&bin, secret, &args);
    cmd.args(["--no-progress", "--io-timeout", "5"]).env("LIVEMIG_CUT_AT", cut_dest.unwrap_or(""));
    let Listening { child: mut dst, addr, .. } = spawn_listening(&mut cmd);
    let mut src = Command::new(&bin)
        .args(["migrate", "--to", &addr, "--transport", "tcp", "--size", "16M", "--wss", "1M", "--rate", "20000"])
        .args(["--policy", "kvm", "--warmup", "0", "--after", "0.2", "--no-progress", "--io-timeout", "5"])
        .env("LIVEMIG_SECRET", secret)
        .env("LIVEMIG_CUT_AT", cut_source.unwrap_or(""))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(src.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap() == 0 {
            break;
        }
        seen += &l;
        if l.contains("no fault injection") {
            let _ = src.kill();
            let _ = dst.kill();
            let _ = (src.wait(), dst.wait());
            eprintln!("skipped: {} was built without fault injection", bin.display());
            return None;
        }
        if l.starts_with("HOLDING") {
            let pid = src.id().to_string();
            assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
            break;
        }
    }
    err.read_to_string(&mut seen).unwrap();
    let s_ok = src.wait().unwrap().success();
    let d = dst.wait_with_output().unwrap();
    Some((s_ok, seen, d.status.success(), String::from_utf8_lossy(&d.stderr).into_owned()))
}

#[test]
fn commit_lost_the_cli_source_holds_its_copy_until_told_to_resume() {
    let Some((s_ok, s_err, d_ok, d_err)) = in_doubt_run(Some("Commit"), None, "-USR1") else { return };
    eprintln!("source:\n{s_err}\ndestination:\n{d_err}");
    assert!(s_err.contains("switchover in doubt"), "{s_err}");
    assert!(s_err.contains("HOLDING the source copy paused"), "{s_err}");
    assert!(s_err.contains("resumed the held source copy on SIGUSR1: workload running"), "{s_err}");
    assert!(!s_ok, "an in-doubt migration is not a success");
    assert!(!d_ok && d_err.contains("no Commit from the source"), "the destination must not run: {d_err}");
}

#[test]
fn resumed_lost_the_destination_runs_and_the_held_source_is_discarded() {
    let Some((s_ok, s_err, d_ok, d_err)) = in_doubt_run(None, Some("Resumed"), "-TERM") else { return };
    eprintln!("source:\n{s_err}\ndestination:\n{d_err}");
    assert!(s_err.contains("HOLDING the source copy paused"), "{s_err}");
    assert!(s_err.contains("held source copy was discarded on signal 15"), "{s_err}");
    assert!(!s_ok);
    assert!(d_ok, "the destination committed and ran the workload: {d_err}");
    assert!(d_err.contains("resumed at"), "{d_err}");
}
