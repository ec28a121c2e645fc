//! TLS 1.3 on a session's TCP connections (rustls), as QEMU's TLS migration and
//! cloud-hypervisor's mTLS offer.
//!
//! # How
//!
//! Each TCP connection runs a TLS 1.3 handshake first (the connector as client), within the
//! handshake deadline; then a **tunnel thread** moves bytes between the TLS connection and a
//! loopback TCP socket pair, and the rest of the backend — the livemig handshake, frames,
//! `splice`, `SO_RCVLOWAT`, byte channels — runs unchanged on the plaintext end. This kernel
//! has no kTLS (no `tls` ULP), so there is no zero-copy way to put records on the wire
//! anyway: the tunnel costs a copy and the encryption, and `bench/tcp-vs-iperf3.sh` prints
//! that cost beside plain TCP.
//!
//! # Who is trusted
//!
//! - [`TlsSettings::Secret`]: each side presents a throw-away self-signed certificate, and
//!   neither checks the other's certificate: the peers authenticate with the shared secret,
//!   whose handshake runs inside TLS with a per-connection secret **bound to the TLS
//!   session** ([`crate::auth::Secret::bound_to`] over the RFC 8446 exporter). A relay that
//!   terminates TLS towards each side holds two TLS sessions, so the two ends derive
//!   different secrets and the handshake inside fails; an eavesdropper sees only TLS.
//! - [`TlsSettings::Certificates`]: mutual certificates. Each side presents `cert` (its
//!   chain, PEM) with `key`, and accepts only a peer whose certificate chains to `ca`; the
//!   connector also checks that the listener's certificate names the IP address it dialled
//!   (an IP address SAN; the host name given on the command line is resolved before the
//!   connection and not checked). The shared-secret handshake still runs inside, bound the
//!   same way: a session needs both.
//!
//! The loopback pair is made by a listener on 127.0.0.1 port 0 that accepts exactly one
//! connection, from the very socket that just connected to it (checked by address), then
//! closes.
//!
//! The plaintext stream ends cleanly (FIN) only after the peer's TLS close_notify; a network
//! EOF without one, a record that fails to decrypt or a failed socket resets it instead
//! (ECONNRESET for its reader), so a truncated byte stream is never taken for a whole one.
//! After this side has sent its close_notify, the tunnel waits at most 5 s for the peer's
//! end, so a peer that never closes cannot keep the thread.

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Instant;
#[cfg(feature = "tls")]
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use crate::auth::Secret;
use crate::TransportError;

/// TLS on a session's TCP connections (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum TlsSettings {
    /// Throw-away certificates; the shared secret, bound to each TLS session, authenticates.
    Secret,
    /// Mutual certificates (PEM files), and the shared secret inside.
    Certificates {
        /// This side's certificate chain.
        cert: PathBuf,
        /// This side's private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
        /// The certificate authority a peer's certificate must chain to.
        ca: PathBuf,
    },
}

/// The label of the keying material exported for the channel binding.
#[cfg(feature = "tls")]
const EXPORTER_LABEL: &[u8] = b"EXPORTER-livemig-session-binding";

#[cfg_attr(not(feature = "tls"), allow(dead_code))]
fn tls_err(what: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(what.to_string())
}

