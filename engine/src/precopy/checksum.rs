//! Whole-region checksum compared at switchover.
//!
//! SHA-256 over fixed 4 MiB chunks, hashed in parallel (the checksum is on the downtime
//! path at both ends), then SHA-256 over `len | chunk size | chunk digests`. Both ends run
//! the same function, so the value is comparable whatever the thread count.

use livemig_transport::Region;
use sha2::{Digest, Sha256};

/// Chunk hashed by one task.
pub const CHUNK: usize = 4 << 20;

/// Checksum of bytes `[0, len)` of `bytes`' owner (a plain slice; see [`region_checksum`]).
pub fn checksum_bytes(bytes: &[u8]) -> [u8; 32] {
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(chunks.len().max(1));
    let mut digests = vec![[0u8; 32]; chunks.len()];
    let per = chunks.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (ins, outs) in chunks.chunks(per).zip(digests.chunks_mut(per)) {
            s.spawn(move || {
                for (c, o) in ins.iter().zip(outs.iter_mut()) {
                    *o = Sha256::digest(c).into();
                }
            });
        }
    });
    let mut h = Sha256::new();
    h.update((bytes.len() as u64).to_le_bytes());
    h.update((CHUNK as u64).to_le_bytes());
    for d in &digests {
        h.update(d);
    }
    h.finalize().into()
}

/// Checksum of the first `len` bytes of `r` (clamped to the region).
///
/// # Safety
/// Nothing may write the region while this runs: the workload is paused or stopped and no
/// transfer into or out of it is in flight (the caller has flushed, or received the message
/// ordered after the peer's last write).
pub unsafe fn region_checksum(r: &Region, len: u64) -> [u8; 32] {
    // SAFETY: quiescence is this function's precondition.
    let all = unsafe { r.as_slice() };
    checksum_bytes(&all[..(len.min(r.len()) as usize)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_one_flipped_byte_and_length() {
        let mut v = vec![0u8; 3 * CHUNK + 100];
        let a = checksum_bytes(&v);
        assert_eq!(a, checksum_bytes(&v));
        v[2 * CHUNK + 7] = 1;
        assert_ne!(a, checksum_bytes(&v));
        assert_ne!(checksum_bytes(&[]), checksum_bytes(&[0]));
    }
}
