//! virtio-rng (`entropy`): fills the guest's buffers from the host's getrandom(2).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, Writer};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    pop_chain, watch_fds, ActivateContext, ActivateError, ActiveQueues, DeviceCounters,
    VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};
use crate::rate_limiter::{
    Cost, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};

/// What the entropy device holds beyond its configuration: its rate limiter's fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub limiter: RateLimiterState,
}

impl Persist for Rng {
    type State = RngState;

    fn save(&mut self) -> RngState {
        RngState {
            limiter: self.limiter.save(),
        }
    }

    fn restore(&mut self, state: RngState) -> Result<(), PersistError> {
        self.limiter.restore(state.limiter)
    }
}

pub const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most: larger buffers get this much (the spec allows short fills).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Errors of creating the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot create an eventfd for the entropy queue: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
}

/// The entropy device.
pub struct Rng {
    queue_events: [EventFd; 1],
    limiter: RateLimiter,
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues<1>>,
    buf: Vec<u8>,
}

/// Fills `buf` with random bytes from the kernel.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into memory `rest` owns.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

impl Rng {
    pub fn new(limiter: RateLimiterConfig) -> Result<Self, RngError> {
        Ok(Self {
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(RngError::EventFd)?],
            limiter: RateLimiter::new(limiter)?,
            counters: Arc::default(),
            active: None,
            buf: Vec::new(),
        })
    }

    pub fn rate_limiter(&self) -> RateLimiterConfig {
        self.limiter.config()
    }

    /// Serves requests until the queue is empty or the rate limiter says wait.
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
            let used = match Writer::new(&active.mem, chain) {
                Ok(mut writer) if writer.available_bytes() > 0 => {
                    let len = writer.available_bytes().min(MAX_REQUEST_BYTES);
                    if !self.limiter.consume(Cost {
                        bytes: len as u64,
                        ops: 1,
                    }) {
                        active.queues[0].go_to_previous_position();
                        DeviceCounters::inc(&self.counters.throttled, 1);
                        break;
                    }
                    self.buf.resize(len, 0);
                    match fill_random(&mut self.buf).and_then(|()| writer.write_all(&self.buf)) {
                        Ok(()) => {
                            DeviceCounters::inc(&self.counters.requests, 1);
                            DeviceCounters::inc(&self.counters.bytes_to_guest, len as u64);
                            len as u32
                        }
                        Err(e) => {
                            tracing::warn!("entropy: {e}");
                            DeviceCounters::inc(&self.counters.io_errors, 1);
                            0
                        }
                    }
                }
                // No writable buffer, or buffers outside guest memory: nothing to fill.
                Ok(_) | Err(_) => {
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    0
                }
            };
            active.add_used(0, head, used, "entropy");
            completed = true;
        }
        if completed {
            active.notify(0);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [self.queue_events[0].as_raw_fd(), self.limiter.as_raw_fd()];
        watch_fds(ops, "entropy", fds);
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
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_returns_unusable_chains_empty() {
        let mem = guest_memory(2 << 20);
        let mut queue = DriverQueue::new(&mem, GuestAddress(0), 16);
        let mut rng = Rng::new(RateLimiterConfig::default()).unwrap();
        activate(&mut rng, &mem, std::slice::from_ref(&queue)).unwrap();
        queue.add_chain(&[(0x10_0000, 4096, WRITE)]);
        queue.add_chain(&[(0x10_2000, 64, 0)]); // read-only buffer
        queue.add_chain(&[(0xfff0_0000, 64, WRITE)]); // outside memory
        rng.process_queue();
        let used = |i| queue.used(i).1;
        assert_eq!((used(0), used(1), used(2)), (4096, 0, 0));
        let mut buf = [0u8; 4096];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0));
        assert_eq!(rng.counters.invalid_requests.load(Ordering::Relaxed), 2);
    }
}
