//! Safe wrappers over the rdma-core verbs objects. Every FFI call of the verbs backend is in
//! this file.
//!
//! Ownership mirrors the verbs object graph, so drop order can never leak or free a parent
//! first: a [`QueuePair`] holds `Arc`s of its [`ProtectionDomain`] and both
//! [`CompletionQueue`]s, a completion queue holds its [`Context`] (and its
//! [`CompletionChannel`]), a [`MemoryRegion`] holds its protection domain and the memory it
//! pins, and a protection domain holds the context. Whatever order the owner drops its
//! fields in, each object is destroyed before the objects it depends on.
//!
//! The queue-pair lifecycle is a typestate: [`PreparedQueuePair`] (created and moved to
//! INIT; receives may be posted, its [`Endpoint`] goes to the peer) becomes a
//! [`QueuePair`] (RTR then RTS) only through [`PreparedQueuePair::connect`], so sending on
//! an unconnected queue pair does not compile.

use std::ffi::CStr;
use std::num::NonZeroU8;
use std::os::raw::{c_int, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_sys as sys;

use super::events::{element_kind, AsyncEvent, ElementKind, EventElement};
use crate::region::Region;

/// `IBV_LINK_LAYER_INFINIBAND` (a `#define` in verbs.h, not in the bindings).
const LINK_LAYER_INFINIBAND: u8 = 1;

extern "C" {
    // `ibv_query_gid_ex` is a static inline wrapper around this exported symbol
    // (libibverbs IBVERBS_1.11, rdma-core ≥ 32); rdma-sys 0.3 does not bind it.
    fn _ibv_query_gid_ex(
        context: *mut sys::ibv_context,
        port_num: u32,
        gid_index: u32,
        entry: *mut sys::ibv_gid_entry,
        flags: u32,
        entry_size: usize,
    ) -> c_int;
}

/// `struct ibv_async_event`, declared here with a plain integer event type: rdma-sys binds
/// `event_type` as a Rust enum, and a value outside it (an event type newer than the
/// bindings) would be undefined behaviour to hold. libibverbs only writes into this memory.
#[repr(C)]
struct RawAsyncEvent {
    element: RawEventElement,
    event_type: u32,
}

/// The element union of `struct ibv_async_event` (object pointers or `int port_num`).
#[repr(C)]
#[derive(Clone, Copy)]
union RawEventElement {
    ptr: *mut c_void,
    port_num: c_int,
}

const _: () = assert!(
    std::mem::size_of::<RawAsyncEvent>() == std::mem::size_of::<sys::ibv_async_event>()
        && std::mem::align_of::<RawAsyncEvent>() == std::mem::align_of::<sys::ibv_async_event>()
);

/// A verbs call failed, or the device does not fit the request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbsError {
    /// `ibv_get_device_list` returned nothing.
    #[error("no RDMA device found (load a driver, e.g. `rdma link add rxe0 type rxe netdev eth0`)")]
    NoDevice,
    /// The named device does not exist.
    #[error("RDMA device {name:?} not found (present: {present})")]
    DeviceNotFound {
        /// Requested name.
        name: String,
        /// Devices that exist.
        present: String,
    },
    /// No port of any (or of the named) device is ACTIVE.
    #[error("no ACTIVE port on {what}")]
    NoActivePort {
        /// Which devices/ports were looked at.
        what: String,
    },
    /// The requested port is not ACTIVE.
    #[error("port {port} of {device} is not ACTIVE (state {state})")]
    PortNotActive {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// `ibv_port_state` value.
        state: u32,
    },
    /// No usable GID was found or the requested one is empty.
    #[error("no usable GID on {device} port {port}: {why}")]
    NoGid {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// Details.
        why: String,
    },
    /// A verb returned an error.
    #[error("{op} failed")]
    Verb {
        /// The verb.
        op: &'static str,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// A request exceeds what the device or queue pair supports.
    #[error("{0}")]
    Limit(String),
}

fn errno(op: &'static str) -> VerbsError {
    VerbsError::Verb { op, source: std::io::Error::last_os_error() }
}

fn rc_err(op: &'static str, rc: c_int) -> VerbsError {
    // Verbs that return an int return a positive errno (some providers return -errno).
    VerbsError::Verb { op, source: std::io::Error::from_raw_os_error(rc.abs()) }
}

/// Which device, port and GID to use (like perftest's `-d`, `-i`, `-x`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSelection {
    /// Device name (e.g. `rxe0`, `mlx5_0`); default: the first device with an ACTIVE port.
    pub device: Option<String>,
    /// Port number (1-based); default: the first ACTIVE port of the device.
    pub ib_port: Option<NonZeroU8>,
    /// GID table index; default: the first RoCE v2 IPv4-mapped GID on Ethernet ports
    /// (index 0 is the link-local GID, which rxe cannot route), index 0 on InfiniBand.
    pub gid_index: Option<u8>,
}

/// Device limits the backend sizes its queues with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Maximum work requests per queue.
    pub max_qp_wr: u32,
    /// Maximum scatter-gather elements per work request.
    pub max_sge: u32,
    /// Maximum completion queue entries.
    pub max_cqe: u32,
    /// Largest memory registration.
    pub max_mr_size: u64,
    /// Largest message on the port.
    pub max_msg_sz: u32,
}

/// An open device with the chosen port and GID.
pub struct Context {
    ctx: NonNull<sys::ibv_context>,
    name: String,
    port: u8,
    lid: u16,
    link_layer: u8,
    active_mtu: u8,
    gid_index: u8,
    gid: [u8; 16],
    limits: DeviceLimits,
}

// SAFETY: an `ibv_context` may be used from any thread; libibverbs serialises the verbs that
// need it internally (rdma-core documents all verbs as thread-safe). The fields besides the
// pointer are plain data.
unsafe impl Send for Context {}
// SAFETY: see above; `&Context` only issues thread-safe verbs.
unsafe impl Sync for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &gid_string(&self.gid))
            .field("active_mtu", &mtu_bytes(self.active_mtu))
            .finish()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from ibv_open_device and is closed exactly once, here. Every child
        // object holds an `Arc<Context>`, so none is alive any more.
        unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// The device list, freed on drop.
