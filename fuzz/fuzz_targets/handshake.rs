//! Fuzzes the handshake as the acceptor against an arbitrary peer byte stream: it must end
//! in an error or a success, never a panic, and never accept without the secret.
#![no_main]
use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use livemig_transport::auth::{handshake, HandshakeParams, Secret};
use livemig_transport::wire::Role;

struct Peer<'a> {
    input: &'a [u8],
}
impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}
impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let secret = Secret::new("fuzzing-secret-fuzzing-secret-fuzzing").unwrap();
    let p = HandshakeParams { role: Role::Acceptor, stream: 0, streams: 1, flags: 0, byte_streams: 0, session: 0, exposed: vec![] };
    let r = handshake(&mut Peer { input: data }, &secret, &p);
    // Without knowing our random nonce in advance, no input can produce a valid proof.
    assert!(r.is_err());
});
