//! `livemig bench pages` / `livemig bench chunks`.

use std::io::IsTerminal;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig_engine::connect::{self, Listener, TransportChoice, TransportOptions};
use livemig_transport::auth::Secret;
use livemig_transport::{
    Access, CoalesceConfig, Coalescer, PageBitmap, Region, RegionTable, TcpConfig, Transport, WindowConfig,
    WriteRequest,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Which pages are dirty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Every page.
    Seq,
    /// Each page with probability 1/2 (seeded).
    Random,
    /// Runs of N dirty pages separated by N clean pages.
    Runs(usize),
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seq" => Ok(Pattern::Seq),
            "random" => Ok(Pattern::Random),
            _ => match s.strip_prefix("runs:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(Pattern::Runs(n)),
                _ => Err(format!("unknown pattern {s:?}: use seq, random or runs:N")),
            },
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Seq => f.write_str("seq"),
            Pattern::Random => f.write_str("random"),
            Pattern::Runs(n) => write!(f, "runs:{n}"),
        }
    }
}

pub use livemig_app::args::parse_size;
use livemig_app::args::{parse_secs, transport_arg, ChildSecret};
use livemig_app::cleanup::OwnedChild;
use livemig_app::open;

/// Options of `livemig bench pages|chunks`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Listen on ADDR and serve as the destination.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["connect", "loopback"])]
    pub listen: Option<String>,
    /// Connect to ADDR and send.
    #[arg(long, value_name = "ADDR", conflicts_with = "loopback")]
    pub connect: Option<String>,
    /// Run both ends on this machine (the destination in a child process).
    #[arg(long)]
    pub loopback: bool,
    /// tcp, verbs or auto.
    #[arg(long, default_value = "auto", value_parser = livemig_app::args::transport_parser())]
    pub transport: TransportChoice,
    /// Region size (both ends must agree).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Page size (chunk size for `chunks`).
    #[arg(long, value_parser = parse_size)]
    pub page_size: Option<u64>,
    /// Dirty pattern: seq, random, runs:N.
    #[arg(long, default_value = "random")]
    pub pattern: Pattern,
    /// Maximum outstanding work requests.
    #[arg(long, default_value_t = 2048)]
    pub window: usize,
    /// Parallel TCP streams.
    #[arg(long, default_value_t = 1)]
    pub streams: u8,
    /// Seconds to keep sending.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = 5.0)]
    pub duration: f64,
    /// Maximum bytes merged into one work request (QEMU: 2 MiB; at most 64 MiB, the wire
    /// protocol's WRITE payload cap).
    #[arg(long, value_parser = parse_size, default_value = "2M")]
    pub max_write: u64,
    /// Send every page as its own work request (the baseline for the coalescing ratio).
    #[arg(long)]
    pub no_coalesce: bool,
    /// Signal one completion per N work requests.
    #[arg(long, default_value_t = 16)]
    pub signal_every: u32,
    /// Socket buffer bytes (default: kernel autotuning).
    #[arg(long, value_parser = parse_size)]
    pub sock_buf: Option<u64>,
    /// TCP: send payloads with writev (the kernel copies them) instead of zero-copy splice.
    #[arg(long)]
    pub tcp_copy: bool,
    /// TCP receiver: wake the reader once this many payload bytes arrived (SO_RCVLOWAT while
    /// reading a WRITE payload); 0 = on every arrival.
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    pub rcv_lowat: u64,
    /// Shared-secret file (else $LIVEMIG_SECRET; --loopback makes a random one).
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Seconds without progress from the peer after which either end gives up (the sender
    /// sends a heartbeat every second while it pushes).
    #[arg(long, value_name = "SECS", value_parser = livemig_app::args::parse_io_timeout, default_value_t = livemig_app::precopy::default_io_timeout_secs())]
    pub io_timeout: f64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Verbs: device name (default: the first with an active port).
    #[arg(long)]
    pub device: Option<String>,
    /// Verbs: port number (default: the first active one).
    #[arg(long)]
    pub ib_port: Option<u8>,
    /// Verbs: GID index (default: the first RoCE v2 IPv4-mapped GID).
    #[arg(long)]
    pub gid_index: Option<u8>,
    /// Verbs: busy-poll completions instead of the completion channel.
    #[arg(long)]
    pub busy_poll: bool,
    /// Verbs: register memory on demand in chunks of this size (default: pin everything).
    #[arg(long, value_parser = parse_size)]
    pub reg_chunk: Option<u64>,
}

