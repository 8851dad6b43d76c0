//! The Generic Event Device (ACPI 6.x, `ACPI0013`): how a hardware-reduced platform tells the
//! guest that something changed. The VMM sets an event bit ([`Ged::notify`]) and raises the
//! device's interrupt; the guest's `_EVT` method reads the 32-bit event register, which returns
//! the pending bits and clears them, and runs the handler of each bit set.
//!
//! | bit | event | handler |
//! |---|---|---|
//! | 0 | [`EVENT_CPU_HOTPLUG`]: a vCPU was inserted or is to be removed | `\_SB_.CPUS.CSCN` |

use acpi_tables::{aml, Aml};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{Persist, PersistError};
use crate::BusDevice;

/// Bytes of the register block on the bus: one 32-bit event register.
pub const REGISTERS_LEN: u64 = 4;

/// The CPU hot-plug controller has news (see [`super::cpu_hotplug`]).
pub const EVENT_CPU_HOTPLUG: u32 = 1 << 0;

/// The AML method every CPU-hotplug event runs.
const CPU_SCAN_METHOD: &str = "\\_SB_.CPUS.CSCN";

/// The event register and the interrupt that announces it.
pub struct Ged {
    pending: u32,
    /// An irqfd: a write raises the device's interrupt line (edge).
    irq: EventFd,
    /// Events raised since the device was made, for the metrics and tests.
    raised: u64,
}

impl Ged {
    pub fn new(irq: EventFd) -> Self {
        Self {
            pending: 0,
            irq,
            raised: 0,
        }
    }

    /// Marks `events` pending and interrupts the guest. Events the guest has not read yet
    /// merge: it handles each kind once per read.
    pub fn notify(&mut self, events: u32) -> std::io::Result<()> {
        self.pending |= events;
        self.raised += 1;
        self.irq.write(1)
    }

    /// Events not read by the guest yet.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// How many times the interrupt was raised.
    pub fn raised(&self) -> u64 {
        self.raised
    }

    /// The device's DSDT entry (inside `\_SB_`): `GED_`, its interrupt, the register as an
    /// operation region, and `_EVT`, which Linux's GED driver calls on each interrupt.
    pub fn aml(base: u32, gsi: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let interrupt = aml::Interrupt::new(true, true, false, false, gsi);
        let crs = aml::ResourceTemplate::new(vec![&interrupt]);
        let len = REGISTERS_LEN as u32;
        let region =
            aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemMemory, &base, &len);
        let field = aml::Field::new(
            "GDST".into(),
            aml::FieldAccessType::DWord,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::Preserve,
            vec![aml::FieldEntry::Named(*b"GEVT", 32)],
        );
        let events = aml::Path::new("GEVT");
        let read = aml::Store::new(&aml::Local(0), &events);
        let cpu_bit = aml::And::new(&aml::ZERO, &aml::Local(0), &EVENT_CPU_HOTPLUG);
        let is_cpu = aml::Equal::new(&cpu_bit, &EVENT_CPU_HOTPLUG);
        let scan = aml::MethodCall::new(CPU_SCAN_METHOD.into(), vec![]);
        let on_cpu = aml::If::new(&is_cpu, vec![&scan]);
        let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &on_cpu]);
        let hid = aml::Name::new("_HID".into(), &"ACPI0013");
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let crs = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt])
            .to_aml_bytes(&mut out);
        out
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Any read of the register hands the guest every pending event once.
        let value = if offset == 0 {
            std::mem::take(&mut self.pending)
        } else {
            0
        };
        super::fill_le(data, value);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only: the guest acknowledges events by reading them.
    }
}

/// What the event device holds: the events the guest has not read, and the count raised. An
/// interrupt raised and not taken yet is the IOAPIC's, saved with the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GedState {
    pub pending: u32,
    pub raised: u64,
}

impl Persist for Ged {
    type State = GedState;

    fn save(&mut self) -> GedState {
        GedState {
            pending: self.pending,
            raised: self.raised,
        }
    }

    fn restore(&mut self, state: GedState) -> Result<(), PersistError> {
        self.pending = state.pending;
        self.raised = state.raised;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn events_raise_the_interrupt_and_a_read_takes_them_once() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        let mut data = [0u8; 4];
        ged.read(0, &mut data);
        assert_eq!(data, [0; 4]);
        ged.notify(EVENT_CPU_HOTPLUG).unwrap();
        ged.notify(EVENT_CPU_HOTPLUG).unwrap();
        assert_eq!(irq.read().unwrap(), 2, "each notification raises the line");
        assert_eq!(ged.pending(), EVENT_CPU_HOTPLUG);
        ged.write(0, &[0xff; 4]);
        ged.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), EVENT_CPU_HOTPLUG);
        ged.read(0, &mut data);
        assert_eq!(data, [0; 4], "read once");
        assert_eq!(ged.raised(), 2);
    }

    #[test]
    fn pending_events_survive_a_snapshot_and_are_read_once_after() {
        let mut ged = Ged::new(EventFd::new(EFD_NONBLOCK).unwrap());
        ged.notify(EVENT_CPU_HOTPLUG).unwrap();
        let bytes = crate::persist::Snapshottable::save_bytes(&mut ged).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut restored = Ged::new(irq.try_clone().unwrap());
        crate::persist::Snapshottable::restore_bytes(&mut restored, &bytes).unwrap();
        assert_eq!(restored.pending(), EVENT_CPU_HOTPLUG);
        assert_eq!(restored.raised(), 1);
        assert!(
            irq.read().is_err(),
            "the restore raises no second interrupt"
        );
        let mut data = [0u8; 4];
        restored.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), EVENT_CPU_HOTPLUG);
        restored.read(0, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(
            crate::persist::Snapshottable::restore_bytes(&mut restored, &[0xff]).is_err(),
            "a truncated state is refused"
        );
    }

    #[test]
    fn the_dsdt_entry_names_the_device_its_register_and_its_handler() {
        let bytes = Ged::aml(0xfe00_0000, 23);
        let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
        assert!(has(b"GED_") && has(b"ACPI0013") && has(b"_EVT") && has(b"GEVT"));
        assert!(has(b"CSCN"));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, GSI 23.
        assert!(has(&[0x89, 6, 0, 0b11, 1, 23, 0, 0, 0]));
        assert!(has(&0xfe00_0000u32.to_le_bytes()));
    }
}
