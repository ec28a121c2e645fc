//! Peer authentication: a password-authenticated key exchange (SPAKE2 over Ed25519) on the
//! shared secret, then key confirmation, before any region is exposed or any memory written.
//!
//! ```text
//!  connector                                  acceptor
//!    HELLO(versions, role=C, session, stream, nonce_c)  ──►
//!                                      ◄──  HELLO(versions, role=A, same session/stream, nonce_a)
//!                                      ◄──  PAKE(spake2 B message)
//!    PAKE(spake2 A message)            ──►
//!    AUTH(HMAC(K, C|transcript))       ──►     acceptor verifies; on failure CLOSE(AUTH)
//!                                      ◄──  AUTH(HMAC(K, A|transcript))   only after that
//!    connector verifies; on failure CLOSE(AUTH)
//!    REGIONS(exposed table)            ◄──►  REGIONS(exposed table)
//! ```
//!
//! K is the SPAKE2 key. Neither side's messages let a peer that does not know the secret test
//! guesses offline: the PAKE messages are blinded by the secret, and the proofs are MACs
//! under K, which such a peer cannot compute. An active attacker gets one online guess per
//! connection. The side that answers (the acceptor) reveals its proof only after checking the
//! connector's. The transcript (session, stream, both nonces, both PAKE messages) and the role
//! byte bind the proofs to this connection and stop reflection.
//!
//! Secrets must be high entropy: at least [`MIN_SECRET_LEN`] bytes (`livemig secret new FILE`
//! writes a random 256-bit one). They come from `LIVEMIG_SECRET` or a file (`--secret-file`).

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::region::RegionInfo;
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::wire::{self, close_code, DecodeError, Frame, FrameType, Header, Hello, Role, PAKE_LEN};

/// Environment variable holding the shared secret.
pub const SECRET_ENV: &str = "LIVEMIG_SECRET";
/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
const TAG: &[u8] = b"livemig-auth-v3";
const ID_CONNECTOR: &[u8] = b"livemig connector";
const ID_ACCEPTOR: &[u8] = b"livemig acceptor";

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
    #[error(
        "the shared secret must be at least {MIN_SECRET_LEN} bytes of random data (got {0}); \
         make one with `livemig secret new FILE`"
    )]
    TooShort(usize),
    /// The OS random source failed.
    #[error("cannot draw a random secret: {0}")]
    Random(String),
    /// `secret new` could not write the file.
    #[error("cannot create secret file {path}")]
    Create {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl Secret {
    /// A secret from bytes (trailing newline trimmed).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let mut v = bytes.into();
        while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            v.pop();
        }
        if v.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(v.len()));
        }
        Ok(Secret(v))
    }

    /// The secret of one connection inside a TLS session: HMAC-SHA256 keyed with this secret
    /// over the session's exported keying material (`binding`), hex-encoded. Both ends derive
    /// the same one only if they share the secret *and* the TLS session, so a relay that
    /// terminates TLS on each side cannot complete the handshake inside.
    pub fn bound_to(&self, binding: &[u8]) -> Secret {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(b"livemig tls channel binding v1");
        m.update(binding);
        let hex: String = m.finalize().into_bytes().iter().map(|x| format!("{x:02x}")).collect();
        Secret(hex.into_bytes())
    }

    /// A fresh 256-bit random secret, hex-encoded (what `livemig secret new` writes).
    pub fn generate_hex() -> Result<String, SecretError> {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// Writes a fresh secret to `path`, created with mode 0600; an existing file is left alone
    /// and reported.
    pub fn write_new(path: &Path) -> Result<(), SecretError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| SecretError::Create { path: path.display().to_string(), source };
        // Drawn first: a failing random source leaves no empty file behind.
        let hex = Self::generate_hex()?;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
        f.write_all(format!("{hex}\n").as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
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
    /// The peer's key-exchange message is not a valid SPAKE2 message.
    #[error("invalid key-exchange message from the peer")]
    KeyExchange,
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

/// An authenticated connection, before the region tables are exchanged.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Negotiated protocol version.
    pub version: u8,
    /// The peer's HELLO.
    pub peer: Hello,
}

/// What both proofs cover, in connector-then-acceptor order: both HELLOs whole (versions,
/// session, streams, flags, nonces), both PAKE messages.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// The connector's HELLO.
    pub hello_c: Hello,
    /// The acceptor's HELLO.
    pub hello_a: Hello,
    /// The connector's PAKE message.
    pub pake_c: [u8; PAKE_LEN],
    /// The acceptor's PAKE message.
    pub pake_a: [u8; PAKE_LEN],
}

