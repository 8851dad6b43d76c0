//! The CPU hot-plug controller: the register block through which the guest's ACPI code learns
//! which vCPUs exist, which the VMM inserted and which it wants removed, and through which the
//! guest ejects a vCPU once it has taken it offline (its consent to the removal).
//!
//! Registers (the model is Cloud Hypervisor's, read to understand the design):
//!
//! | offset | width | read | write |
//! |---|---|---|---|
//! | 0 | 32 | the selected vCPU | selects a vCPU |
//! | 4 | 8 | the selected vCPU's status: bit 0 present, 1 insert event, 2 remove event | 1 in bit 1 clears the insert event, in bit 2 the remove event; bit 3 ejects the vCPU |
//!
//! The DSDT ([`CpuHotplug::aml`]) has this block as `\_SB_.CPHP` and every possible vCPU as a
//! processor device `\_SB_.CPUS.Cxxx` whose `_STA` asks the block whether it is present and whose
//! `_EJ0` ejects it; `\_SB_.CPUS.CSCN`, run by the GED on a CPU event, notifies the guest of each
//! vCPU with an insert (device check) or a remove (eject request) event and clears it.
//!
//! The VMM side ([`CpuHotplug::insert`], [`CpuHotplug::request_removal`],
//! [`CpuHotplug::take_ejected`]) keeps what it asked for apart from the event bits the guest
//! clears: an eject is taken only for a vCPU whose removal the VMM requested and is still
//! pending, never for the boot vCPU 0.

use acpi_tables::{aml, Aml};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{Persist, PersistError};
use crate::BusDevice;

/// Bytes of the register block the guest sees (the operation region).
pub const REGISTERS_LEN: u64 = 8;

const SELECT: u64 = 0;
const STATUS: u64 = 4;
const PRESENT: u8 = 1 << 0;
const INSERT_EVENT: u8 = 1 << 1;
const REMOVE_EVENT: u8 = 1 << 2;
const EJECT: u8 = 1 << 3;

/// Why the VMM's request was refused; nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuHotplugError {
    #[error("vCPU {cpu} does not exist (the VM has at most {max})")]
    NoSuchCpu { cpu: u8, max: u8 },
    #[error("vCPU {0} is already present")]
    AlreadyPresent(u8),
    #[error("vCPU {0} is not present")]
    NotPresent(u8),
    #[error("vCPU 0 boots the VM and cannot be removed")]
    BootCpu,
    #[error("vCPU {0}'s removal is already pending")]
    RemovalPending(u8),
}

/// One vCPU as the controller knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    present: bool,
    insert_event: bool,
    remove_event: bool,
    /// The VMM asked for its removal and the guest has not ejected it yet.
    removal_requested: bool,
    /// The guest ejected it; the VMM has not taken note yet.
    ejected: bool,
}

/// Where a vCPU stands, as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuState {
    Absent,
    /// Present; `acknowledged` once the guest has read (and cleared) its insert event.
    Present {
        acknowledged: bool,
    },
    /// Its removal was requested; the guest has not ejected it yet.
    Removing,
}

/// The controller of a VM with `max` possible vCPUs.
pub struct CpuHotplug {
    slots: Vec<Slot>,
    selected: u32,
    /// Written when the guest ejects a vCPU, to wake the VMM thread.
    ejected: EventFd,
    /// Guest writes that asked for something not allowed (an eject nobody requested).
    refused: u64,
    /// The guest has read a vCPU's status: its OS's hot-plug support has taken the controller
    /// into use (Linux evaluates each processor's `_STA` when its ACPI scans the namespace at
    /// boot; a guest's own driver scans the controller when it starts following it).
    in_use: bool,
}

impl CpuHotplug {
    /// `boot` vCPUs present out of `max`; `ejected` is written on each eject.
    pub fn new(boot: u8, max: u8, ejected: EventFd) -> Self {
        let slots = (0..max)
            .map(|i| Slot {
                present: i < boot,
                ..Slot::default()
            })
            .collect();
        Self {
            slots,
            selected: 0,
            ejected,
            refused: 0,
            in_use: false,
        }
    }

