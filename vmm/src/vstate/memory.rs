//! Guest RAM: anonymous host mappings laid out around the 32-bit MMIO gap, or, when another
//! process must reach it (a vhost-user backend), one memfd mapped shared.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::arch::x86_64::layout::ram_ranges;
use crate::vmm_config::HugePages;

/// Errors of creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{mib} MiB does not fit in this host's address space")]
    TooLarge { mib: u64 },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map { mib: u64, source: MmapRegionError },
    #[error(
        "cannot reserve {mib} MiB of 2 MiB pages (huge_pages \"2M\"): the host's pool has {free_mib} MiB free \
         (vm.nr_hugepages, /sys/kernel/mm/hugepages/hugepages-2048kB): {source}"
    )]
    HugetlbPool {
        mib: u64,
        free_mib: u64,
        source: MmapRegionError,
    },
    #[error("guest memory layout: {0}")]
    Layout(vm_memory::GuestRegionCollectionError),
    #[error("cannot create the shared guest memory file (memfd, {mib} MiB): {source}")]
    Memfd { mib: u64, source: std::io::Error },
}

/// Maps `mem_bytes` of guest RAM, backed as `pages` says.
pub fn create_guest_memory(
    mem_bytes: u64,
    pages: HugePages,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = mem_bytes >> 20;
    let regions = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| map_region(start, len, pages, mib, None))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
}

/// Maps `mem_bytes` of guest RAM from one memfd, shared, so that its file descriptor can be
/// handed to a vhost-user backend (as Firecracker does when a vhost-user device exists). The
/// host still pays only for what the guest touches (the file is sparse). Transparent huge pages
/// then follow the host's `shmem_enabled` setting rather than `enabled`, and the idle trim leaves
/// these regions alone (a page given back from a shared mapping stays in the file).
pub fn create_shared_guest_memory(
    mem_bytes: u64,
    pages: HugePages,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = mem_bytes >> 20;
    let memfd_error = |source| MemoryError::Memfd { mib, source };
    let mut flags = libc::MFD_CLOEXEC;
    if pages == HugePages::Hugetlbfs2M {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"guest_mem".as_ptr(), flags) };
    if fd < 0 {
        return Err(memfd_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    let ranges = ram_ranges(mem_bytes);
    let total: u64 = ranges.iter().map(|(_, len)| len).sum();
    file.set_len(total).map_err(memfd_error)?;
    let mut offset = 0;
    let mut regions = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let at = FileOffset::from_arc(file.clone(), offset);
        regions.push(map_region(start, len, pages, mib, Some(at))?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
}

/// Maps the virtio-mem region: backed like RAM, and shown to the guest only slot by slot as it
/// plugs blocks.
pub fn create_hotplug_region(
    start: u64,
    size: u64,
    pages: HugePages,
) -> Result<GuestRegionMmap, MemoryError> {
    map_region(start, size, pages, size >> 20, None)
}

/// One mapping for guest-physical `[start, start + len)`, part of `mib` MiB of guest memory
/// (which errors name): anonymous and private, or `shared` at that place of a memfd.
///
/// 4 KiB and transparent pages are reserved lazily (MAP_NORESERVE): the host only pays for what
/// the guest touches. 2 MiB hugetlbfs pages are reserved from the host's pool at once, so a pool
/// too small is an error here, not a SIGBUS when the guest first touches the memory.
fn map_region(
    start: u64,
    len: u64,
    pages: HugePages,
    mib: u64,
    shared: Option<FileOffset>,
) -> Result<GuestRegionMmap, MemoryError> {
    let size = usize::try_from(len).map_err(|_| MemoryError::TooLarge { mib })?;
    let mut flags = match shared {
        None => libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
        Some(_) => libc::MAP_SHARED,
    };
    flags |= match (pages, shared.is_some()) {
        (HugePages::None | HugePages::Transparent, _) => libc::MAP_NORESERVE,
        (HugePages::Hugetlbfs2M, false) => libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        // The memfd's own flags pick the page size.
        (HugePages::Hugetlbfs2M, true) => 0,
    };
    let mut builder = MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(pages == HugePages::Hugetlbfs2M);
    match shared {
        Some(at) => builder = builder.with_file_offset(at),
        // hugetlbfs mappings are aligned to their page size by the kernel.
        None if pages == HugePages::Hugetlbfs2M => {}
        None => {
            let at = map_aligned_anonymous(size, flags).map_err(|e| MemoryError::Map {
                mib,
                source: MmapRegionError::Mmap(e),
            })?;
            // SAFETY: `at` starts a live read-write mapping of `size` bytes, made just above for
            // this region alone. vm-memory never unmaps a mapping it was handed, so it stays for
            // the process's life, which is what guest RAM has in a VMM process anyway.
            builder = unsafe { builder.with_raw_mmap_pointer(at) };
        }
    }
    let mapping = builder.build().map_err(|source| match pages {
        HugePages::Hugetlbfs2M => MemoryError::HugetlbPool {
            mib,
            free_mib: free_hugetlb_2m_mib(),
            source,
        },
        _ => MemoryError::Map { mib, source },
    })?;
    let region =
        GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(MemoryError::TooLarge { mib })?;
    if pages == HugePages::Transparent {
        advise_huge_pages(&region);
    }
    Ok(region)
}

/// Where anonymous guest RAM starts in the host's address space, as QEMU places it: KVM maps a
/// guest range with one 2 MiB page only where the host and guest addresses agree modulo 2 MiB,
/// so on an unaligned mapping even a transparent huge page costs the guest 512 EPT/NPT faults
/// and 4 KiB TLB entries. Under a nested KVM, where every such fault is emulated, first touches
/// ran 7 to 17 times faster aligned (resources/nested/README.md). It costs address space only.
const RAM_ALIGN: usize = 2 << 20;

/// A new anonymous mapping of `size` bytes (mmap `flags`) at a [`RAM_ALIGN`]ed address.
fn map_aligned_anonymous(size: usize, flags: libc::c_int) -> std::io::Result<*mut u8> {
    let reserve = size
        .checked_add(RAM_ALIGN)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new mapping at an address the kernel picks (no MAP_FIXED); nothing refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = base as usize;
    let at = start.next_multiple_of(RAM_ALIGN);
    let (head, tail) = (at - start, start + reserve - (at + size));
    for (from, len) in [(start, head), (at + size, tail)] {
        if len > 0 {
            // SAFETY: [from, from + len) lies inside the mapping made above and outside the
            // part kept; nothing refers to it.
            unsafe { libc::munmap(from as *mut libc::c_void, len) };
        }
    }
    Ok(at as *mut u8)
}

/// MiB free in the host's 2 MiB hugetlbfs pool (0 if it cannot be read), for the error message.
fn free_hugetlb_2m_mib() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |pages| pages * 2)
}

