//! The ACPI tables a guest finds its hardware by, built with the rust-vmm `acpi_tables` crate:
//! RSDP -> XSDT -> FADT (hardware-reduced: no PM blocks, no SCI, events through the GED) -> DSDT,
//! and the MADT (LAPICs and the IOAPIC). The DSDT holds `\_SB_` with whatever the devices wrote
//! about themselves when they were attached (the device registry's AML: serial, i8042, every
//! virtio-mmio device, the GED and the CPU hot-plug controller); this module adds nothing of its
//! own there, so the DSDT cannot list a device the buses do not have.
//!
//! The tables sit in the BIOS area from [`RSDP_START`]: Linux scans it for the RSDP, and both boot
//! protocols pass the address too (PVH `rsdp_paddr`, `boot_params.acpi_rsdp_addr`). It is not RAM
//! in the memory map, so the guest never reuses it.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{HIMEM_START, IOAPIC_START, LAPIC_START, RSDP_START};

/// Who made the tables (every table's OEM id).
const OEM_ID: [u8; 6] = *b"PRSCNT";
const OEM_REVISION: u32 = 1;
/// FADT's hypervisor vendor identity: the guest can tell it runs under prescient.
const HYPERVISOR_ID: [u8; 8] = *b"PRSCNTVM";
/// DSDT revision 2 and above: AML integers are 64-bit.
const DSDT_REVISION: u8 = 2;
/// IA-PC boot architecture flags (FADT): an 8042 is there; no VGA; no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Errors of writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(usize),
    #[error("{max} vCPUs do not fit in the MADT (at most {limit})")]
    TooManyCpus { max: u8, limit: u8 },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// The vCPUs the MADT lists: `boot` enabled, up to `max` more that can be plugged later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus {
    pub boot: u8,
    pub max: u8,
}

/// One table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn encode(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `Scope (\_SB_) { <devices> }`.
pub fn dsdt(devices: &[u8]) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"PRSCDSDT",
        OEM_REVISION,
    );
    table.append_slice(&aml::Scope::raw("\\_SB_".into(), devices.to_vec()));
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"PRSCFADT", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed power or sleep button: they are devices, if anything.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    encode(&b.finalize())
}

/// vCPU `i` is LAPIC `i`, with ACPI processor UID `i` (the DSDT's `Cxxx._UID`); those beyond
/// the boot count are listed disabled but online capable, so that the guest counts them as
/// possible CPUs. The flag is needed: the FADT says ACPI 6.5, and since 6.3 an OS ignores a
/// disabled LAPIC without it as one that can never come online (Linux 6.1 then booted with
/// "Allowing 1 CPUs, 0 hotplug CPUs" and could plug none).
fn madt(cpus: Cpus) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"PRSCMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for i in 0..cpus.max {
        let status = if i < cpus.boot {
            EnabledStatus::Enabled
        } else {
            EnabledStatus::DisabledOnlineCapable
        };
        m.add_structure(ProcessorLocalApic::new(i, i, status));
    }
    // The IOAPIC's id follows the LAPICs', as in the MP table.
    m.add_structure(IoApic::new(cpus.max, IOAPIC_START as u32, 0));
    encode(&m)
}

/// Every table, placed from `RSDP_START`: RSDP, XSDT, FADT, MADT, DSDT (8-byte aligned).
pub fn build(cpus: Cpus, devices_aml: &[u8]) -> Result<Vec<Placed>, AcpiError> {
    // xAPIC ids are 8 bits, and the IOAPIC takes the id after the last LAPIC.
    if cpus.max == u8::MAX || cpus.boot == 0 || cpus.boot > cpus.max {
        return Err(AcpiError::TooManyCpus {
            max: cpus.max,
            limit: u8::MAX - 1,
        });
    }
    let align = |a: u64| a.next_multiple_of(8);
    let xsdt_addr = align(RSDP_START + Rsdp::len() as u64);
    // The XSDT has two entries, so its size is known before the others are placed.
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let fadt = fadt(0);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(devices_aml);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > HIMEM_START {
        return Err(AcpiError::TooLarge((end - RSDP_START) as usize));
    }
    let mut xsdt = XSDT::new(OEM_ID, *b"PRSCXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = encode(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    Ok(vec![
        Placed {
            addr: RSDP_START,
            bytes: encode(&Rsdp::new(OEM_ID, xsdt_addr)),
        },
        Placed {
            addr: xsdt_addr,
            bytes: xsdt,
        },
        Placed {
            addr: fadt_addr,
            bytes: self::fadt(dsdt_addr),
        },
        Placed {
            addr: madt_addr,
            bytes: madt,
        },
        Placed {
            addr: dsdt_addr,
            bytes: dsdt,
        },
    ])
}

