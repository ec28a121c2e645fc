//! Fuzzes the verbs backend's control-path decoders (the setup blob and the in-band header of
//! every control-message fragment both come from the peer): they never panic, and whatever
//! they accept re-encodes to exactly the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_transport::verbs::ctrl::{MsgHeader, Setup, MSG_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Setup::decode(data) {
        assert_eq!(s.encode()[..], *data, "{s:?}");
    }
    if let Ok(h) = MsgHeader::decode(data) {
        let payload = &data[MSG_HEADER_LEN..];
        assert_eq!(h.len as usize, payload.len(), "{h:?}");
        assert_eq!([&h.encode()[..], payload].concat(), data, "{h:?}");
    }
});
