//! virtio-blk: a disk backed by a host file.
//!
//! Requests are served synchronously on the VMM thread, their data moved straight between guest
//! memory and the file. WRITE data is on the host file when its status is returned; FLUSH reaches
//! the disk (fdatasync) before it is acknowledged, so a guest that flushed loses nothing when the
//! host dies. With VIRTIO_RING_F_EVENT_IDX the driver is told exactly when to notify and when it
//! wants an interrupt, which saves exits when requests queue up.

mod request;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::request::{Outcome, Request};
use super::{
    pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError, ActiveQueues,
    DeviceCounters, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::{Cost, RateLimiter, RateLimiterConfig, RateLimiterError};

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
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

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
}

impl Block {
    /// A disk named `id` backed by `path`.
    pub fn new(
        id: &str,
        path: &Path,
        read_only: bool,
        limiter: RateLimiterConfig,
    ) -> Result<Self, BlockError> {
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
        let capacity_sectors = len >> SECTOR_SHIFT;
        let mut disk_id = [0u8; DISK_ID_LEN];
        let n = id.len().min(DISK_ID_LEN);
        disk_id[..n].copy_from_slice(&id.as_bytes()[..n]);
        // capacity (le64), size_max (le32, unused), seg_max (le32).
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&capacity_sectors.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
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
        })
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

    /// Serves available requests until the queue is empty or the rate limiter says wait.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        // Passes in a row that took nothing: a second one means the ring is broken (an index
        // far ahead), not that a request slipped in, so the loop stops.
        let mut idle_passes = 0;
        'serve: loop {
            let mut took = false;
            // No notifications while the queue is being drained: the driver need not exit to
            // tell a device that is already looking.
            if let Err(e) = active.queues[0].disable_notification(&active.mem) {
                tracing::debug!("block {}: cannot suppress notifications: {e}", self.id);
            }
            while !self.limiter.is_blocked() {
                let Some(chain) = pop_chain(&mut active.queues[0], &active.mem, &self.counters)
                else {
                    break;
                };
                took = true;
                let head = chain.head_index();
                let used = match Request::parse(&active.mem, chain) {
                    Ok(request) => {
                        let cost = Cost {
                            bytes: request.data_len() as u64,
                            ops: 1,
                        };
                        if !self.limiter.consume(cost) {
                            // Leave the chain in the ring; it is served when the timer fires
                            // (notifications stay off until then: the timer is what wakes us).
                            active.queues[0].go_to_previous_position();
                            DeviceCounters::inc(&self.counters.throttled, 1);
                            break 'serve;
                        }
                        let outcome = request.execute(
                            &active.mem,
                            &self.disk,
                            self.read_only,
                            self.capacity_sectors,
                            &self.disk_id,
                        );
                        count(&self.counters, &outcome);
                        request.complete(&active.mem, outcome)
                    }
                    Err(e) => {
                        // No status byte to answer through: hand the buffers back unused.
                        tracing::debug!("block {}: dropped a malformed chain: {e}", self.id);
                        DeviceCounters::inc(&self.counters.invalid_requests, 1);
                        0
                    }
                };
                if let Err(e) = active.queues[0].add_used(&active.mem, head, used) {
                    tracing::warn!("block {}: cannot return a used buffer: {e}", self.id);
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                }
                completed = true;
            }
            if self.limiter.is_blocked() {
                break;
            }
            idle_passes = if took { 0 } else { idle_passes + 1 };
            // Notifications back on; a request that came in meanwhile is served now, since its
            // notification may have been skipped.
            match active.queues[0].enable_notification(&active.mem) {
                Ok(true) if idle_passes < 2 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!("block {}: cannot re-enable notifications: {e}", self.id);
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    break;
                }
            }
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
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let event_idx = ctx.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = ActiveQueues::new(ctx)?;
        active.queues[0].set_event_idx(event_idx);
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [self.queue_events[0].as_raw_fd(), self.limiter.as_raw_fd()];
        watch_fds(ops, &format!("block {}", self.id), fds);
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
mod tests;
