//! The Intel MultiProcessor table: how a guest without ACPI finds its CPUs, IOAPIC and IRQ routing.
//!
//! Layout per the MP specification 1.4: a 16-byte floating pointer, then the configuration table
//! (44-byte header and entries), both at the start of the EBDA where Linux looks first.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, IOAPIC_PINS, IOAPIC_START, LAPIC_START};

/// Errors of writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Bounded by the 1 KiB EBDA window the table must fit into.
pub const MAX_CPUS: u8 = 32;
const EBDA_WINDOW: usize = 1024;

const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature (family 6) and feature flags (FPU, APIC) reported per processor entry.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Byte that makes the bytes of `data` sum to zero.
fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the whole table (floating pointer followed by the configuration table) for `cpus`
/// vCPUs, as it must appear at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let table_addr = base + 16;

    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // Conforming polarity and trigger: ISA defaults (edge, active high).
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[MP_SPEC_REV, 0]); // checksum patched below
    header.extend_from_slice(b"PRESCNT ");
    header.extend_from_slice(b"microVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]); // 1 paragraph, no default config
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus, EBDA_START)?;
    debug_assert!(table.len() <= EBDA_WINDOW);
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid_and_pointer_finds_table() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        let off = (ptr - EBDA_START) as usize;
        assert_eq!(&t[off..off + 4], b"PCMP");
        let len = u16::from_le_bytes(t[off + 4..off + 6].try_into().unwrap()) as usize;
        assert_eq!(off + len, t.len());
        assert_eq!(sum(&t[off..off + len]), 0);
    }

    #[test]
    fn lists_every_cpu_with_the_first_as_bsp() {
        let t = build(3, EBDA_START).unwrap();
        let cpus: Vec<(u8, u8)> = (0..3)
            .map(|i| {
                let e = &t[16 + 44 + i * 20..];
                assert_eq!(e[0], ENTRY_PROCESSOR);
                (e[1], e[3])
            })
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
        let count = u16::from_le_bytes(t[16 + 34..16 + 36].try_into().unwrap());
        assert_eq!(count, 3 + 2 + 24 + 2);
    }

    #[test]
    fn largest_table_fits_the_ebda_and_limits_are_enforced() {
        assert!(build(MAX_CPUS, EBDA_START).unwrap().len() <= EBDA_WINDOW);
        assert!(matches!(
            build(0, EBDA_START),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
    }
}
