//! Fuzzes the live disk-transfer message decoder and the disk control socket's request parser:
//! errors, never panics; whatever decodes re-encodes to something that decodes to the same
//! value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_storage::cli::control::parse_request;
use livemig_storage::live::proto::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(data) {
        assert_eq!(decode(&encode(&m)), Ok(m));
    }
    if let Ok(r) = parse_request(data) {
        let again = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse_request(&again), Ok(r));
    }
});