    pub fn max(&self) -> u8 {
        self.slots.len() as u8
    }

    fn slot(&mut self, cpu: u8) -> Result<&mut Slot, CpuHotplugError> {
        let max = self.max();
        self.slots
            .get_mut(usize::from(cpu))
            .ok_or(CpuHotplugError::NoSuchCpu { cpu, max })
    }

    /// Marks `cpu` present with an insert event (the VMM has started its thread).
    pub fn insert(&mut self, cpu: u8) -> Result<(), CpuHotplugError> {
        let s = self.slot(cpu)?;
        if s.present {
            return Err(CpuHotplugError::AlreadyPresent(cpu));
        }
        *s = Slot {
            present: true,
            insert_event: true,
            ..Slot::default()
        };
        Ok(())
    }

    /// Asks the guest to give `cpu` up: a remove event; the removal stays pending until the
    /// guest ejects it.
    pub fn request_removal(&mut self, cpu: u8) -> Result<(), CpuHotplugError> {
        if cpu == 0 {
            return Err(CpuHotplugError::BootCpu);
        }
        let s = self.slot(cpu)?;
        if !s.present {
            return Err(CpuHotplugError::NotPresent(cpu));
        }
        if s.removal_requested {
            return Err(CpuHotplugError::RemovalPending(cpu));
        }
        s.removal_requested = true;
        s.remove_event = true;
        Ok(())
    }

    /// The vCPUs the guest ejected since the last call, now absent.
    pub fn take_ejected(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if std::mem::take(&mut s.ejected) {
                *s = Slot::default();
                out.push(i as u8);
            }
        }
        out
    }

    pub fn state(&self, cpu: u8) -> CpuState {
        match self.slots.get(usize::from(cpu)) {
            Some(s) if s.removal_requested => CpuState::Removing,
            Some(s) if s.present => CpuState::Present {
                acknowledged: !s.insert_event,
            },
            _ => CpuState::Absent,
        }
    }

    /// Whether a vCPU has an insert or remove event the guest has not cleared yet.
    pub fn events_pending(&self) -> bool {
        self.slots.iter().any(|s| s.insert_event || s.remove_event)
    }

    /// The lowest vCPU whose removal waits for the guest.
    pub fn removal_pending(&self) -> Option<u8> {
        self.slots
            .iter()
            .position(|s| s.removal_requested)
            .map(|i| i as u8)
    }

    /// Guest writes refused (an eject of a vCPU whose removal nobody asked for).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Whether the guest has read a vCPU's status yet. Before that, an insert may come while
    /// the guest cannot take note of it (its OS still booting, its interrupt not yet routed).
    pub fn in_use(&self) -> bool {
        self.in_use
    }

    fn status(&self) -> u8 {
        let Some(s) = self.slots.get(self.selected as usize) else {
            return 0;
        };
        let bit = |on: bool, b: u8| if on { b } else { 0 };
        bit(s.present, PRESENT)
            | bit(s.insert_event, INSERT_EVENT)
            | bit(s.remove_event, REMOVE_EVENT)
    }

    fn command(&mut self, value: u8) {
        let selected = self.selected;
        let Some(s) = self.slots.get_mut(selected as usize) else {
            if value != 0 {
                self.refused += 1;
            }
            return;
        };
        if value & INSERT_EVENT != 0 {
            s.insert_event = false;
        }
        if value & REMOVE_EVENT != 0 {
            s.remove_event = false;
        }
        if value & EJECT != 0 {
            if s.removal_requested && s.present {
                s.ejected = true;
                s.present = false;
                s.removal_requested = false;
                // The eventfd's counter cannot overflow from one write per eject.
                let _ = self.ejected.write(1);
            } else {
                self.refused += 1;
            }
        }
    }

    /// The DSDT entries (inside `\_SB_`): the register block `CPHP` at `base` and the
    /// processor container `CPUS` with `max` processor devices, each present as the block
    /// says. vCPU 0 is always present and has no `_EJ0`.
    pub fn aml(base: u32, max: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let len = REGISTERS_LEN as u32;
        aml::Device::new(
            "CPHP".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
                &aml::Name::new("_UID".into(), &"CPU Hotplug Controller"),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(true, base, len)]),
                ),
                &aml::Mutex::new("CPLK".into(), 0),
                &aml::OpRegion::new("PRST".into(), aml::OpRegionSpace::SystemMemory, &base, &len),
                &aml::Field::new(
                    "PRST".into(),
                    aml::FieldAccessType::DWord,
                    aml::FieldLockRule::NoLock,
                    aml::FieldUpdateRule::Preserve,
                    vec![aml::FieldEntry::Named(*b"CSEL", 32)],
                ),
                &aml::Field::new(
                    "PRST".into(),
                    aml::FieldAccessType::Byte,
                    aml::FieldLockRule::NoLock,
                    aml::FieldUpdateRule::WriteAsZeroes,
                    vec![
                        aml::FieldEntry::Reserved(32),
                        aml::FieldEntry::Named(*b"CPEN", 1),
                        aml::FieldEntry::Named(*b"CINS", 1),
                        aml::FieldEntry::Named(*b"CRMV", 1),
                        aml::FieldEntry::Named(*b"CEJ0", 1),
                        aml::FieldEntry::Reserved(4),
                    ],
                ),
            ],
        )
        .to_aml_bytes(&mut out);
        processor_container(max, &mut out);
        out
    }
}

