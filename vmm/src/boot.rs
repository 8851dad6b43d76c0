//! Loading the guest kernel and initrd, and writing the boot parameters of its entry protocol:
//! PVH `hvm_start_info` when a vmlinux carries the PVH note, Linux `boot_params` otherwise.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader, KernelLoaderResult};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::arch::x86_64::layout::{
    e820_entries, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO32_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::arch::x86_64::regs::BootEntry;
use crate::vmm_config::{BootSourceConfig, JsonPath, KernelFormat, DEFAULT_BOOT_ARGS};

/// Errors of loading the kernel and writing boot parameters; each names the file or step.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is neither a 64-bit ELF (vmlinux) nor a bzImage")]
    UnknownFormat(PathBuf),
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(
        "bzImage {0} has no 64-bit entry point (needs boot protocol 2.12+ with XLF_KERNEL_64)"
    )]
    No64BitEntry(PathBuf),
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// Offset of the 64-bit entry point from a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment a relocatable kernel may assume for itself when it has no setup header.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// Where the initrd landed.
#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: GuestAddress,
    size: u64,
}

impl BootError {
    /// The spec field the error is about, so the user is pointed at it.
    pub fn spec_field(&self) -> JsonPath {
        let field = match self {
            BootError::OpenInitrd { .. }
            | BootError::InitrdTooLarge { .. }
            | BootError::ReadInitrd { .. } => "initrd_path",
            BootError::Cmdline(_) | BootError::WriteCmdline(_) => "boot_args",
            _ => "kernel_image_path",
        };
        JsonPath::keys(&["boot-source", field])
    }
}

/// `args` with `extra` (parameters the VMM adds: devices, root disk) placed before any `--`,
/// which starts the arguments for init.
pub fn kernel_cmdline(args: &str, extra: &[String]) -> String {
    if extra.is_empty() {
        return args.to_string();
    }
    let extra = extra.join(" ");
    match args.split_once(" -- ") {
        Some((kernel, init)) => format!("{kernel} {extra} -- {init}"),
        None if args.is_empty() => extra,
        None => format!("{args} {extra}"),
    }
}

/// Loads everything `boot` names into `mem` and returns how to enter the kernel; `extra` kernel
/// parameters are added to the command line, and the boot parameters point at the ACPI root
/// pointer `rsdp` if the VM has ACPI tables.
pub fn load_boot_source(
    mem: &GuestMemoryMmap,
    boot: &BootSourceConfig,
    extra: &[String],
    rsdp: Option<u64>,
) -> Result<BootEntry, BootError> {
    let path = &boot.kernel_image_path;
    let open_error = |source| BootError::OpenKernel {
        path: path.clone(),
        source,
    };
    let mut kernel = File::open(path).map_err(open_error)?;
    let format = KernelFormat::detect(&mut kernel)
        .map_err(open_error)?
        .ok_or_else(|| BootError::UnknownFormat(path.clone()))?;
    let load = |res: Result<KernelLoaderResult, linux_loader::loader::Error>| {
        res.map_err(|source| BootError::LoadKernel {
            path: path.clone(),
            source,
        })
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        KernelFormat::Elf64 => load(Elf::load(mem, None, &mut kernel, himem))?,
        KernelFormat::BzImage => load(BzImage::load(mem, None, &mut kernel, himem))?,
    };

    let args = kernel_cmdline(
        boot.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS),
        extra,
    );
    let args = args.as_str();
    let cmdline = Cmdline::try_from(args, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_len = args.len() as u32;

    let initrd = match &boot.initrd_path {
        Some(p) => Some(load_initrd(mem, p, loaded.kernel_end)?),
        None => None,
    };

    match (format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf64, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_start_info(mem, initrd, rsdp)?;
            Ok(BootEntry::Pvh {
                entry,
                start_info: GuestAddress(PVH_INFO_START),
            })
        }
        (KernelFormat::Elf64, _) => {
            write_boot_params(mem, None, cmdline_len, initrd, rsdp)?;
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load,
                boot_params: GuestAddress(ZERO_PAGE_START),
            })
        }
        (KernelFormat::BzImage, _) => {
            let hdr = loaded
                .setup_header
                .filter(|h| h.xloadflags & XLF_KERNEL_64 != 0)
                .ok_or_else(|| BootError::No64BitEntry(path.clone()))?;
            write_boot_params(mem, Some(hdr), cmdline_len, initrd, rsdp)?;
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                boot_params: GuestAddress(ZERO_PAGE_START),
            })
        }
    }
}

