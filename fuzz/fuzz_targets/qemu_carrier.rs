//! Fuzzes the carriers' control-message decoder: errors, never panics; whatever decodes
//! re-encodes to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_qemu::carrier::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(data) {
        assert_eq!(decode(&encode(&m)), Ok(m));
    }
});
