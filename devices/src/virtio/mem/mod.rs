//! virtio-mem: a region of guest-physical memory above RAM that the guest plugs and unplugs block
//! by block to meet the size the host requests.
//!
//! The host backs the whole region with one lazily populated mapping but shows the guest only
//! slots that hold a plugged block (each slot is one KVM memory slot, made and removed through
//! [`HotplugSlots`]); unplugged blocks are discarded at once, so their memory goes back to the
//! host. Every request is checked against the region and the blocks' states: a request that can
//! never be served gets ERROR, plugging past the requested size gets NACK, and neither changes
//! anything.

pub mod request;

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::request::{BlockRange, BlockState, MemRequest, MemResponse, REQUEST_SIZE, RESPONSE_SIZE};
use super::discard::{discard, PAGE_SIZE};
use super::{
    pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError, ActiveQueues,
    DeviceCounters, VirtioDevice, TYPE_MEM, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};

pub const QUEUE_SIZE: u16 = 128;
/// The guest must not touch unplugged memory (it is not mapped).
const F_UNPLUGGED_INACCESSIBLE: u32 = 1;

/// Errors of creating the device or changing its requested size.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("cannot create an eventfd for the virtio-mem queue: {0}")]
    EventFd(std::io::Error),
    #[error("invalid hotplug region: {0}")]
    Layout(String),
    #[error("requested size {requested:#x} is not a multiple of the block size {block:#x} or exceeds the region ({region:#x})")]
    RequestedSize {
        requested: u64,
        block: u64,
        region: u64,
    },
}

/// Where the hotplug region is and how it is cut up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemLayout {
    pub addr: u64,
    pub size: u64,
    /// What the guest plugs at a time.
    pub block_size: u64,
    /// What the host maps into the guest at a time (a multiple of the block size).
    pub slot_size: u64,
}

impl MemLayout {
    pub fn new(addr: u64, size: u64, block_size: u64, slot_size: u64) -> Result<Self, MemError> {
        let bad = |why: &str| Err(MemError::Layout(why.to_string()));
        if !block_size.is_power_of_two() || block_size < PAGE_SIZE {
            return bad("the block size must be a power of two of at least 4 KiB");
        }
        if slot_size == 0 || !slot_size.is_multiple_of(block_size) {
            return bad("the slot size must be a non-zero multiple of the block size");
        }
        if size == 0 || !size.is_multiple_of(slot_size) {
            return bad("the region size must be a non-zero multiple of the slot size");
        }
        if !addr.is_multiple_of(slot_size) || addr.checked_add(size).is_none() {
            return bad("the region must start at a multiple of the slot size and fit in 64 bits");
        }
        Ok(Self {
            addr,
            size,
            block_size,
            slot_size,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.size / self.block_size
    }

    pub fn slots(&self) -> usize {
        (self.size / self.slot_size) as usize
    }

    fn blocks_per_slot(&self) -> u64 {
        self.slot_size / self.block_size
    }

    /// The guest-physical range of slot `index`.
    pub fn slot_range(&self, index: usize) -> Range<u64> {
        let start = self.addr + index as u64 * self.slot_size;
        start..start + self.slot_size
    }

    /// Block indexes of a guest range, if it is a valid run of whole blocks inside the region.
    fn blocks_of(&self, r: BlockRange) -> Option<Range<u64>> {
        let offset = r.addr.checked_sub(self.addr)?;
        if r.nb_blocks == 0 || offset % self.block_size != 0 {
            return None;
        }
        let first = offset / self.block_size;
        let end = first.checked_add(u64::from(r.nb_blocks))?;
        (end <= self.blocks()).then_some(first..end)
    }
}

/// Shows and hides the region's slots to the guest (KVM memory slots in the VMM).
pub trait HotplugSlots: Send {
    fn set_present(&mut self, slot: usize, present: bool) -> std::io::Result<()>;
}

/// What the guest has asked, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemActivity {
    pub plugged_requests: u64,
    pub unplugged_requests: u64,
    pub nacks: u64,
    pub errors: u64,
}

/// Plugged state of every block, with counts per slot.
struct Blocks {
    bits: Vec<u64>,
    plugged: u64,
    per_slot: Vec<u64>,
    blocks_per_slot: u64,
}

impl Blocks {
    fn new(layout: &MemLayout) -> Self {
        Self {
            bits: vec![0; layout.blocks().div_ceil(64) as usize],
            plugged: 0,
            per_slot: vec![0; layout.slots()],
            blocks_per_slot: layout.blocks_per_slot(),
        }
    }