/// The end of RAM below the MMIO gap: the initrd goes as high as possible under it, where the
/// kernel's early mapping reaches and its own image is not.
fn lowmem_end(mem: &GuestMemoryMmap) -> u64 {
    (mem.last_addr().raw_value() + 1).min(MMIO32_START)
}

fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<Initrd, BootError> {
    let open_error = |source| BootError::OpenInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    let limit = lowmem_end(mem);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    let addr = GuestAddress(addr);
    let len = usize::try_from(size).map_err(|_| too_large())?;
    read_into(mem, addr, &mut file, len).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Initrd { addr, size })
}

fn read_into<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &mut F,
    len: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.read_exact_volatile_from(addr, src, len)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<Initrd>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_entries(mem_size(mem))
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.raw_value(),
            size: i.size,
            ..Default::default()
        })
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: u32,
    initrd: Option<Initrd>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        // Read by kernels of boot protocol 2.14 and later; older ones scan the BIOS area.
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr.raw_value() as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let e820 = e820_entries(mem_size(mem));
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// Guest RAM in bytes, summed over the regions.
fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    /// A minimal ELF64 with one PT_LOAD of `code` at 1 MiB and, optionally, a PVH note.
    fn tiny_elf(pvh_entry: Option<u32>) -> Vec<u8> {
        let code = [0xf4u8; 16]; // hlt
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let note_off = 64 + 56 * phnum as u64;
        let note: Vec<u8> = match pvh_entry {
            Some(e) => [
                &4u32.to_le_bytes()[..],
                &4u32.to_le_bytes(),
                &18u32.to_le_bytes(),
                b"Xen\0",
                &e.to_le_bytes(),
            ]
            .concat(),
            None => vec![],
        };
        let code_off = note_off + note.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes());
        f.extend_from_slice(&56u16.to_le_bytes());
        f.extend_from_slice(&phnum.to_le_bytes());
        f.extend_from_slice(&[0; 6]);
        let phdr = |f: &mut Vec<u8>, p_type: u32, off: u64, addr: u64, size: u64| {
            f.extend_from_slice(&p_type.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, size, size, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
        phdr(&mut f, 1, code_off, 0x10_0000, code.len() as u64);
        if pvh_entry.is_some() {
            phdr(&mut f, 4, note_off, 0, note.len() as u64);
        }
        f.extend_from_slice(&note);
        f.extend_from_slice(&code);
        f
    }

    fn temp_file(name: &str, data: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("prescient-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        p
    }

    fn boot_source(kernel: PathBuf, initrd: Option<PathBuf>) -> BootSourceConfig {
        BootSourceConfig {
            kernel_image_path: kernel,
            boot_args: Some("console=ttyS0 foo=bar".into()),
            initrd_path: initrd,
        }
    }

    fn guest_mem(mib: u64) -> GuestMemoryMmap {
        crate::vstate::memory::create_guest_memory(mib * MIB, Default::default()).unwrap()
    }

    #[test]
    fn pvh_note_selects_pvh_and_writes_start_info() {
        let k = temp_file("pvh.elf", &tiny_elf(Some(0x10_0008)));
        let initrd = temp_file("initrd", &[0xab; 5000]);
        let mem = guest_mem(64);
        let entry =
            load_boot_source(&mem, &boot_source(k, Some(initrd)), &[], Some(0xe_0000)).unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: GuestAddress(0x10_0008),
                start_info: GuestAddress(PVH_INFO_START)
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 5000);
        assert_eq!(module.paddr % PAGE_SIZE, 0);
        assert!(module.paddr + 5000 <= 64 * MIB);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(module.paddr + 4999))
                .unwrap(),
            0xab
        );
        let last: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((last.addr, last.addr + last.size), (HIMEM_START, 64 * MIB));
        let mut cmd = [0u8; 22];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 foo=bar\0");
    }

    #[test]
    fn elf_without_note_uses_the_linux_64bit_protocol() {
        let k = temp_file("plain.elf", &tiny_elf(None));
        let mem = guest_mem(32);
        let entry = load_boot_source(&mem, &boot_source(k, None), &[], None).unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: GuestAddress(0x10_0000),
                boot_params: GuestAddress(ZERO_PAGE_START)
            }
        );
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!(params.e820_entries, 2);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0, "no ACPI, no root pointer");
    }

    /// A minimal bzImage: a setup header (boot protocol 2.12, loaded high, with the 64-bit entry
    /// flag unless `no_64bit`) and 4 KiB of protected-mode kernel.
    fn tiny_bzimage(no_64bit: bool) -> Vec<u8> {
        const SETUP_SECTS: u8 = 4;
        let mut img = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
        img[0x1f1] = SETUP_SECTS;
        img[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        if !no_64bit {
            img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        }
        img.extend_from_slice(&[0xab; 4096]);
        img
    }

    #[test]
    fn a_bzimage_is_entered_at_its_64bit_entry_with_boot_params() {
        let k = temp_file("bzImage", &tiny_bzimage(false));
        let mem = guest_mem(32);
        let entry = load_boot_source(&mem, &boot_source(k, None), &[], Some(0xe_0000)).unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: GuestAddress(0x10_0000 + BZIMAGE_64BIT_ENTRY_OFFSET),
                boot_params: GuestAddress(ZERO_PAGE_START)
            }
        );
        let mut kernel = [0u8; 4096];
        mem.read_slice(&mut kernel, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(
            kernel, [0xab; 4096],
            "the protected-mode part is at code32_start"
        );
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(
            { params.hdr.version },
            0x020c,
            "the image's own header is passed on"
        );
        assert_eq!({ params.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
    }

    #[test]
    fn a_bzimage_without_a_64bit_entry_is_refused() {
        let k = temp_file("bzImage32", &tiny_bzimage(true));
        let e = load_boot_source(&guest_mem(32), &boot_source(k, None), &[], None).unwrap_err();
        assert!(matches!(e, BootError::No64BitEntry(_)), "{e}");
        assert_eq!(e.spec_field().to_string(), "boot-source.kernel_image_path");
    }

    #[test]
    fn device_parameters_go_before_init_arguments() {
        let extra = vec!["virtio_mmio.device=4K@0xc0001000:5".to_string()];
        assert_eq!(
            kernel_cmdline("console=ttyS0 -- init-arg", &extra),
            "console=ttyS0 virtio_mmio.device=4K@0xc0001000:5 -- init-arg"
        );
        assert_eq!(
            kernel_cmdline("a", &extra),
            "a virtio_mmio.device=4K@0xc0001000:5"
        );
        assert_eq!(kernel_cmdline("", &extra), extra[0]);
        assert_eq!(kernel_cmdline("a b", &[]), "a b");
    }

    #[test]
    fn an_initrd_larger_than_memory_is_refused() {
        let k = temp_file("small.elf", &tiny_elf(None));
        let initrd = temp_file("big-initrd", &vec![0u8; 3 * MIB as usize]);
        let mem = guest_mem(2);
        let e = load_boot_source(&mem, &boot_source(k, Some(initrd)), &[], None).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        assert_eq!(e.spec_field().to_string(), "boot-source.initrd_path");
    }

    #[test]
    fn a_kernel_that_does_not_fit_is_a_load_error() {
        let k = temp_file("noroom.elf", &tiny_elf(None));
        let mem = guest_mem(1); // RAM ends exactly where the kernel would load
        let e = load_boot_source(&mem, &boot_source(k, None), &[], None).unwrap_err();
        assert!(e.to_string().starts_with("cannot load kernel"), "{e}");
    }
}
