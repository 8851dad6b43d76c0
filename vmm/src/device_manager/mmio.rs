//! Places virtio devices on the MMIO bus: one 4 KiB window each from the start of the 32-bit gap,
//! one IOAPIC pin each, KVM ioeventfds for their queue notifications and irqfds for their
//! interrupts, the device's fds in the VMM's event loop, a `virtio_mmio.device=` entry on the
//! kernel command line so Linux (and the test guest) find them without ACPI or a device tree, and
//! the device's entry in the registry, whatever kind it is.

use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml};
use devices::virtio::device_writes::DeviceWrites;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{
    VirtioDevice, VirtioInterrupt, TYPE_BALLOON, TYPE_BLOCK, TYPE_MEM, TYPE_NET, TYPE_VSOCK,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use predictor::telemetry::DeviceKind;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::registry::{Attachment, Bus, DeviceRegistry, RegistryError};
use crate::arch::x86_64::layout::{IOAPIC_PINS, MMIO32_START};
use crate::event_loop::Subscriber;

/// First IOAPIC pin for virtio devices: 0-4 belong to the timer, keyboard, cascade and serial.
const FIRST_IRQ: u32 = 5;

/// Errors of attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("no IOAPIC pin left: the virtio devices and the ACPI event device share {} pins", u32::from(IOAPIC_PINS) - FIRST_IRQ)]
    OutOfIrqs,
    #[error("cannot create an eventfd for a virtio device: {0}")]
    EventFd(std::io::Error),
    #[error("cannot route virtio IRQ {irq} through KVM: {source}")]
    Irqfd { irq: u32, source: kvm_ioctls::Error },
    #[error("cannot attach an ioeventfd for queue {queue} at {addr:#x}: {source}")]
    Ioeventfd {
        queue: usize,
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What a virtio device's traffic counts as, from its virtio device type.
fn kind_of(device_type: u32) -> DeviceKind {
    match device_type {
        TYPE_BLOCK => DeviceKind::Block,
        TYPE_NET => DeviceKind::Net,
        TYPE_VSOCK => DeviceKind::Vsock,
        TYPE_BALLOON => DeviceKind::Balloon,
        TYPE_MEM => DeviceKind::Mem,
        _ => DeviceKind::Other,
    }
}

/// Where one device landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The device's DSDT entry (`VRnn`, nn = its place among the virtio devices): what Linux's
    /// virtio-mmio driver probes when the guest has ACPI, in place of the command-line entry.
    pub fn aml(&self, index: usize) -> Vec<u8> {
        let mut out = Vec::new();
        aml::Device::new(
            format!("VR{index:02X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(index as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, self.base as u32, MMIO_WINDOW_SIZE as u32),
                        &aml::Interrupt::new(true, true, false, false, self.irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut out);
        out
    }

    /// The kernel command-line entry announcing the device (Linux's `virtio_mmio.device=`).
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_WINDOW_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

/// Hands out MMIO windows and IRQs in order.
pub struct MmioDeviceManager {
    next_base: u64,
    next_irq: u32,
    slots: Vec<MmioSlot>,
    /// Where every device's transport marks the pages the device wrote.
    writes: Arc<DeviceWrites>,
}

impl Default for MmioDeviceManager {
    fn default() -> Self {
        Self {
            // The first page is the boot timer's, as in Firecracker's layout.
            next_base: MMIO32_START + super::boot_timer::BOOT_TIMER_LEN,
            next_irq: FIRST_IRQ,
            slots: Vec::new(),
            writes: Arc::default(),
        }
    }
}

impl MmioDeviceManager {
    /// A manager whose devices mark the pages they write in `writes` (for Diff snapshots).
    pub fn with_device_writes(writes: Arc<DeviceWrites>) -> Self {
        Self {
            writes,
            ..Self::default()
        }
    }

    /// The pages the devices wrote.
    pub fn device_writes(&self) -> Arc<DeviceWrites> {
        self.writes.clone()
    }

    /// Attaches `device`, registered as `name` (its metrics group), and returns its slot.
    /// `device` is served by the VMM's event loop.
    pub fn attach<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        registry: &mut DeviceRegistry,
        event_manager: &mut EventManager<Subscriber>,
        name: String,
        device: Arc<Mutex<D>>,
    ) -> Result<MmioSlot, MmioError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        if self.next_irq >= u32::from(IOAPIC_PINS) {
            return Err(MmioError::OutOfIrqs);
        }
        let slot = MmioSlot {
            base: self.next_base,
            irq: self.next_irq,
        };
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        vm.register_irqfd(&irq_evt, slot.irq)
            .map_err(|source| MmioError::Irqfd {
                irq: slot.irq,
                source,
            })?;
        let (kind, counters) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            let notify = slot.base + QUEUE_NOTIFY_OFFSET;
            for (queue, evt) in d.queue_events().iter().enumerate() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), queue as u32)
                    .map_err(|source| MmioError::Ioeventfd {
                        queue,
                        addr: notify,
                        source,
                    })?;
            }
            (kind_of(d.device_type()), d.counters())
        };
        let interrupt = Arc::new(VirtioInterrupt::new(irq_evt));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = MmioTransport::new(as_virtio, mem.clone(), interrupt, self.writes.clone())
            .map_err(MmioError::EventFd)?;
        let transport = Arc::new(Mutex::new(transport));
        registry.attach(Attachment {
            device: transport.clone(),
            persist: transport,
            bus: Bus::Mmio,
            base: slot.base,
            len: MMIO_WINDOW_SIZE,
            name,
            kind,
            counters: Some(counters),
            aml: slot.aml(self.slots.len()),
        })?;
        let as_subscriber: Subscriber = device;
        event_manager.add_subscriber(as_subscriber);
        self.next_base += MMIO_WINDOW_SIZE;
        self.next_irq += 1;
        self.slots.push(slot);
        Ok(slot)
    }

    /// The next free IOAPIC pin, for a platform device that is not virtio (the GED).
    pub fn take_irq(&mut self) -> Result<u32, MmioError> {
        if self.next_irq >= u32::from(IOAPIC_PINS) {
            return Err(MmioError::OutOfIrqs);
        }
        self.next_irq += 1;
        Ok(self.next_irq - 1)
    }

    /// The command-line entries of every attached device, in attach order.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.slots.iter().map(MmioSlot::cmdline_entry).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_virtio_type_has_the_kind_its_traffic_counts_as() {
        assert_eq!(kind_of(TYPE_BLOCK), DeviceKind::Block);
        assert_eq!(kind_of(TYPE_NET), DeviceKind::Net);
        assert_eq!(kind_of(TYPE_VSOCK), DeviceKind::Vsock);
        assert_eq!(kind_of(TYPE_BALLOON), DeviceKind::Balloon);
        assert_eq!(kind_of(TYPE_MEM), DeviceKind::Mem);
        assert_eq!(kind_of(devices::virtio::TYPE_RNG), DeviceKind::Other);
    }

    /// Every device the MMIO manager can place (one per IOAPIC pin left), the legacy ones and
    /// the ACPI platform devices get a telemetry id.
    #[test]
    fn the_irq_lines_run_out_before_the_device_ids() {
        let virtio = u32::from(IOAPIC_PINS) - FIRST_IRQ;
        let fixed = super::super::legacy::DEVICES + super::super::acpi::DEVICES;
        assert!(virtio as usize + fixed <= predictor::telemetry::MAX_DEVICES);
    }

    #[test]
    fn the_pins_left_after_the_virtio_devices_go_to_platform_devices() {
        let mut m = MmioDeviceManager::default();
        assert_eq!(m.take_irq().unwrap(), FIRST_IRQ);
        assert_eq!(m.take_irq().unwrap(), FIRST_IRQ + 1);
        while m.take_irq().is_ok() {}
        assert_eq!(m.next_irq, u32::from(IOAPIC_PINS));
        let e = m.take_irq().unwrap_err().to_string();
        assert!(e.starts_with("no IOAPIC pin left"), "{e}");
    }

    #[test]
    fn command_line_entries_use_linux_syntax() {
        let slot = MmioSlot {
            base: 0xc000_1000,
            irq: 6,
        };
        assert_eq!(slot.cmdline_entry(), "virtio_mmio.device=4K@0xc0001000:6");
    }
}
