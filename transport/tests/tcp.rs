//! Conformance suite and adversarial peers against the TCP backend.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU8;
use std::time::Duration;

use livemig_transport::auth::{self, HandshakeParams, Secret};
use livemig_transport::conformance as conf;
use livemig_transport::wire::{self, Frame, Role, WriteEntry, WriteFrame};
use livemig_transport::{
    RegionTable, Segment, TcpConfig, TcpListener, TcpTransport, Transport, TransportError, WriteRequest,
};

/// Whether a read ended because the peer closed the connection (EOF or a reset), not because
/// our own read timeout expired.
fn closed_by_peer(r: std::io::Result<usize>) -> bool {
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

fn secret() -> Secret {
    Secret::new("conformance-secret-conformance-secret").unwrap()
}

fn cfg(streams: u8) -> TcpConfig {
    TcpConfig { streams: NonZeroU8::new(streams).unwrap(), io_timeout: Duration::from_secs(5), ..Default::default() }
}

fn pair(streams: u8) -> impl Fn(&RegionTable, &RegionTable) -> (Box<dyn Transport>, Box<dyn Transport>) {
    pair_with(cfg(streams))
}

fn pair_with(c: TcpConfig) -> impl Fn(&RegionTable, &RegionTable) -> (Box<dyn Transport>, Box<dyn Transport>) {
    move |src, dst| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dst = dst.clone();
        let ca = c.clone();
        let t = std::thread::spawn(move || l.accept(&ca, &secret(), &dst).unwrap());
        let a = TcpTransport::connect(addr, &c, &secret(), src).unwrap();
        (Box::new(a) as Box<dyn Transport>, Box::new(t.join().unwrap()) as Box<dyn Transport>)
    }
}

