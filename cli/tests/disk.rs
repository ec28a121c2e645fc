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
    assert!(err.contains("1 modified; state saved"), "{err}");
    assert!(d.join("vm.img.lmmeta").exists());
    let _ = std::fs::remove_dir_all(&d);
}
