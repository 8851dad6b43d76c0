//! The VM's buses and the list of every device on them. The registry owns both, so the only way
//! onto a bus is [`DeviceRegistry::attach`], which gives the device its id (what an exit the bus
//! routes to it is counted under), records what it is, and reports its counters in the metrics.
//! An exit no registered device answered is unknown; nothing else is.

use std::sync::{Arc, Mutex};

use devices::persist::Snapshottable;
use devices::virtio::DeviceCounters;
use devices::{BusDevice, BusError};
use predictor::telemetry::{DeviceId, DeviceKind, MAX_DEVICES};
use serde::Serialize;

use crate::metrics::METRICS;
use crate::vstate::vcpu::IoBuses;

/// Errors of placing a device on a bus.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot attach {name}: a VM has at most {MAX_DEVICES} devices")]
    Full { name: String },
    #[error("cannot place {name} on the {bus} bus: {source}")]
    Bus {
        name: String,
        bus: Bus,
        source: BusError,
    },
}

/// Which bus a device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Pio,
    Mmio,
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bus::Pio => "PIO",
            Bus::Mmio => "MMIO",
        })
    }
}

/// What a device on one of the VM's buses is (`GET /predictor` lists them).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInfo {
    #[serde(serialize_with = "id_index")]
    pub id: DeviceId,
    /// Its name in the metrics (`block_rootfs`, `serial`...).
    pub name: String,
    pub kind: DeviceKind,
    pub bus: Bus,
    pub base: u64,
}

/// One device on one of the VM's buses.
#[derive(Clone)]
pub struct RegisteredDevice {
    pub info: DeviceInfo,
    /// Requests it served, for devices that serve requests (virtio).
    pub counters: Option<Arc<DeviceCounters>>,
    /// Its snapshot state, saved and restored under its name.
    pub persist: Arc<Mutex<dyn Snapshottable>>,
    /// What it adds to the DSDT's `\_SB_` scope (AML), empty if the guest does not find it
    /// through ACPI.
    pub aml: Vec<u8>,
}

fn id_index<S: serde::Serializer>(id: &DeviceId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(id.index() as u64)
}

/// The VM's buses, being filled.
#[derive(Default)]
pub struct DeviceRegistry {
    buses: IoBuses,
    devices: Vec<RegisteredDevice>,
}

/// What to attach: the device as a bus sees it, where, and what it is.
pub struct Attachment {
    pub device: Arc<Mutex<dyn BusDevice>>,
    pub bus: Bus,
    pub base: u64,
    pub len: u64,
    pub name: String,
    pub kind: DeviceKind,
    pub counters: Option<Arc<DeviceCounters>>,
    pub persist: Arc<Mutex<dyn Snapshottable>>,
    /// Its DSDT entry, written by whoever places it (it knows the range and the interrupt).
    pub aml: Vec<u8>,
}

impl DeviceRegistry {
    /// Places a device on its bus under the next id and registers it.
    pub fn attach(&mut self, a: Attachment) -> Result<DeviceId, RegistryError> {
        self.attach_ranges(a, &[])
    }

    /// Places a device at `a`'s range and at each of `more` (`(base, len)`, same bus), all
    /// under one id: one device that owns scattered ports.
    pub fn attach_ranges(
        &mut self,
        a: Attachment,
        more: &[(u64, u64)],
    ) -> Result<DeviceId, RegistryError> {
        let id = u8::try_from(self.devices.len())
            .ok()
            .and_then(DeviceId::new)
            .ok_or_else(|| RegistryError::Full {
                name: a.name.clone(),
            })?;
        let bus = match a.bus {
            Bus::Pio => &mut self.buses.pio,
            Bus::Mmio => &mut self.buses.mmio,
        };
        // Checked on a copy, so a refused range leaves the bus as it was.
        let mut placed = bus.clone();
        for (base, len) in std::iter::once((a.base, a.len)).chain(more.iter().copied()) {
            placed
                .insert(a.device.clone(), id, base, len)
                .map_err(|source| RegistryError::Bus {
                    name: a.name.clone(),
                    bus: a.bus,
                    source,
                })?;
        }
        *bus = placed;
        if let Some(c) = &a.counters {
            METRICS.register_device(a.name.clone(), c.clone());
        }
        self.devices.push(RegisteredDevice {
            info: DeviceInfo {
                id,
                name: a.name,
                kind: a.kind,
                bus: a.bus,
                base: a.base,
            },
            counters: a.counters,
            persist: a.persist,
            aml: a.aml,
        });
        Ok(id)
    }

