//! vhost-user-block (Firecracker's `socket` drives): prescient is the vhost-user frontend, another
//! process on the host (the backend) serves the disk.
//!
//! prescient keeps the virtio-mmio transport and the configuration space; the backend reads the
//! queues straight from guest memory (shared with it as memfd file descriptors), is kicked through
//! the queue's KVM ioeventfd and signals completions on an eventfd that the VMM thread relays to
//! the device's interrupt (the transport's InterruptStatus must say why the line went up).
//!
//! The backend is untrusted input, as a guest is: every reply is checked ([`protocol`]), each
//! exchange has a deadline, and a backend that stops answering or goes away costs the guest this
//! disk, never the VMM. Messages are exchanged
//! on the VMM thread only: the transport calls [`VirtioDevice::activate`] and
//! [`VirtioDevice::reset`] on a vCPU thread, which hands the work over through an eventfd.

pub mod protocol;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::protocol::{
    Frontend, MemoryRegion, ProtocolError, VringAddresses, PROTOCOL_F_CONFIG, PROTOCOL_F_REPLY_ACK,
};

use super::{
    read_config_bytes, watch_fds, ActivateContext, ActivateError, DeviceCounters, VirtioDevice,
    VirtioInterrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::persist::{PersistError, Snapshottable};

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// The configuration space asked of the backend: `struct virtio_blk_config` up to the write
/// zeroes fields (Linux reads no further for the features prescient lets through).
pub const CONFIG_LEN: u32 = 60;
/// How long one message to or from the backend may take.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// vhost-user's own feature bit: the backend speaks the protocol-feature extension.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Feature bits of the backend the guest may see: the ring layouts the backend serves and the
/// virtio-blk features whose configuration fields prescient passes through read-only. Not MQ
/// (one queue) and not CONFIG_WCE (a configuration write would have to reach the backend).
const GUEST_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << 28) // RING_INDIRECT_DESC
    | (1 << 29) // RING_EVENT_IDX
    | (1 << 1) // BLK_SIZE_MAX
    | (1 << 2) // BLK_SEG_MAX
    | (1 << 4) // BLK_GEOMETRY
    | (1 << 5) // BLK_RO
    | (1 << 6) // BLK_BLK_SIZE
    | (1 << 9) // BLK_FLUSH
    | (1 << 10) // BLK_TOPOLOGY
    | (1 << 13) // BLK_DISCARD
    | (1 << 14); // BLK_WRITE_ZEROES
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Errors of talking to a vhost-user-block backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlockError {
    #[error("cannot connect to the vhost-user backend at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-user backend at {path}: cannot watch its socket: {source}")]
    Watch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-user backend at {path}: {source}")]
    Protocol {
        path: PathBuf,
        source: ProtocolError,
    },
    #[error("vhost-user backend at {path} does not offer {what}, which prescient needs")]
    Missing { path: PathBuf, what: &'static str },
    #[error("vhost-user backend at {path}: guest memory at {addr:#x} is not shareable (not backed by a memfd)")]
    MemoryNotShared { path: PathBuf, addr: u64 },
    #[error("vhost-user backend at {path}: queue {what} at guest address {addr:#x} is outside guest memory")]
    QueueAddress {
        path: PathBuf,
        what: &'static str,
        addr: u64,
    },
    #[error("vhost-user backend at {path} went away earlier; the drive is out of service")]
    Broken { path: PathBuf },
    #[error("cannot create an eventfd for the vhost-user drive: {0}")]
    EventFd(std::io::Error),
}

/// What the backend said about itself when prescient connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// Its virtio feature bits.
    pub features: u64,
    /// Its configuration space (`struct virtio_blk_config`).
    pub config: Vec<u8>,
}

impl BackendInfo {
    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        let mut le = [0u8; 8];
        le.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(le)
    }

    /// Whether the backend serves the disk read-only (it decides, not the drive's spec).
    pub fn read_only(&self) -> bool {
        self.features & (1 << VIRTIO_BLK_F_RO) != 0
    }
}

