//! virtio-blk: a disk backed by a host file.
//!
//! Requests are served synchronously on the VMM thread. WRITE data is on the host file when its
//! status is returned. With the writeback cache (prescient's default) the device offers FLUSH
//! and a FLUSH reaches the disk (fdatasync) before it is acknowledged, so a guest that flushed
//! loses nothing when the host dies; with Firecracker's `Unsafe` cache type FLUSH is not
//! offered and a FLUSH sent anyway is acknowledged without a sync, as in Firecracker.
//!
//! The backing file can be replaced while the guest runs ([`Block::swap_backing`], Firecracker's
//! `PATCH /drives/{id}` with a new `path_on_host`): the new file's size becomes the capacity and
//! the guest is told its configuration changed.

mod io_uring;
mod request;

pub use self::io_uring::AsyncIoError;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueOwnedT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::io_uring::{AsyncIo, Completed};
use self::request::{IoKind, Outcome, Request};
use super::{
    pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError, ActiveQueues,
    DeviceCounters, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};
use crate::rate_limiter::{
    Cost, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Descriptors per queue; also bounds the segments of one request.
pub const QUEUE_SIZE: u16 = 256;
/// The largest data transfer of one request (a bounce buffer this size may be allocated).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Length of the GET_ID answer.
pub const DISK_ID_LEN: usize = 20;

const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Errors of creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd for the block queue: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    #[error(transparent)]
    AsyncIo(#[from] AsyncIoError),
}

/// A virtio-blk device.
pub struct Block {
    id: String,
    path: PathBuf,
    disk: File,
    read_only: bool,
    capacity_sectors: u64,
    disk_id: [u8; DISK_ID_LEN],
    config: Vec<u8>,
    queue_events: [EventFd; 1],
    limiter: RateLimiter,
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues<1>>,
    /// Reused bounce buffer between guest memory and the file.
    buf: Vec<u8>,
    /// FLUSH offered and synced (Writeback); neither (Unsafe).
    writeback: bool,
    config_generation: u32,
    /// The Async engine; None: requests are served in place (Sync).
    io: Option<AsyncIo>,
    /// Files replaced by [`Block::swap_backing`] while requests on them were in flight.
    retired: Vec<File>,
}

/// The configuration space: capacity (le64), size_max (le32, unused), seg_max (le32).
fn config_space(capacity_sectors: u64) -> Vec<u8> {
    let mut config = Vec::with_capacity(16);
    config.extend_from_slice(&capacity_sectors.to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes());
    config.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
    config
}

/// Opens a disk image; its file and its size in whole sectors.
fn open_disk(id: &str, path: &Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let open_error = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let disk = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_error)?;
    let len = disk.metadata().map_err(open_error)?.len();
    if len % SECTOR_SIZE != 0 {
        tracing::warn!(
            "disk {id}: {} is {len} bytes, not a multiple of {SECTOR_SIZE}; the tail is not visible",
            path.display()
        );
    }
    Ok((disk, len >> SECTOR_SHIFT))
}

impl Block {
    /// A disk named `id` backed by `path`.
    pub fn new(
        id: &str,
        path: &Path,
        read_only: bool,
        limiter: RateLimiterConfig,
    ) -> Result<Self, BlockError> {
        let (disk, capacity_sectors) = open_disk(id, path, read_only)?;
        let mut disk_id = [0u8; DISK_ID_LEN];
        let n = id.len().min(DISK_ID_LEN);
        disk_id[..n].copy_from_slice(&id.as_bytes()[..n]);
        let config = config_space(capacity_sectors);
        Ok(Self {
            id: id.to_string(),
            path: path.to_path_buf(),
            disk,
            read_only,
            capacity_sectors,
            disk_id,
            config,
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            limiter: RateLimiter::new(limiter)?,
            counters: Arc::default(),
            active: None,
            buf: Vec::new(),
            writeback: true,
            config_generation: 0,
            io: None,
            retired: Vec::new(),
        })
    }

    /// Serves requests through io_uring from now on (Firecracker's `Async` engine). Set before
    /// the device joins the event loop.
    pub fn use_io_uring(&mut self) -> Result<(), BlockError> {
        self.io = Some(AsyncIo::new()?);
        Ok(())
    }

    /// Returns completed asynchronous requests to the guest.
    fn finish(&mut self, done: Vec<Completed>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if done.is_empty() {
            return;
        }
        for c in &done {
            let moved = if c.ok { c.plan.len } else { 0 };
            let mut outcome = if c.ok {
                Outcome::ok(0, 0)
            } else {
                Outcome::io_error()
            };
            match c.plan.kind {
                IoKind::Read => outcome.bytes_to_guest = moved,
                IoKind::Write => outcome.bytes_from_guest = moved,
                IoKind::Flush => {}
            }
            count(&self.counters, &outcome);
            if !active.add_used(0, c.head, c.used, format_args!("block {}", self.id)) {
                DeviceCounters::inc(&self.counters.invalid_requests, 1);
            }
        }
        active.notify(0);
        if self.io.as_ref().is_some_and(|io| io.in_flight() == 0) {
            self.retired.clear();
        }
    }

    fn complete_async(&mut self) {
        let done = match (self.io.as_mut(), self.active.as_ref()) {
            (Some(io), Some(active)) => io.complete(&active.mem),
            _ => return,
        };
        self.finish(done);
    }