/// AML already encoded, as a child of a larger object.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Encodes what `write` writes (one statement, so the builders' temporaries live long enough).
fn encoded(write: impl FnOnce(&mut Vec<u8>)) -> Raw {
    let mut v = Vec::new();
    write(&mut v);
    Raw(v)
}

const LOCK: &str = "\\_SB_.CPHP.CPLK";
const SEL: &str = "\\_SB_.CPHP.CSEL";
const CPEN: &str = "\\_SB_.CPHP.CPEN";
const CINS: &str = "\\_SB_.CPHP.CINS";
const CRMV: &str = "\\_SB_.CPHP.CRMV";
const CEJ0: &str = "\\_SB_.CPHP.CEJ0";

/// The processor's device name: `C` and its index in three hex digits.
fn cpu_name(cpu: u8) -> String {
    format!("C{cpu:03X}")
}

/// `\_SB_.CPUS`: the processor devices and the methods that talk to the controller.
fn processor_container(max: u8, sink: &mut Vec<u8>) {
    let path = aml::Path::new;
    // CSTA(cpu): 0xF if the controller says the vCPU is present, else 0.
    let status = encoded(|s| {
        aml::Method::new(
            "CSTA".into(),
            1,
            true,
            vec![
                &aml::Acquire::new(LOCK.into(), 0xffff),
                &aml::Store::new(&path(SEL), &aml::Arg(0)),
                &aml::Store::new(&aml::Local(0), &aml::ZERO),
                &aml::If::new(
                    &aml::Equal::new(&path(CPEN), &aml::ONE),
                    vec![&aml::Store::new(&aml::Local(0), &0xfu8)],
                ),
                &aml::Release::new(LOCK.into()),
                &aml::Return::new(&aml::Local(0)),
            ],
        )
        .to_aml_bytes(s)
    });
    // CEJ0(cpu): the guest's consent: eject the vCPU.
    let eject = encoded(|s| {
        aml::Method::new(
            "CEJ0".into(),
            1,
            true,
            vec![
                &aml::Acquire::new(LOCK.into(), 0xffff),
                &aml::Store::new(&path(SEL), &aml::Arg(0)),
                &aml::Store::new(&path(CEJ0), &aml::ONE),
                &aml::Release::new(LOCK.into()),
            ],
        )
        .to_aml_bytes(s)
    });
    // CTFY(cpu, event): Notify the processor device `cpu` (Notify needs a name, not a value).
    let ifs: Vec<Raw> = (0..max)
        .map(|cpu| {
            encoded(|s| {
                aml::If::new(
                    &aml::Equal::new(&aml::Arg(0), &cpu),
                    vec![&aml::Notify::new(&path(&cpu_name(cpu)), &aml::Arg(1))],
                )
                .to_aml_bytes(s)
            })
        })
        .collect();
    let notify = encoded(|s| {
        aml::Method::new(
            "CTFY".into(),
            2,
            true,
            ifs.iter().map(|i| i as &dyn Aml).collect(),
        )
        .to_aml_bytes(s)
    });
    // CSCN: every vCPU with an insert event gets a device check (1), with a remove event an
    // eject request (3); each event is cleared as it is passed on.
    let scan = encoded(|s| {
        aml::Method::new(
            "CSCN".into(),
            0,
            true,
            vec![
                &aml::Acquire::new(LOCK.into(), 0xffff),
                &aml::Store::new(&aml::Local(0), &aml::ZERO),
                &aml::While::new(
                    &aml::LessThan::new(&aml::Local(0), &max),
                    vec![
                        &aml::Store::new(&path(SEL), &aml::Local(0)),
                        &aml::If::new(
                            &aml::Equal::new(&path(CINS), &aml::ONE),
                            vec![
                                &aml::MethodCall::new(
                                    "CTFY".into(),
                                    vec![&aml::Local(0), &aml::ONE],
                                ),
                                &aml::Store::new(&path(CINS), &aml::ONE),
                            ],
                        ),
                        &aml::If::new(
                            &aml::Equal::new(&path(CRMV), &aml::ONE),
                            vec![
                                &aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &3u8]),
                                &aml::Store::new(&path(CRMV), &aml::ONE),
                            ],
                        ),
                        &aml::Add::new(&aml::Local(0), &aml::Local(0), &aml::ONE),
                    ],
                ),
                &aml::Release::new(LOCK.into()),
            ],
        )
        .to_aml_bytes(s)
    });
    let cpus: Vec<Raw> = (0..max).map(processor).collect();
    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05"));
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &status, &eject, &notify, &scan];
    children.extend(cpus.iter().map(|c| c as &dyn Aml));
    aml::Device::new("CPUS".into(), children).to_aml_bytes(sink);
}

