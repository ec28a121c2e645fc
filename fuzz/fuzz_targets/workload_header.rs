//! Fuzzes the workload header decoder (page 0 of a migrated region comes from the peer).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = livemig_workload::Header::decode(data);
});
