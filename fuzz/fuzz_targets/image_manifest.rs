//! Fuzzes the image repository's decoders: a manifest from arbitrary bytes (decoded and
//! validated, or refused; never a panic), and, for a manifest that decodes, arbitrary bytes
//! as a stretch of its chunks (checked against their sums, or refused).
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_image::manifest::{parse_ref, runs, Manifest};
use livemig_image::repo::place_stretch;

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(s) = std::str::from_utf8(text) {
        let _ = parse_ref(s);
    }
    let Ok(m) = Manifest::decode(text) else { return };
    assert_eq!(Manifest::decode(&m.encode()).as_ref(), Ok(&m), "a valid manifest round-trips");
    let _ = m.stored_bytes();
    if m.is_empty() {
        return;
    }
    let first = rest.first().copied().unwrap_or(0) as usize % m.len();
    let last = (first + rest.get(1).copied().unwrap_or(0) as usize % 4).min(m.len() - 1);
    let mut out = vec![0u8; rest.len().saturating_sub(2)];
    let _ = place_stretch(&m, first..last + 1, rest.get(2..).unwrap_or(&[]), &mut out);
    let chunks: Vec<usize> = (0..m.len()).filter(|&c| m.chunks[c].is_some()).collect();
    let total: usize = runs(&chunks, 3).iter().map(|r| r.len()).sum();
    assert_eq!(total, chunks.len());
});