/// One connection to a backend: the control plane.
struct Connection {
    path: PathBuf,
    frontend: Frontend,
    /// The same socket, watched for the backend going away between requests.
    watch: UnixStream,
}

impl Connection {
    fn open(path: &Path) -> Result<Self, VhostUserBlockError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserBlockError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_stream(path, stream, BACKEND_TIMEOUT)
    }

    fn from_stream(
        path: &Path,
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<Self, VhostUserBlockError> {
        let watch = stream
            .try_clone()
            .map_err(|source| VhostUserBlockError::Watch {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            frontend: Frontend::new(stream, timeout),
            watch,
        })
    }

    fn step<T>(&self, r: Result<T, ProtocolError>) -> Result<T, VhostUserBlockError> {
        r.map_err(|source| VhostUserBlockError::Protocol {
            path: self.path.clone(),
            source,
        })
    }

    fn missing(&self, what: &'static str) -> VhostUserBlockError {
        VhostUserBlockError::Missing {
            path: self.path.clone(),
            what,
        }
    }

    /// Owner, features, protocol features, configuration: what Firecracker does when the drive
    /// is created.
    fn handshake(&mut self) -> Result<BackendInfo, VhostUserBlockError> {
        let r = self.frontend.set_owner();
        self.step(r)?;
        let r = self.frontend.get_features();
        let features = self.step(r)?;
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) == 0 {
            return Err(self.missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(self.missing("VIRTIO_F_VERSION_1"));
        }
        let r = self.frontend.get_protocol_features();
        let protocol = self.step(r)?;
        if protocol & PROTOCOL_F_CONFIG == 0 {
            return Err(self.missing("the CONFIG protocol feature (GET_CONFIG)"));
        }
        let r = self
            .frontend
            .set_protocol_features(protocol & (PROTOCOL_F_CONFIG | PROTOCOL_F_REPLY_ACK));
        self.step(r)?;
        let config = self.read_config()?;
        Ok(BackendInfo { features, config })
    }

    fn read_config(&mut self) -> Result<Vec<u8>, VhostUserBlockError> {
        let r = self.frontend.get_config(0, CONFIG_LEN);
        self.step(r)
    }

    /// Shares guest memory and starts queue 0 (`queue`) on the backend.
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &Queue,
        features: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VhostUserBlockError> {
        let r = self.frontend.set_features(features);
        self.step(r)?;
        let regions = mem
            .iter()
            .map(|region| {
                let not_shared = || VhostUserBlockError::MemoryNotShared {
                    path: self.path.clone(),
                    addr: region.start_addr().0,
                };
                let at = region.file_offset().ok_or_else(not_shared)?;
                let host = region
                    .get_host_address(MemoryRegionAddress(0))
                    .map_err(|_| not_shared())?;
                Ok(MemoryRegion {
                    guest_phys_addr: region.start_addr().0,
                    size: region.len(),
                    userspace_addr: host as u64,
                    mmap_offset: at.start(),
                    fd: at.file().as_raw_fd(),
                })
            })
            .collect::<Result<Vec<_>, VhostUserBlockError>>()?;
        let r = self.frontend.set_mem_table(&regions);
        self.step(r)?;
        let host = |what: &'static str, addr: u64| {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| VhostUserBlockError::QueueAddress {
                    path: self.path.clone(),
                    what,
                    addr,
                })
        };
        let addrs = VringAddresses {
            desc: host("descriptor table", queue.desc_table())?,
            used: host("used ring", queue.used_ring())?,
            avail: host("available ring", queue.avail_ring())?,
        };
        let f = &mut self.frontend;
        let r = f
            .set_vring_num(0, queue.size())
            .and_then(|()| f.set_vring_addr(0, &addrs))
            .and_then(|()| f.set_vring_base(0, queue.next_avail()))
            .and_then(|()| f.set_vring_call(0, call.as_raw_fd()))
            .and_then(|()| f.set_vring_kick(0, kick.as_raw_fd()))
            .and_then(|()| f.set_vring_enable(0, true));
        self.step(r)
    }

    /// Stops the queue (GET_VRING_BASE stops a ring, in the protocol).
    fn stop(&mut self) -> Result<(), VhostUserBlockError> {
        let r = self.frontend.get_vring_base(0);
        self.step(r).map(|_| ())
    }
}