struct DeviceList {
    list: *mut *mut sys::ibv_device,
    n: usize,
}

impl DeviceList {
    fn get() -> Result<Self, VerbsError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the returned array is freed in Drop.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            // ENOSYS = no kernel support at all: report it as "no device".
            return Err(VerbsError::NoDevice);
        }
        Ok(DeviceList { list, n: n.max(0) as usize })
    }

    fn device(&self, i: usize) -> *mut sys::ibv_device {
        assert!(i < self.n);
        // SAFETY: the array holds `n` valid device pointers (and a NULL terminator).
        unsafe { *self.list.add(i) }
    }

    fn name(&self, i: usize) -> String {
        // SAFETY: `device(i)` is valid while the list lives; the name is a NUL-terminated
        // string owned by the device.
        unsafe { CStr::from_ptr(sys::ibv_get_device_name(self.device(i))) }.to_string_lossy().into_owned()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `list` came from ibv_get_device_list and is freed once. Contexts opened from
        // its devices stay valid after the list is freed (libibverbs refcounts devices).
        unsafe { sys::ibv_free_device_list(self.list) };
    }
}

/// Port attributes we use.
#[derive(Debug, Clone, Copy)]
struct PortInfo {
    state: u32,
    active_mtu: u8,
    lid: u16,
    link_layer: u8,
    gid_tbl_len: i32,
    max_msg_sz: u32,
}

/// `ibv_query_port`.
///
/// # Safety
/// `ctx` must be an open context.
unsafe fn query_port(ctx: NonNull<sys::ibv_context>, port: u8) -> Result<PortInfo, VerbsError> {
    // SAFETY: an all-zero ibv_port_attr is valid (integers only).
    let mut a: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the context is open (caller), `a` is a valid out-pointer of the size rdma-sys
    // passes.
    let rc = unsafe { sys::___ibv_query_port(ctx.as_ptr(), port, &mut a) };
    if rc != 0 {
        return Err(rc_err("ibv_query_port", rc));
    }
    Ok(PortInfo {
        state: a.state,
        active_mtu: a.active_mtu as u8,
        lid: a.lid,
        link_layer: a.link_layer,
        gid_tbl_len: a.gid_tbl_len,
        max_msg_sz: a.max_msg_sz,
    })
}

/// `IBV_PORT_ACTIVE`, the port state in which traffic flows.
pub const PORT_ACTIVE: u32 = sys::ibv_port_state::IBV_PORT_ACTIVE;

/// Name of an `ibv_port_state` value (like `ibv_port_state_str`).
pub fn port_state_str(state: u32) -> &'static str {
    use sys::ibv_port_state as p;
    match state {
        p::IBV_PORT_NOP => "NOP",
        p::IBV_PORT_DOWN => "DOWN",
        p::IBV_PORT_INIT => "INIT",
        p::IBV_PORT_ARMED => "ARMED",
        p::IBV_PORT_ACTIVE => "ACTIVE",
        p::IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "unknown state",
    }
}

/// An opened device before port/GID selection (closed on drop unless turned into a Context).
struct RawCtx(NonNull<sys::ibv_context>);

impl Drop for RawCtx {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, no children were created from it.
        unsafe { sys::ibv_close_device(self.0.as_ptr()) };
    }
}

impl RawCtx {
    fn open(dev: *mut sys::ibv_device) -> Result<Self, VerbsError> {
        // SAFETY: `dev` is a live entry of a device list.
        let ctx = unsafe { sys::ibv_open_device(dev) };
        let raw = NonNull::new(ctx).map(RawCtx).ok_or_else(|| errno("ibv_open_device"))?;
        // The async event fd is only ever read with ibv_get_async_event from
        // `Context::next_async_event`, which must not block (the documented way: O_NONBLOCK).
        set_nonblocking(raw.async_fd())
            .map_err(|source| VerbsError::Verb { op: "fcntl(O_NONBLOCK) on the async event fd", source })?;
        Ok(raw)
    }

    fn async_fd(&self) -> c_int {
        // SAFETY: the context is open; `async_fd` is a plain field set by ibv_open_device.
        unsafe { (*self.0.as_ptr()).async_fd }
    }

    fn query_device(&self) -> Result<sys::ibv_device_attr, VerbsError> {
        // SAFETY: an all-zero ibv_device_attr is a valid value (integers and arrays only).
        let mut a: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `a` is a valid out-pointer.
        let rc = unsafe { sys::ibv_query_device(self.0.as_ptr(), &mut a) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(a)
    }

    fn query_port(&self, port: u8) -> Result<PortInfo, VerbsError> {
        // SAFETY: the context is open until `self` drops.
        unsafe { query_port(self.0, port) }
    }

    /// The GID at `index` and whether it is a RoCE v2 entry (`None` if the type is unknown).
    fn query_gid(&self, port: u8, index: i32) -> Option<([u8; 16], Option<bool>)> {
        // SAFETY: an all-zero ibv_gid_entry is valid (integers and a byte union).
        let mut e: sys::ibv_gid_entry = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; `e` is a valid out-pointer of the size we pass.
        let rc = unsafe {
            _ibv_query_gid_ex(
                self.0.as_ptr(),
                port as u32,
                index as u32,
                &mut e,
                0,
                std::mem::size_of::<sys::ibv_gid_entry>(),
            )
        };
        if rc == 0 {
            // SAFETY: `raw` is the byte view of the GID union; every bit pattern is valid.
            let raw = unsafe { e.gid.raw };
            return Some((raw, Some(e.gid_type == sys::IBV_GID_TYPE_ROCE_V2)));
        }
        // Older libibverbs or an empty entry: fall back to the plain query.
        // SAFETY: an all-zero GID is valid.
        let mut g: sys::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `g` is a valid out-pointer.
        let rc = unsafe { sys::ibv_query_gid(self.0.as_ptr(), port, index, &mut g) };
        if rc != 0 {
            return None;
        }
        // SAFETY: as above, the byte view of the union.
        Some((unsafe { g.raw }, None))
    }
}

fn set_nonblocking(fd: c_int) -> std::io::Result<()> {
    // SAFETY: `fd` is an open descriptor owned by libibverbs; F_GETFL/F_SETFL take no pointers
    // and only change the file status flags.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True for `::ffff:a.b.c.d`.
pub fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10] == [0u8; 10] && gid[10] == 0xff && gid[11] == 0xff
}

