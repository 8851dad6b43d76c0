//! Guest physical memory layout: where boot structures, RAM and the MMIO gap are.
//!
//! The low addresses follow Firecracker's layout so that guests and tools built for it find the
//! same things in the same places.

/// Boot GDT, read by the CPU only until the guest loads its own.
pub const BOOT_GDT_START: u64 = 0x500;
/// A zero-length IDT so that an early exception triple-faults instead of running garbage.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map; shares its page with the zero page because a boot uses one protocol only.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the Linux 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the Linux 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 Linux's COMMAND_LINE_SIZE, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// First address past the legacy hole; kernels load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO gap: [3 GiB, 4 GiB) holds device MMIO, the IOAPIC and the LAPIC; RAM resumes at 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_SIZE: u64 = 0x4000_0000;
pub const RAM_ABOVE_4G_START: u64 = MMIO32_START + MMIO32_SIZE;
/// KVM's three-page TSS area and the identity-map page just below it, at the top of the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = KVM_TSS_ADDRESS - 0x1000;
/// IOAPIC and LAPIC MMIO bases.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The ACPI root pointer, at the start of the BIOS area Linux scans for it (boot protocols also
/// pass its address); the other tables follow it, below [`HIMEM_START`]. None of it is RAM in
/// the memory map.
pub const RSDP_START: u64 = 0xe_0000;
/// Register blocks of the ACPI platform devices, a page each, below the IOAPIC: the Generic
/// Event Device and the CPU hot-plug controller.
pub const ACPI_GED_START: u64 = 0xfeb0_0000;
pub const CPU_HOTPLUG_START: u64 = 0xfeb0_1000;
/// IRQ lines of the in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
/// IRQ of the COM1 serial port.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the i8042 keyboard.
pub const KEYBOARD_IRQ: u32 = 1;

/// The guest RAM ranges (start, length) for `mem_bytes` of RAM, split around the MMIO gap.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO32_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO32_START),
            (RAM_ABOVE_4G_START, mem_bytes - MMIO32_START),
        ]
    }
}

/// Where a virtio-mem region of slots of `slot_size` bytes starts: above RAM and the 32-bit gap,
/// on a 1 GiB boundary (Linux adds hotplugged memory in 128 MiB sections, and a 1 GiB boundary
/// lets guests map it with the largest pages), and on a slot boundary.
pub fn hotplug_region_start(mem_bytes: u64, slot_size: u64) -> Option<u64> {
    let ram_end = ram_ranges(mem_bytes)
        .last()
        .map_or(Some(0), |(start, len)| start.checked_add(*len))?;
    let align = slot_size.max(1 << 30);
    ram_end
        .max(RAM_ABOVE_4G_START)
        .checked_next_multiple_of(align)
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The memory map the guest is told about: (start, length, type) entries.
pub fn e820_entries(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut entries = vec![(0, EBDA_START, E820_RAM)];
    for (start, len) in ram_ranges(mem_bytes) {
        // The first range starts at 0; the legacy hole below HIMEM_START is not RAM to the guest.
        let (start, end) = (start.max(HIMEM_START), start + len);
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotplug_memory_goes_above_ram_and_the_gap_on_a_gib_boundary() {
        const MIB: u64 = 1 << 20;
        assert_eq!(hotplug_region_start(256 * MIB, 128 * MIB), Some(4 << 30));
        assert_eq!(hotplug_region_start(4096 * MIB, 128 * MIB), Some(5 << 30));
        assert_eq!(hotplug_region_start(4097 * MIB, 128 * MIB), Some(6 << 30));
        assert_eq!(hotplug_region_start(256 * MIB, 2 << 30), Some(4 << 30));
        assert_eq!(hotplug_region_start(u64::MAX - (1 << 20), 128 * MIB), None);
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(128 * MIB), vec![(0, 128 * MIB)]);
        assert_eq!(
            e820_entries(128 * MIB),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, 127 * MIB, E820_RAM)
            ]
        );
    }

    #[test]
    fn large_memory_resumes_above_4g() {
        assert_eq!(ram_ranges(5 * GIB), vec![(0, 3 * GIB), (4 * GIB, 2 * GIB)]);
        let e820 = e820_entries(5 * GIB);
        assert_eq!(e820.len(), 3);
        assert_eq!(e820[2], (4 * GIB, 2 * GIB, E820_RAM));
        let ram: u64 = e820.iter().map(|e| e.1).sum();
        assert_eq!(ram, 5 * GIB - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn exactly_the_gap_boundary_needs_no_high_range() {
        assert_eq!(ram_ranges(3 * GIB), vec![(0, 3 * GIB)]);
    }
}
