//! `livemig image`: push, lazy NBD serving (real clients: qemu-io, nbdcopy), CLONE and COMMIT
//! on a served disk, export, corrupt chunks, and the same through a real S3 server (s3s-fs,
//! installed by scripts/install-deps.sh) on loopback. Skipped with a message when the tools
//! are missing, unless LIVEMIG_REQUIRE_NBD_TOOLS=1 / LIVEMIG_REQUIRE_S3=1 (scripts/test.sh
//! sets both).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livemig_tests::spawn_listening;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");
const CHUNK: usize = 256 << 10;

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn nbd_tools() -> bool {
    let ok = ["qemu-io", "nbdcopy"].iter().all(|t| have(t));
    if !ok {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_NBD_TOOLS").is_none(),
            "qemu-utils and libnbd-bin are required (scripts/install-deps.sh installs them)"
        );
        eprintln!("SKIPPED: qemu-io/nbdcopy not installed");
    }
    ok
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 16 MiB image: 6 MiB of pseudo-random data at the start, 1 MiB at 10 MiB, zeros elsewhere.
fn make_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; 16 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for (i, b) in data.iter_mut().enumerate() {
        if i < 6 << 20 || (10 << 20..11 << 20).contains(&i) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    let p = dir.join("base.img");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn livemig(repo: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(BIN).env("LIVEMIG_REPO", repo).envs(env.iter().copied()).arg("image").args(args).output().unwrap()
}

fn ok(o: std::process::Output, what: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{what}: {}\nstdout:\n{out}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn fails(o: std::process::Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{what} should have failed; stdout:\n{}", String::from_utf8_lossy(&o.stdout));
    err
}

struct Served {
    child: Child,
    uri: String,
    control: PathBuf,
}

impl Served {
    /// SIGTERM, then the stop summary's bytes fetched from the repository.
    fn stop(mut self) -> u64 {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "image serve: {st}\n{err}");
        let n = err.split(" bytes fetched from the repository").next().and_then(|s| s.rsplit(' ').next());
        n.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no fetched count in {err:?}"))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, repo: &str, env: &[(&str, &str)], image: &str, local: &str) -> Served {
    let socket = dir.join(format!("{local}.sock"));
    let control = dir.join(format!("{local}.ctl"));
    let l = spawn_listening(
        Command::new(BIN)
            .env("LIVEMIG_REPO", repo)
            .envs(env.iter().copied())
            .args(["image", "serve", image, "--local"])
            .arg(dir.join(local))
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .stderr(Stdio::piped()),
    );
    Served { child: l.child, uri: format!("nbd+unix:///?socket={}", socket.display()), control }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri).output().unwrap()
}

fn nbdcopy(uri: &str, out: &Path) -> Vec<u8> {
    ok(Command::new("nbdcopy").arg(uri).arg(out).output().unwrap(), "nbdcopy");
    std::fs::read(out).unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s:?}"))
}

