//! Fuzzes the NBD server: the option and request decoders, and a whole connection
//! (negotiation and transmission) driven by arbitrary client bytes against a small plain disk.
//! It must end with an error or a clean close, never a panic.
#![no_main]
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use livemig_storage::mirror::Mirror;
use livemig_storage::nbd::proto;
use livemig_storage::nbd::server::{serve_connection, Conn, Export};

#[path = "common/peer.rs"]
mod peer;
use peer::Peer;
impl Conn for Peer<'_> {
    fn set_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_send_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fn export() -> &'static Export {
    static E: OnceLock<Export> = OnceLock::new();
    E.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("livemig-fuzz-nbd-{}.img", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let _ = std::fs::remove_file(&p);
        Export {
            name: "fuzz".into(),
            description: String::new(),
            disk: Arc::new(Mirror::plain(f).unwrap()),
            read_only: false,
            io_timeout: Duration::from_secs(1),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let _ = proto::decode_option_header(data[..16].try_into().unwrap());
    }
    if data.len() >= proto::REQUEST_LEN {
        let _ = proto::Request::decode(data[..proto::REQUEST_LEN].try_into().unwrap());
    }
    let _ = proto::decode_info_request(data);
    let _ = proto::decode_meta_request(data);
    // A session: the 4-byte client flags are forced valid half of the time so negotiation
    // and transmission are reached.
    let mut input = data.to_vec();
    if input.first().is_some_and(|b| b & 1 == 1) && input.len() >= 4 {
        input[0..4].copy_from_slice(&3u32.to_be_bytes());
    }
    let _ = serve_connection(Peer { input: &input }, export());
});
