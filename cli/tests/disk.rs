//! `livemig disk serve` against real NBD clients (qemu-img, qemu-io from qemu-utils; nbdinfo,
//! nbdcopy from libnbd-bin) and against a hand-written hostile client. Skipped with a message
//! when the tools are missing, unless LIVEMIG_REQUIRE_NBD_TOOLS=1 (scripts/test.sh sets it).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use livemig_tests::spawn_listening;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn tools() -> bool {
    let have = ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"].iter().all(|t| {
        Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success())
    });
    if !have {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_NBD_TOOLS").is_none(),
            "qemu-utils and libnbd-bin are required (scripts/install-deps.sh installs them)"
        );
        eprintln!("SKIPPED: qemu-img/qemu-io/nbdinfo/nbdcopy not installed");
    }
    have
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
    /// SIGTERM (the mirror state is saved), then wait.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let st = self.child.wait().unwrap();
        assert!(st.success(), "disk serve: {st}\n{err}");
        err
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, args: &[&str]) -> Server {
    let socket = dir.join("nbd.sock");
    let l = spawn_listening(
        Command::new(BIN)
            .args(["disk", "serve", "--socket"])
            .arg(&socket)
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::piped()),
    );
    Server { child: l.child, socket }
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{cmd:?}\nstdout:\n{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Whether a read ended because the peer closed the connection (EOF or a reset), not because
/// our own read timeout expired.
fn closed_by_peer(r: std::io::Result<usize>) -> bool {
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base_image(dir: &Path, size: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..size).map(|i| ((i * 2654435761usize) >> 13) as u8).collect();
    std::fs::write(dir.join("base.img"), &data).unwrap();
    data
}

#[test]
fn a_mirror_served_to_qemu_and_libnbd_clients_survives_a_restart() {
    if !tools() {
        return;
    }
    let d = scratch("mirror");
    let mut want = base_image(&d, 8 << 20);
    let s = serve(&d, &["--base", "base.img", "disk.img"]);
    // Every byte reads as the base.
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", "base.img", &s.uri()]).current_dir(&d));
    // Writes, a zeroed range, reads of what was written.
    run(Command::new("qemu-io").args(["-f", "raw"]).args([
        "-c",
        "write -P 0xab 1000 5000",
        "-c",
        "write -P 0xcd 3M 300k",
        "-c",
        "write -z -u 6M 512k",
        "-c",
        "read -P 0xab 1000 5000",
        &s.uri(),
    ]));
    want[1000..6000].fill(0xab);
    want[3 << 20..(3 << 20) + (300 << 10)].fill(0xcd);
    want[6 << 20..(6 << 20) + (512 << 10)].fill(0);
    run(Command::new("nbdcopy").arg(s.uri()).arg(d.join("copy.img")));
    assert!(std::fs::read(d.join("copy.img")).unwrap() == want, "nbdcopy read what was written over the base");
    // base:allocation: the zeroed range is a hole.
    let map = run(Command::new("nbdinfo").args(["--map", &s.uri()]));
    assert!(map.contains("hole"), "{map}");
    let err = s.stop();
    assert!(err.contains("modified"), "{err}");
    assert!(std::fs::read(d.join("base.img")).unwrap()[1000] != 0xab, "the base is never written");
    // Restarted: the local state is taken up again.
    let s = serve(&d, &["--base", "base.img", "disk.img"]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xcd 3M 300k", &s.uri()]));
    run(Command::new("nbdcopy").arg(s.uri()).arg(d.join("copy2.img")));
    assert!(std::fs::read(d.join("copy2.img")).unwrap() == want, "the restarted mirror lost nothing");
    drop(s);
    let _ = std::fs::remove_dir_all(&d);
}

/// A minimal client: negotiates structured replies and `base:allocation` if asked, then GO.
fn negotiate(sock: &Path, structured: bool) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let opt = |c: &mut UnixStream, o: u32, data: &[u8]| {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).unwrap();
        // Replies until ACK or an error.
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            c.read_exact(&mut d).unwrap();
            if kind == 1 || kind >= 1 << 31 {
                return kind;
            }
        }
    };
    if structured {
        assert_eq!(opt(&mut c, 8, &[]), 1);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(opt(&mut c, 10, &m), 1);
    }
    // An unknown option is refused, not fatal.
    assert_eq!(opt(&mut c, 999, &[]), (1 << 31) + 1);
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(opt(&mut c, 7, &go), 1);
    c
}

