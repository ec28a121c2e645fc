//! Fuzzes the daemon's service request and reply decoders: errors, never panics; whatever
//! decodes re-encodes to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_engine::open::{OpenReply, OpenRequest, MAX_REQUEST};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = OpenRequest::decode(data) {
        assert!(data.len() <= MAX_REQUEST);
        assert_eq!(OpenRequest::decode(&r.encode()), Ok(r));
    }
    if let Ok(r) = OpenReply::decode(data) {
        assert_eq!(OpenReply::decode(&r.encode()), Ok(r));
    }
});
