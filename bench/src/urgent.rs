//! `livemig bench urgent`: how long a 4 KiB demand page takes while a bulk push saturates
//! the link — the latency a post-copy fault sees. Both ends run in this process over
//! loopback, TCP (an urgent connection) or verbs (an urgent queue pair); three phases in
//! one run:
//!
//! 1. bulk alone: the bulk throughput baseline;
//! 2. urgent channel: the receiver asks for pages on the session's urgent channel (its own
//!    connection), a responder thread at the sender answers each with an urgent write, and
//!    the receiver times request → placement;
//! 3. bulk channel (no priority channel, as plain post-copy does): the same requests travel
//!    as ordinary messages; the sender serves them between bulk batches with a bulk write
//!    followed by a message, and the receiver times request → that message.
//!
//! Percentiles are printed, never asserted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use livemig_engine::connect::{self, Listener, TransportChoice, TransportOptions};
use livemig_transport::auth::Secret;
use livemig_transport::{
    Access, CoalesceConfig, Coalescer, PageBitmap, Region, RegionTable, Segment, TcpConfig, Transport, TransportKind,
    UrgentEvent, WriteRequest,
};

use crate::pages::parse_size;

/// `bench urgent` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct UrgentArgs {
    /// Region size (bulk pushes the first half, urgent pages come from the second).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// Demand requests per phase.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Pause between two requests, microseconds.
    #[arg(long, default_value_t = 500)]
    pub gap_us: u64,
    /// Seconds of bulk alone (the throughput baseline).
    #[arg(long, default_value_t = 2.0)]
    pub bulk_secs: f64,
    /// SO_SNDBUF/SO_RCVBUF of every stream (default: kernel autotuning).
    #[arg(long, value_parser = parse_size)]
    pub sock_buf: Option<u64>,
    /// Parallel bulk TCP streams.
    #[arg(long, default_value_t = 1)]
    pub streams: u8,
    /// Reserve this CPU for the urgent path: the requester and the responder run on it, the
    /// bulk threads (senders, readers, acknowledgers) on every other CPU. Without it all
    /// threads share all CPUs, and a woken urgent thread may wait for a CPU behind the bulk.
    #[arg(long)]
    pub urgent_cpu: Option<usize>,
    /// Backend: tcp (loopback), verbs (the first active RDMA device, over 127.0.0.1), or
    /// auto (verbs when a device is active).
    #[arg(long, default_value = "tcp", value_parser = livemig_app::args::transport_parser())]
    pub transport: TransportChoice,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Latency figures of one phase, microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    /// Phase name.
    pub mode: &'static str,
    /// Requests served.
    pub requests: usize,
    /// Median request → page time.
    pub p50_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
    /// Maximum.
    pub max_us: Option<f64>,
    /// Bulk throughput during the phase, Gbit/s.
    pub bulk_gbit_s: f64,
}

fn percentile(sorted: &[Duration], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(sorted[i].as_secs_f64() * 1e6)
}

fn phase(mode: &'static str, mut t: Vec<Duration>, bulk_bytes: u64, secs: f64) -> Phase {
    t.sort();
    Phase {
        mode,
        requests: t.len(),
        p50_us: percentile(&t, 0.50),
        p99_us: percentile(&t, 0.99),
        max_us: t.last().map(|d| d.as_secs_f64() * 1e6),
        bulk_gbit_s: bulk_bytes as f64 * 8.0 / secs.max(1e-9) / 1e9,
    }
}

struct Ends {
    tx: Box<dyn Transport>,
    rx: Box<dyn Transport>,
    src: Arc<Region>,
    _keep: (RegionTable, RegionTable, Vec<livemig_transport::Registration>),
}

