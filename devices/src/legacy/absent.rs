//! Ports of PC hardware a microVM does not have, which Linux probes anyway: the CMOS/RTC, the
//! POST port its I/O delay writes to, PCI configuration, COM2 to COM4, Super I/O configuration. Owned by
//! one device that answers as an empty bus does (reads all-ones, writes dropped), so a guest
//! probing them is told "nothing here" by a device the VMM placed, and the exits are known,
//! not unknown.

use crate::persist::{Persist, PersistError};
use crate::BusDevice;

/// The port ranges `(base, len)` a Linux guest is known to probe where a microVM has nothing
/// (seen with Debian 12's stock kernel and the project's own under a real KVM).
pub const ABSENT_PORTS: [(u64, u64); 9] = [
    // Super I/O configuration (index, data) at both usual addresses: the 8250 driver's Fintek
    // probe enters and leaves configuration mode there.
    (0x2e, 2),
    (0x4e, 2),
    // CMOS index and data: rtc_cmos and the boot-time clock read.
    (0x70, 2),
    // POST diagnostics: the default I/O delay (outb_p and friends) writes here.
    (0x80, 1),
    // A DMA page register, read once at boot.
    (0x87, 1),
    // COM4, COM2, COM3: the 8250 driver probes its legacy ports (8250.nr_uarts, default 4).
    (0x2e8, 8),
    (0x2f8, 8),
    (0x3e8, 8),
    // PCI configuration mechanisms #1 and #2 (CONFIG_PCI without pci=off).
    (0xcf8, 8),
];

/// Hardware that is not there.
#[derive(Debug, Default)]
pub struct Absent;

impl BusDevice for Absent {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Nothing to save: it has no state.
impl Persist for Absent {
    type State = ();

    fn save(&mut self) {}

    fn restore(&mut self, _state: ()) -> Result<(), PersistError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_float_high_and_writes_change_nothing() {
        let mut a = Absent;
        let mut data = [0u8; 4];
        a.write(0, &[0x12, 0x34, 0x56, 0x78]);
        a.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn the_ranges_are_sorted_and_disjoint_and_miss_the_devices_a_microvm_has() {
        for w in ABSENT_PORTS.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?}");
        }
        // COM1 (0x3f8..0x400), the i8042 (0x60..0x65) and what KVM's in-kernel PIC and PIT
        // answer (0x20, 0x40..0x44, 0x61, 0xa0, 0x4d0) stay theirs.
        for port in [
            0x20, 0x3f8, 0x3ff, 0x40, 0x43, 0x60, 0x61, 0x64, 0xa0, 0x4d0,
        ] {
            assert!(
                !ABSENT_PORTS
                    .iter()
                    .any(|(b, l)| (*b..b + l).contains(&port)),
                "{port:#x}"
            );
        }
    }
}
