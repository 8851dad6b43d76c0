//! Virtio devices over MMIO (virtio 1.x, "modern"): the transport, the interface every device
//! implements, and the devices.
//!
//! Every descriptor chain is guest-controlled input: a device validates it, answers a bad request
//! with a virtio error status where it can find a status byte, otherwise returns the chain unused,
//! counts it, and goes on. Nothing the guest puts in a queue can panic or stall the VMM.

pub mod balloon;
pub mod block;
pub mod device_writes;
pub mod discard;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod pmem;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vhost_user_block;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};

use crate::persist::Snapshottable;
use device_writes::DeviceWrites;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit every modern device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device type ids.
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_MEM: u32 = 24;
pub const TYPE_PMEM: u32 = 27;

/// InterruptStatus bits.
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt line: the status bits the driver reads and acknowledges, and the irqfd
/// that KVM turns into the IOAPIC pin.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    /// Tells the driver that the configuration space (or the device state) changed.
    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    /// Sets `bits` (a restored device's pending interrupt) and raises the line.
    pub fn raise(&self, bits: u32) {
        self.signal(bits);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio: cannot raise the device interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// What a device has done, for the VMM's metrics and the predictor.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests served (with any status).
    pub requests: AtomicU64,
    /// Bytes the device wrote into guest buffers.
    pub bytes_to_guest: AtomicU64,
    /// Bytes the device took from guest buffers.
    pub bytes_from_guest: AtomicU64,
    /// Malformed chains or requests (answered with an error status, or returned unused).
    pub invalid_requests: AtomicU64,
    /// Host-side I/O failures.
    pub io_errors: AtomicU64,
    /// Times the rate limiter made the queue wait.
    pub throttled: AtomicU64,
    /// Accesses to the device's registers that the spec forbids (wrong width, state or offset).
    pub invalid_register_access: AtomicU64,
}

impl DeviceCounters {
    pub fn inc(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub acked_features: u64,
    pub interrupt: Arc<VirtioInterrupt>,
    /// Where returning a chain marks the pages the device wrote (for Diff snapshots).
    pub writes: Arc<DeviceWrites>,
}

/// The queues of a started device, the memory they live in and the interrupt they raise.
pub struct ActiveQueues<const N: usize> {
    pub mem: GuestMemoryMmap,
    pub queues: [Queue; N],
    pub interrupt: Arc<VirtioInterrupt>,
    pub writes: Arc<DeviceWrites>,
}

/// Returns chain `head` to the driver on `queue` with `len` bytes written into it, marking in
/// `writes` the pages the device may have written for it. Every device returns chains this way.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    writes: &DeviceWrites,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    queue.add_used(mem, head, len)?;
    writes.mark_used(mem, queue, head);
    Ok(())
}

impl<const N: usize> ActiveQueues<N> {
    /// Every queue's registers and positions now.
    pub fn states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }

    /// Takes what a device with exactly `N` queues starts with.
    pub fn new(ctx: ActivateContext) -> Result<Self, ActivateError> {
        let got = ctx.queues.len();
        let queues = ctx
            .queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
        Ok(Self {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
            writes: ctx.writes,
        })
    }

    /// Returns chain `head` to the driver on queue `index` with `len` bytes written into it. A
    /// used ring the driver placed where it cannot be written is the driver's fault, not the
    /// device's: it is logged under `who` and `false` returned, and the device goes on.
    pub fn add_used(
        &mut self,
        index: usize,
        head: u16,
        len: u32,
        who: impl std::fmt::Display,
    ) -> bool {
        match add_used(&mut self.queues[index], &self.mem, &self.writes, head, len) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{who}: cannot return a used buffer: {e}");
                false
            }
        }
    }

    /// Raises the interrupt for new used buffers in queue `index`, unless the driver asked not to
    /// be told (event index).
    pub fn notify(&mut self, index: usize) {
        if self.queues[index]
            .needs_notification(&self.mem)
            .unwrap_or(true)
        {
            self.interrupt.signal_used_queue();
        }
    }
}

/// Adds a device's fds (queue eventfds, timers, sockets) to the event loop for reading; a failure
/// is logged under `who` and the device goes on without that fd.
pub fn watch_fds(ops: &mut EventOps, who: &str, fds: impl IntoIterator<Item = RawFd>) {
    for fd in fds {
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            tracing::error!("{who}: cannot watch fd {fd}: {e}");
        }
    }
}

/// Pops the next available chain of `queue`. An available index more than a queue ahead of the
/// device is a driver bug that `pop_descriptor_chain` would report only as "nothing available":
/// it is counted as an invalid request each time the device looks, and nothing is taken until
/// the driver fixes the index or resets the device.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &DeviceCounters,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    match queue.iter(mem) {
        Ok(mut chains) => chains.next(),
        Err(e) => {
            tracing::debug!("virtio: broken available ring: {e}");
            DeviceCounters::inc(&counters.invalid_requests, 1);
            None
        }
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("{0}")]
    Other(String),
}

/// A virtio device behind a transport. Its snapshot state ([`Snapshottable`], through
/// [`crate::persist::Persist`]) is what it holds beyond the transport's registers and queues.
pub trait VirtioDevice: Snapshottable + Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The eventfds the driver's queue notifications arrive on (KVM ioeventfds), one per queue.
    fn queue_events(&self) -> &[EventFd];
    fn avail_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Config space writes; read-only config by default, so every write is a forbidden access.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        DeviceCounters::inc(&self.counters().invalid_register_access, 1);
        tracing::debug!(
            "virtio device type {}: ignored config write of {} bytes at {offset}",
            self.device_type(),
            data.len()
        );
    }
    /// Bumped by devices whose config space changes on their own (balloon target, virtio-mem
    /// requested size), so that a driver reading several fields sees one consistent version.
    fn config_generation(&self) -> u32 {
        0
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The device's queues as it has advanced them since activation (none while inactive).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// Back to the state before activation (the driver wrote 0 to Status).
    fn reset(&mut self);
    fn counters(&self) -> Arc<DeviceCounters>;
}

/// Copies `value`'s little-endian config bytes at `offset` into `data`; out-of-range bytes are 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - offset);
    data[..n].copy_from_slice(&config[offset..offset + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_bits_are_set_signalled_and_acked() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let i = VirtioInterrupt::new(irq.try_clone().unwrap());
        i.signal_used_queue();
        i.signal_config_change();
        assert_eq!(i.status(), INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irq.read().unwrap(), 2);
        i.ack(INTERRUPT_USED_RING);
        assert_eq!(i.status(), INTERRUPT_CONFIG_CHANGE);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [9u8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
