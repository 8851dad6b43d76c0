//! The KVM VM: in-kernel irqchip and PIT, the TSS and identity-map pages, and guest memory slots.

use std::sync::Arc;

use devices::virtio::mem::{HotplugSlots, MemLayout};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
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
    #[error("cannot get the VM's {what}: {source}")]
    GetState {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the VM's {what}: {source}")]
    SetState {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused guest memory slot {slot} ({size} bytes at {start:#x}): {source}")]
    MemorySlot {
        slot: u32,
        start: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// The VM-wide state KVM emulates in the kernel: both PICs, the IOAPIC, the PIT and the KVM clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(chip_id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id,
        ..Default::default()
    }
}

/// A KVM VM with the platform devices every prescient guest gets.
pub struct Vm {
    /// Shared with the virtio-mem device, which adds and removes memory slots while the VM runs.
    fd: Arc<VmFd>,
    /// KVM logs the pages the guest writes (`track_dirty_pages`), for diff snapshots.
    log_dirty: bool,
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
    log_dirty: bool,
) -> Result<(), VmError> {
    let desc = kvm_userspace_memory_region {
        slot,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
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
    /// A VM with `mem` as its memory slots; with `log_dirty` every slot logs the guest's
    /// writes (`track_dirty_pages`).
    pub fn new(kvm: &Kvm, log_dirty: bool, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = Arc::new(kvm.create_vm().map_err(VmError::Create)?);
        // Both addresses must be set before any vCPU exists; they sit in the MMIO gap, never RAM.
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::IdentityMap)?;
        let vm = Self { fd, log_dirty };
        // Memory before the in-kernel devices: once they exist, KVM waits out a grace period
        // (one or two scheduler ticks, ~4-7 ms here) to install each memory slot, which it
        // installs at once before (0.2 ms). Most of a snapshot load's time went there.
        vm.register_memory(mem)?;
        let fd = &vm.fd;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        // No KVM_PIT_SPEAKER_DUMMY: guests calibrate their TSC against PIT channel 2 gated by
        // port 0x61, so KVM must emulate that port.
        fd.create_pit2(kvm_pit_config::default())
            .map_err(VmError::Pit)?;
        Ok(vm)
    }

    /// Whether memory slots log the guest's writes.
    pub fn logs_dirty_pages(&self) -> bool {
        self.log_dirty
    }

    /// The pages the guest wrote in KVM slot `slot` (`size` bytes) since the last call, which
    /// clears the log; all clear for a slot that is not mapped now (an unplugged hotplug slot).
    pub fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, VmError> {
        match self.fd.get_dirty_log(slot, size as usize) {
            Ok(bits) => Ok(bits),
            Err(e) if e.errno() == libc::ENOENT => Ok(vec![0; (size / 4096).div_ceil(64) as usize]),
            Err(source) => Err(VmError::GetState {
                what: "dirty page log",
                source,
            }),
        }
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The in-kernel devices' and clock's state, read while every vCPU is paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let get = |what| move |source| VmError::GetState { what, source };
        let chip = |id, what| {
            let mut c = irqchip(id);
            self.fd.get_irqchip(&mut c).map_err(get(what)).map(|()| c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "master PIC")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
            pit: self.fd.get_pit2().map_err(get("PIT"))?,
            clock: self.fd.get_clock().map_err(get("KVM clock"))?,
        })
    }

    /// Puts `state` into this (fresh) VM, before its vCPUs run.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let set = |what| move |source| VmError::SetState { what, source };
        self.fd.set_pit2(&state.pit).map_err(set("PIT"))?;
        // The clock resumes where it stopped: the guest sees no time pass while it was saved.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("KVM clock"))?;
        for (chip, what) in [
            (&state.pic_master, "master PIC"),
            (&state.pic_slave, "slave PIC"),
            (&state.ioapic, "IOAPIC"),
        ] {
            self.fd.set_irqchip(chip).map_err(set(what))?;
        }
        Ok(())
    }

    /// Makes every region of `mem` a KVM memory slot.
    fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
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
                    self.log_dirty,
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
            log_dirty: self.log_dirty,
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
    log_dirty: bool,
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
                self.log_dirty,
            )
        }
        .map_err(std::io::Error::other)
    }
}
