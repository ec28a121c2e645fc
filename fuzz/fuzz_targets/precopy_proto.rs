//! Fuzzes the pre-copy control-message decoder (messages come from the peer).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = livemig_engine::precopy::proto::decode(data);
});