    /// Firecracker's `cache_type`: `true` for Writeback, `false` for Unsafe. Set before the
    /// guest negotiates features.
    pub fn set_cache_writeback(&mut self, writeback: bool) {
        self.writeback = writeback;
    }

    /// Serves the disk from `path` from now on. Requests already answered were served by the
    /// old file (written data is in it: each write reached it before its status); the guest
    /// sees the new capacity through a configuration change.
    pub fn swap_backing(&mut self, path: &Path) -> Result<(), BlockError> {
        let (disk, capacity_sectors) = open_disk(&self.id, path, self.read_only)?;
        let old = std::mem::replace(&mut self.disk, disk);
        if self.io.as_ref().is_some_and(|io| io.in_flight() > 0) {
            // The kernel still reads or writes it for requests queued before the swap.
            self.retired.push(old);
        }
        self.path = path.to_path_buf();
        self.capacity_sectors = capacity_sectors;
        self.config = config_space(capacity_sectors);
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change();
        }
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn rate_limiter(&self) -> RateLimiterConfig {
        self.limiter.config()
    }

    /// Replaces the rate limiter's buckets while the guest runs.
    pub fn update_rate_limiter(&mut self, config: RateLimiterConfig) -> Result<(), BlockError> {
        self.limiter.update_buckets(config)?;
        self.process_queue();
        Ok(())
    }

    /// Serves available requests until the queue is empty or the rate limiter says wait (or,
    /// with the Async engine, the ring is full: completions free room and resume it).
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        while !self.limiter.is_blocked() && self.io.as_ref().is_none_or(AsyncIo::has_room) {
            let Some(chain) = pop_chain(&mut active.queues[0], &active.mem, &self.counters) else {
                break;
            };
            let head = chain.head_index();
            let used = match Request::parse(&active.mem, chain.clone()) {
                Ok(mut request) => {
                    let cost = Cost {
                        bytes: request.data_len() as u64,
                        ops: 1,
                    };
                    if !self.limiter.consume(cost) {
                        // Leave the chain in the ring; it is served when the timer fires.
                        active.queues[0].go_to_previous_position();
                        DeviceCounters::inc(&self.counters.throttled, 1);
                        break;
                    }
                    let plan = request.plan(self.read_only, self.writeback, self.capacity_sectors);
                    let queued = match (self.io.as_mut(), plan) {
                        (Some(io), Ok(plan)) => io.queue(&active.mem, &chain, plan, &self.disk),
                        _ => false,
                    };
                    if queued {
                        continue;
                    }
                    let outcome = request.execute(
                        &self.disk,
                        self.read_only,
                        self.writeback,
                        self.capacity_sectors,
                        &self.disk_id,
                        &mut self.buf,
                    );
                    count(&self.counters, &outcome);
                    request.complete(outcome)
                }
                Err(e) => {
                    // No status byte to answer through: hand the buffers back unused.
                    tracing::debug!("block {}: dropped a malformed chain: {e}", self.id);
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    0
                }
            };
            if !active.add_used(0, head, used, format_args!("block {}", self.id)) {
                DeviceCounters::inc(&self.counters.invalid_requests, 1);
            }
            completed = true;
        }
        if let Some(io) = self.io.as_mut() {
            io.submit();
        }
        if completed {
            active.notify(0);
        }
    }
}

/// Adds one executed request to `c`.
fn count(c: &DeviceCounters, outcome: &Outcome) {
    DeviceCounters::inc(&c.requests, 1);
    DeviceCounters::inc(&c.bytes_to_guest, outcome.bytes_to_guest as u64);
    DeviceCounters::inc(&c.bytes_from_guest, outcome.bytes_from_guest as u64);
    if outcome.invalid {
        DeviceCounters::inc(&c.invalid_requests, 1);
    }
    if outcome.io_error {
        DeviceCounters::inc(&c.io_errors, 1);
    }
}

impl VirtioDevice for Block {
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
        let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.writeback {
            f |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
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
        if let (Some(io), Some(active)) = (self.io.as_mut(), self.active.as_ref()) {
            // Nothing may write into memory the driver has taken back.
            io.drain(&active.mem);
        }
        self.retired.clear();
        self.active = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

/// The disk file is reopened by path from the configuration; what the device holds beyond it
/// is its rate limiter's fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub limiter: RateLimiterState,
}

impl Persist for Block {
    type State = BlockState;

    fn save(&mut self) -> BlockState {
        // Requests in flight on io_uring complete first, as Firecracker drains them: a restored
        // guest would wait for them forever.
        let done = match (self.io.as_mut(), self.active.as_ref()) {
            (Some(io), Some(active)) => io.drain(&active.mem),
            _ => Vec::new(),
        };
        if !done.is_empty() {
            self.finish(done);
        }
        BlockState {
            limiter: self.limiter.save(),
        }
    }

    fn restore(&mut self, state: BlockState) -> Result<(), PersistError> {
        self.limiter.restore(state.limiter)
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [self.queue_events[0].as_raw_fd(), self.limiter.as_raw_fd()];
        let io = self.io.as_ref().map(AsyncIo::event_fd);
        watch_fds(
            ops,
            &format!("block {}", self.id),
            fds.into_iter().chain(io),
        );
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_events[0].as_raw_fd() {
            let _ = self.queue_events[0].read();
        } else if Some(fd) == self.io.as_ref().map(AsyncIo::event_fd) {
            self.complete_async();
        } else {
            self.limiter.on_timer();
        }
        self.process_queue();
    }
}

#[cfg(test)]
mod tests;