/// The whole workflow on `repo`: push, lazy serve, writes, CLONE + COMMIT through the control
/// socket, export, restart, a stale commit refused.
fn workflow(dir: &Path, repo: &str, env: &[(&str, &str)]) {
    let (img, data) = make_image(dir);
    let out = json(&ok(livemig(repo, env, &["push", img.to_str().unwrap(), "debian", "--json"]), "push"));
    assert_eq!(out["summary"]["chunks_written"], 28, "{out}");
    assert_eq!(out["summary"]["zero_chunks"], 36, "{out}");

    // Lazy: reading 4 KiB fetches its chunk, not the image.
    let s = serve(dir, repo, env, "debian", "vm1.img");
    let o = qemu_io(&s.uri, &["read -v 10M 4k"]);
    let text = ok(o, "qemu-io read");
    let first = format!("{:02x} {:02x}", data[10 << 20], data[(10 << 20) + 1]);
    assert!(text.contains(&first), "the served bytes are the image's: {text}");
    // Writes: one that spans two chunks, one in a zero chunk.
    ok(qemu_io(&s.uri, &["write -P 0xab 1020k 8k", "write -P 0xcd 14M 4k"]), "qemu-io write");
    let mut want = data.clone();
    want[(1020 << 10)..(1028 << 10)].fill(0xab);
    want[(14 << 20)..(14 << 20) + 4096].fill(0xcd);

    // CLONE, then COMMIT: the modified chunks (3, 4, 56) become vm1@2.
    let c = json(&ok(
        livemig(repo, env, &["clone", "debian", "vm1", "--control", s.control.to_str().unwrap(), "--json"]),
        "clone",
    ));
    assert_eq!(c["image"], "vm1@1");
    let err = fails(livemig(repo, env, &["commit", "debian", "--control", s.control.to_str().unwrap()]), "commit");
    assert!(err.contains("bound to vm1@1, not debian"), "{err}");
    let c =
        json(&ok(livemig(repo, env, &["commit", "vm1", "--control", s.control.to_str().unwrap(), "--json"]), "commit"));
    assert_eq!(
        (c["image"].as_str(), c["chunks_written"].as_u64(), c["packs_written"].as_u64()),
        (Some("vm1@2"), Some(3), Some(2)),
        "{c}"
    );
    let written = c["bytes_written"].as_u64().unwrap();
    assert!((3 * CHUNK as u64..(3 * CHUNK + (64 << 10)) as u64).contains(&written), "only modified chunks: {c}");
    // A commit with nothing modified since makes an identical version.
    let c =
        json(&ok(livemig(repo, env, &["commit", "vm1", "--control", s.control.to_str().unwrap(), "--json"]), "commit"));
    assert_eq!((c["image"].as_str(), c["chunks_written"].as_u64()), (Some("vm1@3"), Some(0)), "{c}");

    assert_eq!(nbdcopy(&s.uri, &dir.join("served.raw")), want, "the served disk reads the image plus the writes");
    let fetched = s.stop();
    assert!(fetched <= 16 << 20, "{fetched}");

    // Every version is a first-class image; the origin is untouched.
    for (v, bytes) in [("vm1@2", &want), ("vm1@1", &data), ("debian", &data)] {
        let f = dir.join(format!("{v}.raw"));
        ok(livemig(repo, env, &["export", v, f.to_str().unwrap()]), "export");
        assert!(std::fs::read(&f).unwrap() == *bytes, "export of {v}");
    }
    let ls = json(&ok(livemig(repo, env, &["ls", "vm1", "--json"]), "ls"));
    let versions: Vec<_> =
        ls["images"].as_array().unwrap().iter().map(|m| m["made_by"].as_str().unwrap().to_string()).collect();
    assert_eq!(versions, ["clone", "commit", "commit"], "{ls}");

    // A restart takes up the binding: the disk is vm1@3 with nothing to fetch again.
    let s = serve(dir, repo, env, "vm1", "vm1.img");
    assert_eq!(nbdcopy(&s.uri, &dir.join("again.raw")), want);
    // The served file is locked: an offline commit of it is refused while it is served.
    let err = fails(livemig(repo, env, &["commit", "vm1", "--local", dir.join("vm1.img").to_str().unwrap()]), "commit");
    assert!(err.contains("another process serves or commits this file"), "{err}");
    assert_eq!(s.stop(), 0, "everything was local already");
    let err = fails(
        Command::new(BIN)
            .env("LIVEMIG_REPO", repo)
            .envs(env.iter().copied())
            .args(["image", "serve", "debian", "--local"])
            .arg(dir.join("vm1.img"))
            .arg("--socket")
            .arg(dir.join("x.sock"))
            .output()
            .unwrap(),
        "serve of another image from a bound file",
    );
    assert!(err.contains("holds the local state of vm1@3"), "{err}");

    // Two disks bound to the same version, committed offline: the second is refused and keeps
    // its changes.
    for local in ["a.img", "b.img"] {
        let s = serve(dir, repo, env, "vm1", local);
        ok(qemu_io(&s.uri, &["write -P 0x11 0 4k"]), "write");
        s.stop();
    }
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    ok(livemig(repo, env, &["commit", "vm1", "--local", a.to_str().unwrap()]), "commit a");
    let err = fails(livemig(repo, env, &["commit", "vm1", "--local", b.to_str().unwrap()]), "commit b");
    assert!(err.contains("vm1@4 was written by another writer first"), "{err}");
    let ls = json(&ok(livemig(repo, env, &["ls", "vm1", "--json"]), "ls"));
    assert_eq!(ls["images"].as_array().unwrap().len(), 4);
}