fn connect(a: &UrgentArgs) -> Result<Ends> {
    let src = Arc::new(Region::anonymous(1, a.size, 4096, Access::LOCAL)?);
    let dst = Arc::new(Region::anonymous(2, a.size, 4096, Access::REMOTE_WRITE)?);
    // Touch the source so the bulk moves real pages.
    for p in 0..(a.size / 4096) {
        src.write_at(p * 4096, &p.to_le_bytes());
    }
    let (st, dt) = (RegionTable::new(), RegionTable::new());
    let regs = vec![st.register(src.clone())?, dt.register(dst.clone())?];
    let secret = Secret::new(Secret::generate_hex()?).context("secret")?;
    let cfg = TcpConfig {
        urgent_stream: true,
        streams: std::num::NonZeroU8::new(a.streams.max(1)).context("streams")?,
        socket_buffer: a.sock_buf.map(|b| b as usize),
        ..Default::default()
    };
    let kind = connect::resolve(a.transport).0;
    let opts =
        TransportOptions { choice: a.transport, io_timeout: cfg.io_timeout, tcp: cfg, verbs: Default::default() };
    let l = Listener::bind(kind, "127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let (o, s, d) = (opts.clone(), secret.clone(), dt.clone());
    let acc = std::thread::spawn(move || l.accept(&o, &s, &d));
    let tx = connect::connect(kind, &addr, &opts, &secret, &st)?;
    let rx = acc.join().map_err(|_| anyhow::anyhow!("the accepting thread panicked"))??;
    Ok(Ends { tx, rx, src, _keep: (st, dt, regs) })
}

/// The page a request names (8 bytes, little endian); an error for anything else.
fn page_of(m: &[u8]) -> Result<u64> {
    let b: [u8; 8] = m.try_into().map_err(|_| anyhow::anyhow!("a {}-byte request (8 expected)", m.len()))?;
    Ok(u64::from_le_bytes(b))
}

/// Pushes the first half of the region over and over until `stop`; returns the bytes moved.
/// Between batches, `between` may serve requests on the bulk channel.
fn bulk(
    t: &mut dyn Transport,
    pages: usize,
    stop: &AtomicBool,
    mut between: impl FnMut(&mut dyn Transport) -> Result<()>,
) -> Result<u64> {
    let co = Coalescer::new(CoalesceConfig::default())?;
    let mut wrs = Vec::new();
    let mut bm = PageBitmap::new(pages);
    bm.set_range(0, pages / 2);
    let mut bytes = 0;
    let mut from = 0;
    while !stop.load(Ordering::SeqCst) {
        // 8 MiB per batch, then a chance to serve requests.
        wrs.clear();
        let (next, st) = co.coalesce_from(&bm, from, 2048, &mut wrs);
        from = if next >= pages / 2 || st.wrs == 0 { 0 } else { next };
        let reqs: Vec<WriteRequest<'_>> = wrs
            .iter()
            .map(|w| WriteRequest { local: 1, segments: &w.segments, remote: 2, remote_offset: w.offset })
            .collect();
        t.post_writes(&reqs)?;
        bytes += wrs.iter().map(|w| w.len).sum::<u64>();
        between(t)?;
    }
    t.flush()?;
    Ok(bytes)
}

fn request_page(i: usize, pages: usize) -> u64 {
    (pages / 2 + (i * 7919) % (pages / 2)) as u64
}

/// The requester of a phase: after the bulk has filled the pipe, `a.requests` requests one
/// at a time (`ask` sends one and waits for its page), timed; then stops the bulk (also when
/// a request fails).
fn requests(
    a: &UrgentArgs,
    pages: usize,
    stop: &AtomicBool,
    mut ask: impl FnMut(u64) -> Result<()>,
) -> Result<Vec<Duration>> {
    std::thread::sleep(Duration::from_millis(200));
    let mut times = Vec::with_capacity(a.requests);
    let mut run = || -> Result<()> {
        for i in 0..a.requests {
            let p = request_page(i, pages);
            let t = Instant::now();
            ask(p)?;
            times.push(t.elapsed());
            std::thread::sleep(Duration::from_micros(a.gap_us));
        }
        Ok(())
    };
    let r = run();
    // Stopped on failure too, or the bulk loop would never end.
    stop.store(true, Ordering::SeqCst);
    r.map(|()| times)
}

/// CPU sets of the two sides with `--urgent-cpu`: (bulk, urgent).
fn cpu_split(a: &UrgentArgs) -> Result<Option<(Vec<usize>, Vec<usize>)>> {
    let Some(u) = a.urgent_cpu else { return Ok(None) };
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("reading this thread's CPU set")?;
    let online: Vec<usize> = (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect();
    anyhow::ensure!(online.contains(&u), "--urgent-cpu {u} is not among the CPUs this process may use {online:?}");
    let bulk: Vec<usize> = online.into_iter().filter(|&c| c != u).collect();
    anyhow::ensure!(!bulk.is_empty(), "--urgent-cpu {u} would leave no CPU for the bulk threads");
    Ok(Some((bulk, vec![u])))
}

/// Restricts the calling thread (and the threads it spawns later) to `cpus`.
fn pin(cpus: &[usize]) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).with_context(|| format!("CPU {c}"))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("restricting a thread to CPUs {cpus:?}"))
}

