//! `livemig image push|ls|serve|clone|commit|export`.
//!
//! A served image is a mirror (the storage crate's mirroring module) whose base is a version
//! in the repository: reads fetch whole chunks on first touch, writes stay in the local file.
//! The local file is bound to the image version it mirrors (`FILE.lmimage`, beside
//! `FILE.lmmeta`); CLONE rebinds it to a new image and COMMIT turns its modified chunks into
//! the bound image's next version, then marks them clean.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use livemig_storage::cli::control::{self, CloneRequest, Request, Snapshots};
use livemig_storage::cli::ExportArgs as NbdExportArgs;
use livemig_storage::live::source::SourceDisk;
use livemig_storage::mirror::Mirror;

use crate::base::{FetchStats, RepoBase};
use crate::manifest::{parse_ref, Manifest, VersionRef};
use crate::repo::{Repo, WriteSummary};

/// Where the repository is.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArg {
    /// The repository: a directory (created if missing), or `s3://BUCKET[/PREFIX]` configured
    /// by the AWS environment (AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION).
    #[arg(long, env = "LIVEMIG_REPO", default_value = "/var/lib/livemig/images")]
    pub repo: String,
}

impl RepoArg {
    fn open(&self) -> Result<Repo> {
        Repo::open(&self.repo).with_context(|| format!("the repository {}", self.repo))
    }
}

/// `image push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// A raw image file.
    pub file: PathBuf,
    /// The new image's name.
    pub name: String,
    /// Chunk size: a power of two from 4K to 64M (the paper measured 256K, 512K, 1M).
    #[arg(long, value_parser = livemig_app::args::parse_size, default_value = "256K")]
    pub chunk_size: u64,
    /// Bytes of chunks per stored object (at least one chunk). Larger: fewer objects and
    /// writes; smaller: cheaper reads on stores whose cost grows with the object's size.
    #[arg(long, value_parser = livemig_app::args::parse_size, default_value = "4M")]
    pub pack_size: u64,
    #[command(flatten)]
    pub repo: RepoArg,
    /// One JSON object on stdout, no progress bar.
    #[arg(long)]
    pub json: bool,
}

