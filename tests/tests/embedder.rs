//! The example embedder (`examples/embedder.rs`) migrates its own two-region memory, its
//! vCPU threads and their device state into a child process through the public API; the
//! child checks that memory and device state arrived together and that the vCPUs carry on.

use std::path::PathBuf;
use std::process::Command;

fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe.parent().and_then(|d| d.parent()).expect("target dir").join("examples").join("embedder");
    if !p.exists() {
        // `cargo test --workspace` builds the examples; a narrower run may not have.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo).args(["build", "-p", "livemig-engine", "--example", "embedder"]).status();
        assert!(st.is_ok_and(|s| s.success()), "building the example failed");
    }
    p
}

#[test]
fn the_example_embedder_migrates_itself() {
    let out = Command::new(example()).output().expect("running the example");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the example failed");
    assert!(stdout.contains("migration completed") && stdout.contains("in 2 regions"), "{stdout}");
    assert!(stdout.contains("tracker embedder-log"), "the embedder's dirty log was used: {stdout}");
    for v in 0..2 {
        assert!(stderr.contains(&format!("dest: vcpu {v} resumed at")), "{stderr}");
    }
    assert!(stderr.contains("verified, 16 B of device state"), "{stderr}");
}
