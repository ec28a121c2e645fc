//! Peer authentication: a mutual HMAC-SHA256 challenge–response over a shared secret,
//! run before any region is exposed or any memory written.
//!
//! ```text
//!  connector                                  acceptor
//!    HELLO(versions, role=C, session, stream, nonce_c)  ──►
//!                                      ◄──  HELLO(versions, role=A, same session/stream, nonce_a)
//!    AUTH(HMAC(k, tag|C|session|stream|nonce_c|nonce_a)) ──►
//!                                      ◄──  AUTH(HMAC(k, tag|A|session|stream|nonce_a|nonce_c))
//!    both verify (constant time); on failure CLOSE(AUTH) and error
//!    REGIONS(exposed table)            ◄──►  REGIONS(exposed table)
//! ```
//!
//! The role byte in the MAC stops a reflected proof; fresh nonces on both sides stop replay.
//! The secret comes from `LIVEMIG_SECRET` or a file (`--secret-file`).

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::region::RegionInfo;
use crate::wire::{self, close_code, DecodeError, Frame, FrameType, Header, Hello, Role};

/// Environment variable holding the shared secret.
pub const SECRET_ENV: &str = "LIVEMIG_SECRET";
const TAG: &[u8] = b"livemig-auth-v1";

/// The shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// The secret could not be obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Neither a file nor the environment variable gave one.
    #[error("no shared secret: set {SECRET_ENV} or pass --secret-file")]
    Missing,
    /// The secret file could not be read.
    #[error("cannot read secret file {path}")]
    File {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Too short to be a secret.
    #[error("the shared secret must be at least 8 bytes (got {0})")]
    TooShort(usize),
}

impl Secret {
    /// A secret from bytes (trailing newline trimmed).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let mut v = bytes.into();
        while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            v.pop();
        }
        if v.len() < 8 {
            return Err(SecretError::TooShort(v.len()));
        }
        Ok(Secret(v))
    }

    /// From `file` if given, else from `LIVEMIG_SECRET`.
    pub fn load(file: Option<&Path>) -> Result<Self, SecretError> {
        if let Some(p) = file {
            let b = std::fs::read(p).map_err(|source| SecretError::File { path: p.display().to_string(), source })?;
            return Self::new(b);
        }
        match std::env::var_os(SECRET_ENV) {
            Some(v) => Self::new(v.into_encoded_bytes()),
            None => Err(SecretError::Missing),
        }
    }

    /// A fresh random secret (for `--loopback` runs where one process plays both ends).
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).expect("the OS random source is available");
        Secret(b.to_vec())
    }
}

/// The handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's proof did not verify: it does not know our secret.
    #[error("peer failed authentication (wrong shared secret)")]
    BadSecret,
    /// The peer closed the handshake, typically because it rejected our proof.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// No common protocol version.
    #[error("no common protocol version: ours {ours:?}, peer's {theirs:?}")]
    VersionMismatch {
        /// Our supported range.
        ours: (u8, u8),
        /// The peer's.
        theirs: (u8, u8),
    },
    /// The peer claimed our own role or a different stream.
    #[error("peer hello is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// Malformed frame.
    #[error("malformed handshake frame")]
    Protocol(#[from] DecodeError),
    /// The stream failed or ended.
    #[error("connection failed during the handshake")]
    Io(#[from] std::io::Error),
}

/// What each side brings to the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeParams {
    /// Our role.
    pub role: Role,
    /// Stream index (0 for the control stream); the acceptor adopts the connector's.
    pub stream: u8,
    /// Number of streams in the session; the acceptor adopts the connector's.
    pub streams: u8,
    /// HELLO flags (`wire::HELLO_URGENT_STREAM`); the acceptor adopts the connector's.
    pub flags: u8,
    /// Byte-stream channels of the session; the acceptor adopts the connector's.
    pub byte_streams: u8,
    /// Session id (the connector's choice; the acceptor adopts it).
    pub session: u64,
    /// Regions we expose to the peer.
    pub exposed: Vec<RegionInfo>,
}

/// The handshake result.
#[derive(Debug, Clone)]
pub struct HandshakeOutcome {
    /// Negotiated protocol version.
    pub version: u8,
    /// The peer's HELLO.
    pub peer: Hello,
    /// Regions the peer exposed.
    pub peer_regions: Vec<RegionInfo>,
}

/// The proof a side with `role` sends (pure).
pub fn proof(
    secret: &Secret,
    role: Role,
    session: u64,
    stream: u8,
    own_nonce: &[u8; 32],
    peer_nonce: &[u8; 32],
) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&secret.0).expect("HMAC accepts any key length");
    m.update(TAG);
    m.update(&[role as u8, stream]);
    m.update(&session.to_le_bytes());
    m.update(own_nonce);
    m.update(peer_nonce);
    m.finalize().into_bytes().into()
}

/// Verifies a proof in constant time (pure).
pub fn verify(
    secret: &Secret,
    role: Role,
    session: u64,
    stream: u8,
    own_nonce: &[u8; 32],
    peer_nonce: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&secret.0).expect("HMAC accepts any key length");
    m.update(TAG);
    m.update(&[role as u8, stream]);
    m.update(&session.to_le_bytes());
    m.update(own_nonce);
    m.update(peer_nonce);
    m.verify_slice(mac).is_ok()
}

/// Writes one control frame.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> std::io::Result<()> {
    w.write_all(&f.encode())?;
    w.flush()
}

/// Reads one control frame (not WRITE: its payload must be streamed by the caller).
pub fn read_frame(r: &mut impl Read) -> Result<Frame, HandshakeError> {
    let mut hb = [0u8; wire::HEADER_LEN];
    r.read_exact(&mut hb)?;
    let h = Header::decode(&hb)?;
    if h.kind == FrameType::Write {
        return Err(DecodeError::Unexpected { got: FrameType::Write, expected: "a control frame" }.into());
    }
    let mut body = vec![0u8; h.body_len as usize];
    r.read_exact(&mut body)?;
    Ok(Frame::decode_body(&h, &body)?)
}

