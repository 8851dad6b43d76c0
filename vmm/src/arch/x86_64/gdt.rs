//! Boot GDT entries and their translation into KVM segment registers.

use kvm_bindings::kvm_segment;

/// A GDT descriptor built from flags (the access byte plus the flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// 64-bit code segment (L=1), the Linux 64-bit entry's CS.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit flat code segment, the PVH entry's CS.
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xffff_ffff);
/// Flat read/write data segment.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// A busy 32/64-bit TSS; KVM needs a valid TR even though the guest replaces it.
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// The KVM view of the segment described by GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit_raw = ((entry & 0x000f_0000_0000_0000) >> 32 | (entry & 0xffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G set the limit is in 4 KiB pages.
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_decodes_as_a_long_mode_segment() {
        let s = segment_from_gdt(CODE64, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(
            (s.l, s.db, s.g, s.present, s.s, s.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn fields_round_trip_through_an_entry() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 3);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde, "byte granular limit is kept as is");
        assert_eq!((s.db, s.g, s.type_, s.selector), (1, 0, 3, 24));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
