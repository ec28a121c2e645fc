//! The verbs registration cache: which device registration (MR) covers a byte of a region.
//!
//! Two modes ([`RegistrationMode`]):
//! - **pin-all**: every region of the [`RegionTable`] is registered whole, up front.
//! - **on-demand**: a source region is registered chunk by chunk (`chunk_size` bytes, the
//!   last chunk may be shorter) the first time a work request touches the chunk; the MR is
//!   cached by (region, chunk index). A scatter-gather element cannot span two MRs, so the
//!   coalescer's `sge_boundary` must equal the chunk size ([`super::VerbsTransport::coalesce_config`]
//!   does that); a segment that still crosses a boundary is split into one SGE per chunk.
//!
//! Exposed regions (the peer writes them) are always registered whole with remote write
//! access, because their address and rkey go to the peer in the handshake.
//!
//! Before pinning, the bytes to pin are compared with `RLIMIT_MEMLOCK` (skipped with
//! `CAP_IPC_LOCK`, which lifts the limit); an excess is a [`TransportError::Device`] naming
//! the `ulimit -l` value needed.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;

use super::device::{MemoryRegion, MrAccess, ProtectionDomain, Sge, VerbsError};
use crate::region::{Region, RegionId, RegionInfo, RegionTable};
use crate::{Segment, TransportError};

/// How source memory is registered with the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum RegistrationMode {
    /// Register every region whole when the connection is set up.
    #[default]
    PinAll,
    /// Register `chunk_size`-byte chunks of source regions on first use and cache them.
    OnDemand {
        /// Chunk size in bytes (a multiple of the page size; the coalescer's SGE boundary).
        chunk_size: NonZeroU64,
    },
}

impl RegistrationMode {
    /// The coalescer SGE boundary this mode needs (0 = none).
    pub fn sge_boundary(&self) -> u64 {
        match self {
            RegistrationMode::PinAll => 0,
            RegistrationMode::OnDemand { chunk_size } => chunk_size.get(),
        }
    }
}

/// The chunk holding byte `offset` of a `region_len`-byte region cut in `chunk`-byte chunks:
/// `(index, start, len)` (the last chunk is shorter when `chunk` does not divide the region).
pub fn chunk_of(offset: u64, chunk: u64, region_len: u64) -> Option<(u64, u64, u64)> {
    if chunk == 0 || offset >= region_len {
        return None;
    }
    let idx = offset / chunk;
    let start = idx * chunk;
    Some((idx, start, chunk.min(region_len - start)))
}

/// Splits `[offset, offset+len)` at multiples of `chunk`: the pieces as (offset, len).
pub fn split_at_chunks(offset: u64, len: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let mut cur = offset;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let next = match cur.checked_div(chunk) {
            Some(i) => i.saturating_add(1).saturating_mul(chunk).min(end),
            None => end,
        };
        let piece = (cur, next - cur);
        cur = next;
        Some(piece)
    })
}

/// Checks that pinning `adding` more bytes on top of `pinned` stays within `limit`
/// (`None` = unlimited). The error tells the `ulimit -l` value (KiB) that would suffice.
pub fn check_memlock(pinned: u64, adding: u64, limit: Option<u64>) -> Result<(), String> {
    let Some(limit) = limit else { return Ok(()) };
    let total = pinned.saturating_add(adding);
    if total <= limit {
        return Ok(());
    }
    let need_kib = total.div_ceil(1024);
    Err(format!(
        "pinning {adding} bytes ({total} bytes in all) for RDMA exceeds the locked-memory limit of {limit} bytes \
         ({} KiB); raise it to at least `ulimit -l {need_kib}` (KiB) or `ulimit -l unlimited` \
         (or LimitMEMLOCK= / memlock in limits.conf), or use on-demand registration",
        limit / 1024
    ))
}

/// The soft `RLIMIT_MEMLOCK` (`None` when unlimited or when the process has `CAP_IPC_LOCK`,
/// which exempts it).
pub fn memlock_limit() -> Option<u64> {
    if has_cap_ipc_lock() {
        return None;
    }
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid out-pointer; getrlimit has no other preconditions.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}

fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn device_err(e: VerbsError) -> TransportError {
    TransportError::Device(super::error_chain(&e))
}

