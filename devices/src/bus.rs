//! Address buses (PIO and MMIO) that route a vCPU access to the device owning the address.
//!
//! The bus is built before the vCPUs start and is read-only afterwards, so lookups need no lock on
//! the bus itself; each device has its own mutex, held only for the one access. Each range carries
//! the identity (`Id`) its device was attached under, and an access answers with the identity of
//! the device that served it: who answered is what the bus resolved, not address arithmetic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes in an address range of a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error(
        "bus range {base:#x}+{len:#x} overlaps a device already at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One device's range on a bus.
#[derive(Clone)]
struct Entry<Id> {
    len: u64,
    id: Id,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device known as `Id`.
#[derive(Clone)]
pub struct Bus<Id = ()> {
    // Keyed by range start.
    devices: BTreeMap<u64, Entry<Id>>,
}

impl<Id> Default for Bus<Id> {
    fn default() -> Self {
        Self {
            devices: BTreeMap::new(),
        }
    }
}

impl<Id: Copy> Bus<Id> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device`, known as `id`, at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: SharedDevice,
        id: Id,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let overlapping = self
            .devices
            .range(..base + len)
            .next_back()
            .filter(|(&b, e)| b + e.len > base);
        if let Some((&other_base, e)) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                other_base,
                other_len: e.len,
            });
        }
        self.devices.insert(base, Entry { len, id, device });
        Ok(())
    }

    /// The entry owning `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(&Entry<Id>, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Dispatches a read; returns the id of the device that answered, or None when no device
    /// owns `addr` (the caller decides what an unclaimed read returns).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Option<Id> {
        let (entry, offset) = self.resolve(addr)?;
        lock(&entry.device).read(offset, data);
        Some(entry.id)
    }

    /// Dispatches a write; returns the id of the device that took it, or None when no device
    /// owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Id> {
        let (entry, offset) = self.resolve(addr)?;
        lock(&entry.device).write(offset, data);
        Some(entry.id)
    }
}

/// A device whose mutex was poisoned by a panic elsewhere is still in a consistent state for our
/// devices (every access is a complete register operation), so keep serving it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access so tests can see what the bus delivered.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_to_the_owning_device_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 'a', 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 'b', 0x400, 1)
            .unwrap();

        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut data), Some('a'));
        assert_eq!(data, [5]);
        assert_eq!(bus.write(0x3ff, &[0xab]), Some('a'));
        assert_eq!(dev.lock().unwrap().last_write, Some((7, vec![0xab])));
        assert_eq!(bus.write(0x400, &[1]), Some('b'));

        assert_eq!(bus.read(0x3f7, &mut data), None);
        assert_eq!(bus.write(0x401, &[1]), None);
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), (), 0x60, 5)
            .unwrap();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        assert!(matches!(
            bus.insert(dev.clone(), (), 0x64, 1),
            Err(BusError::Overlap {
                other_base: 0x60,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), (), 0x5c, 8),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(dev.clone(), (), 0x10, 0),
            Err(BusError::InvalidRange { base: 0x10, len: 0 })
        );
        assert!(bus.insert(dev.clone(), (), u64::MAX, 2).is_err());
        // Adjacent ranges are fine.
        bus.insert(dev, (), 0x65, 1).unwrap();
    }
}