#[test]
fn an_image_is_served_lazily_and_clone_commit_make_independent_versions() {
    if !nbd_tools() {
        return;
    }
    let d = tmp("local");
    let repo = d.join("repo");
    let repo = repo.to_str().unwrap();
    workflow(&d, repo, &[]);

    // Two commits of the same version at the same instant (a directory's create-only write
    // is atomic): exactly one lands, whole; the other is refused.
    for (local, byte) in [("c.img", "0x21"), ("e.img", "0x22")] {
        let s = serve(&d, repo, &[], "vm1", local);
        ok(qemu_io(&s.uri, &[&format!("write -P {byte} 0 1M")]), "write");
        s.stop();
    }
    let kids: Vec<_> = ["c.img", "e.img"]
        .iter()
        .map(|l| {
            Command::new(BIN)
                .env("LIVEMIG_REPO", repo)
                .args(["image", "commit", "vm1", "--local"])
                .arg(d.join(l))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    let won: Vec<_> = outs.iter().map(|o| o.status.success()).collect();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{outs:?}");
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(String::from_utf8_lossy(&loser.stderr).contains("was written by another writer first"), "{loser:?}");
    let f = d.join("race.raw");
    ok(livemig(repo, &[], &["export", "vm1", f.to_str().unwrap()]), "export");
    let got = std::fs::read(&f).unwrap();
    let fill = if won[0] { 0x21 } else { 0x22 };
    assert!(got[..1 << 20].iter().all(|&b| b == fill), "the winner's chunks, whole");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_corrupt_or_missing_chunk_reads_as_eio_never_as_wrong_bytes() {
    if !nbd_tools() {
        return;
    }
    let d = tmp("corrupt");
    let repo = d.join("repo");
    let repo_s = repo.to_str().unwrap();
    let (img, _) = make_image(&d);
    ok(livemig(repo_s, &[], &["push", img.to_str().unwrap(), "img", "--chunk-size", "1M"]), "push");
    // Flip one byte of chunk 2's stored bytes (where the manifest says they are).
    let m = json(&std::fs::read_to_string(repo.join("images/img/v0000000001.json")).unwrap());
    let c2 = &m["chunks"][2];
    let pack = repo.join("packs").join(m["packs"][c2["pack"].as_u64().unwrap() as usize].as_str().unwrap());
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[c2["offset"].as_u64().unwrap() as usize + 12345] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();

    let s = serve(&d, repo_s, &[], "img", "vm.img");
    ok(qemu_io(&s.uri, &["read 0 4k", "read 1M 1M"]), "reads of sound chunks");
    let o = qemu_io(&s.uri, &["read 2M 4k"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "a corrupt chunk is EIO: {text}");
    // A write at the chunk's start needs none of its stored bytes and lands; the rest of the
    // chunk still cannot be read.
    ok(qemu_io(&s.uri, &["write -P 1 2M 4k", "read -P 1 2M 4k"]), "write and read back");
    let o = qemu_io(&s.uri, &["read 2112k 4k"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    // A write past a gap needs the gap's bytes (one contiguous range per chunk): EIO too.
    let o = qemu_io(&s.uri, &["write -P 2 2560k 4k"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    s.stop();

    let err = fails(livemig(repo_s, &[], &["export", "img", d.join("out.raw").to_str().unwrap()]), "export");
    assert!(err.contains("chunk 2 of img@1: checksum mismatch"), "{err}");
    assert!(!d.join("out.raw").exists() && !d.join("out.raw.partial").exists());
    std::fs::remove_file(&pack).unwrap();
    let err = fails(livemig(repo_s, &[], &["export", "img", d.join("out.raw").to_str().unwrap()]), "export");
    assert!(err.contains("is not in the repository"), "{err}");
    let err = fails(livemig(repo_s, &[], &["export", "img@7", d.join("out.raw").to_str().unwrap()]), "export");
    assert!(err.contains("img has no version 7 (its versions: 1)"), "{err}");
    let err = fails(livemig(repo_s, &[], &["ls", "nothing"]), "ls");
    assert!(err.contains("no image \"nothing\""), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// s3s-fs on PATH or in cargo's bin directory.
fn s3s_fs() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    let found = dirs.into_iter().map(|d| d.join("s3s-fs")).find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_S3").is_none(),
            "s3s-fs is required (scripts/install-deps.sh installs it with cargo install)"
        );
        eprintln!("SKIPPED: s3s-fs (an S3 server) is not installed");
    }
    found
}

struct S3 {
    child: Child,
    endpoint: String,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_s3(bin: &Path, root: &Path) -> S3 {
    std::fs::create_dir_all(root.join("livemig")).unwrap(); // the bucket
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "livemig",
            "--secret-key",
            "livemig-test-secret",
        ])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    S3 { child, endpoint: format!("http://127.0.0.1:{port}") }
}

#[test]
fn the_same_workflow_runs_on_an_s3_server_and_concurrent_commits_to_different_images_all_land() {
    let Some(bin) = s3s_fs() else { return };
    if !nbd_tools() {
        return;
    }
    let d = tmp("s3");
    let s3 = start_s3(&bin, &d.join("s3root"));
    let endpoint = s3.endpoint.clone();
    let env = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "livemig"),
        ("AWS_SECRET_ACCESS_KEY", "livemig-test-secret"),
        ("AWS_REGION", "us-east-1"),
    ];
    let repo = "s3://livemig/images";
    workflow(&d, repo, &env);

    // Four instances CLONE then COMMIT at once, as a global snapshot does.
    let mut served = Vec::new();
    for i in 0..4 {
        let s = serve(&d, repo, &env, "debian", &format!("inst{i}.img"));
        ok(qemu_io(&s.uri, &[&format!("write -P {} {}M 64k", 0x30 + i, i)]), "write");
        served.push(s);
    }
    let snap = |what: &str, name: &dyn Fn(usize) -> Vec<String>| {
        let kids: Vec<_> = (0..4)
            .map(|i| {
                Command::new(BIN)
                    .env("LIVEMIG_REPO", repo)
                    .envs(env.iter().copied())
                    .arg("image")
                    .arg(what)
                    .args(name(i))
                    .arg("--control")
                    .arg(&served[i].control)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for k in kids {
            ok(k.wait_with_output().unwrap(), what);
        }
    };
    snap("clone", &|i| vec!["debian".into(), format!("snap{i}")]);
    snap("commit", &|i| vec![format!("snap{i}")]);
    for (i, s) in served.into_iter().enumerate() {
        let mut want = make_image(&d).1;
        want[(i << 20)..(i << 20) + (64 << 10)].fill(0x30 + i as u8);
        s.stop();
        let f = d.join(format!("snap{i}.raw"));
        ok(livemig(repo, &env, &["export", &format!("snap{i}@2"), f.to_str().unwrap()]), "export");
        assert!(std::fs::read(&f).unwrap() == want, "snapshot {i}");
    }

    // An unreachable store is a clear, bounded error.
    drop(s3);
    let t = Instant::now();
    let err = fails(livemig(repo, &env, &["ls"]), "ls with the store gone");
    assert!(err.contains("error: listing images/"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(90), "{:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&d);
}

/// A `livemig serve` whose configuration serves one image; returns it, its address and the
/// NBD URI once both are listening (stdout kept open: the daemon prints after its first line).
fn daemon_with_image(
    dir: &Path,
    repo: &str,
    name: &str,
) -> (Child, std::io::BufReader<std::process::ChildStdout>, String, String) {
    let sock = dir.join(format!("{name}.sock"));
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[[images]]\nname = \"{name}\"\nimage = \"debian\"\nrepo = \"{repo}\"\nlocal = \"{}\"\nsocket = \"{}\"\n",
            dir.join(format!("{name}.img")).display(),
            sock.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("LIVEMIG_SECRET", DAEMON_SECRET)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = String::new();
    for _ in 0..2 {
        std::io::BufRead::read_line(&mut out, &mut lines).unwrap();
    }
    let addr = lines
        .lines()
        .find(|l| l.ends_with(" tcp"))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_else(|| panic!("{lines}"));
    assert!(lines.contains(&format!("{} nbd {name}", sock.display())), "{lines}");
    (child, out, addr.to_string(), format!("nbd+unix:///?socket={}", sock.display()))
}

const DAEMON_SECRET: &str = "image-daemon-secret-image-daemon-secret";

#[test]
fn a_global_snapshot_through_the_host_daemons() {
    if !nbd_tools() {
        return;
    }
    let d = tmp("daemon");
    let repo = d.join("repo");
    let repo_s = repo.to_str().unwrap();
    let (img, data) = make_image(&d);
    ok(livemig(repo_s, &[], &["push", img.to_str().unwrap(), "debian"]), "push");
    // Two "hosts", each a daemon serving one instance; each instance writes.
    let mut hosts = Vec::new();
    for (i, name) in ["vmA", "vmB"].iter().enumerate() {
        let (child, out, addr, uri) = daemon_with_image(&d, repo_s, name);
        ok(qemu_io(&uri, &[&format!("write -P {} {}M 128k", 0x41 + i, 2 + i)]), "write");
        hosts.push((child, out, addr, uri, name.to_string()));
    }
    let call = |args: &[&str]| {
        Command::new(BIN)
            .env("LIVEMIG_REPO", repo_s)
            .env("LIVEMIG_SECRET", DAEMON_SECRET)
            .arg("image")
            .args(args)
            .output()
            .unwrap()
    };
    // The orchestrator: CLONE on every host, then COMMIT on every host.
    for (_, _, addr, _, name) in &hosts {
        let snap = format!("snap-{name}");
        ok(call(&["clone", "debian", &snap, "--daemon", addr, "--disk", name]), "clone through the daemon");
    }
    for (_, _, addr, _, name) in &hosts {
        let out =
            json(&ok(call(&["commit", &format!("snap-{name}"), "--daemon", addr, "--disk", name, "--json"]), "commit"));
        assert_eq!(out["chunks_written"], 1, "{out}");
    }
    for (i, (_, _, _, _, name)) in hosts.iter().enumerate() {
        let mut want = data.clone();
        want[((2 + i) << 20)..((2 + i) << 20) + (128 << 10)].fill(0x41 + i as u8);
        let f = d.join(format!("{name}.raw"));
        ok(livemig(repo_s, &[], &["export", &format!("snap-{name}@2"), f.to_str().unwrap()]), "export");
        assert!(std::fs::read(&f).unwrap() == want, "snapshot of {name}");
    }
    // A disk the daemon does not serve, and a wrong secret, are refused.
    let addr = &hosts[0].2;
    let err = fails(call(&["commit", "snap-vmA", "--daemon", addr, "--disk", "nope"]), "unknown disk");
    assert!(err.contains("serves no disk named \"nope\""), "{err}");
    let o = Command::new(BIN)
        .env("LIVEMIG_SECRET", "not-the-secret-not-the-secret-not-the-secret")
        .args(["image", "commit", "snap-vmA", "--daemon", addr, "--disk", "vmA"])
        .output()
        .unwrap();
    let err = fails(o, "wrong secret");
    assert!(err.contains("connecting to the daemon"), "{err}");
    for (mut child, _out, _, _, _) in hosts {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
    }
    // Restarted with the same configuration, a daemon serves what its instance is bound to
    // now (the clone), not the configured origin.
    let (mut child, _out, _, uri, _) = {
        let (c, o, a, u) = daemon_with_image(&d, repo_s, "vmA");
        (c, o, a, u, ())
    };
    let got = nbdcopy(&uri, &d.join("restarted.raw"));
    assert!(got == std::fs::read(d.join("vmA.raw")).unwrap(), "the restarted daemon serves snap-vmA");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&d);
}