/// What the sender measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// pages or chunks.
    pub kind: &'static str,
    /// Backend used.
    pub transport: String,
    /// Why it was chosen.
    pub transport_note: String,
    /// Region bytes.
    pub region_bytes: u64,
    /// Page (chunk) size.
    pub page_size: u64,
    /// Pattern.
    pub pattern: String,
    /// Dirty pages per pass.
    pub dirty_pages: u64,
    /// Full passes sent.
    pub passes: u64,
    /// Seconds from first post to last completion.
    pub seconds: f64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// GB/s (10^9 bytes).
    pub gbytes_per_s: f64,
    /// Gbit/s.
    pub gbits_per_s: f64,
    /// Pages per second.
    pub pages_per_s: f64,
    /// Work requests posted.
    pub work_requests: u64,
    /// Pages per work request.
    pub coalescing_ratio: f64,
    /// Sender CPU seconds (user+system) during the transfer.
    pub sender_cpu_s: f64,
    /// Receiver CPU seconds during the transfer (as reported by it).
    pub receiver_cpu_s: f64,
    /// Times posting waited for the window.
    pub window_stalls: u64,
    /// Single-thread memcpy of the same bytes on this host, GB/s (a ceiling).
    pub memcpy_gbytes_per_s: f64,
    /// Destination checksum equals the source's.
    pub checksum_match: bool,
    /// The checksum (SHA-256 of the whole region).
    pub checksum: String,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn region_checksum(r: &Region) -> String {
    // SAFETY: called when the transfer is over: no one writes the region.
    let bytes = unsafe { r.as_slice() };
    let mut h = Sha256::new();
    for c in bytes.chunks(1 << 20) {
        h.update(c);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn bitmap_for(pattern: Pattern, pages: usize) -> PageBitmap {
    let mut bm = PageBitmap::new(pages);
    match pattern {
        Pattern::Seq => bm.set_range(0, pages),
        Pattern::Random => {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
            for p in 0..pages {
                if rng.gen_bool(0.5) {
                    bm.set(p);
                }
            }
        }
        Pattern::Runs(n) => {
            let mut p = 0;
            while p < pages {
                bm.set_range(p, n);
                p += 2 * n;
            }
        }
    }
    bm
}

fn memcpy_gbps(r: &Region, bytes: u64) -> f64 {
    let len = (r.len() as usize).min(bytes.max(1 << 20) as usize);
    let mut dst = vec![0u8; len];
    // SAFETY: the region is idle (called before and after the transfer only).
    let src = unsafe { &r.as_slice()[..len] };
    dst.copy_from_slice(src); // warm-up: fault the destination in
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_millis(300) {
        dst.copy_from_slice(src);
        n += len as u64;
    }
    std::hint::black_box(&dst);
    n as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Defaults that differ between `pages` and `chunks`.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// "pages" or "chunks".
    pub name: &'static str,
    /// Default region size.
    pub size: u64,
    /// Default page/chunk size.
    pub page_size: u64,
}

/// Page benchmark defaults.
pub const PAGES: Kind = Kind { name: "pages", size: 256 << 20, page_size: 4096 };
/// Chunk benchmark defaults (storage chunks of 1 MiB in a file-backed region).
pub const CHUNKS: Kind = Kind { name: "chunks", size: 1 << 30, page_size: 1 << 20 };

fn options(a: &BenchArgs) -> Result<TransportOptions> {
    let window = WindowConfig {
        max_wrs: NonZeroUsize::new(a.window).context("--window must be at least 1")?,
        max_bytes: 256 << 20,
        signal_every: NonZeroU32::new(a.signal_every).context("--signal-every must be at least 1")?,
    };
    let cap = livemig_transport::wire::MAX_WRITE_PAYLOAD as u64;
    if a.max_write > cap {
        bail!("--max-write {} exceeds the {cap}-byte WRITE payload cap of the wire protocol", a.max_write);
    }
    let tcp = TcpConfig {
        streams: NonZeroU8::new(a.streams).context("--streams must be at least 1")?,
        window,
        socket_buffer: a.sock_buf.map(|b| b as usize),
        // A work request travels as one WRITE frame: let it be as large as --max-write.
        max_frame_bytes: (a.max_write as u32).max(TcpConfig::default().max_frame_bytes),
        zero_copy: !a.tcp_copy,
        rcv_lowat: u32::try_from(a.rcv_lowat).context("--rcv-lowat must be below 4 GiB")?,
        io_timeout: Duration::from_secs_f64(a.io_timeout),
        gate: livemig_transport::GateConfig { tls: livemig_app::args::tls(), ..Default::default() },
        ..Default::default()
    };
    let verbs = livemig_engine::connect::VerbsOptions {
        device: a.device.clone(),
        ib_port: a.ib_port,
        gid_index: a.gid_index,
        busy_poll: a.busy_poll,
        reg_chunk: a.reg_chunk,
    };
    Ok(TransportOptions { choice: a.transport, io_timeout: tcp.io_timeout, tcp, verbs })
}

fn make_region(kind: Kind, id: u32, len: u64, ps: u32, access: Access) -> Result<Arc<Region>> {
    make_region_in(&std::env::temp_dir(), kind, id, len, ps, access)
}

/// The region a benchmark moves: anonymous memory for pages; for chunks a real file (an
/// image) in `dir`, mapped shared and unlinked right away.
pub fn make_region_in(
    dir: &std::path::Path,
    kind: Kind,
    id: u32,
    len: u64,
    ps: u32,
    access: Access,
) -> Result<Arc<Region>> {
    let r = if kind.name == "chunks" {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("livemig-bench-{}-{id}-{n}.img", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        Region::file(id, f, len, ps, access)?
    } else {
        Region::anonymous(id, len, ps, access)?
    };
    Ok(Arc::new(r))
}

fn secret(a: &BenchArgs) -> Result<Secret> {
    Secret::load(a.secret_file.as_deref()).context("loading the shared secret")
}

/// Entry point of `livemig bench pages|chunks`.
pub fn run(kind: Kind, a: &BenchArgs) -> Result<()> {
    let size = a.size.unwrap_or(kind.size);
    let ps = a.page_size.unwrap_or(kind.page_size);
    if !(ps as u32).is_power_of_two() || ps > u32::MAX as u64 || size % ps != 0 || size == 0 {
        bail!("--size {size} must be a positive multiple of --page-size {ps}, a power of two");
    }
    let (tkind, note) = connect::resolve(a.transport);
    let opts = options(a)?;
    if let Some(addr) = &a.listen {
        let secret = secret(a)?;
        let r = make_region(kind, 2, size, ps as u32, Access::REMOTE_WRITE)?;
        let table = RegionTable::new();
        let _reg = table.register(r.clone())?;
        let l = Listener::bind(tkind, addr)?;
        // The bound address on stdout lets a parent (--loopback) or a script find us.
        println!("listening {} {}", l.local_addr()?, tkind);
        // The listening line names the backend; why it was chosen is for a person watching
        // (a parent such as --loopback reads the line and prints its own).
        if std::io::stdout().is_terminal() {
            eprintln!("{note}");
        }
        let mut t = l.accept(&opts, &secret, &table)?;
        return serve(t.as_mut(), &r, opts.io_timeout);
    }
    let (addr, child, secret) = if a.loopback {
        // Both ends share --secret-file if given, else a random secret made here.
        let cs = ChildSecret::new(a.secret_file.as_deref()).context("loading the shared secret")?;
        livemig_app::cleanup::install()?;
        let (addr, child) = spawn_listener(kind, a, size, ps, &cs)?;
        (addr, Some(child), cs.secret().clone())
    } else if let Some(c) = &a.connect {
        (c.clone(), None, secret(a)?)
    } else {
        bail!("give --listen ADDR, --connect ADDR or --loopback");
    };
    let report = send(kind, a, &opts, tkind, note, &addr, size, ps, &secret).inspect_err(|_| {
        // A Ctrl-C ends the child too; let the signal thread report and clean up.
        livemig_app::cleanup::yield_to_signal();
    })?;
    if let Some(mut c) = child {
        let st = c.wait()?;
        if !st.success() {
            bail!("the destination process failed: {st}");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.checksum_match {
        bail!("checksum mismatch: the destination differs from the source");
    }
    Ok(())
}

fn spawn_listener(kind: Kind, a: &BenchArgs, size: u64, ps: u64, secret: &ChildSecret) -> Result<(String, OwnedChild)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", kind.name, "--listen", "127.0.0.1:0", "--size", &size.to_string()])
        .args(["--page-size", &ps.to_string(), "--transport", transport_arg(a.transport)])
        .args(["--streams", &a.streams.to_string(), "--window", &a.window.to_string()])
        .args(["--rcv-lowat", &a.rcv_lowat.to_string()])
        .args(["--io-timeout", &a.io_timeout.to_string()])
        .args(livemig_app::args::tls_child_args())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(b) = a.sock_buf {
        cmd.args(["--sock-buf", &b.to_string()]);
    }
    if let Some(d) = &a.device {
        cmd.args(["--device", d]);
    }
    if let Some(p) = a.ib_port {
        cmd.args(["--ib-port", &p.to_string()]);
    }
    if let Some(g) = a.gid_index {
        cmd.args(["--gid-index", &g.to_string()]);
    }
    if a.busy_poll {
        cmd.arg("--busy-poll");
    }
    secret.apply(&mut cmd);
    let mut child = OwnedChild::spawn(&mut cmd).context("starting the destination process")?;
    let out = child.child().stdout.take().context("child stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    let addr = line.split_whitespace().nth(1).context("the destination did not report its address")?.to_string();
    Ok((addr, child))
}

/// The sender's heartbeat while it pushes (writes alone are invisible to a verbs receiver).
const TICK: &[u8] = b"TICK";

/// The destination of a benchmark session: waits for the sender's CHECK, compares the
/// checksums and answers; a sender silent for `io_timeout` is an error.
pub fn serve(t: &mut dyn Transport, r: &Region, io_timeout: Duration) -> Result<()> {
    let cpu0 = cpu_seconds();
    loop {
        let m = t.recv_message(Some(io_timeout))?.with_context(|| {
            format!("the sender went silent: nothing for {:.1} s (--io-timeout)", io_timeout.as_secs_f64())
        })?;
        let text = String::from_utf8_lossy(&m).to_string();
        if let Some(theirs) = text.strip_prefix("CHECK ") {
            let ours = region_checksum(r);
            let verdict = if ours == theirs { "OK" } else { "MISMATCH" };
            let cpu = cpu_seconds() - cpu0;
            t.send_message(format!("{verdict} {ours} {cpu:.3}").as_bytes())?;
            // wait for the sender to close
            let _ = t.recv_message(Some(Duration::from_secs(10)));
            if verdict != "OK" {
                bail!("checksum mismatch: source {theirs}, destination {ours}");
            }
            return Ok(());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send(
    kind: Kind,
    a: &BenchArgs,
    opts: &TransportOptions,
    tkind: livemig_transport::TransportKind,
    note: String,
    addr: &str,
    size: u64,
    ps: u64,
    secret: &Secret,
) -> Result<BenchReport> {
    let r = make_region(kind, 1, size, ps as u32, Access::LOCAL)?;
    let table = RegionTable::new();
    let _reg = table.register(r.clone())?;
    let bm = bitmap_for(a.pattern, r.pages());
    livemig_transport::testdata::fill_pages(&r, &bm, 0xfeed);
    let cfg = if a.no_coalesce {
        CoalesceConfig::per_page(ps as u32)
    } else {
        CoalesceConfig {
            page_size: ps as u32,
            max_write_bytes: a.max_write.max(ps),
            max_sges: 16,
            ..Default::default()
        }
    };
    let co = Coalescer::new(cfg)?;
    let mut wrs = Vec::new();
    let cst = co.coalesce(&bm, &mut wrs);
    let reqs: Vec<WriteRequest<'_>> = wrs
        .iter()
        .map(|w| WriteRequest { local: 1, segments: &w.segments, remote: 2, remote_offset: w.offset })
        .collect();
    let memcpy = memcpy_gbps(&r, cst.pages * ps);
    let mut t = connect::connect(tkind, addr, opts, secret, &table)?;
    if open::peer_is_daemon(t.as_ref()) {
        let service = if kind.name == "chunks" { open::Service::BenchChunks } else { open::Service::BenchPages };
        let req = open::OpenRequest {
            version: open::OPEN_VERSION,
            service,
            size,
            page_size: ps,
            after_s: 0.0,
            disk: String::new(),
            request: None,
        };
        open::open(t.as_mut(), &req, opts.io_timeout)?;
    }
    let pb = if a.json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((a.duration * 10.0) as u64)
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} sending {msg} [{bar:30}] {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let dur = Duration::from_secs_f64(a.duration.max(0.0));
    let mut passes = 0u64;
    let mut ticked = Instant::now();
    loop {
        for chunk in reqs.chunks(512) {
            t.post_writes(chunk)?;
        }
        passes += 1;
        if ticked.elapsed() >= Duration::from_secs(1) {
            t.send_message(TICK)?;
            ticked = Instant::now();
        }
        let el = start.elapsed();
        pb.set_position((el.as_secs_f64() * 10.0) as u64);
        pb.set_message(format!("{:.2} GB/s", (passes * cst.pages * ps) as f64 / el.as_secs_f64().max(1e-9) / 1e9));
        if el >= dur {
            break;
        }
    }
    t.flush()?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    pb.finish_and_clear();
    let stats = t.stats();
    let sum = region_checksum(&r);
    t.send_message(format!("CHECK {sum}").as_bytes())?;
    let reply = t.recv_message(Some(Duration::from_secs(120)))?.context("no checksum verdict from the destination")?;
    let reply = String::from_utf8_lossy(&reply).to_string();
    let mut it = reply.split_whitespace();
    let verdict = it.next().unwrap_or("");
    let _their_sum = it.next();
    let rcpu: f64 = it.next().and_then(|c| c.parse().ok()).unwrap_or(f64::NAN);
    let bytes = passes * cst.pages * ps;
    Ok(BenchReport {
        kind: kind.name,
        transport: tkind.to_string(),
        transport_note: note,
        region_bytes: size,
        page_size: ps,
        pattern: a.pattern.to_string(),
        dirty_pages: cst.pages,
        passes,
        seconds: secs,
        bytes,
        gbytes_per_s: bytes as f64 / secs / 1e9,
        gbits_per_s: bytes as f64 * 8.0 / secs / 1e9,
        pages_per_s: (passes * cst.pages) as f64 / secs,
        work_requests: stats.writes_posted,
        coalescing_ratio: cst.ratio(),
        sender_cpu_s: cpu,
        receiver_cpu_s: rcpu,
        window_stalls: stats.window_stalls,
        memcpy_gbytes_per_s: memcpy,
        checksum_match: verdict == "OK",
        checksum: sum,
    })
}

fn print_report(r: &BenchReport) {
    println!("livemig bench {} — {} ({})", r.kind, r.transport, r.transport_note);
    println!(
        "  region {} MiB, {} B {}, pattern {}, {} dirty per pass, {} passes in {:.2} s",
        r.region_bytes >> 20,
        r.page_size,
        if r.kind == "chunks" { "chunks" } else { "pages" },
        r.pattern,
        r.dirty_pages,
        r.passes,
        r.seconds
    );
    println!("  throughput {:.3} GB/s = {:.2} Gb/s, {:.0} {}/s", r.gbytes_per_s, r.gbits_per_s, r.pages_per_s, r.kind);
    println!(
        "  work requests {}, coalescing {:.2} {} per request, window stalls {}",
        r.work_requests, r.coalescing_ratio, r.kind, r.window_stalls
    );
    println!(
        "  CPU: sender {:.2} s ({:.0}%), receiver {:.2} s ({:.0}%)",
        r.sender_cpu_s,
        100.0 * r.sender_cpu_s / r.seconds,
        r.receiver_cpu_s,
        100.0 * r.receiver_cpu_s / r.seconds
    );
    println!("  memcpy ceiling (1 thread): {:.2} GB/s", r.memcpy_gbytes_per_s);
    println!(
        "  checksum {} ({})",
        &r.checksum[..16],
        if r.checksum_match { "destination matches source" } else { "MISMATCH" }
    );
}