/// Writes every table into guest memory; returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cpus: Cpus,
    devices_aml: &[u8],
) -> Result<GuestAddress, AcpiError> {
    for t in build(cpus, devices_aml)? {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// A device as the registry would hold it: `Device (NAME) { _HID }`.
    fn device(name: &str, hid: &'static str) -> Vec<u8> {
        encode(&aml::Device::new(
            name.into(),
            vec![&aml::Name::new("_HID".into(), &hid)],
        ))
    }

    fn tables(cpus: Cpus) -> Vec<Placed> {
        let mut devices = device("COM1", "PNP0501");
        devices.extend(device("VR00", "LNRO0005"));
        build(cpus, &devices).unwrap()
    }

    #[test]
    fn every_table_sums_to_zero_and_the_pointers_chain() {
        let t = tables(Cpus { boot: 2, max: 4 });
        let [rsdp, xsdt, fadt, madt, dsdt] = &t[..] else {
            panic!("{} tables", t.len())
        };
        // RSDP: both checksums (first 20 bytes, whole structure), revision 2, the XSDT.
        assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
        assert_eq!(rsdp.bytes.len(), 36);
        assert_eq!(sum(&rsdp.bytes[..20]), 0);
        assert_eq!(sum(&rsdp.bytes), 0);
        assert_eq!(rsdp.bytes[15], 2);
        assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
        for (table, sig) in [
            (xsdt, b"XSDT"),
            (fadt, b"FACP"),
            (madt, b"APIC"),
            (dsdt, b"DSDT"),
        ] {
            assert_eq!(&table.bytes[..4], sig);
            assert_eq!(
                u32_at(&table.bytes, 4) as usize,
                table.bytes.len(),
                "length"
            );
            assert_eq!(
                sum(&table.bytes),
                0,
                "{} checksum",
                String::from_utf8_lossy(sig)
            );
            assert_eq!(&table.bytes[10..16], &OEM_ID);
            assert_eq!(table.addr % 8, 0);
        }
        // The XSDT lists the FADT and the MADT; the FADT points at the DSDT.
        assert_eq!(u64_at(&xsdt.bytes, 36), fadt.addr);
        assert_eq!(u64_at(&xsdt.bytes, 44), madt.addr);
        assert_eq!(u64_at(&fadt.bytes, 140), dsdt.addr, "X_DSDT");
        assert_eq!(u32_at(&fadt.bytes, 40), 0, "no 32-bit DSDT pointer");
        // No table overlaps the next, and all end below 1 MiB.
        for w in t.windows(2) {
            assert!(w[0].addr + w[0].bytes.len() as u64 <= w[1].addr);
        }
        assert!(dsdt.addr + dsdt.bytes.len() as u64 <= HIMEM_START);
    }

    #[test]
    fn the_fadt_is_hardware_reduced_acpi_6_5() {
        let t = tables(Cpus { boot: 1, max: 1 });
        let fadt = &t[2].bytes;
        assert_eq!(fadt.len(), 276);
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT 6.5");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0b10_0110);
        assert_eq!(&fadt[268..276], b"PRSCNTVM");
        // No SCI, no PM1 blocks: a hardware-reduced platform has none.
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 0);
        assert_eq!(u32_at(fadt, 56), 0);
    }

    #[test]
    fn the_madt_lists_boot_cpus_enabled_and_the_rest_plug_able() {
        let t = tables(Cpus { boot: 2, max: 4 });
        let madt = &t[3].bytes;
        assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
        let mut lapics = Vec::new();
        let mut ioapic = None;
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapic = Some((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
                other => panic!("unexpected MADT structure {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        // Enabled (bit 0), or disabled and online capable (bit 1).
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 2), (3, 3, 2)]);
        assert_eq!(ioapic, Some((4, IOAPIC_START as u32, 0)));
    }

    #[test]
    fn the_dsdt_holds_the_devices_in_the_system_bus_scope() {
        let devices = device("COM1", "PNP0501");
        let dsdt = dsdt(&devices);
        assert_eq!(dsdt[8], DSDT_REVISION);
        // ScopeOp, PkgLength, "\_SB_", then the devices as given.
        assert_eq!(dsdt[36], 0x10);
        let body = &dsdt[36..];
        let at = body.windows(5).position(|w| w == b"\\_SB_").unwrap();
        assert_eq!(&body[at + 5..], &devices[..]);
    }

    #[test]
    fn impossible_cpu_counts_and_oversized_dsdts_are_refused() {
        assert!(build(Cpus { boot: 0, max: 1 }, &[]).is_err());
        assert!(build(Cpus { boot: 3, max: 2 }, &[]).is_err());
        assert!(build(Cpus { boot: 1, max: 255 }, &[]).is_err());
        let e = build(Cpus { boot: 1, max: 1 }, &vec![0u8; 200 << 10]).unwrap_err();
        assert!(e.to_string().contains("do not fit below 1 MiB"), "{e}");
        let mem =
            crate::vstate::memory::create_guest_memory(2 << 20, crate::vmm_config::HugePages::None)
                .unwrap();
        let rsdp = create_acpi_tables(&mem, Cpus { boot: 1, max: 2 }, &[]).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