#[cfg(feature = "tls")]
mod imp {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn load_chain(p: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
        let certs = CertificateDer::pem_file_iter(p)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| tls_err(format!("reading certificates from {}: {e}", p.display())))?;
        if certs.is_empty() {
            return Err(tls_err(format!("{} holds no PEM certificate", p.display())));
        }
        Ok(certs)
    }

    fn load_key(p: &std::path::Path) -> Result<PrivateKeyDer<'static>, TransportError> {
        PrivateKeyDer::from_pem_file(p).map_err(|e| tls_err(format!("reading the private key {}: {e}", p.display())))
    }

    fn roots(ca: &std::path::Path) -> Result<Arc<rustls::RootCertStore>, TransportError> {
        let mut r = rustls::RootCertStore::empty();
        for c in load_chain(ca)? {
            r.add(c).map_err(|e| tls_err(format!("CA certificate in {}: {e}", ca.display())))?;
        }
        Ok(Arc::new(r))
    }

    fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TransportError> {
        let ck = rcgen::generate_simple_self_signed(vec!["livemig".to_string()])
            .map_err(|e| tls_err(format!("generating a certificate: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        Ok((vec![ck.cert.der().clone()], key))
    }

    /// Accepts any certificate: the shared secret, bound to the session, authenticates.
    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    pub(super) fn client_conn(s: &TlsSettings, server: &str) -> Result<rustls::Connection, TransportError> {
        let p = provider();
        let b = rustls::ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?;
        let (cfg, name) = match s {
            TlsSettings::Secret => {
                let cfg =
                    b.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(p))).with_no_client_auth();
                (cfg, ServerName::try_from("livemig").expect("a valid DNS name").to_owned())
            }
            TlsSettings::Certificates { cert, key, ca } => {
                let cfg = b
                    .with_root_certificates(roots(ca)?)
                    .with_client_auth_cert(load_chain(cert)?, load_key(key)?)
                    .map_err(|e| tls_err(format!("this side's certificate and key: {e}")))?;
                let name = match server.parse::<std::net::IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(server.to_string())
                        .map_err(|e| tls_err(format!("{server} as a certificate name: {e}")))?,
                };
                (cfg, name)
            }
        };
        let c = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(tls_err)?;
        Ok(rustls::Connection::Client(c))
    }

    pub(super) fn server_conn(s: &TlsSettings) -> Result<rustls::Connection, TransportError> {
        let p = provider();
        let b = rustls::ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?;
        let cfg = match s {
            TlsSettings::Secret => {
                let (chain, key) = self_signed()?;
                b.with_no_client_auth().with_single_cert(chain, key).map_err(tls_err)?
            }
            TlsSettings::Certificates { cert, key, ca } => {
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, p)
                    .build()
                    .map_err(|e| tls_err(format!("client verification with {}: {e}", ca.display())))?;
                b.with_client_cert_verifier(v)
                    .with_single_cert(load_chain(cert)?, load_key(key)?)
                    .map_err(|e| tls_err(format!("this side's certificate and key: {e}")))?
            }
        };
        let c = rustls::ServerConnection::new(Arc::new(cfg)).map_err(tls_err)?;
        Ok(rustls::Connection::Server(c))
    }
}

/// Runs the TLS handshake on `raw` (client when `server` names the peer dialled, server
/// otherwise) within `deadline`, then starts the tunnel. Returns the plaintext end and the
/// connection's secret bound to this TLS session.
#[cfg(feature = "tls")]
pub(crate) fn wrap(
    raw: TcpStream,
    settings: &TlsSettings,
    server: Option<&str>,
    secret: &Secret,
    deadline: Instant,
) -> Result<(TcpStream, Secret), TransportError> {
    let mut conn = match server {
        Some(s) => imp::client_conn(settings, s)?,
        None => imp::server_conn(settings)?,
    };
    let peer = raw.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    {
        let mut d = crate::gate::Deadlined::new(&raw, deadline);
        while conn.is_handshaking() {
            conn.complete_io(&mut d).map_err(|e| tls_err(format!("TLS handshake with {peer}: {e}")))?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut d).map_err(|e| tls_err(format!("TLS handshake with {peer}: {e}")))?;
        }
    }
    let binding = conn
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| tls_err(format!("exporting the TLS channel binding: {e}")))?;
    let plain = start_tunnel(conn, raw)?;
    Ok((plain, secret.bound_to(&binding)))
}

/// Without the `tls` feature: TLS asked for is an error.
#[cfg(not(feature = "tls"))]
pub(crate) fn wrap(
    _raw: TcpStream,
    _settings: &TlsSettings,
    _server: Option<&str>,
    _secret: &Secret,
    _deadline: Instant,
) -> Result<(TcpStream, Secret), TransportError> {
    Err(tls_err("this build has no TLS support (feature `tls`)"))
}