    /// Every device's DSDT entry, in attach order: the body of the DSDT's `\_SB_` scope.
    pub fn aml(&self) -> Vec<u8> {
        self.devices
            .iter()
            .flat_map(|d| d.aml.iter().copied())
            .collect()
    }

    pub fn devices(&self) -> &[RegisteredDevice] {
        &self.devices
    }

    /// The finished buses, for the vCPUs, and the list of what is on them.
    pub fn finish(self) -> (IoBuses, Vec<RegisteredDevice>) {
        (self.buses, self.devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl BusDevice for Nothing {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    impl devices::persist::Persist for Nothing {
        type State = ();
        fn save(&mut self) {}
        fn restore(&mut self, _: ()) -> Result<(), devices::persist::PersistError> {
            Ok(())
        }
    }

    fn attachment(name: &str, bus: Bus, base: u64) -> Attachment {
        let device = Arc::new(Mutex::new(Nothing));
        Attachment {
            persist: device.clone(),
            device,
            bus,
            base,
            len: 0x10,
            name: name.into(),
            kind: DeviceKind::Other,
            counters: None,
            aml: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn every_attached_device_answers_under_its_id_on_either_bus() {
        let mut r = DeviceRegistry::default();
        let a = r.attach(attachment("a", Bus::Pio, 0x60)).unwrap();
        let b = r.attach(attachment("b", Bus::Mmio, 0xd000_0000)).unwrap();
        let c = r.attach(attachment("c", Bus::Mmio, 0xd000_1000)).unwrap();
        assert_eq!([a.index(), b.index(), c.index()], [0, 1, 2]);
        // A range another device holds: refused, and no id is used up.
        let e = r
            .attach(attachment("d", Bus::Mmio, 0xd000_1008))
            .unwrap_err();
        assert!(
            e.to_string().starts_with("cannot place d on the MMIO bus"),
            "{e}"
        );
        assert_eq!(r.devices().len(), 3);
        assert_eq!(r.aml(), b"abc", "the DSDT's devices, in attach order");
        let (buses, devices) = r.finish();
        let mut data = [0u8; 4];
        assert_eq!(buses.pio.read(0x6f, &mut data), Some(a));
        assert_eq!(buses.mmio.write(0xd000_000f, &data), Some(b));
        assert_eq!(buses.mmio.read(0xd000_1000, &mut data), Some(c));
        assert_eq!(buses.mmio.read(0xd000_2000, &mut data), None);
        let json = serde_json::to_value(&devices[1].info).unwrap();
        assert_eq!(json["id"], 1);
        assert_eq!(json["bus"], "mmio");
        assert_eq!(json["kind"], "other");
    }

    #[test]
    fn one_device_may_own_scattered_ranges_under_one_id() {
        let mut r = DeviceRegistry::default();
        let a = r.attach(attachment("a", Bus::Pio, 0x60)).unwrap();
        let b = r
            .attach_ranges(attachment("b", Bus::Pio, 0x70), &[(0x80, 1), (0xcf8, 8)])
            .unwrap();
        // One range taken: nothing of the device is placed and no id is used up.
        let e = r
            .attach_ranges(attachment("c", Bus::Pio, 0x100), &[(0x65, 1), (0x6f, 1)])
            .unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        assert_eq!(r.devices().len(), 2);
        let (buses, _) = r.finish();
        let mut data = [0u8; 1];
        assert_eq!(buses.pio.read(0x7f, &mut data), Some(b));
        assert_eq!(buses.pio.write(0x80, &data), Some(b));
        assert_eq!(buses.pio.read(0xcff, &mut data), Some(b));
        assert_eq!(buses.pio.read(0x81, &mut data), None);
        assert_eq!(buses.pio.read(0x100, &mut data), None);
        assert_eq!(buses.pio.read(0x6f, &mut data), Some(a));
    }

    #[test]
    fn ids_run_out_with_a_message_not_a_wrong_id() {
        let mut r = DeviceRegistry::default();
        for i in 0..MAX_DEVICES as u64 {
            r.attach(attachment("x", Bus::Mmio, i * 0x1000)).unwrap();
        }
        let e = r.attach(attachment("last", Bus::Pio, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot attach last: a VM has at most {MAX_DEVICES} devices")
        );
    }
}
