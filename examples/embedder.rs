//! A VMM-like program that embeds livemig: it owns its guest memory (two regions it mmaps
//! itself), runs its own writer threads ("vCPUs"), keeps device state outside memory (each
//! vCPU's counter), tracks its own writes in a dirty log, and migrates itself into a child
//! process through the public API.
//!
//!     cargo run -p livemig-engine --example embedder
//!
//! The parent is the source; the child (`embedder --dest`) receives, starts the vCPUs from the
//! device state and checks they carry on where the source stopped.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use livemig_engine::dirty::{DirtyError, ExternalDirtyLog};
use livemig_engine::guest::{GuestControl, GuestError, GuestMemory};
use livemig_engine::precopy::{migrate, receive, DestConfig, SourceConfig};
use livemig_transport::auth::Secret;
use livemig_transport::{Access, PageBitmap, Region, RegionTable, TcpConfig, TcpListener, TcpTransport};

const PAGE: usize = 4096;
const REGIONS: [usize; 2] = [2048, 1024]; // pages: 8 MiB + 4 MiB
const VCPUS: usize = 2;

/// The embedder's guest: memory, vCPU threads, their counters (the device state), a dirty log.
struct Vm {
    memory: GuestMemory,
    counters: Arc<Vec<AtomicU64>>,
    gate: Arc<RwLock<bool>>, // true = paused; a vCPU writes only while holding it for reading
    dirty: Arc<Mutex<PageBitmap>>,
    stop: Arc<AtomicBool>,
}

impl Vm {
    fn new(access: Access) -> Vm {
        let regions = REGIONS.iter().enumerate().map(|(i, &pages)| {
            let len = pages * PAGE;
            // SAFETY: a fresh private anonymous mapping; it is leaked, so it outlives the region.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            // SAFETY: the mapping is ours, `len` bytes, never unmapped; the vCPUs only touch it
            // through `Region::write_at`.
            Arc::new(unsafe { Region::from_raw(i as u32 + 1, p.cast(), len as u64, PAGE as u32, access) }.unwrap())
        });
        Vm {
            memory: GuestMemory::new(regions.collect()).unwrap(),
            counters: Arc::new((0..VCPUS).map(|_| AtomicU64::new(0)).collect()),
            gate: Arc::new(RwLock::new(false)),
            dirty: Arc::new(Mutex::new(PageBitmap::new(REGIONS.iter().sum()))),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// vCPU `v` writes its counter into page `counter % pages` of the page space, forever.
    fn start_vcpus(&self) {
        for v in 0..VCPUS {
            let (m, c, g, d, stop) =
                (self.memory.clone(), self.counters.clone(), self.gate.clone(), self.dirty.clone(), self.stop.clone());
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let gate = g.read().unwrap();
                    if *gate {
                        drop(gate);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let n = c[v].fetch_add(1, SeqCst) + 1;
                    let page = (n as usize * VCPUS + v) % m.pages();
                    let (r, local) = m.locate(page).unwrap();
                    m.regions()[r].write_at((local * PAGE) as u64, &[v as u64, n].map(u64::to_le_bytes).concat());
                    d.lock().unwrap().set(page);
                    drop(gate);
                    std::thread::sleep(Duration::from_micros(20));
                }
            });
        }
    }
}

impl GuestControl for Vm {
    fn pause(&mut self) -> Result<(), GuestError> {
        *self.gate.write().unwrap() = true; // returns once no vCPU is inside a write
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        *self.gate.write().unwrap() = false;
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(self.counters.iter().flat_map(|c| c.load(SeqCst).to_le_bytes()).collect())
    }
    fn handed_over(&mut self) {
        self.stop.store(true, SeqCst);
    }
    fn progress(&self) -> Option<u64> {
        Some(self.counters.iter().map(|c| c.load(SeqCst)).sum())
    }
}

fn table(vm: &Vm) -> (RegionTable, Vec<livemig_transport::Registration>) {
    let t = RegionTable::new();
    let regs = vm.memory.regions().iter().map(|r| t.register(r.clone()).unwrap()).collect();
    (t, regs)
}

fn main() {
    let secret = Secret::new("embedder-example-secret-embedder-example").unwrap();
    if std::env::args().any(|a| a == "--dest") {
        let mut vm = Vm::new(Access::REMOTE_WRITE);
        let (t, _regs) = table(&vm);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        println!("{}", l.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let mut tr = l.accept(&TcpConfig::default(), &secret, &t).unwrap();
        let mut resumed_at = Vec::new();
        let mut start = |state: Vec<u8>| {
            for (v, (c, b)) in vm.counters.iter().zip(state.chunks_exact(8)).enumerate() {
                let n = u64::from_le_bytes(b.try_into().unwrap());
                c.store(n, SeqCst);
                // Memory and device state came together: vCPU v's last page holds its counter.
                let (r, local) = vm.memory.locate((n as usize * VCPUS + v) % vm.memory.pages()).unwrap();
                let mut w = [0u8; 16];
                vm.memory.regions()[r].read_at((local * PAGE) as u64, &mut w);
                if n > 0 && w[8..] != n.to_le_bytes() {
                    return Err(GuestError::new("start", format!("vcpu {v}: its last page does not hold {n}")));
                }
                resumed_at.push(n);
            }
            vm.start_vcpus();
            Ok(())
        };
        let rep = receive(&mut tr, &vm.memory.clone(), &mut start, &DestConfig::default(), &mut |_, _, _| {}).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        vm.handed_over();
        for (v, &from) in resumed_at.iter().enumerate() {
            let now = vm.counters[v].load(SeqCst);
            eprintln!("dest: vcpu {v} resumed at {from} (its last page matched), now at {now}");
            assert!(now > from, "vcpu {v} did not continue");
        }
        eprintln!("dest: digest {} verified, {} B of device state", rep.checksum, rep.device_state_bytes);
        return;
    }
    // Source: start the guest, spawn the destination, migrate.
    let mut vm = Vm::new(Access::LOCAL);
    vm.start_vcpus();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--dest")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut addr).unwrap();
    let (t, _regs) = table(&vm);
    let mut tr = TcpTransport::connect(addr.trim(), &TcpConfig::default(), &secret, &t).unwrap();
    // The embedder's own dirty log, handed to the engine each round.
    let log = vm.dirty.clone();
    let mut dirty = ExternalDirtyLog::new(vm.memory.pages(), "embedder-log", move |into: &mut PageBitmap| {
        let mut d = log.lock().map_err(|_| DirtyError::External("poisoned".into()))?;
        let n = d.count_ones();
        into.or_assign(&d);
        d.clear_all();
        Ok(n)
    });
    let memory = vm.memory.clone();
    let s = migrate(&mut tr, &memory, &mut vm, &mut dirty, &SourceConfig::default(), &mut |_| {}).unwrap();
    print!("{}", s.render());
    assert!(child.wait().unwrap().success(), "the destination failed");
}