fn mac_for(key: &[u8], role: Role, t: &Transcript) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(TAG);
    m.update(&[role as u8]);
    m.update(&Frame::Hello(t.hello_c).encode());
    m.update(&Frame::Hello(t.hello_a).encode());
    m.update(&t.pake_c);
    m.update(&t.pake_a);
    m
}

/// The key-confirmation proof a side with `role` sends, keyed by the PAKE key (pure).
pub fn proof(key: &[u8], role: Role, t: &Transcript) -> [u8; 32] {
    mac_for(key, role, t).finalize().into_bytes().into()
}

/// Verifies a proof in constant time (pure).
pub fn verify(key: &[u8], role: Role, t: &Transcript, mac: &[u8; 32]) -> bool {
    mac_for(key, role, t).verify_slice(mac).is_ok()
}

/// One side of the key exchange.
struct Pake {
    state: Spake2<Ed25519Group>,
    msg: [u8; PAKE_LEN],
}

impl Pake {
    fn start(secret: &Secret, role: Role) -> Pake {
        let pw = Password::new(&secret.0);
        let (c, a) = (Identity::new(ID_CONNECTOR), Identity::new(ID_ACCEPTOR));
        let (state, msg) = match role {
            Role::Connector => Spake2::<Ed25519Group>::start_a(&pw, &c, &a),
            Role::Acceptor => Spake2::<Ed25519Group>::start_b(&pw, &c, &a),
        };
        Pake { state, msg: msg.try_into().expect("an Ed25519 SPAKE2 message is 33 bytes") }
    }

    fn finish(self, theirs: &[u8; PAKE_LEN]) -> Result<Vec<u8>, HandshakeError> {
        self.state.finish(theirs).map_err(|_| HandshakeError::KeyExchange)
    }
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
    // The type is checked before the body is read: a peer cannot make us allocate and read
    // a 4 MiB message body where a 33-byte PAKE frame belongs.
    let mut hb = [0u8; wire::HEADER_LEN];
    r.read_exact(&mut hb)?;
    let h = Header::decode(&hb)?;
    if h.kind != kind && h.kind != FrameType::Close {
        return Err(DecodeError::Unexpected { got: h.kind, expected: what }.into());
    }
    let mut body = vec![0u8; h.body_len as usize];
    r.read_exact(&mut body)?;
    let f = Frame::decode_body(&h, &body)?;
    match f {
        Frame::Close { reason, .. } => Err(HandshakeError::Refused(reason)),
        f if f.kind() == kind => Ok(f),
        f => Err(DecodeError::Unexpected { got: f.kind(), expected: what }.into()),
    }
}

fn expect_pake(s: &mut impl Read) -> Result<[u8; PAKE_LEN], HandshakeError> {
    match expect_frame(s, FrameType::Pake, "PAKE")? {
        Frame::Pake(m) => Ok(m),
        _ => unreachable!("kind checked"),
    }
}

fn expect_auth(s: &mut impl Read) -> Result<[u8; 32], HandshakeError> {
    match expect_frame(s, FrameType::Auth, "AUTH")? {
        Frame::Auth(m) => Ok(m),
        _ => unreachable!("kind checked"),
    }
}

fn refuse_auth(s: &mut impl Write) -> HandshakeError {
    let _ = write_frame(
        s,
        &Frame::Close { code: close_code::AUTH, reason: "authentication failed: wrong shared secret".into() },
    );
    HandshakeError::BadSecret
}

/// Runs the handshake on `s`: authentication, then the region tables. Nothing is exposed
/// before the peer has proven the secret.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    secret: &Secret,
    p: &HandshakeParams,
) -> Result<HandshakeOutcome, HandshakeError> {
    let a = authenticate(s, secret, p)?;
    let peer_regions = exchange_regions(s, &p.exposed)?;
    Ok(HandshakeOutcome { version: a.version, peer: a.peer, peer_regions })
}