/// The copying send path (writev) and the kernel's default wake-ups.
fn copy_cfg(streams: u8) -> TcpConfig {
    TcpConfig { zero_copy: false, rcv_lowat: 0, ..cfg(streams) }
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
fn conformance_copy_path() {
    conf::transfer_random_pages(&pair_with(copy_cfg(1)), 16 << 20);
    conf::transfer_random_pages(&pair_with(copy_cfg(2)), 16 << 20);
    conf::window_back_pressure(&pair_with(copy_cfg(1)));
}

/// Zero-copy sends of requests whose segments are not page-aligned, of odd lengths, several
/// per request, around the zero-copy threshold; the receiver's low-water mark far above
/// every frame. Everything lands, and a message after them arrives.
#[test]
fn unaligned_segments_and_small_frames_with_a_large_low_water_mark() {
    let r = conf::regions(4 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = vec![0u8; 4 << 20];
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    r.src.write_at(0, &bytes);
    let c = TcpConfig { rcv_lowat: 8 << 20, ..cfg(1) };
    let (mut a, mut b) = pair_with(c)(&r.src_table, &r.dst_table);
    // (remote offset, segments as (local offset, len)); each request alone is one frame.
    let reqs: Vec<(u64, Vec<Segment>)> = vec![
        (1, vec![Segment { offset: 3, len: 5000 }]),
        (10_000, vec![Segment { offset: 4095, len: 16 << 10 }]),
        (40_000, vec![Segment { offset: 123_457, len: (16 << 10) - 1 }]),
        (
            100_001,
            vec![
                Segment { offset: 777, len: 4097 },
                Segment { offset: 1 << 20, len: 1 },
                Segment { offset: (2 << 20) + 5, len: 300_000 },
            ],
        ),
        (1 << 20, vec![Segment { offset: 9, len: 3 << 20 }]),
    ];
    for (remote_offset, segs) in &reqs {
        let w = WriteRequest { local: 1, segments: segs, remote: 2, remote_offset: *remote_offset };
        a.post_writes(&[w]).unwrap();
        a.flush().unwrap();
    }
    a.send_message(b"done").unwrap();
    assert_eq!(b.recv_message(Some(Duration::from_secs(20))).unwrap().unwrap(), b"done");
    let mut want = vec![0u8; 4 << 20];
    for (remote_offset, segs) in &reqs {
        let mut at = *remote_offset as usize;
        for s in segs {
            let (o, l) = (s.offset as usize, s.len as usize);
            want[at..at + l].copy_from_slice(&bytes[o..o + l]);
            at += l;
        }
    }
    // SAFETY: all writes are placed (the message is ordered after them) and the peer is idle.
    let got = unsafe { r.dst.as_slice() };
    assert!(got == &want[..], "destination differs");
}

/// A peer that trickles a WRITE payload in small pieces, then sends a message: the receiver
/// must place the payload — the kernel may never wake a reader waiting for its low-water
/// mark here (the receive window closes first), so that wait is bounded —, acknowledge it and
/// then deliver the message (the mark is back to 1 for the next header).
#[test]
fn trickled_payload_under_a_large_low_water_mark() {
    let r = conf::regions(4 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let t = std::thread::spawn(move || {
        let c = TcpConfig { rcv_lowat: 1 << 20, ..cfg(1) };
        let mut tr = l.accept(&c, &secret(), &dst).unwrap();
        let m = tr.recv_message(Some(Duration::from_secs(20)));
        (tr, m)
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let p = HandshakeParams {
        role: Role::Connector,
        stream: 0,
        streams: 1,
        flags: 0,
        byte_streams: 0,
        session: 1,
        exposed: vec![],
    };
    auth::handshake(&mut s, &secret(), &p).unwrap();
    s.set_nodelay(true).unwrap();
    let entries = vec![
        WriteEntry { region: 2, len: 2_000_000, offset: 4096 },
        WriteEntry { region: 2, len: 500_003, offset: 3_000_000 },
    ];
    let payload: Vec<u8> = (0..2_500_003u32).map(|i| (i % 251) as u8 + 1).collect();
    s.write_all(&Frame::Write(WriteFrame { wr_first: 1, signaled: true, urgent: false, entries }).encode()).unwrap();
    // (Without the bound on the wait this stalls on Linux 6.x: the receiver waits for 1 MiB,
    // the window closes before that, the kernel never wakes it.)
    for piece in payload.chunks(64 << 10) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    // the acknowledgement comes before anything else is sent
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ack = [0u8; wire::HEADER_LEN + 8];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(Frame::decode(&ack).unwrap().0, Frame::Ack(2));
    s.write_all(&Frame::Msg(b"after".to_vec()).encode()).unwrap();
    let (tr, m) = t.join().unwrap();
    assert_eq!(m.unwrap().unwrap(), b"after");
    drop(tr);
    // SAFETY: the connection is closed; nothing writes the region any more.
    let d = unsafe { r.dst.as_slice() };
    assert!(d[4096..4096 + 2_000_000] == payload[..2_000_000]);
    assert!(d[3_000_000..3_000_000 + 500_003] == payload[2_000_000..]);
    assert!(d[..4096].iter().all(|&b| b == 0));
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
fn wrong_secret_is_refused_and_the_listener_goes_on() {
    let r = conf::regions(1 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let t = std::thread::spawn(move || l.accept(&cfg(1), &secret(), &dst));
    let wrong = Secret::new("not-the-secret-not-the-secret-not-the-secret").unwrap();
    let e = TcpTransport::connect(addr, &cfg(1), &wrong, &r.src_table).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(matches!(e, TransportError::Handshake { .. }), "{e}");
    assert!(msg.contains("wrong shared secret"), "{msg}");
    // The listener logged it and still serves the peer that knows the secret.
    let mut a = TcpTransport::connect(addr, &cfg(1), &secret(), &r.src_table).unwrap();
    let mut b = t.join().unwrap().unwrap();
    a.send_message(b"still here").unwrap();
    assert_eq!(b.recv_message(Some(Duration::from_secs(5))).unwrap().unwrap(), b"still here");
}

/// What a port scanner, a stalled client, a garbage sender and a trickler do to a listener:
/// none of it ends the listener or delays the real peer behind them.
#[test]
fn hostile_connections_cost_one_slot_each_and_never_the_listener() {
    let r = conf::regions(1 << 20);
    let mut c = cfg(2);
    c.gate.handshake_timeout = Duration::from_millis(1500);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let ca = c.clone();
    let t = std::thread::spawn(move || l.accept(&ca, &secret(), &dst));
    // Closes before HELLO (a port scan).
    drop(TcpStream::connect(addr).unwrap());
    // Connects and sends nothing.
    let idle = TcpStream::connect(addr).unwrap();
    // Sends garbage.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0x5a; 300]).unwrap();
    // Sends half a HELLO and stops.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&b"LMIG"[..]).unwrap();
    let started = std::time::Instant::now();
    let mut a = TcpTransport::connect(addr, &c, &secret(), &r.src_table).unwrap();
    let mut b = t.join().unwrap().unwrap();
    assert!(
        started.elapsed() < c.gate.handshake_timeout,
        "the real peer waited {:?} behind hostile connections",
        started.elapsed()
    );
    a.send_message(b"through").unwrap();
    assert_eq!(b.recv_message(Some(Duration::from_secs(5))).unwrap().unwrap(), b"through");
    // The stalled ones were closed at the handshake deadline, not left open.
    for mut s in [idle, half] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = Vec::new();
        // read_to_end returns only at EOF (or an error): whatever it read, EOF means closed.
        let got = s.read_to_end(&mut sink).map(|_| 0);
        assert!(closed_by_peer(got), "a stalled connection was kept past its handshake deadline");
    }
}

/// Beyond `max_pending` unauthenticated connections, a new one evicts the oldest: a flood
/// of idle connections cannot keep the real peer out.
#[test]
fn unauthenticated_connections_are_capped_by_evicting_the_oldest() {
    let r = conf::regions(1 << 20);
    let mut c = cfg(1);
    c.gate.handshake_timeout = Duration::from_secs(30);
    c.gate.max_pending = 2;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let ca = c.clone();
    let t = std::thread::spawn(move || l.accept(&ca, &secret(), &dst));
    let mut oldest = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _second = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The real peer is the third: it evicts the oldest idle one and gets in at once, long
    // before the 30 s handshake deadline would have freed a slot.
    let started = std::time::Instant::now();
    let mut a = TcpTransport::connect(addr, &c, &secret(), &r.src_table).unwrap();
    let mut rx = t.join().unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    a.send_message(b"past the flood").unwrap();
    assert_eq!(rx.recv_message(Some(Duration::from_secs(5))).unwrap().unwrap(), b"past the flood");
    oldest.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(closed_by_peer(oldest.read(&mut b)), "the oldest idle connection was kept");
}

/// An adversarial client: authenticates correctly, then sends `frame` raw. Returns what the
/// acceptor's `accept` + first receive yield, and the destination region afterwards.
fn adversary(frame: Vec<u8>) -> (TransportError, Vec<u8>) {
    let (e, d, _) = adversary_exposing(vec![], frame);
    (e, d)
}

/// [`adversary`], exposing `exposed` at the handshake; also returns the first frame the
/// acceptor sent back after the handshake (its CLOSE).
fn adversary_exposing(
    exposed: Vec<livemig_transport::RegionInfo>,
    frame: Vec<u8>,
) -> (TransportError, Vec<u8>, Option<Frame>) {
    adversary_guarded(exposed, frame, None)
}

/// [`adversary_exposing`] with `guard` installed on the destination region.
fn adversary_guarded(
    exposed: Vec<livemig_transport::RegionInfo>,
    frame: Vec<u8>,
    guard: Option<livemig_transport::WriteGuard>,
) -> (TransportError, Vec<u8>, Option<Frame>) {
    let r = conf::regions(1 << 20);
    r.dst.set_write_guard(guard);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let t = std::thread::spawn(move || {
        let mut tr = l.accept(&cfg(1), &secret(), &dst).unwrap();
        tr.recv_message(Some(Duration::from_secs(10))).unwrap_err()
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let p = HandshakeParams {
        role: Role::Connector,
        stream: 0,
        streams: 1,
        flags: 0,
        byte_streams: 0,
        session: 1,
        exposed,
    };
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
    (e, d, Frame::decode(&sink).ok().map(|(f, _)| f))
}

fn write_frame(entries: Vec<WriteEntry>, payload: usize) -> Vec<u8> {
    let mut b = Frame::Write(WriteFrame { wr_first: 1, signaled: true, urgent: false, entries }).encode();
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

#[test]
fn a_write_guard_refuses_writes_and_nothing_is_placed() {
    // The guard forbids the second page (e.g. a page already installed by post-copy).
    let guard: livemig_transport::WriteGuard = std::sync::Arc::new(|off, len| off + len <= 4096 || off >= 8192);
    let entries =
        vec![WriteEntry { region: 2, len: 4096, offset: 0 }, WriteEntry { region: 2, len: 4096, offset: 4096 }];
    let (e, d, _) = adversary_guarded(vec![], write_frame(entries, 8192), Some(guard.clone()));
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    assert!(d.iter().all(|&b| b == 0), "nothing of the frame was placed");
    // A write the guard allows is placed (the peer then closes: a disconnect, not a refusal).
    let (e, d, _) = adversary_guarded(
        vec![],
        write_frame(vec![WriteEntry { region: 2, len: 4096, offset: 8192 }], 4096),
        Some(guard),
    );
    assert!(matches!(e, TransportError::Disconnected(_)), "{e}");
    assert!(d[8192..12288].iter().all(|&b| b == 0xee));
}

fn urgent_cfg(streams: u8) -> TcpConfig {
    TcpConfig { urgent_stream: true, ..cfg(streams) }
}

#[test]
fn conformance_urgent_burst() {
    conf::urgent_burst(&pair_with(urgent_cfg(1)), 200);
}

#[test]
fn conformance_urgent_pages_during_bulk() {
    let t = conf::urgent_pages_during_bulk(&pair_with(urgent_cfg(1)), 64 << 20, 200);
    assert_eq!(t.len(), 200);
    let t = conf::urgent_pages_during_bulk(&pair_with(urgent_cfg(2)), 32 << 20, 50);
    assert_eq!(t.len(), 50);
}

#[test]
fn no_urgent_channel_unless_asked() {
    let rg = conf::regions(1 << 20);
    let (a, b) = pair(1)(&rg.src_table, &rg.dst_table);
    assert!(matches!(a.urgent(), Err(TransportError::Unsupported(_))));
    assert!(matches!(b.urgent(), Err(TransportError::Unsupported(_))));
}

/// An urgent write that names a range the receiver did not expose is refused by the sender
/// (checked against the peer's table), and one forged on the wire is refused by the receiver,
/// which closes the session with a typed error and writes nothing.
#[test]
fn urgent_writes_are_bounds_checked() {
    let rg = conf::regions(1 << 20);
    let (a, b) = pair_with(urgent_cfg(1))(&rg.src_table, &rg.dst_table);
    let u = a.urgent().unwrap();
    let seg = [Segment { offset: 0, len: 4096 }];
    let w = WriteRequest { local: 1, segments: &seg, remote: 2, remote_offset: (1 << 20) - 100 };
    assert!(matches!(u.post_write(&w), Err(TransportError::RemoteRange { .. })));
    let w = WriteRequest { local: 1, segments: &seg, remote: 9, remote_offset: 0 };
    assert!(matches!(u.post_write(&w), Err(TransportError::RemoteRange { .. })));
    drop((a, b));
}

/// A peer that trickles an urgent frame a byte at a time cannot hold the receiver: the
/// frame has one deadline (the I/O timeout), not one per read.
#[test]
fn a_trickled_urgent_frame_times_out_as_a_whole() {
    let r = conf::regions(1 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = r.dst_table.clone();
    let io = Duration::from_millis(800);
    let acc = std::thread::spawn(move || {
        let c = TcpConfig { io_timeout: io, ..cfg(1) };
        let tr = l.accept(&c, &secret(), &dst).unwrap();
        let u = tr.urgent().unwrap();
        let t0 = std::time::Instant::now();
        let got = u.recv(Some(Duration::from_secs(20)));
        (got, t0.elapsed(), tr)
    });
    let mut socks = Vec::new();
    for stream in 0..2u8 {
        let mut s = TcpStream::connect(addr).unwrap();
        let p = HandshakeParams {
            role: Role::Connector,
            stream,
            streams: 2,
            flags: wire::HELLO_URGENT_STREAM,
            byte_streams: 0,
            session: 7,
            exposed: vec![],
        };
        auth::authenticate(&mut s, &secret(), &p).unwrap();
        socks.push(s);
    }
    // The acceptor answers the region tables once the whole session is in.
    for s in &mut socks {
        auth::exchange_regions(s, &[]).unwrap();
    }
    // An urgent message, one byte every 300 ms: 12 bytes of header alone take 3.6 s.
    let frame = Frame::Urgent(b"page".to_vec()).encode();
    let trickle = std::thread::spawn(move || {
        let mut u = socks.pop().unwrap();
        for b in frame {
            if u.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        socks
    });
    let (got, took, _tr) = acc.join().unwrap();
    assert!(got.is_err(), "{got:?}");
    assert!(took < Duration::from_millis(2500), "held for {took:?}");
    let _ = trickle.join();
}

/// A peer that sends an URGENT frame on a bulk stream (or bulk on the urgent one) breaks the
/// protocol: the receiver refuses it with a typed error.
#[test]
fn urgent_frame_on_a_bulk_stream_is_refused() {
    let (e, _, close) = adversary_exposing(vec![], Frame::Urgent(b"page 3".to_vec()).encode());
    assert!(matches!(close, Some(Frame::Close { code: wire::close_code::PROTOCOL, .. })), "{close:?}");
    assert!(matches!(e, TransportError::Protocol(_)), "{e}");
}

/// A region exposed after the handshake (a disk, a second guest region): bulk and urgent
/// writes reach it once the peer has read a later message.
#[test]
fn regions_exposed_mid_session() {
    conf::regions_exposed_mid_session(&pair_with(urgent_cfg(2)));
    conf::regions_exposed_mid_session(&pair(1));
}

/// A peer that re-announces an id it already exposed is refused: ids are never redefined.
#[test]
fn a_region_announced_twice_is_refused() {
    let info = livemig_transport::RegionInfo {
        id: 3,
        len: 4096,
        page_size: 4096,
        access: livemig_transport::Access::REMOTE_WRITE,
        addr: 0,
        rkey: 0,
    };
    // Exposed at the handshake, announced again; and announced twice in one frame.
    for (at_handshake, frame) in [(vec![info], vec![info]), (vec![], vec![info, info])] {
        let (e, _, close) = adversary_exposing(at_handshake, Frame::Regions(frame).encode());
        assert!(matches!(close, Some(Frame::Close { code: wire::close_code::PROTOCOL, .. })), "{close:?}");
        assert!(matches!(e, TransportError::Protocol(_)), "{e}");
    }
}

/// Byte-stream channels: raw bytes both ways at once, far beyond the message cap, beside
/// bulk writes; one direction ends cleanly; the descriptor takes a zero-copy splice.
#[test]
fn byte_channels_carry_raw_streams_beside_bulk() {
    let c = TcpConfig { byte_streams: 2, ..cfg(1) };
    conf::byte_channels_beside_bulk(&pair_with(c.clone()), 24 << 20);
    let rg = conf::regions(1 << 20);
    let (mut a, _b) = pair_with(c)(&rg.src_table, &rg.dst_table);
    assert!(matches!(a.byte_channel(2), Err(TransportError::Unsupported(_))), "no third channel");
}
