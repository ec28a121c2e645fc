//! A real QEMU guest (TCG; kernel + busybox initramfs + a memory dirtier that prints a
//! counter every second, built by qemu-patch/guest/build.sh) migrated through `livemig qemu
//! migrate` and the destination carrier: a single channel, then multifd onwards from the
//! destination, then a migration whose destination carrier is killed mid-stream, then one that
//! QEMU's own rule would never end, ended by livemig's controller; and a guest whose disk,
//! served by livemig, moves with it (checked by the guest itself). Skipped with
//! a message when QEMU or a readable kernel is missing, unless LIVEMIG_REQUIRE_QEMU=1
//! (scripts/test.sh sets it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// TCG guests are CPU-bound: one test's guests at a time, so timing-bound steps (a guest's
/// counter advancing, a migration converging) do not starve each other on a small machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn available() -> bool {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    let kernel = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-") && std::fs::File::open(e.path()).is_ok());
    if !(qemu && kernel) {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_QEMU").is_none(),
            "qemu-system-x86 and a readable /boot/vmlinuz-* are required (scripts/install-deps.sh; run as root)"
        );
        eprintln!("SKIPPED: qemu-system-x86_64 or a readable kernel is missing");
    }
    qemu && kernel
}

struct Guest {
    child: Child,
    qmp: PathBuf,
    serial: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn start(dir: &Path, guest: &Path, name: &str, incoming: bool) -> Guest {
        Guest::start_with(dir, guest, name, incoming, "dirty=64,24,0", &[])
    }

    /// A guest with `append` on its kernel command line and `extra` QEMU arguments.
    fn start_with(dir: &Path, guest: &Path, name: &str, incoming: bool, append: &str, extra: &[String]) -> Guest {
        Guest::start_on(Path::new("qemu-system-x86_64"), &["-M", "q35"], dir, guest, name, incoming, append, extra)
    }

    /// A guest of the QEMU with livemig's patch (`qemu`), its RAM a shared memfd.
    fn start_patched(qemu: &Path, dir: &Path, guest: &Path, name: &str, incoming: bool) -> Guest {
        Guest::start_patched_with(qemu, dir, guest, name, incoming, &[])
    }