/// Sends our region table and reads the peer's (after [`authenticate`]).
pub fn exchange_regions<S: Read + Write>(s: &mut S, exposed: &[RegionInfo]) -> Result<Vec<RegionInfo>, HandshakeError> {
    write_frame(s, &Frame::Regions(exposed.to_vec()))?;
    match expect_frame(s, FrameType::Regions, "REGIONS")? {
        Frame::Regions(r) => Ok(r),
        _ => unreachable!("kind checked"),
    }
}

/// Authenticates the peer on `s` (HELLO, PAKE, AUTH; `p.exposed` is not used).
pub fn authenticate<S: Read + Write>(
    s: &mut S,
    secret: &Secret,
    p: &HandshakeParams,
) -> Result<Authenticated, HandshakeError> {
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
    let pake = Pake::start(secret, p.role);
    if p.role == Role::Connector {
        let pake_a = expect_pake(s)?;
        let t = Transcript { hello_c: ours, hello_a: peer, pake_c: pake.msg, pake_a };
        write_frame(s, &Frame::Pake(pake.msg))?;
        let key = pake.finish(&pake_a)?;
        write_frame(s, &Frame::Auth(proof(&key, Role::Connector, &t)))?;
        let theirs = expect_auth(s)?;
        if !verify(&key, Role::Acceptor, &t, &theirs) {
            return Err(refuse_auth(s));
        }
    } else {
        write_frame(s, &Frame::Pake(pake.msg))?;
        let pake_c = expect_pake(s)?;
        let t = Transcript { hello_c: peer, hello_a: ours, pake_c, pake_a: pake.msg };
        let key = pake.finish(&pake_c)?;
        let theirs = expect_auth(s)?;
        // Our proof goes out only once the connector has proven the secret.
        if !verify(&key, Role::Connector, &t, &theirs) {
            return Err(refuse_auth(s));
        }
        write_frame(s, &Frame::Auth(proof(&key, Role::Acceptor, &t)))?;
    }
    Ok(Authenticated { version, peer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const GOOD: &str = "sesame-open-sesame-open-sesame-open";
    const BAD: &str = "sesame-shut-sesame-shut-sesame-shut";

    fn hello(role: Role, nonce: [u8; 32]) -> Hello {
        Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::VERSION,
            role,
            stream: 0,
            streams: 1,
            flags: 0,
            byte_streams: 0,
            session: 1,
            nonce,
        }
    }

    fn params(role: Role) -> HandshakeParams {
        HandshakeParams { role, stream: 0, streams: 1, flags: 0, byte_streams: 0, session: 9, exposed: vec![] }
    }

    #[test]
    fn proofs_bind_role_and_transcript() {
        let t = Transcript {
            hello_c: hello(Role::Connector, [1; 32]),
            hello_a: hello(Role::Acceptor, [2; 32]),
            pake_c: [3; PAKE_LEN],
            pake_a: [4; PAKE_LEN],
        };
        let p = proof(b"key", Role::Connector, &t);
        assert!(verify(b"key", Role::Connector, &t, &p));
        assert!(!verify(b"key", Role::Acceptor, &t, &p), "a reflected proof fails");
        assert!(!verify(b"kex", Role::Connector, &t, &p));
        let mut other = t.clone();
        other.pake_a[0] ^= 1;
        assert!(!verify(b"key", Role::Connector, &other, &p));
        let mut other = t.clone();
        std::mem::swap(&mut other.hello_a.nonce, &mut other.hello_c.nonce);
        assert!(!verify(b"key", Role::Connector, &other, &p));
        // Every HELLO field is covered: a downgraded version range or changed stream count
        // breaks the proof.
        let mut other = t.clone();
        other.hello_c.max_version -= 1;
        assert!(!verify(b"key", Role::Connector, &other, &p));
        let mut other = t.clone();
        other.hello_a.streams = 3;
        assert!(!verify(b"key", Role::Connector, &other, &p));
    }

    #[test]
    fn short_secrets_are_refused_naming_the_command() {
        let e = Secret::new("0123456789abcdef0123456789abcde\n").unwrap_err();
        assert!(matches!(e, SecretError::TooShort(31)));
        assert!(e.to_string().contains("livemig secret new"), "{e}");
        assert!(Secret::new(Secret::generate_hex().unwrap()).is_ok());
    }

    #[test]
    fn new_secret_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("livemig-secret-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        Secret::write_new(&dir).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&dir).unwrap();
        assert_eq!(text.trim_end().len(), 64);
        assert!(Secret::load(Some(&dir)).is_ok());
        assert!(matches!(Secret::write_new(&dir), Err(SecretError::Create { .. })));
        assert_eq!(std::fs::read_to_string(&dir).unwrap(), text, "an existing secret stays");
        std::fs::remove_file(&dir).unwrap();
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
        let (a, b) = run(GOOD, GOOD);
        assert_eq!(a.unwrap().version, wire::VERSION);
        assert_eq!(b.unwrap().peer.session, 9);
        let (a, b) = run(GOOD, BAD);
        assert!(matches!(a, Err(HandshakeError::Refused(_))), "{a:?}");
        assert!(matches!(b, Err(HandshakeError::BadSecret)), "{b:?}");
    }

    /// A connector that does not know the secret runs the protocol faithfully with a guess:
    /// the acceptor answers its proof with CLOSE, never with a proof of its own.
    #[test]
    fn the_acceptor_reveals_no_proof_to_a_connector_that_failed() {
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let good = Secret::new(GOOD).unwrap();
        let t = std::thread::spawn(move || authenticate(&mut y, &good, &params(Role::Acceptor)));
        let nonce = [6u8; 32];
        let hello = Hello {
            min_version: wire::MIN_VERSION,
            max_version: wire::VERSION,
            role: Role::Connector,
            stream: 0,
            streams: 1,
            flags: 0,
            byte_streams: 0,
            session: 9,
            nonce,
        };
        write_frame(&mut x, &Frame::Hello(hello)).unwrap();
        let Frame::Hello(theirs) = read_frame(&mut x).unwrap() else { panic!("expected HELLO") };
        let Frame::Pake(pake_a) = read_frame(&mut x).unwrap() else { panic!("expected PAKE") };
        let guess = Pake::start(&Secret::new(BAD).unwrap(), Role::Connector);
        let tr = Transcript { hello_c: hello, hello_a: theirs, pake_c: guess.msg, pake_a };
        write_frame(&mut x, &Frame::Pake(guess.msg)).unwrap();
        let key = guess.finish(&pake_a).unwrap();
        write_frame(&mut x, &Frame::Auth(proof(&key, Role::Connector, &tr))).unwrap();
        match read_frame(&mut x).unwrap() {
            Frame::Close { code, .. } => assert_eq!(code, close_code::AUTH),
            f => panic!("the acceptor answered a failed proof with {f:?}"),
        }
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::BadSecret)));
    }

    /// A listener that does not know the secret gets the connector's proof only under a key
    /// it cannot derive: its own guess does not verify the proof.
    #[test]
    fn a_rogue_listener_cannot_check_a_guess_against_the_connectors_proof() {
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let good = Secret::new(GOOD).unwrap();
        let t = std::thread::spawn(move || authenticate(&mut x, &good, &params(Role::Connector)));
        let Frame::Hello(theirs) = read_frame(&mut y).unwrap() else { panic!("expected HELLO") };
        let mut ours = theirs;
        ours.role = Role::Acceptor;
        ours.nonce = [8; 32];
        write_frame(&mut y, &Frame::Hello(ours)).unwrap();
        let rogue = Pake::start(&Secret::new(BAD).unwrap(), Role::Acceptor);
        write_frame(&mut y, &Frame::Pake(rogue.msg)).unwrap();
        let Frame::Pake(pake_c) = read_frame(&mut y).unwrap() else { panic!("expected PAKE") };
        let Frame::Auth(mac) = read_frame(&mut y).unwrap() else { panic!("expected AUTH") };
        let tr = Transcript { hello_c: theirs, hello_a: ours, pake_c, pake_a: rogue.msg };
        let key = rogue.finish(&pake_c).unwrap();
        assert!(!verify(&key, Role::Connector, &tr, &mac));
        // Nor is the proof a MAC under the secret itself, as an unkeyed exchange would give.
        assert!(!verify(GOOD.as_bytes(), Role::Connector, &tr, &mac));
        write_frame(&mut y, &Frame::Auth([0; 32])).unwrap();
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::BadSecret)));
    }
}
