//! The ACPI platform devices of a VM booted with ACPI: the Generic Event Device (how the VMM
//! interrupts the guest about a hot-plug) and the CPU hot-plug controller, each a register page
//! on the MMIO bus, registered (and so described in the DSDT) like every other device.

use std::sync::{Arc, Mutex};

use devices::acpi::cpu_hotplug::{self, CpuHotplug};
use devices::acpi::ged::{self, Ged};
use kvm_ioctls::VmFd;
use predictor::telemetry::DeviceKind;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::registry::{Attachment, Bus, DeviceRegistry, RegistryError};
use crate::arch::x86_64::layout::{ACPI_GED_START, CPU_HOTPLUG_START};

/// How many devices [`attach`] places.
pub const DEVICES: usize = 2;

/// Errors of creating the ACPI platform devices.
#[derive(Debug, thiserror::Error)]
pub enum AcpiDeviceError {
    #[error("cannot create an eventfd for the {0}: {1}")]
    EventFd(&'static str, std::io::Error),
    #[error("cannot route the ACPI event interrupt (IRQ {0}) through KVM: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The VMM's handles on the ACPI platform devices.
pub struct AcpiDevices {
    pub ged: Arc<Mutex<Ged>>,
    pub cpu_hotplug: Arc<Mutex<CpuHotplug>>,
    /// Readable when the guest has ejected a vCPU.
    pub ejected: EventFd,
}

/// Places the GED (interrupting through IOAPIC pin `irq`) and the CPU hot-plug controller of a
/// VM with `boot` of `max` vCPUs present.
pub fn attach(
    vm: &VmFd,
    registry: &mut DeviceRegistry,
    irq: u32,
    boot: u8,
    max: u8,
) -> Result<AcpiDevices, AcpiDeviceError> {
    let evt = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| AcpiDeviceError::EventFd(what, e));
    let irq_evt = evt("ACPI event interrupt")?;
    vm.register_irqfd(&irq_evt, irq)
        .map_err(|e| AcpiDeviceError::Irqfd(irq, e))?;
    let ged = Arc::new(Mutex::new(Ged::new(irq_evt)));
    registry.attach(Attachment {
        device: ged.clone(),
        bus: Bus::Mmio,
        base: ACPI_GED_START,
        len: ged::REGISTERS_LEN,
        name: "acpi_ged".into(),
        kind: DeviceKind::Platform,
        counters: None,
        persist: ged.clone(),
        aml: Ged::aml(ACPI_GED_START as u32, irq),
    })?;

    let ejected = evt("vCPU eject event")?;
    let for_device = ejected
        .try_clone()
        .map_err(|e| AcpiDeviceError::EventFd("vCPU eject event", e))?;
    let cpu_hotplug = Arc::new(Mutex::new(CpuHotplug::new(boot, max, for_device)));
    registry.attach(Attachment {
        device: cpu_hotplug.clone(),
        bus: Bus::Mmio,
        base: CPU_HOTPLUG_START,
        len: cpu_hotplug::REGISTERS_LEN,
        name: "cpu_hotplug".into(),
        kind: DeviceKind::Platform,
        counters: None,
        persist: cpu_hotplug.clone(),
        aml: CpuHotplug::aml(CPU_HOTPLUG_START as u32, max),
    })?;
    Ok(AcpiDevices {
        ged,
        cpu_hotplug,
        ejected,
    })
}