/// Colon-separated hex, like `ibv_devinfo -v`.
pub fn gid_string(gid: &[u8; 16]) -> String {
    gid.chunks(2).map(|c| format!("{:02x}{:02x}", c[0], c[1])).collect::<Vec<_>>().join(":")
}

/// Bytes of an `ibv_mtu` enum value (1 = 256 … 5 = 4096).
pub fn mtu_bytes(mtu: u8) -> u32 {
    if (1..=5).contains(&mtu) {
        128 << mtu
    } else {
        0
    }
}

impl Context {
    /// Opens the device selected by `sel` (see [`DeviceSelection`] for the defaults).
    pub fn open(sel: &DeviceSelection) -> Result<Arc<Context>, VerbsError> {
        let list = DeviceList::get()?;
        if list.n == 0 {
            return Err(VerbsError::NoDevice);
        }
        let names: Vec<String> = (0..list.n).map(|i| list.name(i)).collect();
        let candidates: Vec<usize> = match &sel.device {
            Some(want) => match names.iter().position(|n| n == want) {
                Some(i) => vec![i],
                None => return Err(VerbsError::DeviceNotFound { name: want.clone(), present: names.join(", ") }),
            },
            None => (0..list.n).collect(),
        };
        let mut looked = Vec::new();
        for i in candidates {
            let raw = RawCtx::open(list.device(i))?;
            let attr = raw.query_device()?;
            let ports: Vec<u8> = match sel.ib_port {
                Some(p) => vec![p.get()],
                None => (1..=attr.phys_port_cnt).collect(),
            };
            for port in ports {
                let pi = raw.query_port(port)?;
                if pi.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
                    if sel.ib_port.is_some() && sel.device.is_some() {
                        return Err(VerbsError::PortNotActive { device: names[i].clone(), port, state: pi.state });
                    }
                    looked.push(format!("{}:{port}", names[i]));
                    continue;
                }
                let (gid_index, gid) = Self::pick_gid(&raw, &names[i], port, &pi, sel.gid_index)?;
                let ctx = Context {
                    ctx: raw.0,
                    name: names[i].clone(),
                    port,
                    lid: pi.lid,
                    link_layer: pi.link_layer,
                    active_mtu: pi.active_mtu,
                    gid_index,
                    gid,
                    limits: DeviceLimits {
                        max_qp_wr: attr.max_qp_wr.max(0) as u32,
                        max_sge: attr.max_sge.max(0) as u32,
                        max_cqe: attr.max_cqe.max(0) as u32,
                        max_mr_size: attr.max_mr_size,
                        max_msg_sz: pi.max_msg_sz,
                    },
                };
                std::mem::forget(raw); // ownership moved into `ctx`
                return Ok(Arc::new(ctx));
            }
        }
        Err(VerbsError::NoActivePort { what: if looked.is_empty() { names.join(", ") } else { looked.join(", ") } })
    }

    fn pick_gid(
        raw: &RawCtx,
        dev: &str,
        port: u8,
        pi: &PortInfo,
        want: Option<u8>,
    ) -> Result<(u8, [u8; 16]), VerbsError> {
        let no_gid = |why: String| VerbsError::NoGid { device: dev.to_owned(), port, why };
        if let Some(idx) = want {
            return match raw.query_gid(port, idx as i32) {
                Some((g, _)) if g != [0; 16] => Ok((idx, g)),
                _ => Err(no_gid(format!("GID index {idx} is empty or out of range"))),
            };
        }
        if pi.link_layer == LINK_LAYER_INFINIBAND {
            return match raw.query_gid(port, 0) {
                Some((g, _)) => Ok((0, g)),
                None => Err(no_gid("GID index 0 unreadable".into())),
            };
        }
        let mut fallback = None;
        for idx in 0..pi.gid_tbl_len.min(256) {
            let Some((g, v2)) = raw.query_gid(port, idx) else { continue };
            if g == [0; 16] || !is_ipv4_mapped(&g) {
                continue;
            }
            match v2 {
                Some(true) => return Ok((idx as u8, g)),
                None if fallback.is_none() => fallback = Some((idx as u8, g)),
                _ => {}
            }
        }
        fallback.ok_or_else(|| {
            no_gid("no RoCE v2 IPv4-mapped GID (configure an IPv4 address on the netdev or pass gid_index)".into())
        })
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Port in use.
    pub fn port(&self) -> u8 {
        self.port
    }
    /// GID index in use.
    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }
    /// GID in use.
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }
    /// Active MTU of the port (`ibv_mtu` enum value).
    pub fn active_mtu(&self) -> u8 {
        self.active_mtu
    }
    /// Device limits.
    pub fn limits(&self) -> DeviceLimits {
        self.limits
    }
    /// True on an InfiniBand port (LID routing), false on RoCE.
    pub fn is_infiniband(&self) -> bool {
        self.link_layer == LINK_LAYER_INFINIBAND
    }

    /// The current state of the port in use (`ibv_port_state`, [`PORT_ACTIVE`] when usable).
    pub fn port_state(&self) -> Result<u32, VerbsError> {
        // SAFETY: the context is open until `self` drops.
        Ok(unsafe { query_port(self.ctx, self.port) }?.state)
    }

    /// The context's async event descriptor (non-blocking): readable when an asynchronous
    /// event is queued, for poll(2).
    pub fn async_fd(&self) -> c_int {
        // SAFETY: the context is open; `async_fd` is a plain field set by ibv_open_device.
        unsafe { (*self.ctx.as_ptr()).async_fd }
    }

    /// Reads the next queued asynchronous event without blocking and acknowledges it at once
    /// (so destroying the object it names never waits for us); `Ok(None)` when none is queued.
    /// The event's object is reported by handle only (see [`super::events`]).
    pub fn next_async_event(&self) -> Result<Option<AsyncEvent>, VerbsError> {
        loop {
            let mut raw = RawAsyncEvent { element: RawEventElement { ptr: ptr::null_mut() }, event_type: 0 };
            let p: *mut RawAsyncEvent = &mut raw;
            // SAFETY: the context is open and `p` points to writable memory with the layout of
            // `struct ibv_async_event` (checked above). The async fd is non-blocking (set in
            // `RawCtx::open`), so this returns -1/EAGAIN when nothing is queued.
            let rc = unsafe { sys::ibv_get_async_event(self.ctx.as_ptr(), p.cast()) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => return Ok(None),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(VerbsError::Verb { op: "ibv_get_async_event", source: e }),
                }
            }
            let t = raw.event_type;
            // SAFETY: libibverbs filled in the union member that `element_kind` names for this
            // event type (its own switch); reading a pointer or an int is valid for any bits.
            // The pointers are only converted to integers, never dereferenced.
            let element = unsafe {
                match element_kind(t) {
                    ElementKind::Cq => EventElement::Cq(raw.element.ptr as usize),
                    ElementKind::Qp => EventElement::Qp(raw.element.ptr as usize),
                    ElementKind::Srq => EventElement::Srq(raw.element.ptr as usize),
                    ElementKind::Wq => EventElement::Wq(raw.element.ptr as usize),
                    ElementKind::Port => EventElement::Port(raw.element.port_num),
                    ElementKind::Device => EventElement::Device,
                }
            };
            // SAFETY: `p` holds the event just returned by ibv_get_async_event, unmodified; it is
            // acknowledged exactly once.
            unsafe { sys::ibv_ack_async_event(p.cast()) };
            return Ok(Some(AsyncEvent { event_type: t, element }));
        }
    }
}

