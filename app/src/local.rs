//! `livemig migrate --local`: both ends on this machine, in two processes.
//!
//! Without `--link` the destination is a child process (`livemig receive` on loopback) and
//! this process is the source. With `--link RATE` each end runs in its own network namespace
//! (created here, unique per process id) joined by a veth pair, both ends shaped with a tc
//! token bucket filter; the source is re-executed inside its namespace so that the workload,
//! the tracker and the sender live in one process, as on a real host. The namespaces (and
//! with them the veth pair) are deleted on every exit path: by a drop guard on returns and
//! errors, and by the [`cleanup`](crate::cleanup) thread on SIGINT, SIGTERM or SIGHUP, which
//! also stops the child processes. Only these namespaces carry the migration traffic; no host
//! interface is touched.
//!
//! The destination child gets the source's `--io-timeout` and `--no-progress` (the source
//! draws the only progress bar on the shared terminal); the re-executed source gets all of
//! its flags back through [`MigrateArgs::source_argv`].

use std::io::BufRead;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use livemig_transport::auth::SECRET_ENV;

use crate::args::{transport_arg, ChildSecret};
use crate::cleanup;
use crate::precopy::{run_source, MigrateArgs};

/// A tc rate like `1gbit`, `10gbit`, `500mbit`, `100kbit` in bits per second.
pub fn parse_rate(s: &str) -> Result<u64> {
    let l = s.trim().to_ascii_lowercase();
    let (num, mul) = if let Some(n) = l.strip_suffix("gbit") {
        (n, 1_000_000_000u64)
    } else if let Some(n) = l.strip_suffix("mbit") {
        (n, 1_000_000)
    } else if let Some(n) = l.strip_suffix("kbit") {
        (n, 1_000)
    } else if let Some(n) = l.strip_suffix("bit") {
        (n, 1)
    } else {
        bail!("link rate {s:?}: use e.g. 1gbit, 10gbit, 500mbit");
    };
    let n: f64 = num.parse().with_context(|| format!("link rate {s:?}"))?;
    if n.is_nan() || n <= 0.0 {
        bail!("link rate {s:?} must be positive");
    }
    Ok((n * mul as f64) as u64)
}

/// Runs `--local` (see the module doc).
pub fn run(a: &MigrateArgs) -> Result<()> {
    // Both ends share --secret-file if given, else a random secret made here.
    let secret = ChildSecret::new(a.secret_file.as_deref()).context("loading the shared secret")?;
    cleanup::install()?;
    match &a.link {
        None => {
            let mut dst = spawn_dest(a, None, "127.0.0.1:0", &secret)?;
            let res = run_source(a, &dst.addr, secret.secret());
            finish(res, &mut dst.child)
        }
        Some(rate) => {
            let bps = parse_rate(rate)?;
            let net = Netns::create(bps)?;
            let mut dst = spawn_dest(a, Some(&net.dst), &format!("{}:0", net.dst_ip), &secret)?;
            let exe = std::env::current_exe()?;
            eprintln!(
                "link: veth {} <-> {} in netns {} / {}, shaped to {rate} with tc tbf (urgent traffic first)",
                net.veth_src, net.veth_dst, net.src, net.dst
            );
            let mut src = Command::new("ip");
            // source_argv carries --secret-file itself; a random secret goes in the environment.
            src.args(["netns", "exec", &net.src]).arg(exe).args(a.source_argv(&dst.addr)).stdin(Stdio::null());
            if let Some(h) = secret.env_value() {
                src.env(SECRET_ENV, h);
            }
            let mut child =
                cleanup::OwnedChild::spawn(&mut src).context("starting the source process in its namespace")?;
            let status = child.wait().context("waiting for the source process")?;
            if !status.success() {
                cleanup::yield_to_signal();
            }
            let res =
                if status.success() { Ok(()) } else { Err(anyhow::anyhow!("the source process failed: {status}")) };
            finish(res, &mut dst.child)
        }
    }
}