/// The Local APIC structure of the MADT for `cpu`, enabled: what `_MAT` returns, so that a
/// vCPU inserted later is known by its APIC id (its MADT entry says disabled).
pub fn madt_local_apic(cpu: u8) -> [u8; 8] {
    [0, 8, cpu, cpu, 1, 0, 0, 0]
}

/// One `ACPI0007` processor device; vCPU 0 is always there and cannot be ejected.
fn processor(cpu: u8) -> Raw {
    encoded(|s| {
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &cpu);
        let mat = aml::Name::new(
            "_MAT".into(),
            &aml::BufferData::new(madt_local_apic(cpu).to_vec()),
        );
        let sta = encoded(|s| {
            if cpu == 0 {
                aml::Method::new("_STA".into(), 0, false, vec![&aml::Return::new(&0xfu8)])
                    .to_aml_bytes(s)
            } else {
                aml::Method::new(
                    "_STA".into(),
                    0,
                    false,
                    vec![&aml::Return::new(&aml::MethodCall::new(
                        "CSTA".into(),
                        vec![&cpu],
                    ))],
                )
                .to_aml_bytes(s)
            }
        });
        let ej0 = encoded(|s| {
            aml::Method::new(
                "_EJ0".into(),
                1,
                false,
                vec![&aml::MethodCall::new("CEJ0".into(), vec![&cpu])],
            )
            .to_aml_bytes(s)
        });
        let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &sta, &mat];
        if cpu != 0 {
            children.push(&ej0);
        }
        aml::Device::new(cpu_name(cpu).as_str().into(), children).to_aml_bytes(s)
    })
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            SELECT => self.selected,
            STATUS => {
                self.in_use = true;
                u32::from(self.status())
            }
            _ => 0,
        };
        super::fill_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            SELECT => self.selected = super::le_value(data),
            STATUS => self.command(data.first().copied().unwrap_or(0)),
            _ => self.refused += 1,
        }
    }
}

/// What the controller holds: each possible vCPU's bits and the guest's selection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuHotplugState {
    pub slots: Vec<Slot>,
    pub selected: u32,
    pub refused: u64,
    pub in_use: bool,
}

