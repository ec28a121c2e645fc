//! Fuzzes the pre-copy control-message decoder (messages come from the peer): it never
//! panics, and whatever it accepts re-encodes to exactly the same bytes (one encoding per
//! message, so nothing is silently reinterpreted).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = livemig_engine::precopy::proto::decode(data) {
        assert_eq!(m.encode(), data, "{m:?}");
    }
});