    fn is_plugged(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn count(&self, r: &Range<u64>) -> u64 {
        r.clone().filter(|&b| self.is_plugged(b)).count() as u64
    }

    fn set(&mut self, r: &Range<u64>, plugged: bool) {
        for b in r.clone() {
            if self.is_plugged(b) == plugged {
                continue;
            }
            self.bits[(b / 64) as usize] ^= 1 << (b % 64);
            let slot = (b / self.blocks_per_slot) as usize;
            if plugged {
                self.plugged += 1;
                self.per_slot[slot] += 1;
            } else {
                self.plugged -= 1;
                self.per_slot[slot] -= 1;
            }
        }
    }

    fn slots_of(&self, r: &Range<u64>) -> Range<usize> {
        (r.start / self.blocks_per_slot) as usize..r.end.div_ceil(self.blocks_per_slot) as usize
    }

    /// Maximal runs of plugged blocks.
    fn plugged_runs(&self, total: u64) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for b in (0..total).filter(|&b| self.is_plugged(b)) {
            match runs.last_mut() {
                Some(run) if run.end == b => run.end += 1,
                _ => runs.push(b..b + 1),
            }
        }
        runs
    }
}

/// The plugged blocks (their KVM slots are shown again on restore) and the requested size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemState {
    pub plugged_bits: Vec<u64>,
    pub requested: u64,
    pub activity: MemActivity,
    pub config_generation: u32,
}

impl Persist for VirtioMem {
    type State = MemState;

    fn save(&mut self) -> MemState {
        MemState {
            plugged_bits: self.blocks.bits.clone(),
            requested: self.requested,
            activity: self.activity,
            config_generation: self.config_generation,
        }
    }

    fn restore(&mut self, s: MemState) -> Result<(), PersistError> {
        let total = self.layout.blocks();
        if s.plugged_bits.len() != self.blocks.bits.len() {
            return Err(PersistError::Mismatch(format!(
                "virtio-mem: a bitmap of {} words for {total} blocks",
                s.plugged_bits.len()
            )));
        }
        if s.requested > self.layout.size || !s.requested.is_multiple_of(self.layout.block_size) {
            return Err(PersistError::Mismatch(format!(
                "virtio-mem: requested size {} in a region of {}",
                s.requested, self.layout.size
            )));
        }
        let mut blocks = Blocks::new(&self.layout);
        for b in 0..(s.plugged_bits.len() as u64 * 64) {
            if s.plugged_bits[(b / 64) as usize] & (1 << (b % 64)) != 0 {
                if b >= total {
                    return Err(PersistError::Mismatch(format!(
                        "virtio-mem: block {b} plugged in a region of {total}"
                    )));
                }
                blocks.set(&(b..b + 1), true);
            }
        }
        for (slot, n) in blocks.per_slot.iter().enumerate() {
            if *n > 0 {
                self.slots.set_present(slot, true).map_err(|e| {
                    PersistError::Restore(format!("virtio-mem: cannot map slot {slot}: {e}"))
                })?;
            }
        }
        self.blocks = blocks;
        self.requested = s.requested;
        self.activity = s.activity;
        self.config_generation = s.config_generation;
        Ok(())
    }
}

/// The virtio-mem device.
pub struct VirtioMem {
    layout: MemLayout,
    blocks: Blocks,
    requested: u64,
    slots: Box<dyn HotplugSlots>,
    queue_events: [EventFd; 1],
    counters: Arc<DeviceCounters>,
    activity: MemActivity,
    config_generation: u32,
    active: Option<ActiveQueues<1>>,
}