/// A loopback TCP pair: (the end handed out, the end the tunnel thread keeps).
#[cfg(feature = "tls")]
fn loopback_pair() -> Result<(TcpStream, TcpStream), TransportError> {
    let io = |op: &'static str| move |source| TransportError::Io { op, source };
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding the TLS tunnel's loopback listener"))?;
    let a = TcpStream::connect(l.local_addr().map_err(io("the TLS tunnel's loopback address"))?)
        .map_err(io("connecting the TLS tunnel's loopback pair"))?;
    let want: SocketAddr = a.local_addr().map_err(io("the TLS tunnel's loopback address"))?;
    l.set_nonblocking(true).map_err(io("the TLS tunnel's loopback listener"))?;
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match l.accept() {
            // Only the socket that just connected: anything else on the port is dropped.
            Ok((b, from)) if from == want => {
                b.set_nonblocking(false).map_err(io("the TLS tunnel's loopback pair"))?;
                return Ok((a, b));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    return Err(tls_err("the TLS tunnel's loopback connection did not arrive"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(io("accepting the TLS tunnel's loopback pair")(e)),
        }
    }
}

#[cfg(feature = "tls")]
fn start_tunnel(conn: rustls::Connection, raw: TcpStream) -> Result<TcpStream, TransportError> {
    let (plain, inner) = loopback_pair()?;
    let _ = raw.set_nodelay(true);
    // The plaintext side's keepalive and TCP_USER_TIMEOUT watch a loopback socket: a vanished
    // peer must show on the network socket instead, which then ends the tunnel (and the
    // plaintext stream with it).
    liveness(&raw);
    let _ = inner.set_nodelay(true);
    for s in [&raw, &inner] {
        s.set_read_timeout(None).map_err(|source| TransportError::Io { op: "the TLS tunnel's sockets", source })?;
        s.set_write_timeout(None).map_err(|source| TransportError::Io { op: "the TLS tunnel's sockets", source })?;
        s.set_nonblocking(true).map_err(|source| TransportError::Io { op: "the TLS tunnel's sockets", source })?;
    }
    std::thread::Builder::new()
        .name("livemig-tls".into())
        .spawn(move || {
            match tunnel(conn, &raw, &inner) {
                Ok(()) => {
                    let _ = inner.shutdown(Shutdown::Both);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TLS tunnel failed");
                    // Reset, not FIN: the plaintext reader must not take this for an end.
                    reset_on_close(&inner);
                }
            }
            let _ = raw.shutdown(Shutdown::Both);
        })
        .map_err(|source| TransportError::Io { op: "starting the TLS tunnel thread", source })?;
    Ok(plain)
}

/// Keepalive (probes after 7 s idle, every 7 s, 3 of them) and a 30 s TCP_USER_TIMEOUT on
/// the network socket of a tunnel. Best effort: a refused option is logged.
#[cfg(feature = "tls")]
fn liveness(s: &TcpStream) {
    if let Err(e) = crate::oob::keepalive(s, Duration::from_secs(21)) {
        tracing::warn!(error = %e, "TLS tunnel keepalive refused");
    }
    if let Err(e) = crate::oob::set_int_option(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000) {
        tracing::warn!(error = %e, "TLS tunnel TCP_USER_TIMEOUT refused");
    }
}

/// Makes the close of `s` a reset (SO_LINGER with a zero timeout).
#[cfg(feature = "tls")]
fn reset_on_close(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on the open socket of `s`, with a live linger struct and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// How long the tunnel waits for the peer's end once its own has been sent.
#[cfg(feature = "tls")]
const LINGER: Duration = Duration::from_secs(5);

/// Appends the plaintext `conn` holds to `out`; true when the peer's close_notify came.
#[cfg(feature = "tls")]
fn drain_plaintext(conn: &mut rustls::Connection, buf: &mut [u8], out: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Moves bytes until both directions have ended: plaintext from `inner` is encrypted onto
/// `raw`, records from `raw` are decrypted onto `inner`. Never reads more from a side whose
/// output is still pending (back-pressure both ways). A clean end is a TLS close_notify; a
/// raw EOF without one ends the plaintext stream too (what is inside detects truncation).
#[cfg(feature = "tls")]
fn tunnel(mut conn: rustls::Connection, raw: &TcpStream, inner: &TcpStream) -> std::io::Result<()> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    let mut buf = vec![0u8; 64 << 10];
    let mut out: Vec<u8> = Vec::new(); // decrypted, not yet written to `inner`
    let mut at = 0;
    let (mut inner_eof, mut raw_eof, mut inner_shut, mut raw_shut) = (false, false, false, false);
    let mut linger_until: Option<Instant> = None;
    loop {
        // Records to the network.
        while conn.wants_write() {
            match conn.write_tls(&mut &*raw) {
                Ok(_) => {}
                Err(e) if e.kind() == WouldBlock => break,
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Plaintext to the local side.
        while at < out.len() {
            match (&*inner).write(&out[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == WouldBlock => break,
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if at == out.len() {
            out.clear();
            at = 0;
        }
        if out.is_empty() && !raw_eof {
            // Plaintext already decrypted (the handshake's last read may have carried the
            // peer's first bytes), then whatever the network has.
            raw_eof = drain_plaintext(&mut conn, &mut buf, &mut out)?;
            if out.is_empty() && !raw_eof {
                match conn.read_tls(&mut &*raw) {
                    Ok(0) => {
                        // The network ended: whole only if the peer's close_notify came.
                        conn.process_new_packets().map_err(std::io::Error::other)?;
                        if !drain_plaintext(&mut conn, &mut buf, &mut out)? {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the peer's TLS stream ended without close_notify",
                            ));
                        }
                        raw_eof = true;
                    }
                    Ok(_) => {
                        conn.process_new_packets().map_err(std::io::Error::other)?;
                        raw_eof = drain_plaintext(&mut conn, &mut buf, &mut out)?;
                    }
                    Err(e) if e.kind() == WouldBlock || e.kind() == Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if !out.is_empty() {
                continue;
            }
        }
        if raw_eof && out.is_empty() && !inner_shut {
            let _ = inner.shutdown(Shutdown::Write);
            inner_shut = true;
        }
        // Plaintext from the local side, while the records already made have left.
        if !inner_eof && !conn.wants_write() {
            match (&*inner).read(&mut buf) {
                Ok(0) => {
                    inner_eof = true;
                    conn.send_close_notify();
                }
                Ok(n) => {
                    conn.writer().write_all(&buf[..n])?;
                    continue;
                }
                Err(e) if e.kind() == WouldBlock || e.kind() == Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if inner_eof && !conn.wants_write() && !raw_shut {
            let _ = raw.shutdown(Shutdown::Write);
            raw_shut = true;
            linger_until = Some(Instant::now() + LINGER);
        }
        if !raw_eof && linger_until.is_some_and(|t| Instant::now() >= t) {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer did not end its TLS stream"));
        }
        if inner_eof && raw_eof && out.is_empty() && !conn.wants_write() {
            return Ok(());
        }
        let mut raw_ev = 0;
        if !raw_eof && out.is_empty() {
            raw_ev |= libc::POLLIN;
        }
        if conn.wants_write() {
            raw_ev |= libc::POLLOUT;
        }
        let mut inner_ev = 0;
        if !inner_eof && !conn.wants_write() {
            inner_ev |= libc::POLLIN;
        }
        if at < out.len() {
            inner_ev |= libc::POLLOUT;
        }
        // A network socket with nothing to wait for stays out of the poll (its hang-up would
        // be reported over and over).
        let raw_fd = if raw_ev == 0 { -1 } else { raw.as_raw_fd() };
        let mut fds = [
            libc::pollfd { fd: raw_fd, events: raw_ev, revents: 0 },
            libc::pollfd { fd: inner.as_raw_fd(), events: inner_ev, revents: 0 },
        ];
        // SAFETY: poll on two pollfd structs this frame owns, for sockets kept open by the caller.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != Interrupted {
                return Err(e);
            }
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(std::io::Error::other("the network socket failed"));
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(std::io::Error::other("the plaintext side failed"));
        }
    }
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;
    use crate::{conformance as conf, GateConfig, TcpConfig, TcpListener as Listener, TcpTransport};
    use std::io::{Read, Write};

    /// Two ends of one TLS connection over loopback, plaintext ends returned, with a handle on
    /// the client's network socket.
    fn tls_pair() -> (TcpStream, TcpStream, TcpStream) {
        let secret = Secret::new("truncation-test-secret-truncation-test").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s2 = secret.clone();
        let server = std::thread::spawn(move || {
            let (raw, _) = l.accept().unwrap();
            wrap(raw, &TlsSettings::Secret, None, &s2, Instant::now() + Duration::from_secs(5)).unwrap().0
        });
        let raw = TcpStream::connect(addr).unwrap();
        let handle = raw.try_clone().unwrap();
        let (client, _) =
            wrap(raw, &TlsSettings::Secret, Some("127.0.0.1"), &secret, Instant::now() + Duration::from_secs(5))
                .unwrap();
        (client, server.join().unwrap(), handle)
    }

    /// A stream ends whole only with the peer's close_notify: a network EOF without it (a
    /// cut, or an attacker's FIN) resets the plaintext side, so its reader gets an error, not
    /// a shorter stream.
    #[test]
    fn only_close_notify_ends_a_stream_cleanly() {
        let data = vec![0x5au8; 1 << 20];
        // Clean: the writer ends its plaintext side.
        let (mut c, mut s, _h) = tls_pair();
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), data.len());
        // Truncated: the network socket ends under the tunnel (no close_notify).
        let (mut c, mut s, h) = tls_pair();
        c.write_all(&data).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        h.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = s.read_to_end(&mut got);
        assert!(r.is_err(), "a truncated stream read as a whole one ({} bytes)", got.len());
    }

    /// A relay that terminates TLS towards each side (it needs no secret for that: the
    /// certificates are not checked in this mode) and passes the plaintext through: the
    /// shared-secret handshake inside runs with secrets bound to two different TLS sessions,
    /// so it fails; without the binding it would pass. The listener then serves a direct peer.
    #[test]
    fn a_relay_that_terminates_tls_cannot_pass_the_handshake_inside() {
        let secret = Secret::new("relay-test-secret-relay-test-secret-relay").unwrap();
        let c = TcpConfig {
            io_timeout: Duration::from_secs(5),
            gate: GateConfig {
                handshake_timeout: Duration::from_secs(3),
                tls: Some(TlsSettings::Secret),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = conf::regions(1 << 20);
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (cc, s2, d) = (c.clone(), secret.clone(), r.dst_table.clone());
        let acc = std::thread::spawn(move || l.accept(&cc, &s2, &d));

        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let relay_thread = std::thread::spawn(move || {
            let stranger = Secret::new("the-relay-does-not-know-the-secret-at-all").unwrap();
            let dl = Instant::now() + Duration::from_secs(5);
            let (from_client, _) = relay.accept().unwrap();
            let (cp, _) = wrap(from_client, &TlsSettings::Secret, None, &stranger, dl).unwrap();
            let to_server = TcpStream::connect(addr).unwrap();
            let (sp, _) = wrap(to_server, &TlsSettings::Secret, Some("127.0.0.1"), &stranger, dl).unwrap();
            let (mut c1, mut s1) = (cp.try_clone().unwrap(), sp.try_clone().unwrap());
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut c1, &mut s1);
                let _ = s1.shutdown(Shutdown::Write);
            });
            let (mut c2, mut s2) = (cp, sp);
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
            let _ = up.join();
        });
        let relayed = TcpTransport::connect(relay_addr, &c, &secret, &r.src_table);
        assert!(matches!(relayed, Err(TransportError::Handshake { .. })), "{relayed:?}");
        relay_thread.join().unwrap();
        // The listener went on: a direct peer gets its session.
        let direct = TcpTransport::connect(addr, &c, &secret, &r.src_table);
        assert!(direct.is_ok(), "{direct:?}");
        assert!(acc.join().unwrap().is_ok());
    }
}