fn expect_frame(r: &mut impl Read, kind: FrameType, what: &'static str) -> Result<Frame, HandshakeError> {
    let f = read_frame(r)?;
    match f {
        Frame::Close { reason, .. } => Err(HandshakeError::Refused(reason)),
        f if f.kind() == kind => Ok(f),
        f => Err(DecodeError::Unexpected { got: f.kind(), expected: what }.into()),
    }
}

/// Runs the handshake on `s`. Nothing is exposed before the peer has proven the secret.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    secret: &Secret,
    p: &HandshakeParams,
) -> Result<HandshakeOutcome, HandshakeError> {
    let mut nonce = [0u8; 32];
    getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut ours = Hello {
        min_version: wire::MIN_VERSION,
        max_version: wire::VERSION,
        role: p.role,
        stream: p.stream,
        streams: p.streams,
        flags: p.flags,
        byte_streams: p.byte_streams,
        session: p.session,
        nonce,
    };
    // The connector speaks first; the acceptor answers, adopting the connector's session and
    // stream numbering (it cannot know them before).
    let peer = if p.role == Role::Connector {
        write_frame(s, &Frame::Hello(ours))?;
        let Frame::Hello(peer) = expect_frame(s, FrameType::Hello, "HELLO")? else { unreachable!("kind checked") };
        peer
    } else {
        let Frame::Hello(peer) = expect_frame(s, FrameType::Hello, "HELLO")? else { unreachable!("kind checked") };
        ours.session = peer.session;
        ours.stream = peer.stream;
        ours.streams = peer.streams;
        ours.flags = peer.flags;
        ours.byte_streams = peer.byte_streams;
        write_frame(s, &Frame::Hello(ours))?;
        peer
    };
    let version = wire::VERSION.min(peer.max_version);
    if version < wire::MIN_VERSION.max(peer.min_version) {
        let _ = write_frame(
            s,
            &Frame::Close {
                code: close_code::VERSION,
                reason: format!("protocol versions {}..={} unsupported", peer.min_version, peer.max_version),
            },
        );
        return Err(HandshakeError::VersionMismatch {
            ours: (wire::MIN_VERSION, wire::VERSION),
            theirs: (peer.min_version, peer.max_version),
        });
    }
    if peer.role == p.role {
        return Err(HandshakeError::Inconsistent("peer claims our role"));
    }
    if peer.stream != ours.stream
        || peer.streams != ours.streams
        || peer.session != ours.session
        || peer.flags != ours.flags
        || peer.byte_streams != ours.byte_streams
    {
        return Err(HandshakeError::Inconsistent("session, stream index, stream count or flags differ"));
    }
    let (session, stream) = (ours.session, ours.stream);
    let mac = proof(secret, p.role, session, stream, &nonce, &peer.nonce);
    write_frame(s, &Frame::Auth(mac))?;
    let Frame::Auth(theirs) = expect_frame(s, FrameType::Auth, "AUTH")? else { unreachable!("kind checked") };
    if !verify(secret, peer.role, session, stream, &peer.nonce, &nonce, &theirs) {
        let _ = write_frame(
            s,
            &Frame::Close { code: close_code::AUTH, reason: "authentication failed: wrong shared secret".into() },
        );
        return Err(HandshakeError::BadSecret);
    }
    write_frame(s, &Frame::Regions(p.exposed.clone()))?;
    let Frame::Regions(peer_regions) = expect_frame(s, FrameType::Regions, "REGIONS")? else {
        unreachable!("kind checked")
    };
    Ok(HandshakeOutcome { version, peer, peer_regions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn params(role: Role) -> HandshakeParams {
        HandshakeParams { role, stream: 0, streams: 1, flags: 0, byte_streams: 0, session: 9, exposed: vec![] }
    }

    #[test]
    fn proofs_bind_role_and_nonces() {
        let s = Secret::new("0123456789").unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let p = proof(&s, Role::Connector, 1, 0, &a, &b);
        assert!(verify(&s, Role::Connector, 1, 0, &a, &b, &p));
        assert!(!verify(&s, Role::Acceptor, 1, 0, &a, &b, &p), "a reflected proof fails");
        assert!(!verify(&s, Role::Connector, 1, 0, &b, &a, &p));
        assert!(!verify(&Secret::new("0123456780").unwrap(), Role::Connector, 1, 0, &a, &b, &p));
        assert!(matches!(Secret::new("short\n"), Err(SecretError::TooShort(5))));
    }

    fn run(sa: &str, sb: &str) -> (Result<HandshakeOutcome, HandshakeError>, Result<HandshakeOutcome, HandshakeError>) {
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let sb = Secret::new(sb).unwrap();
        let t = std::thread::spawn(move || handshake(&mut y, &sb, &params(Role::Acceptor)));
        let a = handshake(&mut x, &Secret::new(sa).unwrap(), &params(Role::Connector));
        drop(x);
        (a, t.join().unwrap())
    }

    #[test]
    fn good_and_bad_secrets() {
        let (a, b) = run("sesame-open", "sesame-open");
        assert_eq!(a.unwrap().version, wire::VERSION);
        assert_eq!(b.unwrap().peer.session, 9);
        let (a, b) = run("sesame-open", "sesame-shut");
        assert!(matches!(a, Err(HandshakeError::BadSecret) | Err(HandshakeError::Refused(_))), "{a:?}");
        assert!(matches!(b, Err(HandshakeError::BadSecret) | Err(HandshakeError::Refused(_))), "{b:?}");
    }
}
