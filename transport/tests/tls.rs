//! TLS 1.3 on the TCP backend: the conformance checks through TLS with the shared secret and
//! with mutual certificates; a peer without TLS, with another CA's certificate, or with the
//! wrong name is refused, and the listener goes on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use livemig_transport::auth::Secret;
use livemig_transport::conformance as conf;
use livemig_transport::tls::TlsSettings;
use livemig_transport::{GateConfig, RegionTable, TcpConfig, TcpListener, TcpTransport, Transport, TransportError};

fn secret() -> Secret {
    Secret::new("tls-test-secret-tls-test-secret-tls-test").unwrap()
}

fn cfg(tls: Option<TlsSettings>) -> TcpConfig {
    TcpConfig {
        io_timeout: Duration::from_secs(20),
        gate: GateConfig { handshake_timeout: Duration::from_secs(5), tls, ..GateConfig::default() },
        ..TcpConfig::default()
    }
}

/// Connects with `client`'s settings to a listener with `server`'s.
fn try_pair(
    client: &TcpConfig,
    server: &TcpConfig,
    src: &RegionTable,
    dst: &RegionTable,
) -> (
    Result<TcpTransport, TransportError>,
    std::net::SocketAddr,
    std::thread::JoinHandle<Result<TcpTransport, TransportError>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (c, d) = (server.clone(), dst.clone());
    let acc = std::thread::spawn(move || l.accept(&c, &secret(), &d));
    (TcpTransport::connect(addr, client, &secret(), src), addr, acc)
}

fn pair(c: TcpConfig) -> impl Fn(&RegionTable, &RegionTable) -> (Box<dyn Transport>, Box<dyn Transport>) {
    move |src, dst| {
        let (a, _, acc) = try_pair(&c, &c, src, dst);
        (Box::new(a.unwrap()) as Box<dyn Transport>, Box::new(acc.join().unwrap().unwrap()) as Box<dyn Transport>)
    }
}

#[test]
fn shared_secret_mode_passes_the_conformance_checks() {
    let c = cfg(Some(TlsSettings::Secret));
    conf::transfer_random_pages(&pair(c.clone()), 8 << 20);
    conf::window_back_pressure(&pair(c.clone()));
    conf::peer_vanishes(&pair(c.clone()));
    conf::regions_exposed_mid_session(&pair(TcpConfig { urgent_stream: true, ..c.clone() }));
    let t = conf::urgent_pages_during_bulk(&pair(TcpConfig { urgent_stream: true, ..c.clone() }), 16 << 20, 50);
    assert_eq!(t.len(), 50);
    conf::byte_channels_beside_bulk(&pair(TcpConfig { byte_streams: 2, ..c }), 6 << 20);
}

struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    /// A CA, and a certificate for 127.0.0.1 signed by it, written as `NAME.crt`/`NAME.key`
    /// (the CA as `ca.crt`).
    fn new(tag: &str, names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("livemig-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        cp.distinguished_name.push(DnType::CommonName, format!("livemig test CA {tag}"));
        let ca = cp.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        for name in names {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, *name);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn settings(&self, name: &str, ca: &Path) -> TlsSettings {
        TlsSettings::Certificates {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            ca: ca.to_path_buf(),
        }
    }
}

#[test]
fn mutual_certificates_mode_and_its_refusals() {
    let pki = Pki::new("a", &["src", "dst"]);
    let other = Pki::new("b", &["intruder"]);
    let ca = pki.dir.join("ca.crt");
    let (src_cfg, dst_cfg) = (cfg(Some(pki.settings("src", &ca))), cfg(Some(pki.settings("dst", &ca))));
    let r = conf::regions(4 << 20);
    // Certificates from the same CA: a session, and pages move.
    let (a, _, acc) = try_pair(&src_cfg, &dst_cfg, &r.src_table, &r.dst_table);
    let (a, b) = (a.unwrap(), acc.join().unwrap().unwrap());
    drop((a, b));
    conf::transfer_random_pages(
        &|s: &RegionTable, d: &RegionTable| {
            let (a, _, acc) = try_pair(&src_cfg, &dst_cfg, s, d);
            (Box::new(a.unwrap()) as Box<dyn Transport>, Box::new(acc.join().unwrap().unwrap()) as Box<dyn Transport>)
        },
        4 << 20,
    );
    // Refused, each time with the listener going on to serve the legitimate peer:
    let refused: Vec<(&str, TcpConfig)> = vec![
        ("a client whose certificate comes from another CA", cfg(Some(other.settings("intruder", &ca)))),
        ("a client trusting another CA", cfg(Some(pki.settings("src", &other.dir.join("ca.crt"))))),
        ("a client without TLS", cfg(None)),
        ("a client in shared-secret mode", cfg(Some(TlsSettings::Secret))),
    ];
    for (what, bad) in refused {
        let (e, addr, acc) = try_pair(&bad, &dst_cfg, &r.src_table, &r.dst_table);
        assert!(e.is_err(), "{what} was let in");
        let good = TcpTransport::connect(addr, &src_cfg, &secret(), &r.src_table);
        assert!(good.is_ok(), "after {what}: {good:?}");
        assert!(acc.join().unwrap().is_ok(), "after {what}");
    }
    // A TLS client against a plain listener fails too.
    let (e, addr, acc) = try_pair(&src_cfg, &cfg(None), &r.src_table, &r.dst_table);
    assert!(e.is_err(), "TLS against plain TCP");
    assert!(TcpTransport::connect(addr, &cfg(None), &secret(), &r.src_table).is_ok());
    assert!(acc.join().unwrap().is_ok());
}
