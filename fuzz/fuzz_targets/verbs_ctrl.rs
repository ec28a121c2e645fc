//! Fuzzes the verbs backend's control-path decoders (the setup blob, the in-band header of
//! every control-message fragment, region announcements, and the messages of the urgent and
//! byte-channel queue pairs all come from the peer): they never panic, and whatever
//! they accept re-encodes to exactly the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_transport::verbs::ctrl::{decode_announcement, encode_announcement, BytesMsg, MsgHeader, Setup, UrgentMsg, MSG_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Setup::decode(data) {
        assert_eq!(s.encode()[..], *data, "{s:?}");
    }
    if let Ok(h) = MsgHeader::decode(data) {
        let payload = &data[MSG_HEADER_LEN..];
        assert_eq!(h.len as usize, payload.len(), "{h:?}");
        assert_eq!([&h.encode()[..], payload].concat(), data, "{h:?}");
        if h.announce {
            if let Ok(rs) = decode_announcement(payload) {
                assert_eq!(encode_announcement(&rs), payload, "{rs:?}");
            }
        }
    }
    if let Ok(m) = UrgentMsg::decode(data) {
        assert_eq!(m.encode(), data, "{m:?}");
    }
    if let Ok(m) = BytesMsg::decode(data) {
        assert_eq!(m.encode(), data, "{m:?}");
    }
});