/// Waits for (or, when the source failed, stops) the destination child.
fn finish(res: Result<()>, child: &mut cleanup::OwnedChild) -> Result<()> {
    if res.is_err() {
        cleanup::yield_to_signal();
        // The source already reported; give the destination a moment to see the abort.
        for _ in 0..50 {
            if child.try_wait()?.is_some() {
                return res;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.child().kill();
        let _ = child.wait();
        return res;
    }
    let st = child.wait()?;
    if !st.success() {
        cleanup::yield_to_signal();
        bail!("the destination process failed: {st}");
    }
    Ok(())
}

/// The destination child; stopped if still running when dropped.
struct Dest {
    child: cleanup::OwnedChild,
    addr: String,
}

fn spawn_dest(a: &MigrateArgs, netns: Option<&str>, listen: &str, secret: &ChildSecret) -> Result<Dest> {
    let exe = std::env::current_exe()?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args(["receive", "--listen", listen, "--size", &a.size.to_string()])
        .args(["--page-size", &a.page_size.to_string(), "--transport", transport_arg(a.transport)])
        .args(["--after", &a.after.to_string(), "--io-timeout", &a.io_timeout.to_string()])
        .args(["--recover-within", &a.recover_within.to_string()])
        .args(crate::args::tls_child_args())
        // The source draws the only progress bar on the shared terminal.
        .arg("--no-progress")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if a.json {
        cmd.arg("--json");
    }
    secret.apply(&mut cmd);
    let mut child = cleanup::OwnedChild::spawn(&mut cmd).context("starting the destination process")?;
    let out = child.child().stdout.take().context("destination stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    let Some(addr) = line.split_whitespace().nth(1).map(str::to_string) else {
        // Almost always the child refused its arguments and said why on the shared stderr.
        let _ = child.child().kill();
        let st = child.wait()?;
        bail!("the destination process ended before listening ({st}); its error is above");
    };
    Ok(Dest { child, addr })
}

/// Two namespaces joined by a shaped veth pair; deleted on drop.
#[derive(Debug)]
struct Netns {
    src: String,
    dst: String,
    veth_src: String,
    veth_dst: String,
    dst_ip: String,
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    fn create(bits_per_sec: u64) -> Result<Netns> {
        let pid = std::process::id();
        let k = pid % 250 + 1;
        let mut n = Netns {
            src: format!("livemig-src-{pid}"),
            dst: format!("livemig-dst-{pid}"),
            veth_src: format!("lmS{pid}"),
            veth_dst: format!("lmD{pid}"),
            dst_ip: format!("10.77.{k}.2"),
            created: Vec::new(),
        };
        for ns in [n.src.clone(), n.dst.clone()] {
            ip(&["netns", "add", &ns]).context("creating a network namespace (needs root)")?;
            cleanup::register_namespace(&ns);
            n.created.push(ns);
        }
        ip(&[
            "link",
            "add",
            &n.veth_src,
            "netns",
            &n.src,
            "type",
            "veth",
            "peer",
            "name",
            &n.veth_dst,
            "netns",
            &n.dst,
        ])?;
        // Token bucket: burst of ~10 ms at the rate (at least 64 KiB for GSO segments).
        let rate = format!("{bits_per_sec}bit");
        let burst = (bits_per_sec / 8 / 100).max(64 << 10).to_string();
        for (ns, dev, addr) in
            [(&n.src, &n.veth_src, format!("10.77.{k}.1/24")), (&n.dst, &n.veth_dst, format!("10.77.{k}.2/24"))]
        {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // The shaper's queue is a `pfifo_fast`: packets of the urgent connection (socket
            // priority 6) leave from its first band, before the bulk streams'. It holds
            // txqueuelen packets, set to ~50 ms at the rate in 64 KiB segments, as tbf's
            // own queue held 50 ms.
            let qlen = (bits_per_sec / 8 / 20 / (64 << 10)).clamp(16, 10_000).to_string();
            ip(&["-n", ns, "link", "set", dev, "txqueuelen", &qlen])?;
            let tc = [
                vec!["qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", &rate, "burst", &burst]
                    .into_iter()
                    .chain(["latency", "50ms"])
                    .collect::<Vec<&str>>(),
                vec!["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "pfifo_fast"],
            ];
            for args in tc {
                let out =
                    Command::new("ip").args(["netns", "exec", ns, "tc"]).args(&args).output().context("running tc")?;
                if !out.status.success() {
                    bail!("tc {} on {dev} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        }
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                tracing::warn!(error = %e, "cleaning up the network namespaces");
            }
            cleanup::forget_namespace(&ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("10Gbit").unwrap(), 10_000_000_000);
        assert_eq!(parse_rate("2.5gbit").unwrap(), 2_500_000_000);
        assert_eq!(parse_rate("500mbit").unwrap(), 500_000_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0gbit").is_err());
    }
}