/// True when some RDMA device has an ACTIVE port (for `--transport auto`).
pub fn active_device_present() -> bool {
    let Ok(list) = DeviceList::get() else { return false };
    for i in 0..list.n {
        let Ok(raw) = RawCtx::open(list.device(i)) else { continue };
        let Ok(attr) = raw.query_device() else { continue };
        for port in 1..=attr.phys_port_cnt {
            if raw.query_port(port).is_ok_and(|p| p.state == sys::ibv_port_state::IBV_PORT_ACTIVE) {
                return true;
            }
        }
    }
    false
}

/// Names of the RDMA devices present (empty without any).
pub fn device_names() -> Vec<String> {
    match DeviceList::get() {
        Ok(l) => (0..l.n).map(|i| l.name(i)).collect(),
        Err(_) => Vec::new(),
    }
}

/// A protection domain.
pub struct ProtectionDomain {
    pd: NonNull<sys::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: a PD handle is usable from any thread (thread-safe verbs); it is only read.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain").field("device", &self.ctx.name).finish()
    }
}

impl ProtectionDomain {
    /// Allocates a protection domain.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: the context is open (we hold an Arc to it).
        let pd = unsafe { sys::ibv_alloc_pd(ctx.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| errno("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain { pd, ctx: ctx.clone() }))
    }
    /// The device context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; every QP and MR of this PD holds an Arc to it and
        // is therefore already destroyed.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A completion channel: a file descriptor that becomes readable when an armed CQ gets a
/// completion (event mode instead of busy polling).
pub struct CompletionChannel {
    ch: NonNull<sys::ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: the channel is a kernel fd plus a refcount libibverbs updates under its own lock.
unsafe impl Send for CompletionChannel {}
// SAFETY: as above; concurrent ibv_get_cq_event calls are allowed by libibverbs.
unsafe impl Sync for CompletionChannel {}

impl std::fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionChannel").field("fd", &self.fd()).finish()
    }
}

impl CompletionChannel {
    /// Creates a channel with a non-blocking fd.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: the context is open.
        let ch = unsafe { sys::ibv_create_comp_channel(ctx.ctx.as_ptr()) };
        let ch = NonNull::new(ch).ok_or_else(|| errno("ibv_create_comp_channel"))?;
        let chan = CompletionChannel { ch, _ctx: ctx.clone() };
        set_nonblocking(chan.fd())
            .map_err(|source| VerbsError::Verb { op: "fcntl(O_NONBLOCK) on the completion channel", source })?;
        Ok(Arc::new(chan))
    }

    /// The descriptor to poll(2) on.
    pub fn fd(&self) -> c_int {
        // SAFETY: `ch` is a live channel; `fd` is a plain field.
        unsafe { (*self.ch.as_ptr()).fd }
    }

    /// Reads and acknowledges every pending event; returns how many there were.
    pub fn drain_events(&self) -> Result<usize, VerbsError> {
        let mut n = 0;
        loop {
            let mut cq: *mut sys::ibv_cq = ptr::null_mut();
            let mut cq_ctx: *mut c_void = ptr::null_mut();
            // SAFETY: the channel is live, both out-pointers are valid. The fd is non-blocking,
            // so this returns -1/EAGAIN when no event is queued.
            let rc = unsafe { sys::ibv_get_cq_event(self.ch.as_ptr(), &mut cq, &mut cq_ctx) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(n);
                }
                return Err(VerbsError::Verb { op: "ibv_get_cq_event", source: e });
            }
            // SAFETY: `cq` was just returned by ibv_get_cq_event, so it is a live CQ attached to
            // this channel (a CQ cannot be destroyed while it has unacknowledged events, and we
            // acknowledge at once).
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            n += 1;
        }
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel; every CQ using it holds an Arc to it and
        // has been destroyed.
        unsafe { sys::ibv_destroy_comp_channel(self.ch.as_ptr()) };
    }
}

/// A work completion, copied out of the CQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The work request id.
    pub wr_id: u64,
    /// `ibv_wc_status` (0 = success).
    pub status: u32,
    /// `ibv_wc_opcode`.
    pub opcode: u32,
    /// Received bytes (receives).
    pub byte_len: u32,
    /// Provider-specific error.
    pub vendor_err: u32,
}

impl WorkCompletion {
    /// True on success.
    pub fn ok(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }
}

/// The provider's text for a completion status.
pub fn wc_status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str accepts any value and returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::ibv_wc_status_str(status)) }.to_string_lossy().into_owned()
}