/// The registration cache of one connection.
#[derive(Debug)]
pub struct MrCache {
    pd: Arc<ProtectionDomain>,
    mode: RegistrationMode,
    table: RegionTable,
    whole: HashMap<RegionId, Arc<MemoryRegion>>,
    chunks: HashMap<(RegionId, u64), Arc<MemoryRegion>>,
    /// Registrations replaced because their region was re-registered under the same id: kept
    /// (still pinned) until the cache drops, because posted work requests may still use them.
    retired: Vec<Arc<MemoryRegion>>,
    pinned: u64,
    limit: Option<u64>,
}

impl MrCache {
    /// An empty cache over `table`.
    pub fn new(pd: Arc<ProtectionDomain>, mode: RegistrationMode, table: RegionTable) -> Self {
        MrCache {
            pd,
            mode,
            table,
            whole: HashMap::new(),
            chunks: HashMap::new(),
            retired: Vec::new(),
            pinned: 0,
            limit: memlock_limit(),
        }
    }

    /// Bytes pinned by this cache (plus [`MrCache::account`]ed buffers).
    pub fn pinned(&self) -> u64 {
        self.pinned
    }

    /// Checks the memlock budget for `bytes` more and records them as pinned.
    pub fn account(&mut self, bytes: u64) -> Result<(), TransportError> {
        check_memlock(self.pinned, bytes, self.limit).map_err(TransportError::Device)?;
        self.pinned += bytes;
        Ok(())
    }

    fn register(
        &mut self,
        r: &Arc<Region>,
        offset: u64,
        len: u64,
        access: MrAccess,
    ) -> Result<Arc<MemoryRegion>, TransportError> {
        check_memlock(self.pinned, len, self.limit).map_err(TransportError::Device)?;
        let mr = MemoryRegion::register(&self.pd, r.clone(), offset, len, access).map_err(device_err)?;
        self.pinned += len;
        Ok(Arc::new(mr))
    }

    /// Registers the regions the peer may write (whole, remote write) and, in pin-all mode,
    /// every other region (whole, local read). The memlock check covers the total first.
    /// Returns the exposed table with addresses and rkeys filled in.
    pub fn setup(&mut self) -> Result<Vec<RegionInfo>, TransportError> {
        let all = self.table.all();
        let pin_all = self.mode == RegistrationMode::PinAll;
        let remote = |r: &Region| r.access().remote_write || r.access().remote_read;
        let total: u64 = all.iter().filter(|r| pin_all || remote(r)).map(|r| r.len()).sum();
        check_memlock(self.pinned, total, self.limit).map_err(TransportError::Device)?;
        let mut exposed = Vec::new();
        for r in &all {
            if !(pin_all || remote(r)) {
                continue;
            }
            exposed.extend(self.register_whole(r)?);
        }
        Ok(exposed)
    }

    /// Registers `r` whole with the access its flags ask for; returns its entry for the peer
    /// when the peer may access it.
    fn register_whole(&mut self, r: &Arc<Region>) -> Result<Option<RegionInfo>, TransportError> {
        let access = match (r.access().remote_write, r.access().remote_read) {
            (true, true) => MrAccess::RemoteReadWrite,
            (true, false) => MrAccess::RemoteWrite,
            (false, true) => MrAccess::RemoteRead,
            (false, false) => MrAccess::LocalRead,
        };
        let mr = self.register(r, 0, r.len(), access)?;
        let info = (r.access().remote_write || r.access().remote_read).then(|| RegionInfo {
            id: r.id(),
            len: r.len(),
            page_size: r.page_size(),
            access: r.access(),
            addr: mr.addr(),
            rkey: mr.rkey(),
        });
        if let Some(old) = self.whole.insert(r.id(), mr) {
            self.retired.push(old);
        }
        Ok(info)
    }

    /// A region added to the table after the setup: registers it whole now when the peer may
    /// access it (its entry, with address and rkey, is returned for the announcement); a
    /// local-only region is left to [`MrCache::sges`] (pinned or chunked on first use).
    pub fn expose(&mut self, r: &Arc<Region>) -> Result<Option<RegionInfo>, TransportError> {
        if !(r.access().remote_write || r.access().remote_read) {
            return Ok(None);
        }
        self.register_whole(r)
    }

