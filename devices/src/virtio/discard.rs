//! Gives guest pages back to the host: the balloon's inflated and reported pages, and virtio-mem's
//! unplugged blocks. Guest RAM is private anonymous memory, so MADV_DONTNEED frees the pages at
//! once and a later guest access finds zeroes; shared guest memory (a memfd, when a vhost-user
//! backend maps it too) keeps its pages in the file under MADV_DONTNEED, so there MADV_REMOVE
//! frees them (a hole in the file, which reads as zeroes in every mapping). Memory backed by 2 MiB hugetlbfs pages can only
//! give back whole huge pages: the part of a range that covers one.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The unit of discarding (and of balloon page frame numbers).
pub const PAGE_SIZE: u64 = 4096;

/// Why a range could not be given back.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("range {addr:#x}+{len:#x} is not page-aligned")]
    Misaligned { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not all guest RAM")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("madvise (MADV_DONTNEED or, shared, MADV_REMOVE) of guest range {addr:#x}+{len:#x}: {source}")]
    Madvise {
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// hugetlbfs pages (2 MiB) can only be given back whole.
const HUGETLB_PAGE: usize = 2 << 20;

/// One region's part of a range: where it is mapped, how long, whether hugetlbfs backs it and
/// whether the mapping is shared.
type Piece = (*mut u8, usize, bool, bool);

/// The host pieces of `[addr, addr + len)`, one per memory region it crosses, or None if any byte
/// of it is not guest memory.
fn host_pieces(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut cur = addr;
    let end = addr.checked_add(len)?;
    while cur < end {
        let region = mem.find_region(GuestAddress(cur))?;
        let offset = region.to_region_addr(GuestAddress(cur))?;
        let n = (region.len() - offset.0).min(end - cur);
        let host = region.get_host_address(offset).ok()?;
        let hugetlb = region.is_hugetlbfs() == Some(true);
        let shared = region.flags() & libc::MAP_SHARED != 0;
        pieces.push((host, usize::try_from(n).ok()?, hugetlb, shared));
        cur += n;
    }
    Some(pieces)
}

/// The whole 2 MiB pages inside `[host, host + n)`, as (start, length); None if there are none.
fn whole_huge_pages(host: *mut u8, n: usize) -> Option<(*mut u8, usize)> {
    let start = (host as usize).next_multiple_of(HUGETLB_PAGE);
    let end = (host as usize + n) / HUGETLB_PAGE * HUGETLB_PAGE;
    (end > start).then(|| (host.wrapping_add(start - host as usize), end - start))
}

/// Frees the host pages behind `[addr, addr + len)` of guest memory. The whole range is checked
/// before anything is freed, so a bad range frees nothing.
pub fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), DiscardError> {
    let addr = addr.0;
    if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Misaligned { addr, len });
    }
    let pieces = host_pieces(mem, addr, len).ok_or(DiscardError::OutsideMemory { addr, len })?;
    for (host, n, hugetlb, shared) in pieces {
        let (host, n) = if hugetlb {
            match whole_huge_pages(host, n) {
                Some(whole) => whole,
                // Nothing the host could take back; the guest still gave the range up.
                None => continue,
            }
        } else {
            (host, n)
        };
        let advice = if shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: `host..host + n` lies inside one live guest memory mapping (checked above).
        // Either advice only drops its pages; the mapping stays valid and reads as zeroes, which
        // is what the guest agreed to when it gave the pages up.
        if unsafe { libc::madvise(host.cast(), n, advice) } != 0 {
            return Err(DiscardError::Madvise {
                addr,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn discarded_pages_read_zero_and_bad_ranges_free_nothing() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        for a in [0x1000u64, 0x2000, 0xf_f000, 0x20_0000] {
            mem.write_obj(0xabcd_u64, GuestAddress(a)).unwrap();
        }
        discard(&mem, GuestAddress(0x1000), 0x1000).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0xabcd);

        // Crosses the hole between the regions: refused as a whole.
        let e = discard(&mem, GuestAddress(0xf_f000), 0x10_2000).unwrap_err();
        assert!(matches!(e, DiscardError::OutsideMemory { .. }), "{e}");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xf_f000)).unwrap(), 0xabcd);
        let e = discard(&mem, GuestAddress(0x1800), 0x1000).unwrap_err();
        assert!(matches!(e, DiscardError::Misaligned { .. }), "{e}");
        let e = discard(&mem, GuestAddress(!0xfff), 0x2000).unwrap_err();
        assert!(matches!(e, DiscardError::OutsideMemory { .. }), "{e}");
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(),
            0xabcd
        );
    }

    #[test]
    fn shared_memory_gives_its_pages_back_to_the_host_too() {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::FileExt;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"discard_test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(0x10_0000).unwrap();
        let reader = file.try_clone().unwrap();
        let at = vm_memory::FileOffset::new(file, 0);
        let mem =
            GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), 0x10_0000, Some(at))])
                .unwrap();
        mem.write_obj(0xabcd_u64, GuestAddress(0x3000)).unwrap();
        let blocks = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks()
        };
        assert!(blocks(&reader) > 0);
        discard(&mem, GuestAddress(0x3000), 0x1000).unwrap();
        assert_eq!(blocks(&reader), 0, "the page went back to the host");
        let mut word = [0xffu8; 8];
        reader.read_exact_at(&mut word, 0x3000).unwrap();
        assert_eq!(word, [0; 8], "the file has a hole there");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
    }

    #[test]
    fn hugetlbfs_memory_gives_back_only_the_whole_huge_pages_of_a_range() {
        let base = 0x4000_0000usize as *mut u8;
        let at = |off: usize| base.wrapping_add(off);
        assert_eq!(whole_huge_pages(at(4096), 4096), None);
        assert_eq!(whole_huge_pages(at(4096), 2 << 20), None);
        assert_eq!(
            whole_huge_pages(at(4096), 4 << 20),
            Some((at(2 << 20), 2 << 20))
        );
        assert_eq!(whole_huge_pages(base, 4 << 20), Some((base, 4 << 20)));
    }
}