fn request(c: &mut UnixStream, kind: u16, offset: u64, len: u32, handle: u64) {
    let mut b = 0x25609513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    c.write_all(&b).unwrap();
}

/// The error of a simple reply.
fn simple_error(c: &mut UnixStream, handle: u64) -> u32 {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x67446698);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), handle);
    u32::from_be_bytes(h[4..8].try_into().unwrap())
}

/// The error of a structured reply (0 for a NONE chunk).
fn structured_error(c: &mut UnixStream) -> u32 {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x668e33ef);
    let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).unwrap();
    if kind == (1 << 15) + 1 {
        u32::from_be_bytes(d[0..4].try_into().unwrap())
    } else {
        0
    }
}

#[test]
fn bad_requests_get_nbd_errors_and_vanishing_clients_cost_nothing() {
    if !tools() {
        return;
    }
    let d = scratch("hostile");
    base_image(&d, 1 << 20);
    let s = serve(&d, &["--base", "base.img", "disk.img", "--io-timeout", "2"]);
    let size = 1u64 << 20;
    // Simple replies.
    let mut c = negotiate(&s.socket, false);
    request(&mut c, 0, size - 10, 11, 1);
    assert_eq!(simple_error(&mut c, 1), 22, "read past the end: EINVAL");
    request(&mut c, 0, u64::MAX - 5, 100, 2);
    assert_eq!(simple_error(&mut c, 2), 22, "offset overflow: EINVAL");
    request(&mut c, 1, size - 2, 4, 3);
    c.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(simple_error(&mut c, 3), 28, "write past the end: ENOSPC");
    request(&mut c, 0, 0, 64 << 20, 4);
    assert_eq!(simple_error(&mut c, 4), 22, "oversized read: EINVAL");
    request(&mut c, 77, 0, 0, 5);
    assert_eq!(simple_error(&mut c, 5), 22, "unknown command: EINVAL");
    request(&mut c, 7, 0, 4096, 6);
    assert_eq!(simple_error(&mut c, 6), 22, "block status without a context: EINVAL");
    request(&mut c, 3, 0, 0, 7);
    assert_eq!(simple_error(&mut c, 7), 0, "flush works after all that");
    // Structured replies.
    let mut c2 = negotiate(&s.socket, true);
    request(&mut c2, 0, size, 1, 8);
    assert_eq!(structured_error(&mut c2), 22);
    request(&mut c2, 7, 0, 8192, 9);
    assert_eq!(structured_error(&mut c2), 0, "block status answers with descriptors");
    // Garbage instead of a request: the server closes this connection.
    c2.write_all(&[0xee; 28]).unwrap();
    let mut sink = [0u8; 1];
    assert!(closed_by_peer(c2.read(&mut sink)), "garbage framing did not close the connection");
    // A client that vanishes mid-write, one that stalls mid-payload, one mid-negotiation.
    let mut v = negotiate(&s.socket, false);
    request(&mut v, 1, 0, 1 << 20, 10);
    v.write_all(&[0u8; 100]).unwrap();
    drop(v);
    let mut stall = negotiate(&s.socket, false);
    request(&mut stall, 1, 0, 4096, 11);
    let mut half = UnixStream::connect(&s.socket).unwrap();
    half.write_all(b"\0\0").unwrap();
    // The export is intact and still served.
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", "base.img", &s.uri()]).current_dir(&d));
    // The stalled payload is given up after --io-timeout.
    stall.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(closed_by_peer(stall.read(&mut sink)), "a stalled payload was not given up");
    drop((c, half));
    s.stop();
    let _ = std::fs::remove_dir_all(&d);
}

