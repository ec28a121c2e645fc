//! Fuzzes the handshake as the acceptor against an arbitrary peer byte stream: it must end
//! in an error or a success, never a panic, and never accept without the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_transport::auth::{handshake, HandshakeParams, Secret};
use livemig_transport::wire::Role;

#[path = "common/peer.rs"]
mod peer;
use peer::Peer;

fuzz_target!(|data: &[u8]| {
    let secret = Secret::new("fuzzing-secret-fuzzing-secret-fuzzing").unwrap();
    let p = HandshakeParams { role: Role::Acceptor, stream: 0, streams: 1, flags: 0, byte_streams: 0, session: 0, exposed: vec![] };
    let r = handshake(&mut Peer { input: data }, &secret, &p);
    // Without knowing our random nonce in advance, no input can produce a valid proof.
    assert!(r.is_err());
});