/// `image ls`.
#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    /// List the versions of this image only.
    pub name: Option<String>,
    #[command(flatten)]
    pub repo: RepoArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `image export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// NAME or NAME@VERSION (the latest version if none is given).
    pub image: String,
    /// The raw image file to write (replaced only once it is whole).
    pub file: PathBuf,
    #[command(flatten)]
    pub repo: RepoArg,
    /// One JSON object on stdout, no progress bar.
    #[arg(long)]
    pub json: bool,
}

/// A served disk reached through the host daemon (`livemig serve` with `[[images]]`).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArg {
    /// The host daemon serving the disk (`HOST:PORT`); with --disk.
    #[arg(long, value_name = "ADDR", requires = "disk", conflicts_with = "control")]
    pub daemon: Option<String>,
    /// The disk's name in the daemon's configuration.
    #[arg(long, value_name = "NAME", requires = "daemon")]
    pub disk: Option<String>,
    /// Shared-secret file for the daemon (else $LIVEMIG_SECRET).
    #[arg(long, value_name = "FILE", requires = "daemon")]
    pub secret_file: Option<PathBuf>,
}

/// Sends `req` for the disk `a.disk` to the daemon at `a.daemon`; returns the `return` value.
fn daemon_call(a: &DaemonArg, req: &Request) -> Result<serde_json::Value> {
    use livemig_app::open;
    let (addr, disk) = (a.daemon.as_deref().expect("clap"), a.disk.as_deref().expect("clap"));
    let secret =
        livemig_transport::auth::Secret::load(a.secret_file.as_deref()).context("loading the shared secret")?;
    let table = livemig_transport::RegionTable::new();
    let opts =
        livemig_app::precopy::transport_options(livemig_engine::connect::TransportChoice::Tcp, Duration::from_secs(30));
    let mut t = livemig_engine::connect::connect(livemig_transport::TransportKind::Tcp, addr, &opts, &secret, &table)
        .with_context(|| format!("connecting to the daemon at {addr}"))?;
    let r = open::OpenRequest {
        version: open::OPEN_VERSION,
        service: open::Service::DiskControl,
        size: 0,
        page_size: 0,
        after_s: 0.0,
        disk: disk.to_string(),
        request: Some(serde_json::to_value(req).expect("a request serialises")),
    };
    open::open(t.as_mut(), &r, opts.io_timeout)?;
    let m = t
        .recv_message(Some(CONTROL_WAIT))
        .context("waiting for the daemon's answer")?
        .with_context(|| format!("the daemon did not answer within {CONTROL_WAIT:?}"))?;
    let v: serde_json::Value = serde_json::from_slice(&m).context("the daemon's answer")?;
    if let Some(e) = v.get("error") {
        bail!("{} (disk {disk} on {addr})", e.as_str().unwrap_or("?"));
    }
    Ok(v.get("return").cloned().unwrap_or_default())
}

/// `image clone`.
#[derive(Debug, Clone, clap::Args)]
pub struct CloneArgs {
    /// NAME or NAME@VERSION to clone. With --control, the image the served disk is bound to.
    pub image: String,
    /// The new image's name.
    pub new: String,
    /// The control socket of an `image serve`: the served disk's local modifications are
    /// bound to the new image (the next COMMIT writes them there).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub daemon: DaemonArg,
    #[command(flatten)]
    pub repo: RepoArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `image commit`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["control", "local", "daemon"])))]
pub struct CommitArgs {
    /// The image the disk is bound to (checked).
    pub name: String,
    /// The control socket of an `image serve` (writes wait while the commit runs; reads of
    /// local bytes go on).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The local file of a disk that is not being served.
    #[arg(long, value_name = "FILE")]
    pub local: Option<PathBuf>,
    #[command(flatten)]
    pub daemon: DaemonArg,
    #[command(flatten)]
    pub repo: RepoArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `image serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// NAME or NAME@VERSION (the latest version if none is given).
    pub image: String,
    /// The local file holding fetched and written chunks (created sparse if missing; its
    /// state and binding are kept beside it, so a restart takes up where it stopped).
    #[arg(long, value_name = "FILE")]
    pub local: PathBuf,
    /// Where and how it is exported; its control socket also takes `image clone|commit
    /// --control`.
    #[command(flatten)]
    pub export: NbdExportArgs,
    #[command(flatten)]
    pub repo: RepoArg,
    /// Serve whatever image the local file is bound to, even if that is not `image` (a
    /// daemon whose instances were cloned since its configuration was written).
    #[arg(skip)]
    pub follow_binding: bool,
}

fn bar(len: u64, hide: bool, what: &str) -> ProgressBar {
    if hide || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// `livemig image push`.
pub fn run_push(a: &PushArgs) -> Result<()> {
    let chunk = u32::try_from(a.chunk_size).ok().filter(|c| c.is_power_of_two()).unwrap_or(0);
    let repo = a.repo.open()?;
    let size = std::fs::metadata(&a.file).with_context(|| format!("{}", a.file.display()))?.len();
    let b = bar(size, a.json, "push");
    let t = Instant::now();
    let (m, s) = repo.push(&a.file, &a.name, chunk, a.pack_size.max(1), &mut |n| b.set_position(n))?;
    b.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "summary": s, "size": m.size, "chunk_size": m.chunk_size, "seconds": secs })
        );
    } else {
        println!(
            "pushed {} as {}: {} chunks of {} KiB ({} stored, {} zero), {} packs, {:.1} MiB written in {:.2} s",
            a.file.display(),
            s.image,
            m.len(),
            m.chunk_size >> 10,
            s.chunks_written,
            s.zero_chunks,
            s.packs_written,
            mib(s.bytes_written),
            secs
        );
    }
    Ok(())
}

