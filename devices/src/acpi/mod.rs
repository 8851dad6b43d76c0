//! ACPI platform devices: register blocks on the MMIO bus that the guest's ACPI code (AML in the
//! DSDT) reads and writes. Each device also writes its own DSDT entry ([`ged::Ged::aml`],
//! [`cpu_hotplug::CpuHotplug::aml`]), so what the guest is told and what answers it live in one
//! place.
//!
//! - [`ged`]: the Generic Event Device. The VMM sets an event bit and raises its interrupt; the
//!   guest's `_EVT` method reads (and so clears) the bits and runs the handler of each.
//! - [`cpu_hotplug`]: which vCPUs are present, which the VMM has inserted or wants removed, and the
//!   guest's eject of a vCPU it has taken offline.

pub mod cpu_hotplug;
pub mod ged;

/// The little-endian value of an access of `data.len()` bytes (at most 4 are looked at).
fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

/// Fills a read of `data.len()` bytes with `value`, little-endian (zeros past its 4 bytes).
fn fill_le(data: &mut [u8], value: u32) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_of_any_width_are_little_endian() {
        assert_eq!(le_value(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(le_value(&[0x05]), 5);
        assert_eq!(le_value(&[1, 0, 0, 0, 9, 9, 9, 9]), 1);
        let mut d = [0xffu8; 6];
        fill_le(&mut d, 0x0a0b_0c0d);
        assert_eq!(d, [0x0d, 0x0c, 0x0b, 0x0a, 0, 0]);
        let mut one = [0u8; 1];
        fill_le(&mut one, 0x1ff);
        assert_eq!(one, [0xff]);
    }
}