/// Connects to the backend at `path` and asks what it serves, then hangs up: how a drive is
/// checked when it is configured (Firecracker answers 400 if no backend is listening).
pub fn probe(path: &Path) -> Result<BackendInfo, VhostUserBlockError> {
    Connection::open(path)?.handshake()
}

/// What the vCPU thread asked the VMM thread to do.
enum Pending {
    Start(ActivateContext),
    Stop,
}

/// A virtio-blk device served by a vhost-user backend.
pub struct VhostUserBlock {
    id: String,
    conn: Connection,
    info: BackendInfo,
    config_generation: u32,
    queue_events: [EventFd; 1],
    /// The backend's used-buffer notifications, relayed to `interrupt`.
    call: EventFd,
    /// Work handed from the transport (a vCPU thread) to the VMM thread.
    wake: EventFd,
    pending: Vec<Pending>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    /// The backend's queue runs.
    started: bool,
    /// The backend went away or broke the protocol: nothing more is sent to it.
    broken: bool,
    /// Firecracker's `cache_type`: FLUSH reaches the guest (if the backend has it) only with
    /// Writeback.
    writeback: bool,
    counters: Arc<DeviceCounters>,
}

impl VhostUserBlock {
    /// Connects drive `id` to the backend listening at `socket`.
    pub fn new(id: &str, socket: &Path) -> Result<Self, VhostUserBlockError> {
        let mut conn = Connection::open(socket)?;
        let info = conn.handshake()?;
        Self::with_connection(id, conn, info)
    }