/// `livemig image ls`.
pub fn run_ls(a: &LsArgs) -> Result<()> {
    let repo = a.repo.open()?;
    let mut rows = Vec::new();
    match &a.name {
        Some(n) => {
            let (name, _) = parse_ref(n).map_err(anyhow::Error::msg)?;
            let vs = repo.versions(&name)?;
            if vs.is_empty() {
                bail!("no image {name:?} in {}", repo.url());
            }
            for v in vs {
                rows.push(repo.manifest(&name, Some(v))?);
            }
        }
        None => {
            for name in repo.images()? {
                rows.push(repo.manifest(&name, None)?);
            }
        }
    }
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name, "version": m.version, "size": m.size, "chunk_size": m.chunk_size,
                    "chunks": m.len(), "stored_chunks": m.chunks.iter().flatten().count(),
                    "parent": m.parent.as_ref().map(|p| p.to_string()), "made_by": m.made_by,
                    "created_unix": m.created_unix,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "repo": repo.url(), "images": v }));
        return Ok(());
    }
    println!("{:<24} {:>5} {:>10} {:>7} {:>8} {:<8} parent", "image", "ver", "size MiB", "chunk", "stored", "made by");
    for m in &rows {
        println!(
            "{:<24} {:>5} {:>10.1} {:>6}K {:>8} {:<8} {}",
            m.name,
            m.version,
            mib(m.size),
            m.chunk_size >> 10,
            m.chunks.iter().flatten().count(),
            m.made_by,
            m.parent.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

/// `livemig image export`.
pub fn run_export(a: &ExportArgs) -> Result<()> {
    let (name, ver) = parse_ref(&a.image).map_err(anyhow::Error::msg)?;
    let repo = a.repo.open()?;
    let m = repo.manifest(&name, ver)?;
    let b = bar(m.size, a.json, "export");
    let t = Instant::now();
    let fetched = repo.export(&m, &a.file, &mut |n| b.set_position(n))?;
    b.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "image": m.id().to_string(), "size": m.size, "fetched": fetched, "seconds": secs })
        );
    } else {
        println!(
            "exported {} to {}: {:.1} MiB, {:.1} MiB fetched, {:.2} s",
            m.id(),
            a.file.display(),
            mib(m.size),
            mib(fetched),
            secs
        );
    }
    Ok(())
}

/// What a local file is bound to (`FILE.lmimage`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The repository it was opened from.
    pub repo: String,
    /// The image version the local state is relative to.
    pub image: VersionRef,
}

/// The binding path beside `local`.
pub fn binding_path(local: &Path) -> PathBuf {
    let mut p = local.as_os_str().to_owned();
    p.push(".lmimage");
    PathBuf::from(p)
}

