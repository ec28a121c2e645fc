//! Fuzzes the decoder of the RAM description a patched QEMU sends (`x-livemig-attach`):
//! errors, never panics; whatever decodes is within its limits and re-encodes to the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_qemu::external::{decode_attach, MAX_BLOCKS};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_attach(data) {
        assert!(!m.blocks.is_empty() && m.blocks.len() <= MAX_BLOCKS);
        assert!(m.blocks.iter().all(|b| b.length % b.page_size == 0 && b.host.checked_add(b.length).is_some()));
        assert_eq!(decode_attach(&serde_json::to_vec(&m).unwrap()), Ok(m));
    }
});
