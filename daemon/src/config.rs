//! The daemon's configuration file (TOML). Every field is optional; unknown fields are an
//! error. `daemon/livemig.toml` is a commented example.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

/// `livemig serve` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// TCP addresses to listen on (`host:port`; port 0 picks one, printed at start).
    pub listen: Vec<String>,
    /// Out-of-band TCP addresses for sessions over RDMA verbs (their queue pairs on the first
    /// RDMA device with an active port); none by default.
    #[serde(default)]
    pub listen_verbs: Vec<String>,
    /// File holding the shared secret (`livemig secret new FILE`); unset: `$LIVEMIG_SECRET`.
    pub secret_file: Option<PathBuf>,
    /// Seconds a connection may take to authenticate, all of its handshake together.
    pub handshake_timeout_s: f64,
    /// Connections authenticating at once, per listen address; more are closed at once.
    pub max_pending_handshakes: usize,
    /// Sessions served at once; a session beyond it is refused with a reason.
    pub max_sessions: usize,
    /// Largest memory (or disk) one session may ask for: bytes, or a size like "16G".
    #[serde(deserialize_with = "size")]
    pub max_session_bytes: u64,
    /// Memory all sessions together may hold: bytes, or a size like "64G". Default: half of
    /// this host's physical memory.
    #[serde(deserialize_with = "size")]
    pub max_total_bytes: u64,
    /// Seconds without progress from a peer after which its session fails.
    pub io_timeout_s: f64,
    /// TLS 1.3 on every connection of every session: `"secret"` (the shared secret, bound to
    /// each TLS session) or `{ certificates = { cert, key, ca } }` (mutual certificates, PEM
    /// files). Unset: the command line's `--tls…` flags, else plain TCP.
    #[serde(default)]
    pub tls: Option<livemig_transport::tls::TlsSettings>,
    /// Seconds a session may last, however busy its peer keeps it (its memory is released
    /// then); 0: no limit. Raise it for very large migrations over slow links.
    pub max_session_s: f64,
    /// Where file-backed regions (chunk benchmarks) are created; memory regions are memfds
    /// and live nowhere in the file system.
    pub region_dir: PathBuf,
    /// Print the daemon's state (sessions, memory held, resident memory, open files) every
    /// this many seconds; 0: never.
    pub stats_every_s: f64,
    /// Disks served over NBD by the daemon (`[[disks]]` tables), as `livemig disk serve`.
    pub disks: Vec<DiskConfig>,
    /// Images from a repository served over NBD by the daemon (`[[images]]` tables), as
    /// `livemig image serve`; `image clone|commit --daemon` reach them by `name`.
    #[serde(default)]
    pub images: Vec<ImageConfig>,
    /// Where disks migrated to this daemon (`disk migrate --to NAME@ADDR`, `migrate --disk
    /// CONTROL=NAME@ADDR`) are kept: `NAME.img`, served over NBD on the unix socket
    /// `NAME.sock` there from the handover on, until the daemon stops. Unset: the daemon
    /// receives no disk.
    #[serde(default)]
    pub receive_disks_dir: Option<PathBuf>,
}

/// One image served by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The instance's name: its NBD export name and how `--daemon` calls name it.
    pub name: String,
    /// `NAME` or `NAME@VERSION` in the repository.
    pub image: String,
    /// The repository (a directory, or `s3://BUCKET/PREFIX` with the AWS environment).
    pub repo: String,
    /// The local file holding fetched and written chunks.
    pub local: PathBuf,
    /// Serve on this unix socket...
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// ...or on this TCP address.
    #[serde(default)]
    pub listen: Option<String>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// A control socket as well (`image clone|commit --control`, `disk migrate`).
    #[serde(default)]
    pub control: Option<PathBuf>,
}

/// One NBD export of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The disk: the local mirror file of `base`/`base_dir`, or a plain image without them.
    pub file: PathBuf,
    /// Read-only base image mirrored lazily.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// Base as a directory of chunks.
    #[serde(default)]
    pub base_dir: Option<PathBuf>,
    /// Chunk size of a new mirror (bytes or a size like "256K").
    #[serde(default = "default_chunk", deserialize_with = "size")]
    pub chunk_size: u64,
    /// Serve on this unix socket...
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// ...or on this TCP address.
    #[serde(default)]
    pub listen: Option<String>,
    /// Export name.
    #[serde(default)]
    pub name: String,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Control socket through which `livemig disk migrate --control PATH` moves the disk
    /// live to another host (none: the disk cannot be migrated).
    #[serde(default)]
    pub control: Option<PathBuf>,
}

fn default_chunk() -> u64 {
    256 << 10
}

fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(size.max(0) as u64)
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: vec!["127.0.0.1:7879".into()],
            listen_verbs: Vec::new(),
            secret_file: None,
            handshake_timeout_s: 10.0,
            max_pending_handshakes: 64,
            max_sessions: 128,
            max_session_bytes: 64 << 30,
            max_total_bytes: (physical_memory() / 2).max(1 << 30),
            io_timeout_s: 20.0,
            max_session_s: 6.0 * 3600.0,
            tls: None,
            region_dir: std::env::temp_dir(),
            stats_every_s: 0.0,
            disks: Vec::new(),
            images: Vec::new(),
            receive_disks_dir: None,
        }
    }
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Spec {
        Bytes(u64),
        Text(String),
    }
    match Spec::deserialize(d)? {
        Spec::Bytes(b) => Ok(b),
        Spec::Text(t) => livemig_app::args::parse_size(&t).map_err(serde::de::Error::custom),
    }
}

impl DaemonConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<DaemonConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: DaemonConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        c.check().with_context(|| format!("checking {}", path.display()))?;
        Ok(c)
    }

    /// Rejects settings that cannot work.
    pub fn check(&self) -> Result<()> {
        if self.listen.is_empty() {
            bail!("listen: give at least one address");
        }
        for (name, v) in [
            ("handshake_timeout_s", self.handshake_timeout_s),
            ("io_timeout_s", self.io_timeout_s),
            ("stats_every_s", self.stats_every_s),
        ] {
            if !(v.is_finite() && (0.0..=86400.0).contains(&v)) {
                bail!("{name} = {v}: must be between 0 and 86400 seconds");
            }
        }
        if !(self.max_session_s.is_finite() && (0.0..=30.0 * 86400.0).contains(&self.max_session_s)) {
            bail!("max_session_s = {}: must be between 0 (no limit) and 30 days", self.max_session_s);
        }
        if self.handshake_timeout_s < 0.001 || self.io_timeout_s < 0.001 {
            bail!("handshake_timeout_s and io_timeout_s must be at least 0.001 s");
        }
        if self.max_pending_handshakes == 0 || self.max_sessions == 0 {
            bail!("max_pending_handshakes and max_sessions must be at least 1");
        }
        if self.max_session_bytes == 0 || self.max_total_bytes == 0 {
            bail!("max_session_bytes and max_total_bytes must be positive");
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.socket.is_some() == d.listen.is_some() {
                bail!("disks[{i}] ({}): give exactly one of socket and listen", d.file.display());
            }
            if d.base.is_some() && d.base_dir.is_some() {
                bail!("disks[{i}] ({}): give at most one of base and base_dir", d.file.display());
            }
        }
        let mut names: std::collections::HashSet<&str> =
            self.disks.iter().map(|d| d.name.as_str()).filter(|n| !n.is_empty()).collect();
        for (i, m) in self.images.iter().enumerate() {
            if m.socket.is_some() == m.listen.is_some() {
                bail!("images[{i}] ({}): give exactly one of socket and listen", m.name);
            }
            if m.name.is_empty() || !names.insert(m.name.as_str()) {
                bail!("images[{i}]: every image needs a name of its own ({:?})", m.name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_example_and_refuses_unknown_fields() {
        let example = include_str!("../livemig.toml");
        let c: DaemonConfig = toml::from_str(example).unwrap();
        c.check().unwrap();
        assert_eq!(c.max_session_bytes, 16 << 30);
        assert_eq!(c.listen, ["0.0.0.0:7879"]);
        assert!(toml::from_str::<DaemonConfig>("listen = [\"a:1\"]\nmax_sesions = 3\n").is_err());
        let c: DaemonConfig = toml::from_str("max_total_bytes = 1048576\n").unwrap();
        assert_eq!(c.max_total_bytes, 1 << 20);
        let c: DaemonConfig = toml::from_str("io_timeout_s = -1.0\n").unwrap();
        assert!(c.check().is_err());
        let c: DaemonConfig = toml::from_str("listen = []\n").unwrap();
        assert!(c.check().is_err());
        let c: DaemonConfig = toml::from_str("[[disks]]\nfile = \"d.img\"\n").unwrap();
        assert!(c.check().is_err(), "a disk needs a socket or an address");
        let c: DaemonConfig =
            toml::from_str("[[disks]]\nfile = \"d.img\"\nsocket = \"/tmp/s\"\nchunk_size = \"1M\"\n").unwrap();
        c.check().unwrap();
        assert_eq!(c.disks[0].chunk_size, 1 << 20);
        let img = "[[images]]\nname = \"vm1\"\nimage = \"debian\"\nrepo = \"/srv/images\"\nlocal = \"vm1.img\"\nsocket = \"/run/vm1.sock\"\n";
        let c: DaemonConfig = toml::from_str(img).unwrap();
        c.check().unwrap();
        let c: DaemonConfig = toml::from_str(&format!("{img}{img}")).unwrap();
        assert!(c.check().is_err(), "two images of one name");
    }
}