const PAGE: usize = 4096;
/// A transparent huge page: the unit the host backs `Transparent` guest memory with.
const HUGE_PAGE: usize = 2 << 20;
const PAGES_PER_HUGE_PAGE: usize = HUGE_PAGE / PAGE;

/// Calls `f(host address, length)` for each mapped piece of guest memory.
fn for_each_mapping(mem: &GuestMemoryMmap, mut f: impl FnMut(*mut u8, usize)) {
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
            f(host, region.len() as usize);
        }
    }
}

/// Residency of the pages of `[host, host + len)` (one byte per 4 KiB page, bit 0 = resident),
/// into `map`, which holds at least `len / PAGE` bytes.
fn residency(host: *mut u8, len: usize, map: &mut [u8]) -> std::io::Result<()> {
    debug_assert!(map.len() >= len.div_ceil(PAGE));
    // SAFETY: mincore only reads the page tables of `[host, host + len)`, which lies inside a live
    // guest mapping (callers pass pieces of one), and writes one byte per page into `map`, which
    // is large enough (checked above).
    if unsafe { libc::mincore(host.cast(), len, map.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of `mem` backed by host pages now (mincore), for the predictor's view of what the guest
/// really costs the host and for the idle trim's "did the guest take more" check. Works through
/// the memory 16 MiB at a time with a buffer on the stack, so a large guest costs no heap.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    const STEP_PAGES: usize = 4096;
    let mut map = [0u8; STEP_PAGES];
    let mut resident = 0;
    for_each_mapping(mem, |host, len| {
        for offset in (0..len).step_by(STEP_PAGES * PAGE) {
            let n = (len - offset).min(STEP_PAGES * PAGE);
            // SAFETY: `offset < len`, so the pointer stays inside the mapping.
            let piece = unsafe { host.add(offset) };
            match residency(piece, n, &mut map) {
                Ok(()) => {
                    let pages = n.div_ceil(PAGE);
                    resident += map[..pages].iter().filter(|b| *b & 1 != 0).count() as u64;
                }
                Err(e) => tracing::debug!("mincore: {e}"),
            }
        }
    });
    resident * PAGE as u64
}

/// A huge page is split and its zero pages given back only when at least this many of its
/// 512 pages read zero (1/8 of it, 256 KiB): less is not worth losing the huge page's TLB reach.
pub const TRIM_MIN_ZERO_PAGES: usize = 64;

/// What one [`trim_zero_pages`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrimReport {
    /// Fully resident 2 MiB pieces looked at.
    pub huge_pages_scanned: u64,
    /// Of those, the ones split and partly given back.
    pub huge_pages_trimmed: u64,
    /// Bytes of zero pages given back to the host.
    pub freed_bytes: u64,
}

/// Gives the host back the zero 4 KiB pages of fully resident, mostly unused 2 MiB pieces of
/// `mem`: what transparent huge pages brought in around the pages the guest really wrote.
///
/// A page that reads zero is given back with MADV_DONTNEED (the guest reads zeroes there again, so
/// nothing it sees changes), its piece is marked MADV_NOHUGEPAGE (so khugepaged does not fill it
/// back up) and MADV_COLD (which makes the kernel split the huge page now and free the pages, not
/// only under memory pressure).
///
/// One call looks at the pieces from guest address `from` on and stops after `max_scanned` fully
/// resident ones (a bounded pause for a large guest), returning where to go on, or None at the
/// end of guest memory.
///
/// Every range given back is told to `given_back` (guest address, bytes): a snapshot that finds
/// its pages by residency must know them.
///
/// Nothing may write guest memory meanwhile, or a write between the check and the discard would
/// be lost: call it with every vCPU paused, from the thread that runs the devices.
pub fn trim_zero_pages(
    mem: &GuestMemoryMmap,
    from: GuestAddress,
    max_scanned: u64,
    given_back: &mut dyn FnMut(GuestAddress, u64),
) -> (TrimReport, Option<GuestAddress>) {
    let mut report = TrimReport::default();
    let mut map = [0u8; PAGES_PER_HUGE_PAGE];
    for region in mem.iter() {
        // Memory mapped privately from a snapshot's file: a page given back would read the
        // file's content again, not zero.
        if region.file_offset().is_some() {
            continue;
        }
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        let first = (host as usize).next_multiple_of(HUGE_PAGE) - host as usize;
        for offset in (first..len).step_by(HUGE_PAGE) {
            let guest = region.start_addr().0 + offset as u64;
            if len - offset < HUGE_PAGE || guest < from.0 {
                continue;
            }
            if report.huge_pages_scanned == max_scanned {
                return (report, Some(GuestAddress(guest)));
            }
            // SAFETY: `offset + HUGE_PAGE <= len`: the piece lies inside the mapping.
            let piece = unsafe { host.add(offset) };
            if residency(piece, HUGE_PAGE, &mut map).is_err() || map.iter().any(|b| *b & 1 == 0) {
                continue;
            }
            report.huge_pages_scanned += 1;
            let freed = trim_huge_page(piece, &mut |offset, len| {
                given_back(GuestAddress(guest + offset as u64), len as u64)
            });
            if freed > 0 {
                report.huge_pages_trimmed += 1;
                report.freed_bytes += freed;
            }
        }
    }
    (report, None)
}

/// Trims one resident 2 MiB piece at `piece` (2 MiB aligned, inside guest memory) if it has
/// enough zero pages; returns the bytes given back.
fn trim_huge_page(piece: *mut u8, given_back: &mut dyn FnMut(usize, usize)) -> u64 {
    let mut zero = [false; PAGES_PER_HUGE_PAGE];
    for (i, z) in zero.iter_mut().enumerate() {
        // SAFETY: the page lies inside the piece, which is resident guest memory that nothing
        // writes while the trim runs (the caller's contract), so it can be read as words.
        let words =
            unsafe { std::slice::from_raw_parts(piece.add(i * PAGE).cast::<u64>(), PAGE / 8) };
        *z = words.iter().all(|w| *w == 0);
    }
    let zeroes = zero.iter().filter(|z| **z).count();
    if zeroes < TRIM_MIN_ZERO_PAGES {
        return 0;
    }
    let advise = |offset: usize, len: usize, advice: libc::c_int| {
        // SAFETY: `[piece + offset, + len)` lies inside the piece; these advices change paging
        // only, and the data they drop is zero pages, which read back as zero.
        if unsafe { libc::madvise(piece.add(offset).cast(), len, advice) } != 0 {
            tracing::debug!(
                "madvise({advice}) while trimming guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    };
    advise(0, HUGE_PAGE, libc::MADV_NOHUGEPAGE);
    let mut i = 0;
    while i < PAGES_PER_HUGE_PAGE {
        if !zero[i] {
            i += 1;
            continue;
        }
        let run = zero[i..].iter().take_while(|z| **z).count();
        advise(i * PAGE, run * PAGE, libc::MADV_DONTNEED);
        given_back(i * PAGE, run * PAGE);
        i += run;
    }
    advise(0, HUGE_PAGE, libc::MADV_COLD);
    (zeroes * PAGE) as u64
}

/// Asks for transparent huge pages behind guest memory: a guest's first touch of memory then
/// costs one fault per 2 MiB instead of per 4 KiB, and the host's page tables shrink. Advisory:
/// hosts with THP off keep 4 KiB pages.
fn advise_huge_pages(region: &GuestRegionMmap) {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    // SAFETY: madvise only changes the paging policy of this live mapping, which `region` owns;
    // it does not touch its contents.
    let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        tracing::debug!(
            "MADV_HUGEPAGE on guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn anonymous_ram_starts_on_a_2_mib_boundary_and_is_usable_to_its_last_byte() {
        for pages in [HugePages::None, HugePages::Transparent] {
            let mem = create_guest_memory((256 << 20) + (4 << 10), pages).unwrap();
            for region in mem.iter() {
                let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
                assert_eq!(host as usize % RAM_ALIGN, 0, "{pages:?}");
                let last =
                    vm_memory::Address::unchecked_add(&region.start_addr(), region.len() - 4);
                mem.write_obj(0x5eed_u32, last).unwrap();
                assert_eq!(mem.read_obj::<u32>(last).unwrap(), 0x5eed);
            }
        }
    }

    #[test]
    fn memory_is_split_around_the_gap_and_usable() {
        let mem = create_guest_memory(4 << 30, HugePages::None).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1_0000_0000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1_0000_0000)).unwrap(),
            0xdead_beef
        );
        assert!(
            mem.read_obj::<u32>(GuestAddress(0xd000_0000)).is_err(),
            "the gap is not RAM"
        );
    }

    #[test]
    fn shared_memory_is_one_memfd_another_process_can_map() {
        use std::os::unix::fs::FileExt;
        let mem = create_shared_guest_memory(4 << 30, HugePages::None).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let low = mem.iter().next().unwrap();
        let high = mem.iter().nth(1).unwrap();
        let (lo, hi) = (low.file_offset().unwrap(), high.file_offset().unwrap());
        // One file, the regions one after the other in it.
        assert_eq!(lo.start(), 0);
        assert_eq!(hi.start(), low.len());
        mem.write_obj(0x5eed_u32, GuestAddress(0x1_0000_0000))
            .unwrap();
        let mut word = [0u8; 4];
        hi.file().read_exact_at(&mut word, hi.start()).unwrap();
        assert_eq!(
            u32::from_le_bytes(word),
            0x5eed,
            "the file sees the guest's write"
        );
        // Nothing to trim: a page given back from a shared mapping would stay in the file.
        let (report, _) = trim_zero_pages(&mem, GuestAddress(0), u64::MAX, &mut |_, _| {});
        assert_eq!(report.huge_pages_scanned, 0);
    }

    #[test]
    fn resident_bytes_follow_touched_pages_and_hotplug_regions_map_lazily() {
        let mem = create_guest_memory(64 << 20, HugePages::None).unwrap();
        let before = resident_bytes(&mem);
        for page in 0..256u64 {
            mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = resident_bytes(&mem);
        assert!(after >= before + (1 << 20), "{before} -> {after}");

        let region = create_hotplug_region(4 << 30, 256 << 20, HugePages::None).unwrap();
        let with_region = mem.insert_region(std::sync::Arc::new(region)).unwrap();
        let resident = resident_bytes(&with_region);
        assert!(
            resident < after + (8 << 20),
            "untouched hotplug memory costs nothing: {resident}"
        );
    }

    /// Whether all of the 2 MiB piece of `mem` at guest address `addr` is resident.
    fn fully_resident(mem: &GuestMemoryMmap, addr: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut map = [0u8; PAGES_PER_HUGE_PAGE];
        residency(host, HUGE_PAGE, &mut map).unwrap();
        map.iter().all(|b| b & 1 != 0)
    }

    #[test]
    fn trim_gives_back_the_zero_pages_of_sparse_huge_pages_and_keeps_every_byte() {
        const MIB: u64 = 1 << 20;
        let mem = create_guest_memory(16 * MIB, HugePages::Transparent).unwrap();
        // Piece 0: one page written. Piece 1: every page written. Piece 2: 500 pages written.
        mem.write_obj(0x1111_u64, GuestAddress(0x1000)).unwrap();
        for page in 0..512u64 {
            mem.write_obj(page + 1, GuestAddress(2 * MIB + page * 4096))
                .unwrap();
        }
        for page in 0..500u64 {
            mem.write_obj(7u8, GuestAddress(4 * MIB + page * 4096 + 100))
                .unwrap();
        }
        let sparse_was_huge = fully_resident(&mem, 0);
        let before = resident_bytes(&mem);
        let mut ranges = Vec::new();
        let (report, next) = trim_zero_pages(&mem, GuestAddress(0), u64::MAX, &mut |a, n| {
            ranges.push((a.0, n))
        });
        assert_eq!(next, None);
        // What was told given back is what was freed, and none of it held data.
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), report.freed_bytes);
        assert!(
            ranges
                .iter()
                .all(|&(a, n)| !(a..a + n).contains(&0x1000) && a + n <= 2 * MIB),
            "{ranges:x?}"
        );
        let after = resident_bytes(&mem);

        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0x1111);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0);
        for page in 0..512u64 {
            let v: u64 = mem.read_obj(GuestAddress(2 * MIB + page * 4096)).unwrap();
            assert_eq!(v, page + 1);
        }
        for page in 0..500u64 {
            let v: u8 = mem
                .read_obj(GuestAddress(4 * MIB + page * 4096 + 100))
                .unwrap();
            assert_eq!(v, 7);
        }
        assert_eq!(
            before - after,
            report.freed_bytes,
            "what was given back is no longer resident"
        );
        if sparse_was_huge {
            // The one-page piece gives back 511 pages; the full one nothing; the one with 12
            // zero pages is not worth splitting.
            assert_eq!(report.huge_pages_trimmed, 1, "{report:?}");
            assert_eq!(report.freed_bytes, 511 * 4096, "{report:?}");
            assert!(!fully_resident(&mem, 0));
            assert!(fully_resident(&mem, 2 * MIB) && fully_resident(&mem, 4 * MIB));
            // In steps of one resident piece: the same result, a piece at a time.
            let mem = create_guest_memory(16 * MIB, HugePages::Transparent).unwrap();
            mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
            mem.write_obj(1u8, GuestAddress(8 * MIB)).unwrap();
            let (first, next) = trim_zero_pages(&mem, GuestAddress(0), 1, &mut |_, _| {});
            assert_eq!(
                (first.huge_pages_trimmed, next),
                (1, Some(GuestAddress(2 * MIB)))
            );
            let (second, next) = trim_zero_pages(&mem, next.unwrap(), 1, &mut |_, _| {});
            assert_eq!(
                (second.huge_pages_trimmed, next),
                (1, Some(GuestAddress(10 * MIB)))
            );
            let (rest, next) = trim_zero_pages(&mem, next.unwrap(), 1, &mut |_, _| {});
            assert_eq!((rest.huge_pages_scanned, next), (0, None));
        } else {
            // Without transparent huge pages (host THP off) nothing was brought in around the
            // written pages, so there is nothing to give back.
            assert_eq!(report.freed_bytes, 0, "{report:?}");
        }
    }

    #[test]
    fn a_short_hugetlbfs_pool_is_an_error_at_start_not_a_fault_later() {
        // Private (anonymous) and shared (memfd, for a vhost-user backend) alike.
        for create in [create_guest_memory, create_shared_guest_memory] {
            a_short_pool_is_an_error(create(4 << 20, HugePages::Hugetlbfs2M));
        }
    }

    fn a_short_pool_is_an_error(mem: Result<GuestMemoryMmap, MemoryError>) {
        match mem {
            Ok(mem) => {
                // This host has 2 MiB pages to spare: they back the memory.
                mem.write_obj(5u64, GuestAddress(0x20_0000)).unwrap();
                assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 5);
            }
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.starts_with("cannot reserve 4 MiB of 2 MiB pages (huge_pages \"2M\")"),
                    "{text}"
                );
                assert!(text.contains("vm.nr_hugepages"), "{text}");
            }
        }
    }

    #[test]
    fn unmappable_sizes_are_errors_not_panics() {
        let e = create_guest_memory(1 << 62, HugePages::None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot map 4398046511104 MiB of guest memory"),
            "{e}"
        );
    }
}
