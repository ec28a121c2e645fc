//! The real `livemig` binary with `--strategy postcopy`: a local migration that completes
//! with its summary, and a destination too small for the source, refused at the handshake
//! (the source keeps running). Skipped (with a message) when the binary is not built next
//! to this test.

use std::process::Command;

use livemig_tests::{livemig_bin, receive_command, spawn_listening};

/// Runs `livemig migrate --local --transport tcp --size 32M --wss 8M --warmup 0.3 --after 0.3
/// --json` plus `args`; checks it succeeded and both ends report the same digest. Returns the
/// source's JSON summary and the stderr (which carries the destination's report).
fn local_json(bin: &std::path::Path, args: &[&str]) -> (serde_json::Value, String) {
    let out = Command::new(bin)
        .args(["migrate", "--local", "--transport", "tcp", "--size", "32M", "--wss", "8M"])
        .args(["--warmup", "0.3", "--after", "0.3", "--json"])
        .args(args)
        .output()
        .expect("running livemig");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON summary on stdout");
    let sum = v["checksum"].as_str().expect("a digest");
    assert!(stderr.contains(sum), "both ends report the same digest:\n{stderr}");
    (v, stderr)
}

#[test]
fn postcopy_local_completes_with_a_summary() {
    let Some(bin) = livemig_bin() else {
        eprintln!("skipped: no livemig binary (cargo build -p livemig, or set LIVEMIG_BIN)");
        return;
    };
    let (v, stderr) = local_json(&bin, &["--strategy", "postcopy", "--workload", "random"]);
    assert_eq!(v["strategy"], "post-copy");
    assert_eq!(
        v["zero_pages"].as_u64().unwrap() + v["pushed_pages"].as_u64().unwrap() + v["demanded_pages"].as_u64().unwrap(),
        8192
    );
    assert!(v["downtime_ms"].as_f64().is_some(), "{v}");
    // The destination's report: every page installed, fault service timed.
    assert!(stderr.contains("\"fault_p50_us\""), "destination report:\n{stderr}");
}

#[test]
fn hybrid_local_completes_with_a_pass_then_post_copy() {
    let Some(bin) = livemig_bin() else { return };
    let (v, _) = local_json(&bin, &["--strategy", "hybrid", "--workload", "seq", "--rate", "20000"]);
    assert_eq!(v["strategy"], "hybrid");
    let inv = v["invalidated_pages"].as_u64().expect("pages written during the pass");
    assert!(v["precopy_pages"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["pushed_pages"].as_u64().unwrap() + v["demanded_pages"].as_u64().unwrap(), inv, "{v}");
}

#[test]
fn precopy_with_switchover_postcopy_hands_over_when_the_policy_decides() {
    let Some(bin) = livemig_bin() else { return };
    let (v, _) = local_json(&bin, &["--strategy", "precopy", "--switchover", "postcopy", "--workload", "random"]);
    assert_eq!(v["strategy"], "hybrid", "{v}");
    assert!(v["decided_by"].as_str().is_some_and(|r| !r.is_empty()), "the policy decided: {v}");
    let inv = v["invalidated_pages"].as_u64().expect("pages still dirty at the hand-over");
    assert_eq!(v["pushed_pages"].as_u64().unwrap() + v["demanded_pages"].as_u64().unwrap(), inv, "{v}");
}

#[test]
fn postcopy_refused_by_a_smaller_destination_leaves_the_source_running() {
    let Some(bin) = livemig_bin() else { return };
    let secret = "cli-test-secret-cli-test-secret-cli-test";
    let args = ["--listen", "127.0.0.1:0", "--size", "16M", "--transport", "tcp"];
    let mut dst = spawn_listening(&mut receive_command(&bin, secret, &args));
    let out = Command::new(&bin)
        .args(["migrate", "--to", &dst.addr, "--transport", "tcp", "--size", "32M", "--warmup", "0"])
        .args(["--strategy", "postcopy"])
        .env("LIVEMIG_SECRET", secret)
        .output()
        .unwrap();
    let _ = dst.child.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("smaller than the source region"), "{stderr}");
    assert!(stderr.contains("source workload: running"), "{stderr}");
}

#[test]
fn postcopy_link_cut_between_the_start_and_the_push_is_taken_over() {
    let Some(bin) = livemig_bin() else { return };
    // The destination process drops its link instead of sending `Running` (its guest runs,
    // the source waits to push): the source dials again and a new session takes over.
    let out = Command::new(&bin)
        .args(["migrate", "--local", "--transport", "tcp", "--size", "32M", "--wss", "8M"])
        .args(["--warmup", "0.3", "--after", "0.3", "--json", "--strategy", "postcopy", "--workload", "random"])
        .env("LIVEMIG_CUT_AT", "Running")
        .output()
        .expect("running livemig");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no fault injection") {
        eprintln!("skipped: {} was built without fault injection", bin.display());
        return;
    }
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON summary on stdout");
    assert_eq!(v["recoveries"], 1, "{v}\n{stderr}");
    let sum = v["checksum"].as_str().expect("a digest");
    assert!(stderr.contains(sum), "both ends report the same digest:\n{stderr}");
}

#[test]
fn bad_push_settings_are_refused_before_anything_starts() {
    let Some(bin) = livemig_bin() else { return };
    let out = Command::new(&bin)
        .args(["migrate", "--local", "--transport", "tcp", "--size", "8M", "--strategy", "postcopy"])
        .args(["--push-batch", "32", "--push-window", "16"])
        .output()
        .expect("running livemig");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--push-batch / --push-window"), "{stderr}");
    // No destination was started to see its source go.
    assert!(!stderr.contains("disconnected") && !stderr.contains("destination"), "{stderr}");
}
