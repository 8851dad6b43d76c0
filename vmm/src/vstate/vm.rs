//! The KVM VM: in-kernel irqchip and PIT, the TSS and identity-map pages, and guest memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    fd: VmFd,
}

impl Vm {
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
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
            let slot = slot as u32;
            let start = region.start_addr().raw_value();
            let size = region.len();
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("an mmap region always has a host address") as u64;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: start,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping of `size` bytes owned by `mem`, which the
            // microVM keeps alive for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    start,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }
}