/// Completion statuses the backend maps specially.
pub mod status {
    use rdma_sys::ibv_wc_status as s;
    /// Success.
    pub const SUCCESS: u32 = s::IBV_WC_SUCCESS;
    /// The work request was flushed because the QP is in the error state.
    pub const WR_FLUSH_ERR: u32 = s::IBV_WC_WR_FLUSH_ERR;
    /// The remote side refused the access (bad rkey, out of range, no permission).
    pub const REM_ACCESS_ERR: u32 = s::IBV_WC_REM_ACCESS_ERR;
    /// Transport retries exhausted: the peer stopped answering.
    pub const RETRY_EXC_ERR: u32 = s::IBV_WC_RETRY_EXC_ERR;
    /// RNR retries exhausted: the peer had no receive posted.
    pub const RNR_RETRY_EXC_ERR: u32 = s::IBV_WC_RNR_RETRY_EXC_ERR;
    /// Local QP operation error (rxe: the packet could not be routed, e.g. its netdev is down).
    pub const LOC_QP_OP_ERR: u32 = s::IBV_WC_LOC_QP_OP_ERR;
    /// Fatal device error.
    pub const FATAL_ERR: u32 = s::IBV_WC_FATAL_ERR;
    /// Response timeout.
    pub const RESP_TIMEOUT_ERR: u32 = s::IBV_WC_RESP_TIMEOUT_ERR;
    /// Other error.
    pub const GENERAL_ERR: u32 = s::IBV_WC_GENERAL_ERR;

    /// True for the statuses a failure of the local port or device produces (as opposed to
    /// a bad request or a refusal by the peer), which may have an asynchronous event as
    /// their cause that is still on its way.
    pub fn may_have_a_device_cause(status: u32) -> bool {
        matches!(status, LOC_QP_OP_ERR | WR_FLUSH_ERR | RETRY_EXC_ERR | FATAL_ERR | RESP_TIMEOUT_ERR | GENERAL_ERR)
    }
}

/// A completion queue.
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    channel: Option<Arc<CompletionChannel>>,
    _ctx: Arc<Context>,
}

// SAFETY: CQ verbs are thread-safe in libibverbs (providers lock the CQ); the backend polls
// each CQ from one thread at a time anyway.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue").field("event_mode", &self.channel.is_some()).finish()
    }
}

impl CompletionQueue {
    /// Creates a CQ with room for `cqe` entries, optionally bound to a completion channel.
    pub fn new(
        ctx: &Arc<Context>,
        cqe: u32,
        channel: Option<&Arc<CompletionChannel>>,
    ) -> Result<Arc<Self>, VerbsError> {
        let max = ctx.limits.max_cqe.max(1);
        if cqe > max {
            return Err(VerbsError::Limit(format!("a CQ of {cqe} entries exceeds the device maximum {max}")));
        }
        let ch = channel.map_or(ptr::null_mut(), |c| c.ch.as_ptr());
        // SAFETY: the context is open; `ch` is NULL or a live channel of the same context that
        // outlives the CQ (we keep an Arc).
        let cq = unsafe { sys::ibv_create_cq(ctx.ctx.as_ptr(), cqe as c_int, ptr::null_mut(), ch, 0) };
        let cq = NonNull::new(cq).ok_or_else(|| errno("ibv_create_cq"))?;
        Ok(Arc::new(CompletionQueue { cq, channel: channel.cloned(), _ctx: ctx.clone() }))
    }

    /// Polls up to `out`'s spare capacity (at most 32) completions; returns how many were added.
    pub fn poll(&self, out: &mut Vec<WorkCompletion>) -> Result<usize, VerbsError> {
        const N: usize = 32;
        // SAFETY: ibv_wc is plain integers and an integer union; all-zero is valid.
        let mut wc: [sys::ibv_wc; N] = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is live and `wc` has room for N entries.
        let got = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), N as c_int, wc.as_mut_ptr()) };
        if got < 0 {
            return Err(VerbsError::Verb {
                op: "ibv_poll_cq",
                source: std::io::Error::other("poll_cq returned an error"),
            });
        }
        for w in &wc[..got as usize] {
            out.push(WorkCompletion {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                byte_len: w.byte_len,
                vendor_err: w.vendor_err,
            });
        }
        Ok(got as usize)
    }

    /// Identity of the CQ in asynchronous events (the address of the libibverbs object).
    pub fn handle(&self) -> usize {
        self.cq.as_ptr() as usize
    }

    /// Arms the CQ: the next completion raises an event on its channel.
    pub fn arm(&self) -> Result<(), VerbsError> {
        if self.channel.is_none() {
            return Ok(());
        }
        // SAFETY: the CQ is live and bound to a channel.
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(rc_err("ibv_req_notify_cq", rc));
        }
        Ok(())
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; every QP using it holds an Arc and is gone; events
        // are acknowledged as soon as they are read (CompletionChannel::drain_events).
        unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// Access rights of a memory registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MrAccess {
    /// The local device may read it (send sources).
    LocalRead,
    /// The local device may write it (receive buffers).
    LocalWrite,
    /// The peer may RDMA WRITE into it (exposed regions).
    RemoteWrite,
    /// The peer may RDMA READ it.
    RemoteRead,
    /// The peer may RDMA WRITE and READ it.
    RemoteReadWrite,
}

impl MrAccess {
    fn flags(self) -> c_int {
        use sys::ibv_access_flags as f;
        (match self {
            MrAccess::LocalRead => f(0),
            MrAccess::LocalWrite => f::IBV_ACCESS_LOCAL_WRITE,
            // REMOTE_WRITE requires LOCAL_WRITE.
            MrAccess::RemoteWrite => f::IBV_ACCESS_LOCAL_WRITE | f::IBV_ACCESS_REMOTE_WRITE,
            MrAccess::RemoteRead => f::IBV_ACCESS_REMOTE_READ,
            MrAccess::RemoteReadWrite => {
                f::IBV_ACCESS_LOCAL_WRITE | f::IBV_ACCESS_REMOTE_WRITE | f::IBV_ACCESS_REMOTE_READ
            }
        })
        .0 as c_int
    }
}