/// The daemon serves disks from its config file beside its sessions; SIGTERM saves them.
#[test]
fn the_daemon_serves_a_disk_from_its_config() {
    if !tools() {
        return;
    }
    let d = scratch("daemon");
    base_image(&d, 4 << 20);
    let sock = d.join("vm.sock");
    let cfg = d.join("livemig.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[[disks]]\nfile = \"{}\"\nbase = \"{}\"\nsocket = \"{}\"\n",
            d.join("vm.img").display(),
            d.join("base.img").display(),
            sock.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("LIVEMIG_SECRET", "daemon-disk-secret-daemon-disk-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = String::new();
    for _ in 0..2 {
        std::io::BufRead::read_line(&mut out, &mut lines).unwrap();
    }
    assert!(lines.contains(" tcp") && lines.contains(&format!("{} nbd", sock.display())), "{lines}");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", "base.img", &uri]).current_dir(&d));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 64k", &uri]));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("1 modified; idle; state saved"), "{err}");
    assert!(d.join("vm.img.lmmeta").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// A `livemig disk receive` whose stdout goes to a file (it prints `listening`, then
/// `serving` at the handover, then the summary).
struct Receiver {
    child: Child,
    out: PathBuf,
    socket: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Receiver {
        let out = dir.join("receive.out");
        let socket = dir.join("dst.sock");
        let mut cmd = Command::new(BIN);
        cmd.args(["disk", "receive", "--listen", "127.0.0.1:0", "--secret-file", "secret", "--socket"])
            .arg(&socket)
            .args(args)
            .current_dir(dir)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("receive.err")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let r = Receiver { child, out, socket };
        r.wait_for("listening ");
        r
    }
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    fn wait_for(&self, what: &str) -> String {
        for _ in 0..600 {
            let o = self.output();
            if o.contains(what) {
                return o;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("disk receive never printed {what:?}: {}\n{}", self.output(), self.err());
    }
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fn wait_for_err(&self, what: &str) -> String {
        for _ in 0..600 {
            let e = self.err();
            if e.contains(what) {
                return e;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("disk receive never reported {what:?}: {}\n{}", self.output(), self.err());
    }
    fn wait_for_err_any(&self, what: &str) -> String {
        for _ in 0..600 {
            let e = self.err();
            if e.contains(what) {
                return e;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.err()
    }
    fn err(&self) -> String {
        std::fs::read_to_string(self.out.with_file_name("receive.err")).unwrap_or_default()
    }
    fn addr(&self) -> String {
        let o = self.output();
        o.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap().to_string()
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(dir: &Path) -> String {
    run(Command::new(BIN).args(["disk", "status", "--control", "src.ctl"]).current_dir(dir))
}

fn wait_status(dir: &Path, want: &str) {
    for _ in 0..200 {
        if status(dir).contains(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the source never reached {want}: {}", status(dir));
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri).output().unwrap()
}

fn migrate_cmd(dir: &Path, to: &str, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["disk", "migrate", "--control", "src.ctl", "--secret-file", "secret", "--json", "--to", to])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn migration_setup(name: &str) -> (PathBuf, Vec<u8>, Server) {
    let d = scratch(name);
    let mut want = base_image(&d, 16 << 20);
    run(Command::new(BIN).args(["secret", "new", "secret"]).current_dir(&d));
    let s = serve(&d, &["--base", "base.img", "--control", "src.ctl", "src.img"]);
    // Written before the migration: the ModifiedSet it starts from.
    let o = qemu_io(&s.uri(), &["write -P 0x11 0 2M", "write -P 0x12 5M 100k"]);
    assert!(o.status.success(), "{o:?}");
    want[..2 << 20].fill(0x11);
    want[5 << 20..(5 << 20) + (100 << 10)].fill(0x12);
    (d, want, s)
}

/// Hybrid and pre-copy: writes during the transfer (hot chunks written three times are held
/// back by the hybrid strategy and pulled after the handover), the source refuses I/O after
/// it, the destination serves every byte as the source had it plus its own writes, and both
/// ends report the chunk-by-chunk check.
#[test]
fn a_served_disk_migrates_live_with_writes_during_the_transfer() {
    if !tools() {
        return;
    }
    for strategy in ["hybrid", "precopy"] {
        let (d, mut want, s) = migration_setup(&format!("live-{strategy}"));
        let r = Receiver::start(&d, &["--base", "base.img", "dst.img", "--io-timeout", "2"], &[]);
        let mut m =
            migrate_cmd(&d, &r.addr(), &["--strategy", strategy, "--switchover", "command", "--io-timeout", "2"]);
        wait_status(&d, "migrating");
        // During the transfer: a cold range written once, hot chunks written three times, and
        // a read that grows a pushed chunk's local range from the base (nothing to resend).
        let o = qemu_io(
            &s.uri(),
            &[
                "write -P 0x22 4M 1M",
                "write -P 0x31 8M 512k",
                "write -P 0x32 8M 512k",
                "write -P 0x33 8M 512k",
                "read 5300k 4k",
            ],
        );
        assert!(o.status.success(), "{o:?}");
        // Waiting for the switchover command longer than either side's silence bound.
        std::thread::sleep(Duration::from_secs(3));
        want[4 << 20..5 << 20].fill(0x22);
        want[8 << 20..(8 << 20) + (512 << 10)].fill(0x33);
        run(Command::new(BIN).args(["disk", "switchover", "--control", "src.ctl"]).current_dir(&d));
        let out = m.stdout.take().unwrap();
        let o = m.wait_with_output().unwrap();
        let mut summary = String::new();
        std::io::Read::read_to_string(&mut { out }, &mut summary).unwrap();
        assert!(o.status.success(), "{strategy}: {summary}\n{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
        assert!(v["verified_chunks"].as_u64().unwrap() >= 13, "{strategy}: {v}");
        if strategy == "hybrid" {
            assert!(v["remaining_at_switchover"].as_u64().unwrap() >= 2, "hot chunks are held back: {v}");
        } else {
            assert!(v["rounds"].as_u64().unwrap() >= 1, "{v}");
        }
        r.wait_for("serving ");
        // The source serves nothing after the handover.
        let o = qemu_io(&s.uri(), &["read 0 4k"]);
        assert!(!o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"), "{o:?}");
        // The destination: a read of a hot chunk, a write of its own.
        let o = qemu_io(&r.uri(), &["read -P 0x33 8M 512k", "write -P 0x44 9M 4k"]);
        assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
        want[9 << 20..(9 << 20) + 4096].fill(0x44);
        let done = r.wait_for("disk received");
        assert!(done.contains("verified equal"), "{done}");
        std::fs::write(d.join("want.img"), &want).unwrap();
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", "want.img", &r.uri()]).current_dir(&d));
        drop(r);
        drop(s);
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// The destination dies before the handover: the migration fails, and the source goes on
/// serving the disk with every write intact.
#[test]
fn a_destination_lost_before_the_handover_leaves_the_source_serving() {
    if !tools() {
        return;
    }
    let (d, _, s) = migration_setup("dest-lost");
    let mut r = Receiver::start(&d, &["--base", "base.img", "dst.img"], &[]);
    let m = migrate_cmd(&d, &r.addr(), &["--switchover", "command", "--io-timeout", "3"]);
    wait_status(&d, "migrating");
    let o = qemu_io(&s.uri(), &["write -P 0x22 4M 1M"]);
    assert!(o.status.success(), "{o:?}");
    r.child.kill().unwrap();
    let o = m.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("before the handover"), "{err}");
    wait_status(&d, "idle");
    let o =
        qemu_io(&s.uri(), &["read -P 0x11 0 2M", "read -P 0x22 4M 1M", "write -P 0x23 6M 4k", "read -P 0x23 6M 4k"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
    drop(s);
    let _ = std::fs::remove_dir_all(&d);
}

/// A destination that serves its disk from the start (as a QEMU started with `-incoming`
/// needs): a request before the handover fails at once rather than reading zeroes (or holding
/// QEMU's start-up); `disk handover` returns once the destination serves the disk, which
/// then reads as the source's. A migration cancelled before its handover leaves the source
/// serving every write, and the destination's early export failing.
#[test]
fn an_early_destination_fails_requests_until_the_handover_and_a_cancel_keeps_the_disk_at_the_source() {
    if !tools() {
        return;
    }
    let (d, want, s) = migration_setup("early");
    let r = Receiver::start(&d, &["--base", "base.img", "dst.img", "--serve-early"], &[]);
    assert!(r.output().contains("serving "), "served at once: {}", r.output());
    // Nothing has arrived: a read fails (an I/O error, not a refused connection).
    let eio = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).contains("read failed: Input/output error");
    let o = qemu_io(&r.uri(), &["read 0 4k"]);
    assert!(eio(&o), "{o:?}");
    let m = migrate_cmd(&d, &r.addr(), &["--switchover", "command", "--io-timeout", "3"]);
    wait_status(&d, "migrating");
    let o = qemu_io(&r.uri(), &["read 0 4k"]);
    assert!(eio(&o), "{o:?}");
    // Once `disk handover` has returned, the destination serves the source's disk.
    let h = run(Command::new(BIN).args(["disk", "handover", "--control", "src.ctl"]).current_dir(&d));
    assert!(h.contains("handed-over"), "{h}");
    let o = qemu_io(&r.uri(), &["read -P 0x11 0 2M", "read -P 0x12 5M 100k"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
    let o = m.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    r.wait_for("disk received");
    std::fs::write(d.join("want.img"), &want).unwrap();
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", "want.img", &r.uri()]).current_dir(&d));
    drop(r);
    drop(s);
    let _ = std::fs::remove_dir_all(&d);

    // Cancelled before the handover.
    let (d, _, s) = migration_setup("cancel");
    let mut r = Receiver::start(&d, &["--base", "base.img", "dst.img", "--serve-early"], &[]);
    let m = migrate_cmd(&d, &r.addr(), &["--switchover", "command"]);
    wait_status(&d, "migrating");
    let o = qemu_io(&s.uri(), &["write -P 0x22 4M 1M"]);
    assert!(o.status.success(), "{o:?}");
    run(Command::new(BIN).args(["disk", "cancel", "--control", "src.ctl"]).current_dir(&d));
    let o = m.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cancelled"), "{err}");
    wait_status(&d, "idle");
    let o = qemu_io(&s.uri(), &["read -P 0x11 0 2M", "read -P 0x22 4M 1M"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
    // The destination gives up: told by the source, it exits with the reason.
    let st = r.child.wait().unwrap();
    assert!(!st.success(), "{}", r.err());
    assert!(r.err().contains("cancelled"), "{}", r.err());
    // Nothing left to cancel.
    let o = Command::new(BIN).args(["disk", "cancel", "--control", "src.ctl"]).current_dir(&d).output().unwrap();
    assert!(!o.status.success(), "{o:?}");
    drop(s);
    let _ = std::fs::remove_dir_all(&d);
}

/// A chunk damaged at the destination after it was installed is caught by the final check at
/// both ends, by index.
#[cfg(feature = "fault-injection")]
#[test]
fn a_corrupted_chunk_fails_the_final_check() {
    if !tools() {
        return;
    }
    let (d, _, s) = migration_setup("corrupt");
    let r = Receiver::start(&d, &["--base", "base.img", "dst.img"], &[("LIVEMIG_CORRUPT_CHUNK", "3")]);
    let m = migrate_cmd(&d, &r.addr(), &[]);
    let o = m.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("differ") && err.contains("[3]"), "{err}");
    let rerr = r.wait_for_err("differ");
    assert!(rerr.contains("[3]"), "{rerr}");
    drop(s);
    let _ = std::fs::remove_dir_all(&d);
}

/// The source dies right after the handover while chunks remain: the destination reports the
/// chunks it could not pull, reads of them fail with EIO (never zeros), the rest is served.
#[cfg(feature = "fault-injection")]
#[test]
fn a_source_lost_after_the_handover_is_reported_with_its_missing_chunks() {
    if !tools() {
        return;
    }
    let d = scratch("source-lost");
    base_image(&d, 16 << 20);
    run(Command::new(BIN).args(["secret", "new", "secret"]).current_dir(&d));
    let socket = d.join("nbd.sock");
    let l = spawn_listening(
        Command::new(BIN)
            .args(["disk", "serve", "--base", "base.img", "--control", "src.ctl", "src.img", "--socket"])
            .arg(&socket)
            .env("LIVEMIG_EXIT_AFTER_HANDOVER", "1")
            .current_dir(&d)
            .stderr(Stdio::null()),
    );
    let s = Server { child: l.child, socket };
    let o = qemu_io(&s.uri(), &["write -P 0x11 0 1M"]);
    assert!(o.status.success(), "{o:?}");
    let r = Receiver::start(&d, &["--base", "base.img", "dst.img"], &[]);
    let m = migrate_cmd(&d, &r.addr(), &["--switchover", "command"]);
    wait_status(&d, "migrating");
    // Hot: held back, still at the source at the handover.
    let o = qemu_io(&s.uri(), &["write -P 0x31 8M 1M", "write -P 0x32 8M 1M"]);
    assert!(o.status.success(), "{o:?}");
    run(Command::new(BIN).args(["disk", "switchover", "--control", "src.ctl"]).current_dir(&d));
    let _ = m.wait_with_output();
    let err = r.wait_for_err("could not be pulled");
    assert!(err.contains("32, 33"), "the hot chunks 32..35 are named: {err}");
    let o = qemu_io(&r.uri(), &["read 8M 4k"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("failed") || !o.status.success(), "a missing chunk must not read: {out}");
    let o = qemu_io(&r.uri(), &["read -P 0x11 0 1M"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
    drop(r);
    drop(s);
    let _ = std::fs::remove_dir_all(&d);
}

/// A full disk at the destination: the transfer fails with ENOSPC named at both ends, before
/// the handover, and the source keeps serving (needs root for a small tmpfs; skipped with a
/// message otherwise).
#[test]
fn a_full_disk_at_the_destination_is_reported_and_costs_the_source_nothing() {
    if !tools() {
        return;
    }
    let (d, _, s) = migration_setup("full");
    let small = d.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&small)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let u = Unmount(small.clone());
    let r = Receiver::start(&d, &["--base", "base.img", "small/dst.img"], &[]);
    let o = migrate_cmd(&d, &r.addr(), &[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("before the handover"), "{err}");
    let rerr = r.wait_for_err_any("No space left");
    assert!(rerr.contains("No space left"), "{rerr}");
    wait_status(&d, "idle");
    let o = qemu_io(&s.uri(), &["read -P 0x11 0 2M", "write -P 0x23 6M 4k"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
    drop(r);
    drop(s);
    drop(u);
    let _ = std::fs::remove_dir_all(&d);
}

/// A host daemon started with `--receive-disks-dir`: its TCP address and the directory.
struct Daemon {
    child: Child,
    addr: String,
    recv: PathBuf,
    err: PathBuf,
    /// Its stdout, kept open (it prints a line for each disk it starts serving).
    _out: std::io::BufReader<std::process::ChildStdout>,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let recv = dir.join("received");
        std::fs::create_dir_all(&recv).unwrap();
        let err = dir.join("daemon.err");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--secret-file", "secret"])
            .arg("--receive-disks-dir")
            .arg(&recv)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let addr = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("daemon said {line:?}")).to_string();
        Daemon { child, addr, recv, err, _out: out }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `livemig migrate --disk`: a guest's memory (the synthetic workload) and its disk (a plain
/// image served with `disk serve`, written before and during the migration) move to one host
/// daemon, which receives the disk under a name and serves it over NBD. The disk is handed
/// over inside the memory's pause: its switchover time lies within the downtime. The memory
/// is verified by the engine, the disk chunk by chunk and here against the source's image
/// with `qemu-img compare`. A disk the destination refuses stops the memory migration before
/// it starts, and the source keeps serving the disk.
#[test]
fn memory_and_a_disk_move_together_into_a_daemon() {
    if !tools() {
        return;
    }
    let d = scratch("together");
    run(Command::new(BIN).args(["secret", "new", "secret"]).current_dir(&d));
    let daemon = Daemon::start(&d);
    for (strategy, name) in [("precopy", "vm1"), ("postcopy", "vm2")] {
        let img = format!("{name}-src.img");
        let ctl = format!("{name}.ctl");
        let data: Vec<u8> = (0..8 << 20).map(|i: usize| ((i * 2654435761usize) >> 11) as u8).collect();
        std::fs::write(d.join(&img), &data).unwrap();
        let socket = d.join(format!("{name}-src.sock"));
        let src = spawn_listening(
            Command::new(BIN)
                .args(["disk", "serve", "--control", &ctl, "--socket"])
                .arg(&socket)
                .arg(&img)
                .current_dir(&d)
                .stderr(Stdio::piped()),
        );
        let src = Server { child: src.child, socket };
        let o = qemu_io(&src.uri(), &["write -P 0x51 1M 300k"]);
        assert!(o.status.success(), "{o:?}");
        // Writes while the disk moves (before the memory's pause).
        let writer = {
            let uri = src.uri();
            std::thread::spawn(move || {
                (0..6u64)
                    .filter(|i| qemu_io(&uri, &[&format!("write -P 0x6{i} {}k 64k", 2048 + i * 256)]).status.success())
                    .count()
                    == 6
            })
        };
        let o = Command::new(BIN)
            .args(["migrate", "--to", &daemon.addr, "--secret-file", "secret", "--size", "32M", "--workload", "random"])
            .args(["--strategy", strategy, "--warmup", "0.3", "--after", "0.3", "--json", "--no-progress"])
            .args(["--disk", &format!("{ctl}={name}@{}", daemon.addr)])
            .current_dir(&d)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{strategy}: {out}\n{err}\ndaemon:\n{}", daemon.log());
        assert!(writer.join().unwrap(), "writes during the transfer");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let b = &v["beside"];
        assert_eq!(b["handed_over"], true, "{v}");
        assert_eq!(b["moved"][0]["ok"], true, "{b}");
        assert!(b["moved"][0]["summary"]["verified_chunks"].as_u64().unwrap() >= 32, "{b}");
        let (switch, down) = (b["switchover_ms"].as_f64().unwrap(), v["downtime_ms"].as_f64().unwrap());
        assert!(switch <= down, "{strategy}: the disk's handover ({switch} ms) lies inside the pause ({down} ms)");
        if strategy == "precopy" {
            assert_eq!(v["outcome"], "completed", "{v}");
            assert!(v["checksum"].is_string(), "memory verified: {v}");
        }
        // The daemon serves the disk as NAME; it equals the source's image.
        let dst = format!("nbd+unix:///{name}?socket={}", daemon.recv.join(format!("{name}.sock")).display());
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &img, &dst]).current_dir(&d));
        assert!(daemon.log().contains(&format!("disk-receive {name}")), "{}", daemon.log());
        drop(src);
    }

    // The name is taken: the destination refuses the disk, the memory never moves, and the
    // source serves its disk on.
    let img = "vm3-src.img";
    std::fs::write(d.join(img), vec![7u8; 1 << 20]).unwrap();
    let socket = d.join("vm3-src.sock");
    let src = spawn_listening(
        Command::new(BIN)
            .args(["disk", "serve", "--control", "vm3.ctl", "--socket"])
            .arg(&socket)
            .arg(img)
            .current_dir(&d)
            .stderr(Stdio::piped()),
    );
    let src = Server { child: src.child, socket };
    let o = Command::new(BIN)
        .args(["migrate", "--to", &daemon.addr, "--secret-file", "secret", "--size", "8M", "--json", "--no-progress"])
        .args(["--disk", &format!("vm3.ctl=vm1@{}", daemon.addr)])
        .current_dir(&d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a refused disk fails the migration");
    assert!(err.contains("already has a disk named \"vm1\""), "{err}");
    let o = qemu_io(&src.uri(), &["read -P 7 0 1M", "write -P 8 0 4k"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"), "{o:?}");
    drop(src);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&d);
}
