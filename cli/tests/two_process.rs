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

/// A port scan, a silent client and a wrong secret in front of the real source: the
/// listener logs each and serves the real one.
#[test]
fn hostile_and_wrong_secret_clients_do_not_end_the_listener() {
    let right = "the-right-secret-the-right-secret";
    let dst = spawn_listening(
        Command::new(BIN)
            .args(["bench", "pages", "--listen", "127.0.0.1:0", "--size", "4M", "--transport", "tcp"])
            .args(["--io-timeout", "5"])
            .env("LIVEMIG_SECRET", right)
            .stderr(Stdio::piped()),
    );
    drop(std::net::TcpStream::connect(&dst.addr).unwrap());
    let idle = std::net::TcpStream::connect(&dst.addr).unwrap();
    let src = |secret: &str| {
        Command::new(BIN)
            .args(["bench", "pages", "--connect", &dst.addr, "--size", "4M", "--transport", "tcp", "--duration", "0"])
            .env("LIVEMIG_SECRET", secret)
            .output()
            .unwrap()
    };
    let wrong = src("a-wrong-secret!-a-wrong-secret!-a-wrong");
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("wrong shared secret"), "{err}");
    let good = src(right);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let dst = dst.child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&dst.stderr);
    assert!(dst.status.success(), "{err}");
    assert!(err.contains("handshake failed"), "{err}");
    drop(idle);
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
