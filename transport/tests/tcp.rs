//! Conformance suite and adversarial peers against the TCP backend.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU8;
use std::time::Duration;

use livemig_transport::auth::{self, HandshakeParams, Secret};
use livemig_transport::conformance as conf;
use livemig_transport::wire::{self, Frame, Role, WriteEntry, WriteFrame};
use livemig_transport::{RegionTable, TcpConfig, TcpListener, TcpTransport, Transport, TransportError};

fn secret() -> Secret {
    Secret::new("conformance-secret").unwrap()
}

fn cfg(streams: u8) -> TcpConfig {
    TcpConfig { streams: NonZeroU8::new(streams).unwrap(), io_timeout: Duration::from_secs(5), ..Default::default() }
}

fn pair(streams: u8) -> impl Fn(&RegionTable, &RegionTable) -> (Box<dyn Transport>, Box<dyn Transport>) {
    move |src, dst| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dst = dst.clone();
        let c = cfg(streams);
        let t = std::thread::spawn(move || l.accept(&c, &secret(), &dst).unwrap());
        let a = TcpTransport::connect(addr, &cfg(streams), &secret(), src).unwrap();
        (Box::new(a) as Box<dyn Transport>, Box::new(t.join().unwrap()) as Box<dyn Transport>)
    }
}

#[test]
fn conformance_transfer_one_stream() {
    conf::transfer_random_pages(&pair(1), 32 << 20);
}

#[test]
fn conformance_transfer_parallel_streams() {
    conf::transfer_random_pages(&pair(3), 32 << 20);
}

#[test]
fn conformance_window() {
    conf::window_back_pressure(&pair(1));
    conf::window_back_pressure(&pair(2));
}

#[test]
fn conformance_bounds() {
    conf::remote_bounds_refused(&pair(1));
}

#[test]
fn conformance_peer_vanishes() {
    conf::peer_vanishes(&pair(1));
}

#[test]
fn wrong_secret_is_refused() {
    let r = conf::regions(1 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let t = std::thread::spawn(move || l.accept(&cfg(1), &secret(), &dst));
    let e = TcpTransport::connect(addr, &cfg(1), &Secret::new("not-the-secret").unwrap(), &r.src_table).unwrap_err();
    assert!(matches!(e, TransportError::Handshake { .. }), "{e}");
    let e = t.join().unwrap().unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("wrong shared secret"), "{msg}");
}

/// An adversarial client: authenticates correctly, then sends `frame` raw. Returns what the
/// acceptor's `accept` + first receive yield, and the destination region afterwards.
fn adversary(frame: Vec<u8>) -> (TransportError, Vec<u8>) {
    let r = conf::regions(1 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let t = std::thread::spawn(move || {
        let mut tr = l.accept(&cfg(1), &secret(), &dst).unwrap();
        tr.recv_message(Some(Duration::from_secs(10))).unwrap_err()
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let p = HandshakeParams { role: Role::Connector, stream: 0, streams: 1, session: 1, exposed: vec![] };
    auth::handshake(&mut s, &secret(), &p).unwrap();
    s.write_all(&frame).unwrap();
    // the peer then stops sending (a truncated frame stays truncated)
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // the acceptor closes the connection: reading ends (CLOSE frame then EOF), never hangs
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let e = t.join().unwrap();
    // SAFETY: the connection is closed; nothing writes the region any more.
    let d = unsafe { r.dst.as_slice() }.to_vec();
    (e, d)
}

fn write_frame(entries: Vec<WriteEntry>, payload: usize) -> Vec<u8> {
    let mut b = Frame::Write(WriteFrame { wr_first: 1, signaled: true, entries }).encode();
    b.extend(std::iter::repeat_n(0xee, payload));
    b
}

#[test]
fn malformed_frames_get_typed_errors_and_write_nothing() {
    // offset past the region
    let (e, d) = adversary(write_frame(vec![WriteEntry { region: 2, len: 4096, offset: 1 << 20 }], 4096));
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    assert!(d.iter().all(|&b| b == 0));
    // second entry bad: the first must not be written either
    let (e, d) = adversary(write_frame(
        vec![
            WriteEntry { region: 2, len: 4096, offset: 0 },
            WriteEntry { region: 2, len: 4096, offset: (1 << 20) - 1 },
        ],
        8192,
    ));
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    assert!(d.iter().all(|&b| b == 0));
    // region not exposed for writing
    let (e, _) = adversary(write_frame(vec![WriteEntry { region: 1, len: 8, offset: 0 }], 8));
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    // length overflow: offset + len wraps
    let (e, d) = adversary(write_frame(vec![WriteEntry { region: 2, len: 4096, offset: u64::MAX - 10 }], 4096));
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    assert!(d.iter().all(|&b| b == 0));
    // unknown version
    let mut f = Frame::Msg(b"hi".to_vec()).encode();
    f[4] = 77;
    let (e, _) = adversary(f);
    assert!(matches!(e, TransportError::Protocol(wire::DecodeError::UnsupportedVersion { got: 77 })), "{e}");
    // truncated header, then the peer goes away
    let f = Frame::Ack(1).encode()[..7].to_vec();
    let (e, _) = adversary(f);
    assert!(matches!(e, TransportError::Disconnected(_)), "{e}");
    // truncated payload
    let mut f = write_frame(vec![WriteEntry { region: 2, len: 4096, offset: 0 }], 100);
    f.truncate(f.len() - 1);
    let (e, _) = adversary(f);
    assert!(matches!(e, TransportError::Disconnected(_)), "{e}");
}
