//! The driver's side of split virtqueues in guest memory, for exercising devices over real
//! descriptor chains: the unit tests and the fuzz targets (`fuzz/`) share it.

use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// Guest memory of `size` bytes from address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("anonymous guest memory")
}

/// An interrupt line whose eventfd nobody reads (a non-blocking eventfd only saturates).
pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    ))
}

/// One split queue as the driver sees it: its rings in guest memory and the next free descriptor.
pub struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    size: u16,
    /// The used ring, placed after the avail ring's `used_event` (the mock puts it over that
    /// field, which VIRTIO_RING_F_EVENT_IDX needs).
    used: GuestAddress,
    next_desc: u16,
}

/// Used ring: flags, index, then 8-byte elements.
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

impl<'a> DriverQueue<'a> {
    /// A queue of `size` entries whose descriptor table starts at `at` (the rings follow it).
    pub fn new(mem: &'a GuestMemoryMmap, at: GuestAddress, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, at, size);
        let used_event_end = mock.avail_addr().0 + 4 + 2 * u64::from(size) + 2;
        Self {
            used: GuestAddress(used_event_end.next_multiple_of(4)),
            mock,
            mem,
            size,
            next_desc: 0,
        }
    }

    /// The device's view of this queue, ready.
    pub fn queue(&self) -> Queue {
        let mut q = self
            .mock
            .create_queue::<Queue>()
            .expect("the mock's rings fit its memory");
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q
    }

    /// Places one chain of `(addr, len, flags)` in the next free descriptors, linking them with
    /// NEXT, and makes it available.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let base = self.next_desc;
        let chain: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i == descs.len() - 1;
                let flags = if last { flags } else { flags | NEXT };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, base + i as u16 + 1))
            })
            .collect();
        self.mock
            .add_desc_chains(&chain, base)
            .expect("the chain fits the queue");
        self.next_desc += descs.len() as u16;
    }

    /// Stores a descriptor exactly as given, however malformed: indices past the table are
    /// ignored, as a driver cannot write there.
    pub fn store_raw(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let _ = self.mock.desc_table().store(index, d);
    }

    /// Publishes `heads` in the available ring from slot 0 and sets its index to `idx`, which a
    /// hostile driver may set to anything.
    pub fn publish(&self, heads: &[u16], idx: u16) {
        let ring = self.mock.avail().ring();
        for (slot, &head) in heads.iter().enumerate() {
            if let Ok(r) = ring.ref_at(slot) {
                r.store(head);
            }
        }
        self.mock.avail().idx().store(idx);
    }

    /// The avail index after which the device wants a notification (`avail_event`, at the end of
    /// the used ring; meaningful with VIRTIO_RING_F_EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.used.0 + USED_HEADER + USED_ELEMENT * u64::from(self.size);
        self.mem
            .read_obj(GuestAddress(at))
            .expect("avail_event inside memory")
    }

    /// Sets `used_event` (at the end of the avail ring): the used index after which the driver
    /// wants an interrupt.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(idx, GuestAddress(at))
            .expect("used_event inside memory");
    }

    /// Number of chains the device has returned.
    pub fn used_count(&self) -> u16 {
        self.mem
            .read_obj(self.used.unchecked_add(2))
            .expect("used index inside memory")
    }

    /// (head, length written) of used entry `i`.
    pub fn used(&self, i: usize) -> (u32, u32) {
        let at = self.used.0 + USED_HEADER + USED_ELEMENT * (i as u64 % u64::from(self.size));
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used slot");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used slot");
        (id, len)
    }
}

/// The features a driver that wants nothing optional acks.
pub const VERSION_1_ONLY: u64 = 1 << VIRTIO_F_VERSION_1;

/// Starts `dev` on `queues` in `mem` as a VERSION_1 driver would, with an interrupt nobody reads.
pub fn activate(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    queues: &[DriverQueue<'_>],
) -> Result<(), ActivateError> {
    activate_with(dev, mem, queues, interrupt(), VERSION_1_ONLY)
}

/// [`activate`] with the interrupt the caller watches and the features the driver acked.
pub fn activate_with(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    queues: &[DriverQueue<'_>],
    interrupt: Arc<VirtioInterrupt>,
    acked_features: u64,
) -> Result<(), ActivateError> {
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: queues.iter().map(DriverQueue::queue).collect(),
        acked_features,
        interrupt,
        writes: Arc::default(),
    })
}