/// Runs the three phases.
pub fn measure(a: &UrgentArgs) -> Result<Vec<Phase>> {
    let pages = (a.size / 4096) as usize;
    anyhow::ensure!(pages >= 4, "--size must be at least 16 KiB");
    let split = cpu_split(a)?;
    let mut out = Vec::new();
    // The transport's bulk threads inherit the CPU set of the thread that connects.
    let all: Option<Vec<usize>> = split.as_ref().map(|(b, u)| b.iter().chain(u).copied().collect());
    if let Some((bulk, _)) = &split {
        pin(bulk)?;
    }
    let urgent_side = || -> Result<()> {
        match &split {
            Some((_, u)) => pin(u),
            None => Ok(()),
        }
    };

    // 1. Bulk alone.
    let mut e = connect(a)?;
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let bytes = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs_f64(a.bulk_secs));
            stop.store(true, Ordering::SeqCst);
        });
        bulk(e.tx.as_mut(), pages, &stop, |_| Ok(()))
    })?;
    out.push(phase("bulk alone", Vec::new(), bytes, t0.elapsed().as_secs_f64()));
    drop(e);

    // 2. Urgent channel.
    let mut e = connect(a)?;
    let (su, du) = (e.tx.urgent()?, e.rx.urgent()?);
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (bytes, times) = std::thread::scope(|s| -> Result<(u64, Vec<Duration>)> {
        let responder = s.spawn(|| -> Result<()> {
            urgent_side()?;
            for _ in 0..a.requests {
                match su.recv(Some(Duration::from_secs(10)))? {
                    Some(UrgentEvent::Message(m)) => {
                        let p = page_of(&m)?;
                        let seg = [Segment { offset: p * 4096, len: 4096 }];
                        su.post_write(&WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: p * 4096 })?;
                    }
                    other => anyhow::bail!("unexpected urgent event {other:?}"),
                }
            }
            Ok(())
        });
        let requester = s.spawn(|| {
            urgent_side()?;
            requests(a, pages, &stop, |p| {
                du.send_message(&p.to_le_bytes())?;
                match du.recv(Some(Duration::from_secs(10)))? {
                    Some(UrgentEvent::Placed { offset, .. }) if offset == p * 4096 => Ok(()),
                    other => anyhow::bail!("unexpected urgent event {other:?}"),
                }
            })
        });
        let bytes = bulk(e.tx.as_mut(), pages, &stop, |_| Ok(()));
        stop.store(true, Ordering::SeqCst);
        let times = requester.join().map_err(|_| anyhow::anyhow!("requester panicked"))?;
        responder.join().map_err(|_| anyhow::anyhow!("responder panicked"))??;
        Ok((bytes?, times?))
    })?;
    out.push(phase("urgent channel", times, bytes, t0.elapsed().as_secs_f64()));
    drop(e);

    // 3. The same requests on the bulk channel.
    let Ends { mut tx, mut rx, src, _keep } = connect(a)?;
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (bytes, times) = std::thread::scope(|s| -> Result<(u64, Vec<Duration>)> {
        let requester = s.spawn(|| {
            requests(a, pages, &stop, |p| {
                rx.send_message(&p.to_le_bytes())?;
                // The answer: the page as a bulk write, then this message (ordered after it).
                let m = rx.recv_message(Some(Duration::from_secs(30)))?.context("no answer in 30 s")?;
                anyhow::ensure!(m == p.to_le_bytes(), "answer for another page");
                Ok(())
            })
        });
        let _ = &src;
        let bytes = bulk(tx.as_mut(), pages, &stop, |t| {
            while let Some(m) = t.recv_message(Some(Duration::ZERO))? {
                let p = page_of(&m)?;
                let seg = [Segment { offset: p * 4096, len: 4096 }];
                t.post_writes(&[WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: p * 4096 }])?;
                t.send_message(&m)?;
            }
            Ok(())
        });
        stop.store(true, Ordering::SeqCst);
        let times = requester.join().map_err(|_| anyhow::anyhow!("requester panicked"))?;
        Ok((bytes?, times?))
    })?;
    out.push(phase("bulk channel (no priority)", times, bytes, t0.elapsed().as_secs_f64()));
    if let Some(all) = all {
        pin(&all)?;
    }
    Ok(out)
}

/// Entry point of `livemig bench urgent`.
pub fn run(a: &UrgentArgs) -> Result<()> {
    let phases = measure(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&phases)?);
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let over = match connect::resolve(a.transport).0 {
        TransportKind::Tcp => "TCP loopback",
        TransportKind::Verbs => "verbs (RDMA device, 127.0.0.1)",
    };
    println!(
        "urgent 4 KiB page while a bulk push saturates {over} ({} MiB region, {} requests, {} µs apart)",
        a.size >> 20,
        a.requests,
        a.gap_us
    );
    match a.urgent_cpu {
        Some(c) => println!("CPU {c} reserved for the urgent requester and responder; bulk threads on the others"),
        None => println!("all threads share all CPUs (--urgent-cpu reserves one for the urgent path)"),
    }
    println!("{:<28} {:>9} {:>9} {:>9} {:>12}", "mode", "p50 µs", "p99 µs", "max µs", "bulk Gbit/s");
    for p in &phases {
        println!("{:<28} {:>9} {:>9} {:>9} {:>12.1}", p.mode, f(p.p50_us), f(p.p99_us), f(p.max_us), p.bulk_gbit_s);
    }
    if let (Some(u), Some(b)) = (phases[1].p99_us, phases[2].p99_us) {
        println!("p99: urgent channel {:.1}× lower than the bulk channel", b / u.max(1e-9));
    }
    println!(
        "bulk throughput with urgent traffic: {:.2}× bulk alone",
        phases[1].bulk_gbit_s / phases[0].bulk_gbit_s.max(1e-9)
    );
    Ok(())
}