/// A registration of `[offset, offset+len)` of a [`Region`]; deregistered on drop. It keeps
/// the region mapped (Arc) and the protection domain alive.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    mem: Arc<Region>,
    offset: u64,
    len: u64,
    lkey: u32,
    rkey: u32,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an MR handle is plain data after registration; deregistration happens once in Drop.
unsafe impl Send for MemoryRegion {}
// SAFETY: `&MemoryRegion` only reads keys and addresses.
unsafe impl Sync for MemoryRegion {}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("region", &self.mem.id())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .finish()
    }
}

impl MemoryRegion {
    /// Registers (pins) `[offset, offset+len)` of `mem`.
    pub fn register(
        pd: &Arc<ProtectionDomain>,
        mem: Arc<Region>,
        offset: u64,
        len: u64,
        access: MrAccess,
    ) -> Result<Self, VerbsError> {
        if len == 0 || !mem.contains(offset, len) {
            return Err(VerbsError::Limit(format!(
                "cannot register [{offset}, +{len}) of the {}-byte region {}",
                mem.len(),
                mem.id()
            )));
        }
        let max = pd.ctx.limits.max_mr_size;
        if max != 0 && len > max {
            return Err(VerbsError::Limit(format!("a {len}-byte registration exceeds the device maximum {max}")));
        }
        // SAFETY: `offset < len(mem)` was checked, so the pointer stays inside the mapping.
        let addr = unsafe { mem.as_ptr().add(offset as usize) };
        // SAFETY: the PD is live; `[addr, addr+len)` lies inside a mapping kept alive by the
        // Arc<Region> stored next to the MR until after ibv_dereg_mr. The device may access it
        // as `access` allows, which the Region contract permits (raw shared memory).
        let mr = unsafe { sys::ibv_reg_mr(pd.pd.as_ptr(), addr.cast(), len as usize, access.flags()) };
        let mr = NonNull::new(mr).ok_or_else(|| errno("ibv_reg_mr"))?;
        // SAFETY: `mr` is a freshly returned, live ibv_mr; the key fields are plain integers.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(MemoryRegion { mr, mem, offset, len, lkey, rkey, _pd: pd.clone() })
    }

    /// Local key (for SGEs).
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    /// Remote key (for the peer's RDMA WRITEs).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    /// Virtual address of the registration's first byte.
    pub fn addr(&self) -> u64 {
        self.mem.as_ptr() as u64 + self.offset
    }
    /// Offset of the registration in its region.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Registered bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false (registrations are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The registered region.
    pub fn region(&self) -> &Arc<Region> {
        &self.mem
    }
    /// True when `[offset, offset+len)` of the region lies inside this registration.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        offset >= self.offset && offset.checked_add(len).is_some_and(|e| e <= self.offset + self.len)
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr and deregistered once. Owners destroy the QPs that
        // may still reference this MR before dropping it (see the module doc), and the memory
        // (Arc<Region>) is released only after this call.
        unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// Queue sizes requested for a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// SGEs per send work request.
    pub max_send_sge: u32,
    /// SGEs per receive work request.
    pub max_recv_sge: u32,
    /// Inline data bytes per send work request.
    pub max_inline: u32,
}

/// What the peer needs to connect to a queue pair (the out-of-band exchange).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// GID.
    pub gid: [u8; 16],
    /// GID index on the owner's side (informational).
    pub gid_index: u8,
    /// Active path MTU of the owner's port (`ibv_mtu` enum value).
    pub mtu: u8,
}

/// The queue pair handle shared by both typestates; destroyed on drop.
struct Qp {
    qp: NonNull<sys::ibv_qp>,
    caps: QpCaps,
    pd: Arc<ProtectionDomain>,
    _send_cq: Arc<CompletionQueue>,
    _recv_cq: Arc<CompletionQueue>,
}

// SAFETY: posting and modifying a QP are thread-safe verbs; the backend uses a QP from one
// thread at a time anyway.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed once; the CQs and PD it uses are kept
        // alive by the Arcs in this struct until after the call.
        unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

impl Qp {
    fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; `qp_num` is a plain field set at creation.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    fn modify(
        &self,
        attr: &mut sys::ibv_qp_attr,
        mask: sys::ibv_qp_attr_mask,
        op: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: the QP is live and `attr` is a valid, initialised attribute struct whose
        // fields named by `mask` are set.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as c_int) };
        if rc != 0 {
            return Err(rc_err(op, rc));
        }
        Ok(())
    }