impl Persist for CpuHotplug {
    type State = CpuHotplugState;

    fn save(&mut self) -> CpuHotplugState {
        CpuHotplugState {
            slots: self.slots.clone(),
            selected: self.selected,
            refused: self.refused,
            in_use: self.in_use,
        }
    }

    fn restore(&mut self, state: CpuHotplugState) -> Result<(), PersistError> {
        if state.slots.len() != self.slots.len() {
            return Err(PersistError::Mismatch(format!(
                "{} vCPUs saved, the controller has {}",
                state.slots.len(),
                self.slots.len()
            )));
        }
        if !state.slots.first().is_some_and(|s| s.present) {
            return Err(PersistError::Mismatch("vCPU 0 is not present".into()));
        }
        self.slots = state.slots;
        self.selected = state.selected;
        self.refused = state.refused;
        self.in_use = state.in_use;
        // An eject the VMM had not taken note of wakes it again.
        if self.slots.iter().any(|s| s.ejected) {
            self.ejected
                .write(1)
                .map_err(|e| PersistError::Restore(format!("cannot signal the eject: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn controller(boot: u8, max: u8) -> (CpuHotplug, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (CpuHotplug::new(boot, max, evt.try_clone().unwrap()), evt)
    }

    fn status_of(c: &mut CpuHotplug, cpu: u32) -> u8 {
        c.write(SELECT, &cpu.to_le_bytes());
        let mut b = [0u8; 1];
        c.read(STATUS, &mut b);
        b[0]
    }

    #[test]
    fn every_vcpus_bits_and_the_selection_survive_a_snapshot() {
        use crate::persist::Snapshottable;
        let (mut c, _evt) = controller(1, 4);
        c.insert(2).unwrap();
        c.insert(1).unwrap();
        c.write(SELECT, &1u32.to_le_bytes());
        c.write(STATUS, &[INSERT_EVENT]);
        c.request_removal(1).unwrap();
        c.write(SELECT, &2u32.to_le_bytes());
        let mut b = [0u8; 1];
        c.read(STATUS, &mut b);
        let bytes = c.save_bytes().unwrap();

        let (mut r, evt) = controller(1, 4);
        assert!(!r.in_use());
        r.restore_bytes(&bytes).unwrap();
        assert!(r.in_use(), "the guest's use of the controller is kept");
        assert!(evt.read().is_err(), "no eject was pending");
        let mut b = [0u8; 1];
        r.read(STATUS, &mut b);
        assert_eq!(
            b[0],
            PRESENT | INSERT_EVENT,
            "vCPU 2 stays selected, its insert unread"
        );
        assert_eq!(r.state(0), CpuState::Present { acknowledged: true });
        assert_eq!(r.state(1), CpuState::Removing);
        assert_eq!(r.state(3), CpuState::Absent);
        assert_eq!(r.removal_pending(), Some(1));
        assert_eq!(r.save(), c.save());

        let (mut other, _) = controller(1, 2);
        let err = other.restore_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("4 vCPUs saved"), "{err}");
        assert!(other.restore_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn the_controller_is_in_use_once_the_guest_reads_a_status() {
        let (mut c, _) = controller(1, 4);
        c.insert(1).unwrap();
        let mut sel = [0u8; 4];
        c.read(SELECT, &mut sel);
        c.write(SELECT, &1u32.to_le_bytes());
        c.write(0x40, &[1]);
        assert!(
            !c.in_use(),
            "a selection alone shows nothing of the guest's use"
        );
        let mut b = [0u8; 1];
        c.read(STATUS, &mut b);
        assert!(c.in_use());
    }

    #[test]
    fn boot_vcpus_are_present_the_rest_absent() {
        let (mut c, _) = controller(2, 4);
        assert_eq!(status_of(&mut c, 0), PRESENT);
        assert_eq!(status_of(&mut c, 1), PRESENT);
        assert_eq!(status_of(&mut c, 2), 0);
        assert_eq!(status_of(&mut c, 99), 0, "beyond max reads as absent");
        let mut sel = [0u8; 4];
        c.read(SELECT, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 99);
        assert_eq!(c.state(1), CpuState::Present { acknowledged: true });
        assert_eq!(c.state(3), CpuState::Absent);
    }

    #[test]
    fn an_insert_is_shown_until_the_guest_clears_it() {
        let (mut c, _) = controller(1, 4);
        c.insert(2).unwrap();
        assert_eq!(c.insert(2), Err(CpuHotplugError::AlreadyPresent(2)));
        assert_eq!(
            c.insert(4),
            Err(CpuHotplugError::NoSuchCpu { cpu: 4, max: 4 })
        );
        assert_eq!(status_of(&mut c, 2), PRESENT | INSERT_EVENT);
        assert!(c.events_pending());
        assert_eq!(
            c.state(2),
            CpuState::Present {
                acknowledged: false
            }
        );
        c.write(STATUS, &[INSERT_EVENT]);
        assert_eq!(status_of(&mut c, 2), PRESENT);
        assert_eq!(c.state(2), CpuState::Present { acknowledged: true });
        assert!(!c.events_pending());
        c.request_removal(2).unwrap();
        assert!(c.events_pending(), "a remove event too");
    }

    #[test]
    fn only_a_requested_removal_can_be_ejected() {
        let (mut c, evt) = controller(3, 4);
        // The guest ejecting on its own: refused, nothing changes.
        c.write(SELECT, &2u32.to_le_bytes());
        c.write(STATUS, &[EJECT]);
        assert_eq!(c.refused(), 1);
        assert!(evt.read().is_err(), "no eject was signalled");
        assert_eq!(c.state(2), CpuState::Present { acknowledged: true });

        assert_eq!(c.request_removal(0), Err(CpuHotplugError::BootCpu));
        assert_eq!(c.request_removal(3), Err(CpuHotplugError::NotPresent(3)));
        c.request_removal(2).unwrap();
        assert_eq!(
            c.request_removal(2),
            Err(CpuHotplugError::RemovalPending(2))
        );
        assert_eq!(c.removal_pending(), Some(2));
        assert_eq!(c.state(2), CpuState::Removing);
        assert_eq!(status_of(&mut c, 2), PRESENT | REMOVE_EVENT);
        c.write(STATUS, &[REMOVE_EVENT]);
        assert_eq!(status_of(&mut c, 2), PRESENT, "the event is cleared...");
        assert_eq!(c.state(2), CpuState::Removing, "...the request stays");
        assert!(c.take_ejected().is_empty());

        c.write(STATUS, &[EJECT]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(status_of(&mut c, 2), 0, "an ejected vCPU reads absent");
        assert_eq!(c.take_ejected(), vec![2]);
        assert!(c.take_ejected().is_empty());
        assert_eq!(c.state(2), CpuState::Absent);
        assert_eq!(c.removal_pending(), None);
        // It can come back.
        c.insert(2).unwrap();
        assert_eq!(status_of(&mut c, 2), PRESENT | INSERT_EVENT);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut c, _) = controller(1, 2);
        c.write(0x40, &[1]);
        c.write(SELECT, &[5]);
        c.write(STATUS, &[EJECT | INSERT_EVENT | REMOVE_EVENT]);
        c.write(STATUS, &[]);
        let mut big = [0xffu8; 8];
        c.read(0x100, &mut big);
        assert_eq!(big, [0; 8]);
        assert_eq!(c.refused(), 2);
        assert_eq!(status_of(&mut c, 0), PRESENT);
    }

    #[test]
    fn the_dsdt_entries_name_every_processor_and_the_methods() {
        let bytes = CpuHotplug::aml(0xfe00_1000, 3);
        let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
        for name in [
            &b"CPHP"[..],
            b"CPUS",
            b"C000",
            b"C001",
            b"C002",
            b"CSCN",
            b"CTFY",
            b"CSTA",
            b"CEJ0",
            b"_EJ0",
            b"_MAT",
            b"ACPI0007",
            b"ACPI0010",
        ] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        assert!(!has(b"C003"));
        assert_eq!(madt_local_apic(2), [0, 8, 2, 2, 1, 0, 0, 0]);
    }
}