    /// Appends the SGEs for `seg` of local region `id` to `out`, registering what is missing.
    /// Checks the range against the region.
    pub fn sges(&mut self, id: RegionId, seg: Segment, out: &mut Vec<Sge>) -> Result<(), TransportError> {
        let range_err = || TransportError::LocalRange { region: id, offset: seg.offset, len: seg.len as u64 };
        let r = self.table.get(id).ok_or_else(range_err)?;
        if !r.contains(seg.offset, seg.len as u64) {
            return Err(range_err());
        }
        if seg.len == 0 {
            return Ok(());
        }
        let base = r.as_ptr() as u64;
        // A whole-region registration of this very mapping (the table may have replaced the
        // region under the same id since: compare the Arc, not the id).
        if let Some(mr) = self.whole.get(&id).filter(|m| Arc::ptr_eq(m.region(), &r)) {
            out.push(Sge { addr: base + seg.offset, len: seg.len, lkey: mr.lkey() });
            return Ok(());
        }
        match self.mode {
            RegistrationMode::PinAll => {
                // Registered after the connection was set up: pin it whole now.
                let mr = self.register(&r, 0, r.len(), MrAccess::LocalRead)?;
                out.push(Sge { addr: base + seg.offset, len: seg.len, lkey: mr.lkey() });
                if let Some(old) = self.whole.insert(id, mr) {
                    self.retired.push(old);
                }
            }
            RegistrationMode::OnDemand { chunk_size } => {
                let chunk = chunk_size.get();
                for (off, len) in split_at_chunks(seg.offset, seg.len as u64, chunk) {
                    let (idx, start, clen) = chunk_of(off, chunk, r.len()).ok_or_else(range_err)?;
                    let mr = match self.chunks.get(&(id, idx)).filter(|m| Arc::ptr_eq(m.region(), &r)) {
                        Some(m) => m.clone(),
                        None => {
                            let m = self.register(&r, start, clen, MrAccess::LocalRead)?;
                            if let Some(old) = self.chunks.insert((id, idx), m.clone()) {
                                self.retired.push(old);
                            }
                            m
                        }
                    };
                    debug_assert!(mr.covers(off, len));
                    out.push(Sge { addr: base + off, len: len as u32, lkey: mr.lkey() });
                }
            }
        }
        Ok(())
    }

    /// Test-only: pretend RLIMIT_MEMLOCK is `limit` (root in the test guest is exempt).
    #[cfg(test)]
    pub(crate) fn set_limit_for_test(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }

    /// Chunks registered on demand so far.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_message_names_the_ulimit() {
        assert!(check_memlock(0, 1 << 30, None).is_ok());
        assert!(check_memlock(4096, 4096, Some(8192)).is_ok());
        let e = check_memlock(1 << 20, (8 << 20) + 1, Some(8 << 20)).unwrap_err();
        // 9 MiB + 1 byte → 9217 KiB (rounded up)
        assert!(e.contains("ulimit -l 9217"), "{e}");
        assert!(e.contains("8192 KiB"), "{e}");
        let e = check_memlock(0, 65537, Some(65536)).unwrap_err();
        assert!(e.contains("ulimit -l 65"), "{e}");
        assert!(check_memlock(u64::MAX, 2, Some(10)).is_err(), "no overflow");
    }

    #[test]
    fn chunk_mapping() {
        let c = 64 << 10;
        assert_eq!(chunk_of(0, c, 1 << 20), Some((0, 0, c)));
        assert_eq!(chunk_of(c + 5, c, 1 << 20), Some((1, c, c)));
        // short last chunk
        assert_eq!(chunk_of(100_000, c, 100 * 1024), Some((1, c, 100 * 1024 - c)));
        assert_eq!(chunk_of(1 << 20, c, 1 << 20), None);
        assert_eq!(chunk_of(0, 0, 1 << 20), None);
        let pieces: Vec<_> = split_at_chunks(c - 4096, 3 * c, c).collect();
        assert_eq!(pieces, vec![(c - 4096, 4096), (c, c), (2 * c, c), (3 * c, c - 4096)]);
        assert_eq!(split_at_chunks(0, c, c).collect::<Vec<_>>(), vec![(0, c)]);
        assert_eq!(split_at_chunks(10, 0, c).count(), 0);
        assert_eq!(split_at_chunks(10, 100, 0).collect::<Vec<_>>(), vec![(10, 100)]);
    }

    #[test]
    fn mode_boundary_and_serde() {
        let m = RegistrationMode::OnDemand { chunk_size: NonZeroU64::new(1 << 20).unwrap() };
        assert_eq!(m.sge_boundary(), 1 << 20);
        assert_eq!(RegistrationMode::PinAll.sge_boundary(), 0);
        assert_eq!(RegistrationMode::default(), RegistrationMode::PinAll);
    }

    #[test]
    fn memlock_limit_reads() {
        // Whatever the environment, the call works and is consistent with getrlimit.
        let _ = memlock_limit();
    }
}