    /// # Safety
    /// `buf` must point to `len` bytes inside the registration of `lkey` (with local write
    /// access) that stay valid, and that no one else accesses, until the receive completes or
    /// the QP is destroyed.
    unsafe fn post_recv(&self, wr_id: u64, buf: u64, len: u32, lkey: u32) -> Result<(), VerbsError> {
        let mut sge = sys::ibv_sge { addr: buf, length: len, lkey };
        let mut wr = sys::ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` are valid for the call (the provider copies
        // them); the buffer's validity is the caller's obligation.
        let rc = unsafe { sys::ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err("ibv_post_recv", rc));
        }
        Ok(())
    }
}

/// A queue pair that exists and is in INIT: receives may be posted, nothing can be sent.
pub struct PreparedQueuePair {
    qp: Qp,
    local: Endpoint,
}

impl std::fmt::Debug for PreparedQueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedQueuePair").field("local", &self.local).finish()
    }
}

/// Transport timing of a connected queue pair.
pub mod rc_params {
    /// Local ACK timeout exponent: 4.096 µs · 2^14 ≈ 67 ms.
    pub const TIMEOUT: u8 = 14;
    /// Transport retries.
    pub const RETRY_CNT: u8 = 7;
    /// RNR retries (7 = infinite on hardware; the backend's credits keep receives posted).
    pub const RNR_RETRY: u8 = 7;
    /// Minimum RNR NAK timer (12 = 0.64 ms).
    pub const MIN_RNR_TIMER: u8 = 12;
}

impl PreparedQueuePair {
    /// Creates an RC queue pair on `pd` and moves it to INIT (remote write allowed: the peer
    /// writes our exposed regions and our credit counter).
    pub fn new(
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Self, VerbsError> {
        let ctx = pd.context();
        let lim = ctx.limits;
        if caps.max_send_wr > lim.max_qp_wr || caps.max_recv_wr > lim.max_qp_wr {
            return Err(VerbsError::Limit(format!(
                "queue depths {}/{} exceed the device maximum {}",
                caps.max_send_wr, caps.max_recv_wr, lim.max_qp_wr
            )));
        }
        if caps.max_send_sge > lim.max_sge || caps.max_recv_sge > lim.max_sge {
            return Err(VerbsError::Limit(format!(
                "{} SGEs exceed the device maximum {}",
                caps.max_send_sge, lim.max_sge
            )));
        }
        // SAFETY: an all-zero ibv_qp_init_attr is valid (NULL pointers, zero integers).
        let mut ia: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        ia.send_cq = send_cq.cq.as_ptr();
        ia.recv_cq = recv_cq.cq.as_ptr();
        ia.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        ia.sq_sig_all = 0;
        ia.cap = sys::ibv_qp_cap {
            max_send_wr: caps.max_send_wr,
            max_recv_wr: caps.max_recv_wr,
            max_send_sge: caps.max_send_sge,
            max_recv_sge: caps.max_recv_sge,
            max_inline_data: caps.max_inline,
        };
        // SAFETY: the PD and both CQs are live and belong to the same context; `ia` is valid.
        let mut raw = unsafe { sys::ibv_create_qp(pd.pd.as_ptr(), &mut ia) };
        if raw.is_null() && caps.max_inline > 0 {
            // Some providers refuse inline data: retry without.
            ia.cap.max_inline_data = 0;
            // SAFETY: as above.
            raw = unsafe { sys::ibv_create_qp(pd.pd.as_ptr(), &mut ia) };
        }
        let raw = NonNull::new(raw).ok_or_else(|| errno("ibv_create_qp"))?;
        // ibv_create_qp writes the granted capacities back into `ia.cap`.
        let granted = QpCaps {
            max_send_wr: ia.cap.max_send_wr,
            max_recv_wr: ia.cap.max_recv_wr,
            max_send_sge: ia.cap.max_send_sge,
            max_recv_sge: ia.cap.max_recv_sge,
            max_inline: ia.cap.max_inline_data,
        };
        let qp = Qp { qp: raw, caps: granted, pd: pd.clone(), _send_cq: send_cq.clone(), _recv_cq: recv_cq.clone() };

        // SAFETY: all-zero attributes are valid; the fields named in the mask are set below.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = ctx.port;
        a.qp_access_flags =
            (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
        use sys::ibv_qp_attr_mask as m;
        qp.modify(
            &mut a,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        let mut psn = [0u8; 4];
        getrandom::getrandom(&mut psn)
            .map_err(|e| VerbsError::Verb { op: "getrandom", source: std::io::Error::other(e.to_string()) })?;
        let local = Endpoint {
            qpn: qp.qpn(),
            psn: u32::from_le_bytes(psn) & 0x00ff_ffff,
            lid: ctx.lid,
            gid: ctx.gid,
            gid_index: ctx.gid_index,
            mtu: ctx.active_mtu,
        };
        Ok(PreparedQueuePair { qp, local })
    }

    /// What the peer needs to connect to us.
    pub fn endpoint(&self) -> Endpoint {
        self.local
    }

    /// Granted queue sizes.
    pub fn caps(&self) -> QpCaps {
        self.qp.caps
    }

    /// Posts one receive buffer (receives may be posted before the QP is connected, so that
    /// the peer's first message finds one).
    ///
    /// # Safety
    /// `buf` must point to `len` bytes inside the registration of `lkey` (local write access)
    /// that stay valid, and that no one else accesses, until the receive completes or the QP
    /// is destroyed.
    pub unsafe fn post_recv(&self, wr_id: u64, buf: u64, len: u32, lkey: u32) -> Result<(), VerbsError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.qp.post_recv(wr_id, buf, len, lkey) }
    }

    /// Moves the QP to RTR and RTS towards `remote` (timeout 14, retry_cnt 7, rnr_retry 7).
    /// Path MTU: the smaller of both ports' active MTUs.
    ///
    /// Only the connected [`QueuePair`] can send; a prepared one cannot:
    ///
    /// ```compile_fail,E0599
    /// use livemig_transport::verbs::device::{PreparedQueuePair, SendBatch};
    /// fn send_early(qp: &PreparedQueuePair, batch: &mut SendBatch) {
    ///     // error[E0599]: no method named `post_send` found for `PreparedQueuePair`
    ///     let _ = unsafe { qp.post_send(batch) };
    /// }
    /// ```
    pub fn connect(self, remote: Endpoint) -> Result<QueuePair, VerbsError> {
        let ctx = self.qp.pd.context().clone();
        let path_mtu = self.local.mtu.min(remote.mtu).clamp(1, 5);
        use sys::ibv_qp_attr_mask as m;

        // SAFETY: all-zero attributes are valid; the fields named in the mask are set below.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = path_mtu as sys::ibv_mtu::Type;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn & 0x00ff_ffff;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = rc_params::MIN_RNR_TIMER;
        a.ah_attr.port_num = ctx.port;
        a.ah_attr.sl = 0;
        if ctx.is_infiniband() && remote.lid != 0 {
            a.ah_attr.dlid = remote.lid;
            a.ah_attr.is_global = 0;
        } else {
            // RoCE: always routed by GID (GRH present), dlid unused.
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = sys::ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = ctx.gid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        self.qp.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        // SAFETY: as above.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = self.local.psn;
        a.timeout = rc_params::TIMEOUT;
        a.retry_cnt = rc_params::RETRY_CNT;
        a.rnr_retry = rc_params::RNR_RETRY;
        a.max_rd_atomic = 1;
        self.qp.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )?;
        Ok(QueuePair { qp: self.qp, local: self.local, remote, path_mtu })
    }
}

/// A connected (RTS) RC queue pair.
pub struct QueuePair {
    qp: Qp,
    local: Endpoint,
    remote: Endpoint,
    path_mtu: u8,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("local_qpn", &self.local.qpn)
            .field("remote_qpn", &self.remote.qpn)
            .field("path_mtu", &mtu_bytes(self.path_mtu))
            .finish()
    }
}