impl VirtioMem {
    pub fn new(layout: MemLayout, slots: Box<dyn HotplugSlots>) -> Result<Self, MemError> {
        Ok(Self {
            blocks: Blocks::new(&layout),
            layout,
            requested: 0,
            slots,
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(MemError::EventFd)?],
            counters: Arc::default(),
            activity: MemActivity::default(),
            config_generation: 0,
            active: None,
        })
    }

    pub fn layout(&self) -> MemLayout {
        self.layout
    }

    pub fn plugged_bytes(&self) -> u64 {
        self.blocks.plugged * self.layout.block_size
    }

    pub fn requested_bytes(&self) -> u64 {
        self.requested
    }

    pub fn activity(&self) -> MemActivity {
        self.activity
    }

    /// Asks the guest to plug or unplug until `bytes` are plugged.
    pub fn set_requested_bytes(&mut self, bytes: u64) -> Result<(), MemError> {
        if !bytes.is_multiple_of(self.layout.block_size) || bytes > self.layout.size {
            return Err(MemError::RequestedSize {
                requested: bytes,
                block: self.layout.block_size,
                region: self.layout.size,
            });
        }
        if bytes != self.requested {
            self.requested = bytes;
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Some(active) = &self.active {
                active.interrupt.signal_config_change();
            }
        }
        Ok(())
    }

    fn config(&self) -> [u8; 56] {
        let mut c = [0u8; 56];
        let mut put = |at: usize, v: u64| c[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(0, self.layout.block_size);
        // 8: node_id and padding stay 0 (no NUMA).
        put(16, self.layout.addr);
        put(24, self.layout.size);
        put(32, self.layout.size);
        put(40, self.plugged_bytes());
        put(48, self.requested);
        c
    }

    /// Serves every request waiting in the queue.
    pub fn process_queue(&mut self) {
        let mut completed = false;
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = active.mem.clone();
            let Some(chain) = pop_chain(&mut active.queues[0], &mem, &self.counters) else {
                break;
            };
            let head = chain.head_index();
            let used = self.serve_chain(&mem, chain);
            if let Some(active) = self.active.as_mut() {
                active.add_used(0, head, used, "virtio-mem");
            }
            completed = true;
        }
        if completed {
            if let Some(active) = self.active.as_mut() {
                active.notify(0);
            }
        }
    }

    /// One request: its answer goes into the chain's writable part; returns the bytes written.
    fn serve_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        DeviceCounters::inc(&self.counters.requests, 1);
        let (reader, writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                DeviceCounters::inc(&self.counters.invalid_requests, 1);
                return 0;
            }
        };
        let mut reader = reader;
        let mut writer = writer;
        let mut raw = [0u8; REQUEST_SIZE];
        let response = if reader.available_bytes() < REQUEST_SIZE {
            DeviceCounters::inc(&self.counters.invalid_requests, 1);
            MemResponse::Error
        } else {
            match std::io::Read::read_exact(&mut reader, &mut raw) {
                Ok(()) => self.serve(mem, MemRequest::parse(&raw)),
                Err(_) => MemResponse::Error,
            }
        };
        if writer.available_bytes() < RESPONSE_SIZE {
            DeviceCounters::inc(&self.counters.invalid_requests, 1);
            return 0;
        }
        match std::io::Write::write_all(&mut writer, &response.encode()) {
            Ok(()) => RESPONSE_SIZE as u32,
            Err(e) => {
                tracing::debug!("virtio-mem: cannot write a response: {e}");
                DeviceCounters::inc(&self.counters.invalid_requests, 1);
                0
            }
        }
    }

    /// Carries out a request; state changes only on ACK.
    pub fn serve(&mut self, mem: &GuestMemoryMmap, req: MemRequest) -> MemResponse {
        let response = match req {
            MemRequest::Plug(r) => self.plug(r),
            MemRequest::Unplug(r) => self.unplug(mem, r),
            MemRequest::UnplugAll => self.unplug_all(mem),
            MemRequest::State(r) => match self.layout.blocks_of(r) {
                None => MemResponse::Error,
                Some(blocks) => MemResponse::State(match self.blocks.count(&blocks) {
                    0 => BlockState::Unplugged,
                    n if n == blocks.end - blocks.start => BlockState::Plugged,
                    _ => BlockState::Mixed,
                }),
            },
            MemRequest::Unknown(kind) => {
                tracing::debug!("virtio-mem: unknown request type {kind}");
                MemResponse::Error
            }
        };
        match response {
            MemResponse::Error => {
                self.activity.errors += 1;
                DeviceCounters::inc(&self.counters.invalid_requests, 1);
                tracing::debug!("virtio-mem: {req:?} refused");
            }
            MemResponse::Nack => self.activity.nacks += 1,
            _ => {}
        }
        response
    }

    fn plug(&mut self, r: BlockRange) -> MemResponse {
        let Some(blocks) = self.layout.blocks_of(r) else {
            return MemResponse::Error;
        };
        if self.blocks.count(&blocks) != 0 {
            return MemResponse::Error;
        }
        let n = blocks.end - blocks.start;
        if (self.blocks.plugged + n) * self.layout.block_size > self.requested {
            return MemResponse::Nack;
        }
        let empty: Vec<usize> = self
            .blocks
            .slots_of(&blocks)
            .filter(|&s| self.blocks.per_slot[s] == 0)
            .collect();
        for (done, &slot) in empty.iter().enumerate() {
            if let Err(e) = self.slots.set_present(slot, true) {
                tracing::warn!("virtio-mem: cannot map slot {slot}: {e}");
                DeviceCounters::inc(&self.counters.io_errors, 1);
                for &undo in &empty[..done] {
                    let _ = self.slots.set_present(undo, false);
                }
                return MemResponse::Error;
            }
        }
        self.blocks.set(&blocks, true);
        self.activity.plugged_requests += 1;
        MemResponse::Ack
    }

    fn release(&mut self, mem: &GuestMemoryMmap, blocks: &Range<u64>) -> Result<(), ()> {
        let addr = self.layout.addr + blocks.start * self.layout.block_size;
        let len = (blocks.end - blocks.start) * self.layout.block_size;
        if let Err(e) = discard(mem, GuestAddress(addr), len) {
            tracing::warn!("virtio-mem: {e}");
            DeviceCounters::inc(&self.counters.io_errors, 1);
            return Err(());
        }
        let slots = self.blocks.slots_of(blocks);
        self.blocks.set(blocks, false);
        for slot in slots.filter(|&s| self.blocks.per_slot[s] == 0) {
            if let Err(e) = self.slots.set_present(slot, false) {
                // The blocks are discarded either way; the slot only stays visible.
                tracing::warn!("virtio-mem: cannot unmap slot {slot}: {e}");
                DeviceCounters::inc(&self.counters.io_errors, 1);
            }
        }
        Ok(())
    }

    fn unplug(&mut self, mem: &GuestMemoryMmap, r: BlockRange) -> MemResponse {
        let Some(blocks) = self.layout.blocks_of(r) else {
            return MemResponse::Error;
        };
        if self.blocks.count(&blocks) != blocks.end - blocks.start {
            return MemResponse::Error;
        }
        match self.release(mem, &blocks) {
            Ok(()) => {
                self.activity.unplugged_requests += 1;
                MemResponse::Ack
            }
            Err(()) => MemResponse::Error,
        }
    }

    fn unplug_all(&mut self, mem: &GuestMemoryMmap) -> MemResponse {
        for run in self.blocks.plugged_runs(self.layout.blocks()) {
            if self.release(mem, &run).is_err() {
                return MemResponse::Error;
            }
        }
        self.activity.unplugged_requests += 1;
        MemResponse::Ack
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << F_UNPLUGGED_INACCESSIBLE)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveQueues::states)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.acked_features & (1 << F_UNPLUGGED_INACCESSIBLE) == 0 {
            // Unplugged memory is not mapped: a driver that would read it cannot be served.
            return Err(ActivateError::Other(
                "the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE".to_string(),
            ));
        }
        self.active = Some(ActiveQueues::new(ctx)?);
        Ok(())
    }

    /// Plugged blocks stay plugged across a reset: the driver finds them in `plugged_size` and
    /// unplugs them itself.
    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

impl MutEventSubscriber for VirtioMem {
    fn init(&mut self, ops: &mut EventOps) {
        watch_fds(ops, "virtio-mem", [self.queue_events[0].as_raw_fd()]);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue_events[0].read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests;
