//! Two `livemig` processes over loopback.
use std::process::{Command, Stdio};

use livemig_tests::spawn_listening;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

#[test]
fn random_pages_256mib_checksums_match() {
    let out = Command::new(BIN)
        .args(["bench", "pages", "--loopback", "--transport", "tcp", "--size", "256M", "--pattern", "random"])
        .args(["--duration", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("\"checksum_match\": true"), "{s}");
    assert!(s.contains("\"region_bytes\": 268435456"), "{s}");
    assert!(s.contains("\"passes\": 1"), "{s}");
}

#[test]
fn chunks_between_files() {
    let out = Command::new(BIN)
        .args(["bench", "chunks", "--loopback", "--transport", "tcp", "--size", "64M", "--duration", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"checksum_match\": true"));
}

#[test]
fn wrong_secret_between_processes_is_refused() {
    let dst = spawn_listening(
        Command::new(BIN)
            .args(["bench", "pages", "--listen", "127.0.0.1:0", "--size", "4M", "--transport", "tcp"])
            .env("LIVEMIG_SECRET", "the-right-secret")
            .stderr(Stdio::piped()),
    );
    let src = Command::new(BIN)
        .args(["bench", "pages", "--connect", &dst.addr, "--size", "4M", "--transport", "tcp", "--duration", "0"])
        .env("LIVEMIG_SECRET", "a-wrong-secret!")
        .output()
        .unwrap();
    assert!(!src.status.success());
    let dst = dst.child.wait_with_output().unwrap();
    assert!(!dst.status.success());
    let err = String::from_utf8_lossy(&dst.stderr);
    assert!(err.contains("wrong shared secret"), "{err}");
}

#[test]
fn missing_secret_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["bench", "pages", "--listen", "127.0.0.1:0", "--size", "4M", "--transport", "tcp"])
        .env_remove("LIVEMIG_SECRET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LIVEMIG_SECRET"));
}
