//! Places virtio devices on the MMIO bus: one 4 KiB window each from the start of the 32-bit gap,
//! one IOAPIC pin each, KVM ioeventfds for their queue notifications and irqfds for their
//! interrupts, the device's fds in the VMM's event loop, and a `virtio_mmio.device=` entry on the
//! kernel command line so Linux (and the test guest) find them without ACPI or a device tree.

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{DeviceCounters, VirtioDevice, VirtioInterrupt};
use devices::{Bus, BusError};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{IOAPIC_PINS, MMIO32_START};
use crate::runtime::Subscriber;

/// First IOAPIC pin for virtio devices: 0-4 belong to the timer, keyboard, cascade and serial.
const FIRST_IRQ: u32 = 5;

/// Errors of attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("no IOAPIC pin left for another virtio device (at most {} devices)", u32::from(IOAPIC_PINS) - FIRST_IRQ)]
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
    #[error("cannot place a virtio device on the MMIO bus: {0}")]
    Bus(#[from] BusError),
}

/// Where one device landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
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
}

impl Default for MmioDeviceManager {
    fn default() -> Self {
        Self {
            next_base: MMIO32_START,
            next_irq: FIRST_IRQ,
            slots: Vec::new(),
        }
    }
}

impl MmioDeviceManager {
    /// Attaches `device` and returns its slot. `device` is served by the VMM's event loop.
    pub fn attach<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        event_manager: &mut EventManager<Subscriber>,
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
        {
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
        }
        let interrupt = Arc::new(VirtioInterrupt::new(irq_evt));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport =
            MmioTransport::new(as_virtio, mem.clone(), interrupt).map_err(MmioError::EventFd)?;
        mmio.insert(Arc::new(Mutex::new(transport)), slot.base, MMIO_WINDOW_SIZE)?;
        let as_subscriber: Subscriber = device;
        event_manager.add_subscriber(as_subscriber);
        self.next_base += MMIO_WINDOW_SIZE;
        self.next_irq += 1;
        self.slots.push(slot);
        Ok(slot)
    }

    /// The command-line entries of every attached device, in attach order.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.slots.iter().map(MmioSlot::cmdline_entry).collect()
    }
}

/// A device's counters under the name metrics report it by.
pub type NamedCounters = (String, Arc<DeviceCounters>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_entries_use_linux_syntax() {
        let slot = MmioSlot {
            base: 0xc000_1000,
            irq: 6,
        };
        assert_eq!(slot.cmdline_entry(), "virtio_mmio.device=4K@0xc0001000:6");
    }
}
