//! Command-line values shared by the `livemig` subcommands (`migrate`, `receive`, `bench`):
//! sizes, durations, the transport choice as text, and the shared secret handed to a child
//! process that plays the other end (`migrate --local`, `bench --loopback`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use livemig_transport::auth::{Secret, SecretError, SECRET_ENV};

use livemig_engine::connect::TransportChoice;

/// Parses sizes like `256M`, `4K`, `1G`, `4096`, `4MiB`, `4KB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let t = s.trim_end_matches(['i', 'I', 'B', 'b']);
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("bad size {s:?}: a whole number of bytes, or with a suffix K, M, G or T (powers of 1024), e.g. 512M")
    })?;
    n.checked_mul(mul).ok_or_else(|| format!("size {s:?} overflows"))
}

/// Longest duration any flag takes: one year.
pub const MAX_SECS: f64 = 365.0 * 86400.0;

/// Parses a duration flag in seconds: finite, `0 ≤ v ≤` [`MAX_SECS`], fractions allowed.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("bad number of seconds {s:?}"))?;
    if v.is_finite() && (0.0..=MAX_SECS).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} must be between 0 and {MAX_SECS} seconds"))
    }
}

/// Parses `--io-timeout SECS`: like [`parse_secs`] but at least 1 ms.
pub fn parse_io_timeout(s: &str) -> Result<f64, String> {
    match parse_secs(s) {
        Ok(v) if v >= 0.001 => Ok(v),
        _ => Err(format!("--io-timeout {s:?} must be between 0.001 and {MAX_SECS} seconds")),
    }
}

/// A duration flag (already validated by [`parse_secs`]) as a `Duration`.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

/// `--transport` value as text (for a child's command line).
/// The clap parser of `--transport tcp|verbs|auto` (the engine's `TransportChoice` knows no
/// clap).
pub fn transport_parser() -> impl clap::builder::TypedValueParser<Value = TransportChoice> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["tcp", "verbs", "auto"])
        .map(|s| s.parse::<TransportChoice>().expect("one of the possible values"))
}

/// The `--transport` value of `c`.
pub fn transport_arg(c: TransportChoice) -> &'static str {
    match c {
        TransportChoice::Tcp => "tcp",
        TransportChoice::Verbs => "verbs",
        TransportChoice::Auto => "auto",
    }
}

/// The secret of a run whose other end is a child process: the `--secret-file` if one was
/// given (both ends read it), else a fresh random one handed to the child in
/// `$LIVEMIG_SECRET`.
#[derive(Debug)]
pub struct ChildSecret {
    secret: Secret,
    file: Option<PathBuf>,
    hex: Option<String>,
}

impl ChildSecret {
    /// Loads `file`, or makes a random secret.
    pub fn new(file: Option<&Path>) -> Result<Self, SecretError> {
        match file {
            Some(f) => Ok(ChildSecret { secret: Secret::load(Some(f))?, file: Some(f.to_path_buf()), hex: None }),
            None => {
                let hex = Secret::generate_hex()?;
                Ok(ChildSecret { secret: Secret::new(hex.clone())?, file: None, hex: Some(hex) })
            }
        }
    }

    /// Our side's secret.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Gives `cmd` (a `livemig` child) the same secret.
    pub fn apply(&self, cmd: &mut Command) {
        if let Some(f) = &self.file {
            cmd.arg("--secret-file").arg(f);
        }
        if let Some(h) = &self.hex {
            cmd.env(SECRET_ENV, h);
        }
    }

    /// The random secret as `$LIVEMIG_SECRET` would carry it, when no file was given.
    pub fn env_value(&self) -> Option<&str> {
        self.hex.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4kb"), Ok(4096));
        assert_eq!(parse_size(" 2M "), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1P").unwrap_err().contains("K, M, G or T"));
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("0"), Ok(0.0));
        assert_eq!(parse_secs("2.5"), Ok(2.5));
        for bad in ["-1", "inf", "NaN", "1e30", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert!(parse_io_timeout("0").is_err());
        assert_eq!(parse_io_timeout("0.5"), Ok(0.5));
        assert_eq!(secs(1.5), Duration::from_millis(1500));
    }

    #[test]
    fn child_secret_from_a_file_or_random() {
        let r = ChildSecret::new(None).unwrap();
        assert_eq!(r.env_value().map(str::len), Some(64));
        let mut c = Command::new("true");
        r.apply(&mut c);
        assert!(c.get_envs().any(|(k, v)| k == SECRET_ENV && v.is_some()));

        let dir = std::env::temp_dir().join(format!("livemig-secret-{}", std::process::id()));
        std::fs::write(&dir, "a-file-secret-a-file-secret-a-file-secret\n").unwrap();
        let f = ChildSecret::new(Some(&dir)).unwrap();
        assert_eq!(f.env_value(), None);
        let mut c = Command::new("true");
        f.apply(&mut c);
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(args, [std::ffi::OsStr::new("--secret-file"), dir.as_os_str()]);
        std::fs::remove_file(&dir).unwrap();
        assert!(ChildSecret::new(Some(Path::new("/nonexistent/secret"))).is_err());
    }
}

/// `--tls`, or `--tls-cert/--tls-key/--tls-ca`: TLS 1.3 on the TCP connections of every
/// session this process opens or accepts (`migrate`, `receive`, `bench pages|chunks`,
/// `serve`). Both ends must use the same mode.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// TLS 1.3 on every TCP connection, the peers authenticated by the shared secret bound to
    /// each TLS session (no certificates to manage).
    #[arg(long, global = true)]
    pub tls: bool,
    /// Mutual-certificate TLS: this side's certificate chain (PEM); with --tls-key and --tls-ca.
    #[arg(long, global = true, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, global = true, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The CA a peer's certificate must chain to (PEM).
    #[arg(long, global = true, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The settings these flags ask for (`None`: plain TCP).
    pub fn settings(&self) -> Result<Option<livemig_transport::tls::TlsSettings>, String> {
        use livemig_transport::tls::TlsSettings;
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(self.tls.then_some(TlsSettings::Secret)),
            (Some(cert), Some(key), Some(ca)) => {
                Ok(Some(TlsSettings::Certificates { cert: cert.clone(), key: key.clone(), ca: ca.clone() }))
            }
            _ => Err("mutual-certificate TLS takes all three of --tls-cert, --tls-key and --tls-ca".into()),
        }
    }
}

static TLS: std::sync::OnceLock<Option<livemig_transport::tls::TlsSettings>> = std::sync::OnceLock::new();

/// Sets the process's TLS settings (once, from the command line, before any session).
pub fn set_tls(s: Option<livemig_transport::tls::TlsSettings>) {
    let _ = TLS.set(s);
}

/// The process's TLS settings (`None`: plain TCP).
pub fn tls() -> Option<livemig_transport::tls::TlsSettings> {
    TLS.get().cloned().flatten()
}

/// The flags that give a child process (the other end of `--local`/`--loopback`) the same
/// TLS settings.
pub fn tls_child_args() -> Vec<std::ffi::OsString> {
    use livemig_transport::tls::TlsSettings;
    match tls() {
        None => Vec::new(),
        Some(TlsSettings::Secret) => vec!["--tls".into()],
        Some(TlsSettings::Certificates { cert, key, ca }) => {
            vec!["--tls-cert".into(), cert.into(), "--tls-key".into(), key.into(), "--tls-ca".into(), ca.into()]
        }
    }
}