    fn with_connection(
        id: &str,
        conn: Connection,
        info: BackendInfo,
    ) -> Result<Self, VhostUserBlockError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VhostUserBlockError::EventFd);
        Ok(Self {
            id: id.to_string(),
            conn,
            info,
            config_generation: 0,
            queue_events: [evt()?],
            call: evt()?,
            wake: evt()?,
            pending: Vec::new(),
            interrupt: None,
            started: false,
            broken: false,
            writeback: true,
            counters: Arc::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Firecracker's `cache_type`: `true` for Writeback, `false` for Unsafe (FLUSH hidden from
    /// the guest). Set before the guest negotiates features.
    pub fn set_cache_writeback(&mut self, writeback: bool) {
        self.writeback = writeback;
    }

    pub fn socket(&self) -> &Path {
        &self.conn.path
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.info.capacity_sectors()
    }

    pub fn read_only(&self) -> bool {
        self.info.read_only()
    }

    /// Asks the backend for its configuration again (Firecracker's `PATCH /drives/{id}` on a
    /// vhost-user drive: the backend's disk changed size) and tells the guest.
    pub fn refresh_config(&mut self) -> Result<(), VhostUserBlockError> {
        self.check_alive()?;
        let config = self
            .conn
            .read_config()
            .inspect_err(|_| self.broken = true)?;
        if config != self.info.config {
            self.info.config = config;
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Some(i) = &self.interrupt {
                i.signal_config_change();
            }
        }
        Ok(())
    }

    fn check_alive(&self) -> Result<(), VhostUserBlockError> {
        if self.broken {
            return Err(VhostUserBlockError::Broken {
                path: self.conn.path.clone(),
            });
        }
        Ok(())
    }

    /// Carries out what the transport asked for, in order, on the VMM thread.
    fn run_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            let result = match p {
                Pending::Start(ctx) => self.start(ctx),
                Pending::Stop => self.stop(),
            };
            if let Err(e) = result {
                tracing::error!("vhost-user drive {}: {e}", self.id);
                self.broken = true;
                DeviceCounters::inc(&self.counters.io_errors, 1);
            }
        }
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), VhostUserBlockError> {
        self.check_alive()?;
        let queue = &ctx.queues[0];
        let features =
            (ctx.acked_features & self.avail_features()) | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        self.conn
            .start(&ctx.mem, queue, features, &self.queue_events[0], &self.call)?;
        self.started = true;
        tracing::info!(
            "vhost-user drive {}: queue started on {}",
            self.id,
            self.conn.path.display()
        );
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VhostUserBlockError> {
        if !std::mem::take(&mut self.started) {
            return Ok(());
        }
        self.check_alive()?;
        self.conn.stop()
    }

    /// The backend's socket became readable or hung up between requests: it went away, or
    /// sent what nobody asked for. Either way it is not spoken to again.
    fn backend_gone(&mut self, ops: &mut EventOps) {
        let mut byte = [0u8; 1];
        // SAFETY: recv into a 1-byte buffer we own, on a socket we own; MSG_PEEK leaves the
        // data where it is and MSG_DONTWAIT never blocks the VMM thread.
        let n = unsafe {
            libc::recv(
                self.conn.watch.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let why = if n > 0 {
            "sent a message nobody asked for"
        } else {
            "closed the connection"
        };
        tracing::error!(
            "vhost-user drive {}: the backend at {} {why}; the drive's requests go unanswered \
             until the VM is restarted with a backend",
            self.id,
            self.conn.path.display()
        );
        self.broken = true;
        DeviceCounters::inc(&self.counters.io_errors, 1);
        let _ = ops.remove(Events::new_raw(
            self.conn.watch.as_raw_fd(),
            vmm_sys_util::epoll::EventSet::IN,
        ));
    }
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        let mut f = self.info.features & GUEST_FEATURES;
        if !self.writeback {
            f &= !(1 << VIRTIO_BLK_F_FLUSH);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.info.config, offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: ctx.queues.len(),
            });
        }
        self.check_alive()
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        self.interrupt = Some(ctx.interrupt.clone());
        self.pending.push(Pending::Start(ctx));
        self.wake
            .write(1)
            .map_err(|e| ActivateError::Other(format!("cannot wake the VMM thread: {e}")))
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        // The backend owns the queue positions.
        Vec::new()
    }

    fn reset(&mut self) {
        self.pending.push(Pending::Stop);
        if let Err(e) = self.wake.write(1) {
            tracing::warn!(
                "vhost-user drive {}: cannot wake the VMM thread: {e}",
                self.id
            );
        }
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

/// Firecracker refuses to snapshot a microVM with vhost-user devices; so does prescient (the
/// queue state lives in the backend).
impl Snapshottable for VhostUserBlock {
    fn save_bytes(&mut self) -> Result<Vec<u8>, PersistError> {
        Err(PersistError::Encode(format!(
            "vhost-user drive {}: snapshots of vhost-user devices are not supported",
            self.id
        )))
    }

    fn restore_bytes(&mut self, _bytes: &[u8]) -> Result<(), PersistError> {
        Err(PersistError::Restore(format!(
            "vhost-user drive {}: snapshots of vhost-user devices are not supported",
            self.id
        )))
    }
}

impl MutEventSubscriber for VhostUserBlock {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.call.as_raw_fd(),
            self.wake.as_raw_fd(),
            self.conn.watch.as_raw_fd(),
        ];
        watch_fds(ops, &format!("vhost-user drive {}", self.id), fds);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.call.as_raw_fd() {
            let _ = self.call.read();
            if let Some(i) = &self.interrupt {
                i.signal_used_queue();
            }
        } else if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            self.run_pending();
        } else if fd == self.conn.watch.as_raw_fd() {
            self.backend_gone(ops);
        }
    }
}

#[cfg(test)]
mod tests;
