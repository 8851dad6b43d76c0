//! The KVM VM: in-kernel irqchip and PIT, the TSS and identity-map pages, and guest memory slots.

use std::sync::Arc;

use devices::virtio::mem::{HotplugSlots, MemLayout};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors of creating and configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create a KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot set the KVM TSS address: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("cannot set the KVM identity map address: {0}")]
    IdentityMap(kvm_ioctls::Error),
    #[error("cannot create the in-kernel irqchip: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("KVM refused guest memory slot {slot} ({size} bytes at {start:#x}): {source}")]
    MemorySlot {
        slot: u32,
        start: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with the platform devices every prescient guest gets.
pub struct Vm {
    /// Shared with the virtio-mem device, which adds and removes memory slots while the VM runs.
    fd: Arc<VmFd>,
}

/// The host address of a region's first byte.
fn host_address(region: &GuestRegionMmap) -> u64 {
    region
        .get_host_address(MemoryRegionAddress(0))
        .expect("an mmap region always has a host address") as u64
}

/// Makes guest range `[start, start + size)` the KVM memory slot `slot`, backed by host memory at
/// `host`; a size of 0 deletes the slot.
///
/// # Safety
/// When `size` is not 0, `host..host + size` must be a mapping that stays alive until the slot
/// is deleted or the VM is gone.
unsafe fn set_memory_slot(
    fd: &VmFd,
    slot: u32,
    start: u64,
    size: u64,
    host: u64,
) -> Result<(), VmError> {
    let desc = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: start,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the caller vouches for the mapping (see above).
    unsafe { fd.set_user_memory_region(desc) }.map_err(|source| VmError::MemorySlot {
        slot,
        start,
        size,
        source,
    })
}

impl Vm {
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = Arc::new(kvm.create_vm().map_err(VmError::Create)?);
        // Both addresses must be set before any vCPU exists; they sit in the MMIO gap, never RAM.
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        // No KVM_PIT_SPEAKER_DUMMY: guests calibrate their TSC against PIT channel 2 gated by
        // port 0x61, so KVM must emulate that port.
        fd.create_pit2(kvm_pit_config::default())
            .map_err(VmError::Pit)?;
        Ok(Self { fd })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Makes every region of `mem` a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`, which the
            // microVM keeps alive for as long as the VM exists.
            unsafe {
                set_memory_slot(
                    &self.fd,
                    slot as u32,
                    region.start_addr().raw_value(),
                    region.len(),
                    host_address(region),
                )
            }?;
        }
        Ok(())
    }

    /// Makes the host mapping `host..host + size` (a device's memory, e.g. a pmem file) the KVM
    /// slot `slot` at guest address `start`, read-only for the guest if asked.
    ///
    /// # Safety
    /// The mapping must stay alive until the VM is gone.
    pub unsafe fn map_device_memory(
        &self,
        slot: u32,
        start: u64,
        size: u64,
        host: u64,
        read_only: bool,
    ) -> Result<(), VmError> {
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: start,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the caller vouches for the mapping (see above).
        unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| VmError::MemorySlot {
            slot,
            start,
            size,
            source,
        })
    }

    /// The slots of a virtio-mem region, numbered from `first_slot`, mapped on demand.
    pub fn hotplug_slots(
        &self,
        region: Arc<GuestRegionMmap>,
        layout: MemLayout,
        first_slot: u32,
    ) -> KvmHotplugSlots {
        KvmHotplugSlots {
            vm: self.fd.clone(),
            host_base: host_address(&region),
            region,
            layout,
            first_slot,
        }
    }
}

/// virtio-mem's view of KVM: one memory slot per hotplug slot with plugged blocks.
pub struct KvmHotplugSlots {
    vm: Arc<VmFd>,
    /// Keeps the host mapping alive for as long as a slot may point into it.
    region: Arc<GuestRegionMmap>,
    host_base: u64,
    layout: MemLayout,
    first_slot: u32,
}

impl HotplugSlots for KvmHotplugSlots {
    fn set_present(&mut self, slot: usize, present: bool) -> std::io::Result<()> {
        let range = self.layout.slot_range(slot);
        let offset = range.start - self.layout.addr;
        if range.end - self.layout.addr > self.region.len() {
            return Err(std::io::Error::other(format!(
                "hotplug slot {slot} lies outside the region"
            )));
        }
        let size = if present { self.layout.slot_size } else { 0 };
        let kvm_slot = self.first_slot + slot as u32;
        // SAFETY: the slot lies inside `region` (checked above), a live mapping this struct
        // keeps alive; the slot is deleted before the region can go, or with the VM.
        unsafe {
            set_memory_slot(
                &self.vm,
                kvm_slot,
                range.start,
                size,
                self.host_base + offset,
            )
        }
        .map_err(std::io::Error::other)
    }
}
