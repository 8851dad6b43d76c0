//! Boot-time register state of the boot vCPU for the two entry protocols.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{segment_from_gdt, CODE32, CODE64, DATA, TSS};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

/// How the guest kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = `boot_params`.
    Linux64 {
        entry: GuestAddress,
        boot_params: GuestAddress,
    },
}

/// Errors of setting up boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot {what} into guest memory: {source}")]
    WriteMemory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot read the vCPU's special registers: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("cannot set the vCPU's special registers: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("cannot set the vCPU's general registers: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("cannot set the vCPU's FPU state: {0}")]
    SetFpu(kvm_ioctls::Error),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets every vCPU's FPU to its reset state (x87 control word and MXCSR defaults).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Puts the boot vCPU at the kernel's entry point in the state its protocol promises.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        ..Default::default()
    };
    let code = match entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry.raw_value();
            regs.rbx = start_info.raw_value();
            CODE32
        }
        BootEntry::Linux64 { entry, boot_params } => {
            regs.rip = entry.raw_value();
            regs.rsi = boot_params.raw_value();
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            CODE64
        }
    };
    load_boot_segments(mem, &mut sregs, code)?;
    if let BootEntry::Linux64 { .. } = entry {
        setup_identity_paging(mem, &mut sregs)?;
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

fn write_mem<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, source })
}

/// Writes the boot GDT (null, code, data, TSS) and an empty IDT, and loads the segments.
fn load_boot_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    code: u64,
) -> Result<(), RegsError> {
    let gdt = [0, code, DATA, TSS];
    for (i, entry) in gdt.iter().enumerate() {
        write_mem(mem, "GDT", *entry, BOOT_GDT_START + 8 * i as u64)?;
    }
    write_mem(mem, "IDT", 0u64, BOOT_IDT_START)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = segment_from_gdt(DATA, 2);
    sregs.cs = segment_from_gdt(code, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(TSS, 3);

    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages, as the Linux 64-bit protocol requires.
fn setup_identity_paging(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write_mem(mem, "PML4", PDPTE_START | PRESENT_RW, PML4_START)?;
    write_mem(mem, "PDPTE", PDE_START | PRESENT_RW, PDPTE_START)?;
    for i in 0..512u64 {
        write_mem(
            mem,
            "PDE",
            (i << 21) | PAGE_SIZE_2M | PRESENT_RW,
            PDE_START + i * 8,
        )?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    fn boot(entry: BootEntry) -> (kvm_regs, kvm_sregs, GuestMemoryMmap) {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        setup_boot_vcpu(&vcpu, &mem, entry).unwrap();
        setup_fpu(&vcpu).unwrap();
        (vcpu.get_regs().unwrap(), vcpu.get_sregs().unwrap(), mem)
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode_without_paging() {
        let (regs, sregs, _) = boot(BootEntry::Pvh {
            entry: GuestAddress(0x10_0040),
            start_info: GuestAddress(0x6000),
        });
        assert_eq!((regs.rip, regs.rbx), (0x10_0040, 0x6000));
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!(sregs.efer & EFER_LME, 0);
    }

    #[test]
    fn linux64_entry_is_long_mode_with_an_identity_map() {
        let (regs, sregs, mem) = boot(BootEntry::Linux64 {
            entry: GuestAddress(0x100_0000),
            boot_params: GuestAddress(0x7000),
        });
        assert_eq!((regs.rip, regs.rsi, regs.rsp), (0x100_0000, 0x7000, 0x8ff0));
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        // The 2 MiB page covering 0x3fe00000 maps to itself.
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde & !0xfff, 511 << 21);
    }
}