    /// The same, with `extra` QEMU arguments.
    fn start_patched_with(
        qemu: &Path,
        dir: &Path,
        guest: &Path,
        name: &str,
        incoming: bool,
        extra: &[String],
    ) -> Guest {
        let m = [
            "-L",
            "/usr/share/qemu",
            "-L",
            "/usr/share/seabios",
            "-M",
            "q35,memory-backend=mem0",
            "-object",
            "memory-backend-memfd,id=mem0,size=256M,share=on",
        ];
        Guest::start_on(qemu, &m, dir, guest, name, incoming, "dirty=64,24,0", extra)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_on(
        qemu: &Path,
        machine: &[&str],
        dir: &Path,
        guest: &Path,
        name: &str,
        incoming: bool,
        append: &str,
        extra: &[String],
    ) -> Guest {
        let qmp = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let mut c = Command::new(qemu);
        c.args(machine)
            .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-nodefaults"])
            .args(["-monitor", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap());
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        let g = Guest { child: c.spawn().unwrap(), qmp, serial };
        let t0 = Instant::now();
        while !g.qmp.exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "QEMU {name} never opened its QMP socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    /// The last `DIRTY t=N` counter on the serial console.
    fn counter(&self) -> Option<u64> {
        let s = std::fs::read_to_string(&self.serial).unwrap_or_default();
        s.lines().rev().find_map(|l| l.strip_prefix("DIRTY t=")?.split_whitespace().next()?.parse().ok())
    }

    /// The serial console so far.
    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Full sweeps of the disk checker so far.
    fn sweeps(&self) -> usize {
        self.console().lines().filter(|l| l.starts_with("DISKCHK sweep=")).count()
    }

    /// Waits until the disk checker has made `n` sweeps.
    fn wait_sweeps(&self, n: usize, within: Duration) {
        let t0 = Instant::now();
        while self.sweeps() < n {
            assert!(
                t0.elapsed() < within,
                "the disk checker made {} of {n} sweeps:\n{}",
                self.sweeps(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Lines where the disk checker found its disk disagreeing with its memory, or failed.
    fn disk_faults(&self) -> Vec<String> {
        self.console()
            .lines()
            .filter(|l| l.starts_with("DISKCHK BAD") || l.starts_with("DISKCHK ERROR"))
            .map(String::from)
            .collect()
    }

    /// Waits until the counter reaches `n`.
    fn wait_counter(&self, n: u64, within: Duration) -> u64 {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.counter().filter(|&c| c >= n) {
                return c;
            }
            assert!(t0.elapsed() < within, "the guest's counter never reached {n}: {:?}", self.counter());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A child killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh scratch directory with a shared secret in it, and the test guest (built once).
fn setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let guest = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qemu-guest");
    let o = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../qemu-patch/guest/build.sh"))
        .arg(&guest)
        .output()
        .unwrap();
    assert!(o.status.success(), "building the guest: {}", String::from_utf8_lossy(&o.stderr));
    assert!(Command::new(BIN).args(["secret", "new", "secret"]).current_dir(&dir).status().unwrap().success());
    (dir, guest)
}

fn carrier(dir: &Path, dst: &Guest, name: &str) -> (Proc, String) {
    carrier_with(dir, dst, name, &[])
}

fn carrier_with(dir: &Path, dst: &Guest, name: &str, extra: &[&str]) -> (Proc, String) {
    let incoming = dir.join(format!("{name}.in")).to_string_lossy().into_owned();
    let qmp = dst.qmp.to_string_lossy().into_owned();
    let args: Vec<&str> = [
        "qemu",
        "carrier",
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        "secret",
        "--json",
        "--incoming",
        &incoming,
        "--dst-qmp",
        &qmp,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    let (child, line) = spawn_waiting(dir, &format!("{name}-carrier"), &args, "listening ");
    (child, line.split_whitespace().nth(1).unwrap().to_string())
}

fn migrate(dir: &Path, src: &Guest, to: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["qemu", "migrate", "--json", "--secret-file", "secret", "--max-time", "120", "--src-qmp"])
        .arg(&src.qmp)
        .args(["--to", to, "--socket-dir"])
        .arg(dir)
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn qmp_status(q: &Path) -> String {
    qmp(q, "query-status", "{}")
}

/// Runs one QMP command on the socket `q`; returns QEMU's reply line (`return` or `error`).
fn qmp(q: &Path, command: &str, args: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(q).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    writeln!(s, "{{\"execute\":\"{command}\",\"arguments\":{args}}}").unwrap();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "QEMU closed QMP during {command}");
        if line.contains("\"return\"") || line.contains("\"error\"") {
            return line;
        }
    }
}

/// Guest-physical memory `[0, len)` of a paused guest, through QMP's `pmemsave`.
fn guest_memory(dir: &Path, g: &Guest, name: &str, len: u64) -> Vec<u8> {
    let f = dir.join(format!("{name}.mem"));
    let r = qmp(&g.qmp, "pmemsave", &format!("{{\"val\":0,\"size\":{len},\"filename\":\"{}\"}}", f.display()));
    assert!(r.contains("\"return\""), "pmemsave on {name}: {r}");
    let m = std::fs::read(&f).unwrap();
    let _ = std::fs::remove_file(&f);
    m
}

/// The pages (4 KiB) where `a` and `b` differ.
fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.chunks(4096).zip(b.chunks(4096)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect()
}

#[test]
fn a_qemu_guest_migrates_through_livemig_and_keeps_running() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    let (dir, guest) = setup("livemig-qemu");

    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    // A boots and dirties memory; B waits for it.
    let a = Guest::start(&dir, &guest, "a", false);
    let before = a.wait_counter(2, Duration::from_secs(90));
    step("A booted");
    let b = Guest::start(&dir, &guest, "b", true);
    let (mut cb, addr) = carrier(&dir, &b, "b");
    let o = migrate(&dir, &a, &addr, &["--max-bandwidth", "1G"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "A→B: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["dest_running"], true);
    assert_eq!((v["channels"].as_u64(), v["handoff"].as_bool()), (Some(1), Some(true)), "{v}");
    assert!(v["carried"].as_u64().unwrap() > 64 << 20, "the guest's touched memory crossed: {v}");
    assert!(cb.0.wait().unwrap().success(), "{}", std::fs::read_to_string(dir.join("b-carrier.err")).unwrap());
    // B goes on from where A was: its counter continues past A's.
    let after = b.wait_counter(before + 2, Duration::from_secs(30));
    assert!(after > before);
    assert!(qmp_status(&a.qmp).contains("postmigrate"), "A stopped after the migration");

    step("A→B migrated, B runs");
    // B → C with multifd (3 connections), C started paused (-S): once the migration completed,
    // C's guest memory is compared with B's byte for byte before C runs.
    let c = Guest::start_with(&dir, &guest, "c", true, "dirty=64,24,0", &["-S".to_string()]);
    let (mut cc, addr) = carrier(&dir, &c, "c");
    let o = migrate(&dir, &b, &addr, &["--max-bandwidth", "1G", "--multifd", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "B→C: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["dest_running"].as_bool(), v["channels"].as_u64()),
        (Some("completed"), Some(false), Some(3)),
        "{v}"
    );
    assert!(cc.0.wait().unwrap().success());
    let (mb, mc) = (guest_memory(&dir, &b, "b", 256 << 20), guest_memory(&dir, &c, "c", 256 << 20));
    assert_eq!(mb.len(), 256 << 20);
    // Reported, not required: Debian's QEMU 7.2 loses guest writes under TCG (its bitmap
    // sync leaves TCG's TLB unarmed; qemu-patch/qemu/0003 fixes it in the patched build), and
    // QEMU's own multifd over unix: has left a few pages different here without livemig.
    let diff = differing_pages(&mb, &mc);
    if diff.is_empty() {
        step("B→C (multifd through the relay): C's guest memory equals B's, byte for byte");
    } else {
        step(&format!(
            "B→C (multifd through the relay): C's memory differs from B's in {} pages {:?} (QEMU 7.2 under TCG)",
            diff.len(),
            &diff[..diff.len().min(16)]
        ));
    }
    drop((mb, mc));
    assert!(qmp(&c.qmp, "cont", "{}").contains("\"return\""));
    c.wait_counter(after + 2, Duration::from_secs(30));

    step("B→C migrated, C runs");
    // C → D through the relay, with D's carrier killed mid-stream: the migration fails, C
    // runs on. (A single channel handed to QEMU no longer depends on the carrier.)
    let d = Guest::start(&dir, &guest, "d", true);
    let (mut cd, addr) = carrier(&dir, &d, "d");
    let m = Command::new(BIN)
        .args(["qemu", "migrate", "--json", "--secret-file", "secret", "--max-bandwidth", "4M", "--relay", "--src-qmp"])
        .arg(&c.qmp)
        .args(["--to", &addr, "--socket-dir"])
        .arg(&dir)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    cd.0.kill().unwrap();
    let _ = cd.0.wait();
    let o = m.wait_with_output().unwrap();
    step("C→D failed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a killed carrier must fail the migration: {err}");
    assert!(err.contains("runs on at the source"), "{err}");
    let t0 = Instant::now();
    while !qmp_status(&c.qmp).contains("\"running\": true") {
        assert!(t0.elapsed() < Duration::from_secs(20), "C must run on: {}", qmp_status(&c.qmp));
        std::thread::sleep(Duration::from_millis(200));
    }
    let now = c.counter().unwrap();
    c.wait_counter(now + 2, Duration::from_secs(30));
    step("C runs on");

    // C → E under a bandwidth the working set outruns (QEMU's own rule never converges): the
    // controller sees the pattern and raises the downtime limit; E runs on.
    let e = Guest::start(&dir, &guest, "e", true);
    let (mut ce, addr) = carrier(&dir, &e, "e");
    let now = c.counter().unwrap();
    let o = migrate(
        &dir,
        &c,
        &addr,
        &["--max-bandwidth", "16M", "--downtime-limit", "50", "--switchover", "stop-and-copy"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "C→E: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((v["status"].as_str(), v["dest_running"].as_bool()), (Some("completed"), Some(true)), "{v}");
    assert!(v["action"].as_str().unwrap_or("").contains("downtime-limit raised"), "the controller decided: {v}");
    assert!(ce.0.wait().unwrap().success());
    e.wait_counter(now + 2, Duration::from_secs(30));
    step("C→E converged by the controller");
    drop((a, b, c, d, e));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `livemig` with `args` in `dir`, its stdout to `name.out`, and waits for a line of
/// it starting with `wait_for` (returned).
fn spawn_waiting(dir: &Path, name: &str, args: &[&str], wait_for: &str) -> (Proc, String) {
    let out = dir.join(format!("{name}.out"));
    let child = Proc(
        Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    loop {
        let o = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(l) = o.lines().find(|l| l.starts_with(wait_for)) {
            return (child, l.to_string());
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{name} never printed {wait_for:?}: {o}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nbd_drive(sock: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=nbd,server.type=unix,server.path={},node-name=disk0", sock.display()),
        "-device".into(),
        "virtio-blk-pci,drive=disk0".into(),
    ]
}

fn read_range(p: &Path, r: std::ops::Range<u64>) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; (r.end - r.start) as usize];
    std::fs::File::open(p).unwrap().read_exact_at(&mut b, r.start).unwrap();
    b
}

fn disk_state(dir: &Path, control: &str) -> String {
    let o = Command::new(BIN).args(["disk", "status", "--control", control]).current_dir(dir).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A guest whose disk is served by livemig moves with its disk: the disk's live transfer runs
/// beside the memory migration and is handed over while QEMU waits in pre-switchover. The
/// guest's checker keeps in memory the generation of every block it wrote and reads the
/// blocks back: after the move every block must hold what the guest's memory says. The move
/// ends in postcopy. A destination disk that dies before the switchover cancels the
/// migration instead.
#[test]
fn a_guest_and_its_livemig_disk_move_together() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    let (dir, guest) = setup("livemig-qemu-disk");
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());

    // A 96 MiB disk of known content; the guest writes and checks its first 32 MiB.
    const SIZE: u64 = 96 << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let img: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(dir.join("src.img"), &img).unwrap();
    drop(img);
    let (_serve, _) = spawn_waiting(
        &dir,
        "serve",
        &["disk", "serve", "src.img", "--socket", "src.nbd", "--control", "src.ctl"],
        "listening",
    );
    let append = "dirty=64,24,0 diskchk=32,64,0";
    let a = Guest::start_with(&dir, &guest, "a", false, append, &nbd_drive(&dir.join("src.nbd")));
    a.wait_sweeps(3, Duration::from_secs(90));
    step("A booted, its disk checked");

    // The destination's disk dies while the memory migration runs: QEMU's migration is
    // cancelled, A runs on with its disk served at the source.
    let (mut r1, l) = spawn_waiting(
        &dir,
        "recv1",
        &[
            "disk",
            "receive",
            "dst1.img",
            "--size",
            "96M",
            "--serve-early",
            "--listen",
            "127.0.0.1:0",
            "--socket",
            "dst1.nbd",
            "--secret-file",
            "secret",
        ],
        "listening",
    );
    let addr1 = l.split_whitespace().nth(1).unwrap().to_string();
    let c = Guest::start_with(&dir, &guest, "c", true, append, &nbd_drive(&dir.join("dst1.nbd")));
    let (_cc, caddr) = carrier(&dir, &c, "c");
    let m = Command::new(BIN)
        .args(["qemu", "migrate", "--json", "--secret-file", "secret", "--max-bandwidth", "8M", "--src-qmp"])
        .arg(&a.qmp)
        .args(["--to", &caddr, "--socket-dir"])
        .arg(&dir)
        .args(["--disk", &format!("src.ctl={addr1}")])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let w0 = Instant::now();
    while !disk_state(&dir, "src.ctl").contains("migrating") {
        assert!(w0.elapsed() < Duration::from_secs(20), "the disk transfer never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    r1.0.kill().unwrap();
    let _ = r1.0.wait();
    let o = m.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a dead destination disk must fail the migration: {err}");
    assert!(err.contains("disk") && err.contains("runs on at the source"), "{err}");
    let w0 = Instant::now();
    while !qmp_status(&a.qmp).contains("\"running\": true") {
        assert!(w0.elapsed() < Duration::from_secs(20), "A must run on: {}", qmp_status(&a.qmp));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(disk_state(&dir, "src.ctl").contains("idle"), "the disk is served at the source again");
    let n = a.sweeps();
    a.wait_sweeps(n + 2, Duration::from_secs(30));
    assert_eq!(a.disk_faults(), Vec::<String>::new(), "A's disk stayed whole");
    drop(c);
    step("A→C failed with its disk destination, A runs on");

    // A → B with the disk.
    let (_r2, l) = spawn_waiting(
        &dir,
        "recv2",
        &[
            "disk",
            "receive",
            "dst2.img",
            "--size",
            "96M",
            "--serve-early",
            "--listen",
            "127.0.0.1:0",
            "--socket",
            "dst2.nbd",
            "--secret-file",
            "secret",
        ],
        "listening",
    );
    let addr2 = l.split_whitespace().nth(1).unwrap().to_string();
    let b = Guest::start_with(&dir, &guest, "b", true, append, &nbd_drive(&dir.join("dst2.nbd")));
    let (mut cb, baddr) = carrier(&dir, &b, "b");
    // Under a bandwidth the guest's working set outruns, the controller switches to postcopy:
    // the disk is handed over in postcopy's own pre-switchover, and the destination pulls
    // its disk's chunks while it faults its memory pages in.
    let disk = format!("src.ctl={addr2}");
    let o = migrate(
        &dir,
        &a,
        &baddr,
        &["--max-bandwidth", "16M", "--postcopy", "--switchover", "postcopy", "--disk", &disk],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "A→B: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((v["status"].as_str(), v["dest_running"].as_bool()), (Some("completed"), Some(true)), "{v}");
    assert_eq!(v["postcopy"], true, "{v}");
    let d = &v["disks"][0];
    assert_eq!(d["ok"], true, "{v}");
    // Chunks the guest wrote again at the destination differ from the source's by right; the
    // rest of the disk (64 MiB of 256 KiB chunks) the guest never writes, so all of it is
    // compared.
    assert!(d["summary"]["verified_chunks"].as_u64().unwrap() >= (SIZE - (32 << 20)) / (256 << 10), "{v}");
    // The disks were handed over while the guest was paused.
    let (paused, handover) = (v["stop_to_resume_ms"].as_f64(), v["disk_handover_ms"].as_f64());
    assert!(matches!((paused, handover), (Some(p), Some(h)) if p >= h), "{v}");
    assert!(cb.0.wait().unwrap().success());
    step(&format!(
        "A→B migrated with its disk in postcopy: paused {:.0} ms (disk handover {:.0} ms), disk transfer {:.2} s",
        paused.unwrap_or(0.0),
        handover.unwrap_or(0.0),
        d["summary"]["total_s"].as_f64().unwrap_or(0.0)
    ));

    // B reads back every block it wrote, through the destination's disk.
    b.wait_sweeps(3, Duration::from_secs(60));
    assert_eq!(b.disk_faults(), Vec::<String>::new(), "B's disk agrees with B's memory");
    // What the guest never wrote came across too.
    assert!(
        read_range(&dir.join("dst2.img"), 32 << 20..SIZE) == read_range(&dir.join("src.img"), 32 << 20..SIZE),
        "the rest of the disk equals the source's"
    );
    // The checker is no rubber stamp: blocks changed behind the guest's back are caught.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(dir.join("dst2.img")).unwrap();
        f.write_all_at(&vec![0u8; 4 << 20], 0).unwrap();
    }
    let w0 = Instant::now();
    while b.disk_faults().is_empty() {
        assert!(w0.elapsed() < Duration::from_secs(30), "a corrupted block went unnoticed:\n{}", b.console());
        std::thread::sleep(Duration::from_millis(200));
    }
    step("B's checker catches a corrupted block");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Multifd with every connection handed to QEMU (QEMU with livemig's patch at both ends:
/// `x-livemig-channels`): nothing relays the stream, the destination (started paused) holds the
/// source's guest memory byte for byte, and the guest runs on there. A destination QEMU
/// without the patch is refused before anything moves, and the guest runs on at the source.
#[test]
fn multifd_connections_handed_to_patched_qemus() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    let Some(qemu) = patched_qemu() else { return };
    let (dir, guest) = setup("livemig-qemu-multifd-fds");
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let a = Guest::start_patched(&qemu, &dir, &guest, "a", false);
    let before = a.wait_counter(2, Duration::from_secs(90));
    step("A booted");

    // A destination QEMU without livemig's patch cannot take the channels: refused up front.
    let stock = Guest::start_patched(Path::new("qemu-system-x86_64"), &dir, &guest, "stock", true);
    let (mut cs, addr) = carrier(&dir, &stock, "stock");
    let o = migrate(&dir, &a, &addr, &["--multifd", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a QEMU without x-livemig-channels must be refused: {err}");
    assert!(err.contains("x-livemig-channels"), "{err}");
    let _ = cs.0.wait();
    assert!(is_running(&a), "A runs on: {}", qmp_status(&a.qmp));
    drop(stock);
    step("a destination QEMU without the patch was refused; A runs on");

    let b = Guest::start_patched_with(&qemu, &dir, &guest, "b", true, &["-S".to_string()]);
    let (mut cb, addr) = carrier(&dir, &b, "b");
    let o = migrate(&dir, &a, &addr, &["--multifd", "2", "--max-bandwidth", "1G"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "A→B: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["handoff"].as_bool(), v["channels"].as_u64(), v["dest_runstate"].as_str()),
        (Some("completed"), Some(true), Some(3), Some("paused")),
        "{v}"
    );
    assert!(cb.0.wait().unwrap().success());
    let carrier_out = std::fs::read_to_string(dir.join("b-carrier.out")).unwrap_or_default();
    assert!(carrier_out.contains("\"bytes_in\":0,"), "nothing was relayed: {carrier_out}");
    let (ma, mb) = (guest_memory(&dir, &a, "a", 256 << 20), guest_memory(&dir, &b, "b", 256 << 20));
    let diff = differing_pages(&ma, &mb);
    assert!(diff.is_empty(), "B's memory differs from A's in {} pages {:?}", diff.len(), &diff[..diff.len().min(16)]);
    drop((ma, mb));
    step(&format!(
        "A→B, multifd (2 + main) handed to QEMU: {:.0} MiB/s, memory equal byte for byte",
        v["throughput_mib_s"].as_f64().unwrap_or(0.0)
    ));
    assert!(qmp(&b.qmp, "cont", "{}").contains("\"return\""));
    b.wait_counter(before + 2, Duration::from_secs(30));
    step("B runs on");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// QEMU with livemig's patch: `LIVEMIG_QEMU_PATCHED` (scripts/test.sh builds it with
/// qemu-patch/qemu/build.sh). Required when LIVEMIG_REQUIRE_QEMU is set.
fn patched_qemu() -> Option<PathBuf> {
    let p = std::env::var_os("LIVEMIG_QEMU_PATCHED").map(PathBuf::from).filter(|p| p.is_file());
    if p.is_none() {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_QEMU").is_none(),
            "LIVEMIG_QEMU_PATCHED must name QEMU built with livemig's patch (qemu-patch/qemu/build.sh)"
        );
        eprintln!("SKIPPED: LIVEMIG_QEMU_PATCHED is not set (build it with qemu-patch/qemu/build.sh)");
    }
    p
}

fn migrate_ram(dir: &Path, src: &Guest, to: &str, strategy: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["qemu", "migrate", "--secret-file", "secret", "--max-time", "120", "--ram", "livemig", "--strategy"])
        .arg(strategy)
        .arg("--src-qmp")
        .arg(&src.qmp)
        .args(["--to", to, "--socket-dir"])
        .arg(dir)
        .current_dir(dir);
    c
}

fn is_running(g: &Guest) -> bool {
    qmp_status(&g.qmp).contains("\"running\": true")
}

/// The guest's RAM moved by livemig's engine between QEMUs with livemig's patch (QEMU's own
/// stream carries the device state only): a corrupted page is caught and the source runs on;
/// a migration killed during pre-copy leaves the source running (and it migrates again after,
/// through the same userfaultfd); pre-copy, hybrid and post-copy move a guest that dirties
/// memory flat out, and it goes on at each destination (post-copy with its link cut and
/// recovered); a post-copy migration whose livemig source dies leaves the destination's guest
/// blocked on its missing pages, never reading wrong memory, until a new livemig takes it over.
#[test]
fn qemus_ram_moved_by_livemig() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    let Some(qemu) = patched_qemu() else { return };
    let (dir, guest) = setup("livemig-qemu-ram");
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let a = Guest::start_patched(&qemu, &dir, &guest, "a", false);
    a.wait_counter(2, Duration::from_secs(90));
    step("A booted");

    // A page corrupted on its way: the destination's digest disagrees, nothing runs there,
    // A runs on.
    let b = Guest::start_patched(&qemu, &dir, &guest, "b", true);
    let (_cb, addr) = carrier(&dir, &b, "b");
    let o = migrate_ram(&dir, &a, &addr, "precopy").env("LIVEMIG_CORRUPT_PAGE", "3000").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a corrupted page must fail the migration: {err}");
    assert!(err.contains("digest") || err.contains("checksum"), "{err}");
    assert!(is_running(&a), "A runs on: {}", qmp_status(&a.qmp));
    let now = a.counter().unwrap();
    a.wait_counter(now + 2, Duration::from_secs(30));
    drop(b);
    step("a corrupted page was caught; A runs on");

    // livemig killed during pre-copy: A runs on.
    let b = Guest::start_patched(&qemu, &dir, &guest, "b2", true);
    let (_cb, addr) = carrier(&dir, &b, "b2");
    let mut m =
        Proc(migrate_ram(&dir, &a, &addr, "precopy").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(m.0.stdout.take().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 && !line.starts_with("round 1") {
            line.clear();
        }
        assert!(line.starts_with("round 1"), "pre-copy never reported its first round");
    }
    m.0.kill().unwrap();
    let _ = m.0.wait();
    assert!(is_running(&a), "A runs on after livemig died in pre-copy: {}", qmp_status(&a.qmp));
    let now = a.counter().unwrap();
    a.wait_counter(now + 2, Duration::from_secs(30));
    drop(b);
    step("livemig killed in pre-copy; A runs on");

    // One hop: the guest at `src` moves to a new destination `d{i}` by `strategy`, its writes
    // tracked by `log`; the destination goes on from its source's counter. A pre-copy
    // destination is started paused (-S): once the migration completed, its guest memory must
    // equal the source's byte for byte (a write the tracker missed would show), then it runs.
    let hop = |src: &Guest, i: usize, strategy: &str, log: &str| -> Guest {
        let paused = strategy == "precopy";
        let extra = if paused { vec!["-S".to_string()] } else { vec![] };
        let d = Guest::start_patched_with(&qemu, &dir, &guest, &format!("d{i}"), true, &extra);
        let (mut cd, addr) = carrier(&dir, &d, &format!("d{i}"));
        let before = src.counter().unwrap();
        let mut m = migrate_ram(&dir, src, &addr, strategy);
        m.args(["--dirty-log", log]);
        let cut = strategy == "postcopy" && livemig_engine::precopy::FAULT_INJECTION;
        if cut {
            // The link cut during the push (fault injection): a new session takes over.
            m.env("LIVEMIG_CUT_AT", "Placed#40");
        }
        let o = m.arg("--json").output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{strategy}: {out}\n{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!((v["status"].as_str(), v["dest_running"].as_bool()), (Some("completed"), Some(!paused)), "{v}");
        assert_eq!(v["blocks"][0][1], 256u64 << 20, "{v}");
        assert!(v["checksum"].as_str().is_some_and(|c| c.len() >= 16), "both ends agreed on every page: {v}");
        // QEMU's own stream carried no guest RAM: its firmware blocks and the device state only.
        assert!(v["qemu_stream_bytes"].as_u64().unwrap() < 4 << 20, "{v}");
        match log {
            "uffd" => assert_eq!(v["tracker"], "uffd-wp-async+pagemap-scan", "{v}"),
            "qemu" => {
                assert_eq!(v["tracker"], "qemu-dirty-log", "{v}");
                // The guest dirtied pages during the pass: QEMU's log reported them.
                let dirtied = match strategy {
                    "precopy" => v["engine"]["intervals"][0]["dirty"].as_u64(),
                    _ => v["engine"]["invalidated_pages"].as_u64(),
                };
                assert!(dirtied.unwrap_or(0) > 0, "{v}");
            }
            _ => {}
        }
        if strategy != "precopy" {
            assert!(v["dest_ram"]["pages"].as_u64() == Some(65536), "{v}");
            // The push started when the destination QEMU had loaded the device state (its
            // RESUME, or the end of its incoming migration under -S), not at the bound.
            assert_eq!(v["dest_ram"]["running_by_bound"], false, "{v}");
            assert!(v["engine"]["push_held_ms"].as_f64().is_some_and(|ms| ms < 2000.0), "{v}");
        }
        if cut {
            assert_eq!(v["engine"]["recoveries"], 1, "the cut link was recovered: {v}");
            assert_eq!(v["dest_ram"]["recoveries"], 1, "{v}");
            step(&format!(
                "postcopy: link cut at the 40th Placed, taken over by a new session in {:.1} ms, {} pages sent again",
                v["engine"]["recovery_ms"].as_f64().unwrap_or(-1.0),
                v["engine"]["resent_pages"]
            ));
        }
        assert!(cd.0.wait().unwrap().success());
        assert!(qmp_status(&src.qmp).contains("postmigrate"), "the source stays stopped: {}", qmp_status(&src.qmp));
        if paused {
            assert_eq!(v["dest_runstate"], "paused", "{v}");
            let (ms, md) = (guest_memory(&dir, src, "src", 256 << 20), guest_memory(&dir, &d, "dst", 256 << 20));
            let diff = differing_pages(&ms, &md);
            assert!(
                diff.is_empty(),
                "{strategy} ({log}): the destination's memory differs from the source's in {} pages {:?}",
                diff.len(),
                &diff[..diff.len().min(16)]
            );
            step(&format!("{strategy} ({log}): the destination's guest memory equals the source's, byte for byte"));
            assert!(qmp(&d.qmp, "cont", "{}").contains("\"return\""));
        }
        d.wait_counter(before + 2, Duration::from_secs(30));
        step(&format!(
            "{strategy} ({log}): paused {}, {:.1} MiB sent by livemig",
            v["stop_to_resume_ms"].as_f64().map_or("until `cont` (-S)".to_string(), |ms| format!("{ms:.1} ms")),
            v["engine"]["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
        ));
        d
    };
    // Pre-copy, hybrid, post-copy (with its link cut), the guest's writes tracked by
    // userfaultfd; QEMU's own dirty log further down.
    let mut src = a;
    for (i, (strategy, log)) in [("precopy", "uffd"), ("hybrid", "uffd"), ("postcopy", "auto")].into_iter().enumerate()
    {
        src = hop(&src, i, strategy, log);
    }

    // Post-copy whose livemig source dies mid-push: the destination's guest waits on its
    // missing pages (its counter stops); a new livemig takes the migration over from the
    // stopped source QEMU, and the guest goes on.
    let e = Guest::start_patched(&qemu, &dir, &guest, "e", true);
    let (mut ce, addr) = carrier(&dir, &e, "e");
    let mut m =
        Proc(migrate_ram(&dir, &src, &addr, "postcopy").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    let id = {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(m.0.stdout.take().unwrap());
        let mut line = String::new();
        let mut id = None;
        // Once the guest was handed over to E (post-copy reports its push) while pages are
        // still being pushed: "post-copy: SENT/PAGES pages sent, …" with SENT < PAGES.
        let pushing = |l: &str| {
            let Some(rest) = l.strip_prefix("post-copy: ") else { return false };
            let sent_of: Vec<u64> =
                rest.split_whitespace().next().unwrap_or("").split('/').filter_map(|n| n.parse().ok()).collect();
            matches!(sent_of[..], [sent, pages] if sent < pages)
        };
        while r.read_line(&mut line).unwrap() > 0 && !pushing(&line) {
            if let Some(rest) = line.strip_prefix("post-copy migration id ") {
                id = rest.split_whitespace().next().map(str::to_string);
            }
            line.clear();
        }
        assert!(pushing(&line), "post-copy ended before its push could be interrupted: {line}");
        id.expect("the migration id was printed")
    };
    m.0.kill().unwrap();
    let _ = m.0.wait();
    // A sweep under way may still end on pages that had arrived; then the guest blocks.
    std::thread::sleep(Duration::from_secs(1));
    // E runs the guest (QEMU's own stream carried the device state), but it waits on the
    // pages that never came. (Not asked over QMP: a vCPU blocked on a missing page may hold
    // QEMU's big lock, and QMP with it.)
    let stuck = e.counter();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(e.counter(), stuck, "the destination's guest must not run on without its pages");
    step("post-copy source killed: the destination's guest waits on its missing pages");
    let o = migrate_ram(&dir, &src, &addr, "postcopy").args(["--take-over", &id, "--json"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "take-over: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["dest_running"].as_bool(), Some(true), "{v}");
    assert_eq!(v["dest_ram"]["recoveries"], 1, "{v}");
    assert_eq!(v["dest_ram"]["checksum"], v["checksum"], "both ends agreed on every page: {v}");
    assert!(ce.0.wait().unwrap().success());
    e.wait_counter(stuck.unwrap_or(0) + 2, Duration::from_secs(30));
    step(&format!(
        "a new livemig took the migration over: {} pages sent again in {:.1} ms",
        v["engine"]["resent_pages"],
        v["engine"]["recovery_ms"].as_f64().unwrap_or(-1.0)
    ));
    drop(src);
    // The guest's writes read from QEMU's own dirty log (x-livemig-dirty-sync): pre-copy and
    // hybrid, on from E.
    let mut src = e;
    for (i, (strategy, log)) in [("precopy", "qemu"), ("hybrid", "qemu")].into_iter().enumerate() {
        src = hop(&src, 10 + i, strategy, log);
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
}
