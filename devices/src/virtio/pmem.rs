//! virtio-pmem (Firecracker's `pmem`): a host file mapped into guest physical memory, which the
//! guest reads and writes with loads and stores (Linux: `/dev/pmem0`, DAX-capable); its one
//! queue carries FLUSH requests, answered once the file's data is on the disk (fdatasync).
//!
//! The mapping is the file, shared (read-only files are mapped read-only), padded with anonymous
//! memory to a 2 MiB multiple; the VMM makes it a KVM memory slot at the address the
//! configuration space reports ([`Pmem::set_guest_address`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, Reader, Writer};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError, ActiveQueues,
    DeviceCounters, VirtioDevice, TYPE_PMEM, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};
use crate::rate_limiter::{
    Cost, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};

pub const QUEUE_SIZE: u16 = 256;
/// The guest region's alignment and size granule (Linux maps it in 2 MiB sections).
pub const ALIGNMENT: u64 = 2 << 20;
const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;

/// Errors of creating the device.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is empty: a pmem backing file needs a size")]
    Empty(PathBuf),
    #[error("cannot map {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd for the pmem queue: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
}

/// The file's mapping in the VMM, padded to [`ALIGNMENT`].
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory shared with the guest; the device only hands out its
// address (for the KVM slot) and unmaps it when dropped.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(file: &File, file_len: u64, read_only: bool) -> std::io::Result<Self> {
        let len = file_len.div_ceil(ALIGNMENT) * ALIGNMENT;
        let len = usize::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a fresh anonymous reservation of `len` bytes; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mapping = Self { addr, len };
        // SAFETY: MAP_FIXED over the start of the reservation made above, which we own; the
        // file part replaces the anonymous pages, the padding stays anonymous.
        let file_part = unsafe {
            libc::mmap(
                addr,
                file_len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if file_part == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(mapping)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation this value owns; the VMM removes the KVM slot
        // before the device goes (the VM is torn down first).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// A virtio-pmem device.
pub struct Pmem {
    id: String,
    file: File,
    mapping: Mapping,
    read_only: bool,
    /// start (le64), size (le64).
    config: [u8; 16],
    queue_events: [EventFd; 1],
    limiter: RateLimiter,
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues<1>>,
}

impl Pmem {
    /// A device named `id` backed by `path`.
    pub fn new(
        id: &str,
        path: &Path,
        read_only: bool,
        limiter: RateLimiterConfig,
    ) -> Result<Self, PmemError> {
        let open = |source| PmemError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open)?;
        let len = file.metadata().map_err(open)?.len();
        if len == 0 {
            return Err(PmemError::Empty(path.to_path_buf()));
        }
        let mapping = Mapping::new(&file, len, read_only).map_err(|source| PmemError::Map {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = [0u8; 16];
        config[8..].copy_from_slice(&(mapping.len as u64).to_le_bytes());
        Ok(Self {
            id: id.to_string(),
            file,
            mapping,
            read_only,
            config,
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(PmemError::EventFd)?],
            limiter: RateLimiter::new(limiter)?,
            counters: Arc::default(),
            active: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The host mapping the KVM slot points at, and its (padded) size.
    pub fn host_region(&self) -> (u64, u64) {
        (self.mapping.addr as u64, self.mapping.len as u64)
    }

    /// Where the VMM put the region in guest physical memory (reported to the driver).
    pub fn set_guest_address(&mut self, start: u64) {
        self.config[..8].copy_from_slice(&start.to_le_bytes());
    }

    pub fn rate_limiter(&self) -> RateLimiterConfig {
        self.limiter.config()
    }

    /// Replaces the rate limiter's buckets while the guest runs.
    pub fn update_rate_limiter(&mut self, config: RateLimiterConfig) -> Result<(), PmemError> {
        self.limiter.update_buckets(config)?;
        self.process_queue();
        Ok(())
    }

    /// Serves FLUSH requests until the queue is empty or the rate limiter says wait. A flush
    /// costs one op and, in bytes, the region's size (as in Firecracker).
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        while !self.limiter.is_blocked() {
            let Some(chain) = pop_chain(&mut active.queues[0], &active.mem, &self.counters) else {
                break;
            };
            let head = chain.head_index();
            let request = Reader::new(&active.mem, chain.clone())
                .ok()
                .and_then(|mut r| r.read_obj::<u32>().ok());
            let mut status = Writer::new(&active.mem, chain).ok();
            let used = match (request, status.as_mut()) {
                (Some(kind), Some(w)) if w.available_bytes() >= 4 => {
                    if !self.limiter.consume(Cost {
                        bytes: self.mapping.len as u64,
                        ops: 1,
                    }) {
                        active.queues[0].go_to_previous_position();
                        DeviceCounters::inc(&self.counters.throttled, 1);
                        break;
                    }
                    let resp = if kind != VIRTIO_PMEM_REQ_TYPE_FLUSH {
                        DeviceCounters::inc(&self.counters.invalid_requests, 1);
                        RESP_EIO
                    } else if self.read_only {
                        RESP_OK
                    } else {
                        match self.file.sync_data() {
                            Ok(()) => RESP_OK,
                            Err(e) => {
                                tracing::warn!("pmem {}: fdatasync: {e}", self.id);
                                DeviceCounters::inc(&self.counters.io_errors, 1);
                                RESP_EIO
                            }
                        }
                    };
                    DeviceCounters::inc(&self.counters.requests, 1);
                    match w.write_obj(resp) {
                        Ok(()) => 4,
                        Err(_) => 0,
                    }
                }
                _ => {
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    0
                }
            };
            active.add_used(0, head, used, format_args!("pmem {}", self.id));
            completed = true;
        }
        if completed {
            active.notify(0);
        }
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        TYPE_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueues::new(ctx)?);
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveQueues::states)
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

/// What a pmem device holds beyond its configuration: its rate limiter's fill. Its data is the
/// file's (a shared mapping, like a drive's file), reopened and mapped again by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmemState {
    pub limiter: RateLimiterState,
}

impl Persist for Pmem {
    type State = PmemState;

    fn save(&mut self) -> PmemState {
        PmemState {
            limiter: self.limiter.save(),
        }
    }

    fn restore(&mut self, state: PmemState) -> Result<(), PersistError> {
        self.limiter.restore(state.limiter)
    }
}

impl MutEventSubscriber for Pmem {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [self.queue_events[0].as_raw_fd(), self.limiter.as_raw_fd()];
        watch_fds(ops, &format!("pmem {}", self.id), fds);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_events[0].as_raw_fd() {
            let _ = self.queue_events[0].read();
        } else {
            self.limiter.on_timer();
        }
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{activate, guest_memory, DriverQueue, WRITE};
    use vm_memory::{Bytes, GuestAddress};

    fn file(name: &str, bytes: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("prescient-pmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, vec![0x3cu8; bytes]).unwrap();
        p
    }

    #[test]
    fn the_file_is_the_region_and_flush_answers() {
        let path = file("rw.img", 3 << 20);
        let mut pmem = Pmem::new("p0", &path, false, RateLimiterConfig::default()).unwrap();
        let (host, size) = pmem.host_region();
        assert_eq!(size, 4 << 20, "padded to 2 MiB");
        pmem.set_guest_address(0x1_4000_0000);
        let mut cfg = [0u8; 16];
        pmem.read_config(0, &mut cfg);
        assert_eq!(
            u64::from_le_bytes(cfg[..8].try_into().unwrap()),
            0x1_4000_0000
        );
        assert_eq!(u64::from_le_bytes(cfg[8..].try_into().unwrap()), 4 << 20);
        // What the guest stores through the region is in the file.
        // SAFETY: within the mapping this test's device owns.
        unsafe { std::ptr::write_volatile((host as *mut u8).add(4096), 0xa5) };
        let mem = guest_memory(2 << 20);
        let mut queue = DriverQueue::new(&mem, GuestAddress(0), 16);
        activate(&mut pmem, &mem, std::slice::from_ref(&queue)).unwrap();
        mem.write_obj(VIRTIO_PMEM_REQ_TYPE_FLUSH, GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x10_1000))
            .unwrap();
        queue.add_chain(&[(0x10_0000, 4, 0), (0x10_1000, 4, WRITE)]);
        mem.write_obj(7u32, GuestAddress(0x10_2000)).unwrap();
        queue.add_chain(&[(0x10_2000, 4, 0), (0x10_3000, 4, WRITE)]);
        queue.add_chain(&[(0x10_4000, 4, 0)]); // no status buffer
        pmem.process_queue();
        assert_eq!(queue.used(0).1, 4);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_1000)).unwrap(),
            RESP_OK
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_3000)).unwrap(),
            RESP_EIO
        );
        assert_eq!(queue.used(2).1, 0);
        assert_eq!(std::fs::read(&path).unwrap()[4096], 0xa5);
    }

    #[test]
    fn empty_and_missing_files_are_refused() {
        let empty = file("empty.img", 0);
        assert!(matches!(
            Pmem::new("p", &empty, false, RateLimiterConfig::default()),
            Err(PmemError::Empty(_))
        ));
        assert!(matches!(
            Pmem::new(
                "p",
                Path::new("/nonexistent"),
                true,
                RateLimiterConfig::default()
            ),
            Err(PmemError::Open { .. })
        ));
    }
}