fn load_binding(local: &Path) -> Result<Option<Binding>> {
    let p = binding_path(local);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Writes the binding atomically (temporary file, fsync, rename).
fn save_binding(local: &Path, b: &Binding) -> Result<()> {
    let p = binding_path(local);
    let tmp = p.with_extension("lmimage.tmp");
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    use std::io::Write;
    (&f).write_all(&serde_json::to_vec(b).expect("a binding serialises"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// Opens the mirror of `name[@ver]` in `local`, taking up an earlier binding; returns the
/// mirror and the manifest it mirrors.
fn open_bound(
    repo: &Arc<Repo>,
    local: &Path,
    name: &str,
    ver: Option<u32>,
    fetched: &Arc<FetchStats>,
    follow: bool,
) -> Result<(Mirror, Manifest)> {
    let bound = load_binding(local)?;
    let m = match &bound {
        Some(b) => {
            if follow && b.image.name != name {
                eprintln!("{}: serving {}, which it is bound to (configured: {name})", local.display(), b.image);
            } else if b.image.name != name || ver.is_some_and(|v| v != b.image.version) {
                bail!(
                    "{} holds the local state of {}; serve {} (or {}) from it, or give another --local",
                    local.display(),
                    b.image,
                    b.image.name,
                    b.image
                );
            }
            repo.manifest(&b.image.name, Some(b.image.version))?
        }
        None => {
            if livemig_storage::mirror::meta_path(local).exists() {
                bail!(
                    "{} holds a mirror's state that is bound to no image ({} is missing); give another --local",
                    local.display(),
                    binding_path(local).display()
                );
            }
            repo.manifest(name, ver)?
        }
    };
    let base = RepoBase::new(repo.clone(), m.clone(), fetched.clone());
    let mirror = Mirror::open(Box::new(base), local, m.chunk_size)
        .with_context(|| format!("opening the local file {}", local.display()))?;
    if bound.is_none() {
        save_binding(local, &Binding { repo: repo.url().to_string(), image: m.id() })?;
    }
    Ok((mirror, m))
}

/// COMMIT of `mirror` (bound to `cur` in `local`): the modified chunks become `cur`'s next
/// version; the binding moves to it and the chunks are marked clean.
fn commit_mirror(
    repo: &Arc<Repo>,
    cur: &Manifest,
    mirror: &Mirror,
    local: &Path,
    fetched: &Arc<FetchStats>,
) -> Result<(Manifest, WriteSummary)> {
    let frozen = mirror.freeze()?;
    let mods = frozen.modified();
    let (m, s) = repo.commit(cur, &mods, &mut |c, buf| frozen.read_chunk(c, buf).map_err(|e| e.to_string()))?;
    // The version is published: whatever fails from here on is reported, and the disk moves
    // on to it regardless (else every later commit would conflict with it). A crash from here
    // on leaves at worst the same changes committed again as a later version: the binding
    // moves before the chunks are marked clean.
    if let Err(e) = save_binding(local, &Binding { repo: repo.url().to_string(), image: m.id() }) {
        tracing::warn!(error = %format!("{e:#}"), image = %m.id(), "committed, but the binding was not saved");
    }
    if let Err(e) = frozen.finish(Box::new(RepoBase::new(repo.clone(), m.clone(), fetched.clone()))) {
        tracing::warn!(error = %e, image = %m.id(), "committed, but the disk state was not saved");
    }
    Ok((m, s))
}

/// A served image disk: CLONE and COMMIT for the control socket.
#[derive(Debug)]
struct Instance {
    repo: Arc<Repo>,
    local: PathBuf,
    current: Mutex<Manifest>,
    fetched: Arc<FetchStats>,
}

impl Snapshots for Instance {
    fn clone_to(&self, disk: &SourceDisk, req: &CloneRequest) -> Result<serde_json::Value, String> {
        disk.exclusive(|_| {
            let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(want) = &req.from {
                if *want != cur.name {
                    return Err(format!("the disk is bound to {}, not {want}", cur.id()));
                }
            }
            let t = Instant::now();
            let m = self.repo.clone_image(&cur, &req.name).map_err(|e| e.to_string())?;
            // The new image reads exactly as the old one: only the binding changes.
            save_binding(&self.local, &Binding { repo: self.repo.url().to_string(), image: m.id() })
                .map_err(|e| format!("{e:#}"))?;
            let from = cur.id();
            *cur = m;
            Ok(serde_json::json!({
                "image": cur.id().to_string(), "from": from.to_string(), "seconds": t.elapsed().as_secs_f64(),
            }))
        })?
    }

    fn commit(&self, disk: &SourceDisk, name: Option<&str>) -> Result<serde_json::Value, String> {
        disk.exclusive(|mirror| {
            let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(want) = name {
                if want != cur.name {
                    return Err(format!("the disk is bound to {}, not {want}", cur.id()));
                }
            }
            let t = Instant::now();
            let (m, s) =
                commit_mirror(&self.repo, &cur, mirror, &self.local, &self.fetched).map_err(|e| format!("{e:#}"))?;
            *cur = m;
            let mut v = serde_json::to_value(&s).expect("a summary serialises");
            v["seconds"] = t.elapsed().as_secs_f64().into();
            Ok(v)
        })?
    }
}

/// Opens `image serve`'s disk and starts serving it; returns what is served and the counter of
/// bytes fetched from the repository.
pub fn start_serve(a: &ServeArgs) -> Result<(livemig_storage::cli::Served, Arc<FetchStats>)> {
    let (name, ver) = parse_ref(&a.image).map_err(anyhow::Error::msg)?;
    let repo = Arc::new(a.repo.open()?);
    let fetched = Arc::new(FetchStats::default());
    let (mirror, m) = open_bound(&repo, &a.local, &name, ver, &fetched, a.follow_binding)?;
    let inst = Arc::new(Instance { repo, local: a.local.clone(), current: Mutex::new(m), fetched: fetched.clone() });
    let description = format!("livemig disk {}", a.local.display());
    Ok((livemig_storage::cli::start_with(&a.export, description, mirror, Some(inst))?, fetched))
}

/// `livemig image serve`: prints `listening ADDR|PATH nbd IMAGE` first on stdout, serves
/// until SIGINT/SIGTERM, then saves the local state and exits.
pub fn run_serve(a: &ServeArgs) -> Result<()> {
    let (served, fetched) = start_serve(a)?;
    let bound = load_binding(&a.local)?.map(|b| b.image.to_string()).unwrap_or_default();
    println!("listening {} nbd {bound}", served.endpoint);
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut signals = signal_hook_iter()?;
    let sig = signals.forever().next().unwrap_or(0);
    let summary = served.stop()?;
    eprintln!(
        "image serve: stopped on signal {sig}; {summary}; {} ({} bytes of the disk filled from its base)",
        fetched.summary(),
        served.disk.fetched_bytes()
    );
    Ok(())
}

fn signal_hook_iter() -> Result<signal_hook::iterator::Signals> {
    signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("installing signal handlers")
}

fn control_call(c: Option<&Path>, d: &DaemonArg, req: &Request, json: bool, what: &str) -> Result<()> {
    let r = match c {
        Some(c) => control::call(c, req, CONTROL_WAIT).with_context(|| format!("{what} through {}", c.display()))?,
        None => daemon_call(d, req).with_context(|| format!("{what} through the daemon"))?,
    };
    if json {
        println!("{r}");
    } else {
        print_summary(what, &r);
    }
    Ok(())
}

fn print_summary(what: &str, r: &serde_json::Value) {
    let s = |k: &str| r.get(k).map(|x| x.to_string().trim_matches('"').to_string()).unwrap_or_default();
    match what {
        "clone" => println!("cloned {} as {} in {:.3} s", s("from"), s("image"), r["seconds"].as_f64().unwrap_or(0.0)),
        _ => println!(
            "committed {}: {} chunks in {} packs ({} zero chunks), {:.2} MiB written, {:.3} s",
            s("image"),
            s("chunks_written"),
            s("packs_written"),
            s("zero_chunks"),
            mib(r["bytes_written"].as_u64().unwrap_or(0)),
            r["seconds"].as_f64().unwrap_or(0.0)
        ),
    }
}

/// Longest a clone or commit request waits for its reply.
const CONTROL_WAIT: Duration = Duration::from_secs(3600);

/// `livemig image clone`.
pub fn run_clone(a: &CloneArgs) -> Result<()> {
    let (name, ver) = parse_ref(&a.image).map_err(anyhow::Error::msg)?;
    if a.control.is_some() || a.daemon.daemon.is_some() {
        if ver.is_some() {
            bail!("a served disk's own version is cloned: give NAME, not NAME@VERSION");
        }
        let req = Request::Clone(CloneRequest { name: a.new.clone(), from: Some(name) });
        return control_call(a.control.as_deref(), &a.daemon, &req, a.json, "clone");
    }
    let repo = a.repo.open()?;
    let t = Instant::now();
    let from = repo.manifest(&name, ver)?;
    let m = repo.clone_image(&from, &a.new)?;
    let r = serde_json::json!({
        "image": m.id().to_string(), "from": from.id().to_string(), "seconds": t.elapsed().as_secs_f64(),
    });
    if a.json {
        println!("{r}");
    } else {
        print_summary("clone", &r);
    }
    Ok(())
}

/// `livemig image commit`.
pub fn run_commit(a: &CommitArgs) -> Result<()> {
    let (name, ver) = parse_ref(&a.name).map_err(anyhow::Error::msg)?;
    if ver.is_some() {
        bail!("a commit makes the next version of the image the disk is bound to: give NAME, not NAME@VERSION");
    }
    if a.control.is_some() || a.daemon.daemon.is_some() {
        let req = Request::Commit(control::CommitRequest { name: Some(name) });
        return control_call(a.control.as_deref(), &a.daemon, &req, a.json, "commit");
    }
    let local = a.local.as_ref().expect("clap requires --control, --local or --daemon");
    let Some(b) = load_binding(local)? else {
        bail!("{} is bound to no image ({} is missing)", local.display(), binding_path(local).display())
    };
    if b.image.name != name {
        bail!("{} is bound to {}, not {name}", local.display(), b.image);
    }
    let repo = Arc::new(a.repo.open()?);
    let fetched = Arc::new(FetchStats::default());
    let (mirror, cur) = open_bound(&repo, local, &name, None, &fetched, false)?;
    let t = Instant::now();
    let (_, s) = commit_mirror(&repo, &cur, &mirror, local, &fetched)?;
    let mut r = serde_json::to_value(&s).expect("a summary serialises");
    r["seconds"] = t.elapsed().as_secs_f64().into();
    if a.json {
        println!("{r}");
    } else {
        print_summary("commit", &r);
    }
    Ok(())
}