/// What a send work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// RDMA WRITE to `remote_addr` under `rkey`.
    Write {
        /// Remote virtual address.
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// SEND (consumes a receive on the peer).
    Send,
}

/// A chain of send work requests built in safe code and posted with one `ibv_post_send`.
/// Pointers between the entries are fixed up only when posting, so the vectors may grow.
#[derive(Default)]
pub struct SendBatch {
    wrs: Vec<sys::ibv_send_wr>,
    sges: Vec<sys::ibv_sge>,
    /// Index of each WR's first SGE.
    first_sge: Vec<usize>,
}

// SAFETY: the raw pointers inside the stored WRs (`next`, `sg_list`) are only written and
// followed inside `QueuePair::post_send`, which recomputes them from the vectors first; moving
// the batch to another thread moves the vectors they point into along with it.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch").field("wrs", &self.wrs.len()).field("sges", &self.sges.len()).finish()
    }
}

/// One scatter-gather element: `len` bytes at virtual address `addr` under `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Virtual address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// Local key of the registration holding it (ignored for inline data).
    pub lkey: u32,
}

impl SendBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
    /// Work requests in the batch.
    pub fn len(&self) -> usize {
        self.wrs.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }
    /// Empties the batch.
    pub fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
        self.first_sge.clear();
    }

    /// Appends a work request.
    pub fn push(&mut self, wr_id: u64, op: SendOp, sges: &[Sge], signaled: bool, inline: bool) {
        use sys::ibv_send_flags as fl;
        // SAFETY: ibv_send_wr is integers, raw pointers and integer unions: all-zero is valid.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.num_sge = sges.len() as c_int;
        let mut flags = fl(0);
        if signaled {
            flags |= fl::IBV_SEND_SIGNALED;
        }
        if inline {
            flags |= fl::IBV_SEND_INLINE;
        }
        wr.send_flags = flags.0;
        match op {
            SendOp::Write { remote_addr, rkey } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
            }
            SendOp::Send => wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
        }
        self.first_sge.push(self.sges.len());
        self.sges.extend(sges.iter().map(|s| sys::ibv_sge { addr: s.addr, length: s.len, lkey: s.lkey }));
        self.wrs.push(wr);
    }
}

/// `ibv_post_send` refused a work request of a batch.
#[derive(Debug, thiserror::Error)]
#[error("ibv_post_send refused work request {failed} of the batch")]
pub struct PostError {
    /// Index in the batch of the first work request not posted (the ones before it were).
    pub failed: usize,
    /// errno.
    #[source]
    pub source: std::io::Error,
}

impl QueuePair {
    /// Our endpoint.
    pub fn local(&self) -> Endpoint {
        self.local
    }
    /// The peer's endpoint.
    pub fn remote(&self) -> Endpoint {
        self.remote
    }
    /// Negotiated path MTU (`ibv_mtu` enum value).
    pub fn path_mtu(&self) -> u8 {
        self.path_mtu
    }
    /// Identity of the QP in asynchronous events (the address of the libibverbs object).
    pub fn handle(&self) -> usize {
        self.qp.qp.as_ptr() as usize
    }
    /// Granted queue sizes.
    pub fn caps(&self) -> QpCaps {
        self.qp.caps
    }

    /// Posts one receive buffer.
    ///
    /// # Safety
    /// As [`PreparedQueuePair::post_recv`].
    pub unsafe fn post_recv(&self, wr_id: u64, buf: u64, len: u32, lkey: u32) -> Result<(), VerbsError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.qp.post_recv(wr_id, buf, len, lkey) }
    }

    /// Posts the whole batch with one `ibv_post_send` and empties it.
    ///
    /// # Safety
    /// For every work request without inline data, each SGE must lie inside the registration
    /// of its `lkey` and that memory must stay valid (mapped, registered) until the work
    /// request completes or the QP is destroyed. Inline SGEs must be readable for the duration
    /// of this call only.
    pub unsafe fn post_send(&self, batch: &mut SendBatch) -> Result<(), PostError> {
        if batch.wrs.is_empty() {
            return Ok(());
        }
        let n = batch.wrs.len();
        let sges = batch.sges.as_mut_ptr();
        let wrs = batch.wrs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: `i < n` and `first_sge[i] <= sges.len()`; the vectors are not resized until
            // after the post, so the pointers stay valid for the call.
            unsafe {
                let wr = &mut *wrs.add(i);
                wr.sg_list = if wr.num_sge > 0 { sges.add(batch.first_sge[i]) } else { ptr::null_mut() };
                wr.next = if i + 1 < n { wrs.add(i + 1) } else { ptr::null_mut() };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live and connected; the chain is well formed (fixed up above) and
        // its SGE memory is valid per the caller's contract. The provider copies the WRs.
        let rc = unsafe { sys::ibv_post_send(self.qp.qp.as_ptr(), wrs, &mut bad) };
        let out = if rc == 0 {
            Ok(())
        } else {
            // SAFETY: on failure `bad` points into our array (or is NULL).
            let failed = if bad.is_null() { 0 } else { unsafe { bad.offset_from(wrs) }.max(0) as usize };
            Err(PostError { failed, source: std::io::Error::from_raw_os_error(rc.abs()) })
        };
        batch.clear();
        out
    }

    /// Moves the QP to the error state: outstanding work requests complete at once with
    /// `WR_FLUSH_ERR` (used at teardown so nothing waits for a dead peer).
    pub fn set_error(&self) -> Result<(), VerbsError> {
        // SAFETY: all-zero attributes are valid; only the state is set.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        self.qp.modify(&mut a, sys::ibv_qp_attr_mask::IBV_QP_STATE, "ibv_modify_qp(ERR)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_helpers() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert!(is_ipv4_mapped(&g));
        assert_eq!(gid_string(&g), "0000:0000:0000:0000:0000:ffff:7f00:0001");
        g[0] = 0xfe;
        assert!(!is_ipv4_mapped(&g));
        assert_eq!((mtu_bytes(1), mtu_bytes(3), mtu_bytes(5), mtu_bytes(9)), (256, 1024, 4096, 0));
    }
}
