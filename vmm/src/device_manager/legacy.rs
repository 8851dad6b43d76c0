//! The legacy PIO devices every microVM has: COM1 (serial console), the i8042 (reset), and
//! the ports of PC hardware it lacks but Linux probes (owned, so those exits are known).

use std::io::Write;
use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml};
use devices::legacy::{
    Absent, IrqTrigger, SerialCounters, SerialDevice, SerialHooks, ABSENT_PORTS, I8042,
};
use kvm_ioctls::VmFd;
use predictor::telemetry::DeviceKind;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::registry::{Attachment, Bus, DeviceRegistry, RegistryError};
use crate::arch::x86_64::layout::{KEYBOARD_IRQ, SERIAL_IRQ};
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::METRICS;

/// COM1 ports and the i8042's 0x60..=0x64 window.
const COM1_BASE: u64 = 0x3f8;
const COM1_LEN: u64 = 8;
const I8042_BASE: u64 = 0x60;
const I8042_LEN: u64 = 5;
/// The serial port's DSDT entry: Linux's 8250 driver finds COM1 through it.
fn serial_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let port = COM1_BASE as u16;
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_DDN".into(), &"COM1"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(port, port, 1, COM1_LEN as u8),
                    &aml::Interrupt::new(true, true, false, false, SERIAL_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The i8042's DSDT entry (data port 0x60, command port 0x64): Linux's i8042 driver finds the
/// keyboard controller through it, as the FADT says there is one.
fn i8042_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let (data, command) = (I8042_BASE as u16, (I8042_BASE + I8042_LEN - 1) as u16);
    aml::Device::new(
        "PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(data, data, 1, 1),
                    &aml::IO::new(command, command, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, KEYBOARD_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// How many devices [`attach`] places.
pub const DEVICES: usize = 3;

/// Errors of creating the legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("cannot create an eventfd for the {0}: {1}")]
    EventFd(&'static str, std::io::Error),
    #[error("cannot route the {0} interrupt (IRQ {1}) through KVM: {2}")]
    Irqfd(&'static str, u32, kvm_ioctls::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Turns the guest's i8042 reset command into the VM's end.
pub struct ResetToExit(Arc<ExitSignal>);

impl vm_superio::Trigger for ResetToExit {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        METRICS
            .vmm
            .guest_resets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.request(ExitReason::GuestReset);
        Ok(())
    }
}

/// The VMM's handles on the legacy devices.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042<ResetToExit>>>,
    /// Readable when the guest has emptied the serial receive FIFO.
    pub serial_input_drained: EventFd,
}

/// Creates COM1 (writing the guest's console to `serial_out`), the i8042 and the absent
/// hardware's ports on the PIO bus.
pub fn attach(
    vm: &VmFd,
    registry: &mut DeviceRegistry,
    serial_out: Box<dyn Write + Send>,
    exit: Arc<ExitSignal>,
) -> Result<LegacyDevices, LegacyError> {
    let evt = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| LegacyError::EventFd(what, e));
    let irq = evt("serial interrupt")?;
    vm.register_irqfd(&irq, SERIAL_IRQ)
        .map_err(|e| LegacyError::Irqfd("serial", SERIAL_IRQ, e))?;
    let drained = evt("serial input")?;
    let drained_for_device = drained
        .try_clone()
        .map_err(|e| LegacyError::EventFd("serial input", e))?;
    let counters = Arc::new(SerialCounters::default());
    METRICS.register_serial(counters.clone());
    let hooks = SerialHooks {
        input_drained: drained_for_device,
        counters,
    };
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        IrqTrigger(irq),
        hooks,
        serial_out,
    )));
    registry.attach(Attachment {
        device: serial.clone(),
        persist: serial.clone(),
        bus: Bus::Pio,
        base: COM1_BASE,
        len: COM1_LEN,
        name: "serial".into(),
        kind: DeviceKind::Console,
        counters: None,
        aml: serial_aml(),
    })?;

    let kbd_irq = evt("keyboard interrupt")?;
    vm.register_irqfd(&kbd_irq, KEYBOARD_IRQ)
        .map_err(|e| LegacyError::Irqfd("keyboard", KEYBOARD_IRQ, e))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        ResetToExit(exit),
        IrqTrigger(kbd_irq),
    )));
    registry.attach(Attachment {
        device: i8042.clone(),
        persist: i8042.clone(),
        bus: Bus::Pio,
        base: I8042_BASE,
        len: I8042_LEN,
        name: "i8042".into(),
        kind: DeviceKind::Platform,
        counters: None,
        aml: i8042_aml(),
    })?;

    let [(base, len), more @ ..] = ABSENT_PORTS;
    let absent = Arc::new(Mutex::new(Absent));
    registry.attach_ranges(
        Attachment {
            device: absent.clone(),
            persist: absent,
            bus: Bus::Pio,
            base,
            len,
            name: "absent_legacy".into(),
            kind: DeviceKind::Absent,
            counters: None,
            // Hardware that is not there has no DSDT entry.
            aml: Vec::new(),
        },
        &more,
    )?;
    Ok(LegacyDevices {
        serial,
        i8042,
        serial_input_drained: drained,
    })
}
