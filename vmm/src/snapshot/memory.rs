//! Guest memory in its own file: the regions one after another in guest address order (RAM
//! below the MMIO gap, RAM above it, the hotplug region), pages the guest never populated left
//! as holes. A restore maps the file privately: nothing is read until the guest touches it, and
//! what the guest writes stays in the process.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

pub const PAGE: u64 = 4096;

/// Errors of writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write guest memory to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the memory file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the memory file {path} is {len} bytes; the snapshot's guest memory needs {need}: it is \
         truncated or belongs to another snapshot"
    )]
    TooShort { path: String, len: u64, need: u64 },
    #[error("cannot map {len} bytes of the memory file {path} at offset {offset}: {source}")]
    Map {
        path: String,
        offset: u64,
        len: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("the snapshot's memory regions overlap or do not fit: {0}")]
    Layout(String),
}

/// Where one region of guest memory lies in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The regions of `mem` as the memory file holds them.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<RegionLayout> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let l = RegionLayout {
                guest_addr: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            l
        })
        .collect()
}

/// The file size a layout needs.
pub fn file_len(layout: &[RegionLayout]) -> u64 {
    layout
        .iter()
        .map(|r| r.file_offset + r.len)
        .max()
        .unwrap_or(0)
}

/// One bit per 4 KiB page of a region: the pages a snapshot writes.
pub type PageBitmap = Vec<u64>;

pub fn empty_bitmap(len: u64) -> PageBitmap {
    vec![0; (len / PAGE).div_ceil(64) as usize]
}

fn set_bit(bitmap: &mut [u64], page: u64) {
    bitmap[(page / 64) as usize] |= 1 << (page % 64);
}

fn host_ptr(region: &GuestRegionMmap) -> *mut u8 {
    region
        .get_host_address(MemoryRegionAddress(0))
        .expect("an mmap region always has a host address")
}

/// Pages of `region` whose content is not known to be zero: those in host memory now (mincore)
/// and, for a region mapped from an earlier snapshot's file, those with data in that file.
/// Without swap every other page is zero; with swap (mincore does not see swapped pages) every
/// page counts.
pub fn populated_pages(region: &GuestRegionMmap, swap: bool) -> std::io::Result<PageBitmap> {
    let len = region.len();
    let pages = len / PAGE;
    let mut bitmap = empty_bitmap(len);
    if swap {
        (0..pages).for_each(|p| set_bit(&mut bitmap, p));
        return Ok(bitmap);
    }
    let mut vec = vec![0u8; pages as usize];
    // SAFETY: mincore only reads the page tables of this live mapping, which `region` owns, and
    // writes one byte per page into `vec`, sized for it.
    if unsafe { libc::mincore(host_ptr(region).cast(), len as usize, vec.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for (p, v) in vec.iter().enumerate() {
        if v & 1 != 0 {
            set_bit(&mut bitmap, p as u64);
        }
    }
    if let Some(f) = region.file_offset() {
        for (start, end) in data_extents(f.file(), f.start(), f.start() + len)? {
            for p in (start - f.start()) / PAGE..(end - f.start()).div_ceil(PAGE) {
                set_bit(&mut bitmap, p);
            }
        }
    }
    Ok(bitmap)
}

/// Ranges of `file` within `[from, to)` that hold data (not holes), by SEEK_DATA/SEEK_HOLE.
pub fn data_extents(file: &File, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        // SAFETY: lseek on an fd this function borrows; it moves only the file position.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= to {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(to);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// Whether the host swaps: mincore cannot see swapped-out pages.
pub fn host_swaps() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .map(|s| s.lines().count() > 1)
        .unwrap_or(true)
}

/// What a memory file leaves out of the pages it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPages {
    /// Written like any other: a Diff's zero page must overwrite what its base holds there.
    Write,
    /// Left as holes, which read zero: in a Full snapshot they cost neither the write nor the
    /// disk. Transparent huge pages make every 2 MiB the guest touched resident, mostly zeroes.
    Skip,
}

/// Whether the page at `page` reads all zero.
///
/// # Safety
/// `page` points at `PAGE` readable, 8-byte aligned bytes of live guest memory.
unsafe fn zero_page(page: *const u8) -> bool {
    // SAFETY: the caller's contract; guest memory is plain bytes.
    let words = unsafe { std::slice::from_raw_parts(page.cast::<u64>(), PAGE as usize / 8) };
    words.iter().all(|w| *w == 0)
}

/// Writes the pages `bitmaps` select (one bitmap per region, in `mem`'s order) to `file` at the
/// regions' offsets, zero ones as `zero` says; the file gets the layout's full length, the rest
/// holes. Returns the bytes written.
pub fn write_pages(
    mem: &GuestMemoryMmap,
    bitmaps: &[PageBitmap],
    zero: ZeroPages,
    file: &File,
    path: &str,
) -> Result<u64, MemoryFileError> {
    let err = |source| MemoryFileError::Write {
        path: path.to_string(),
        source,
    };
    let layout = layout(mem);
    file.set_len(file_len(&layout)).map_err(err)?;
    let mut written = 0;
    for ((region, l), bitmap) in mem.iter().zip(&layout).zip(bitmaps) {
        let base = host_ptr(region);
        let pages = l.len / PAGE;
        let bit = |p: u64| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0;
        // SAFETY: callers pass pages below `pages`, inside the region's live mapping, which is
        // page aligned; the guest is paused.
        let skipped =
            |p: u64| zero == ZeroPages::Skip && unsafe { zero_page(base.add((p * PAGE) as usize)) };
        let mut page = 0;
        while page < pages {
            if !bit(page) {
                // Skip clear words whole.
                if bitmap[(page / 64) as usize] == 0 {
                    page = (page / 64 + 1) * 64;
                } else {
                    page += 1;
                }
                continue;
            }
            if skipped(page) {
                page += 1;
                continue;
            }
            let start = page;
            while page < pages && bit(page) && !skipped(page) {
                page += 1;
            }
            let (off, len) = (start * PAGE, (page - start) * PAGE);
            // SAFETY: [off, off + len) lies inside the region's live mapping (pages < region
            // length / PAGE); the guest is paused, and guest memory is plain bytes.
            let bytes = unsafe { std::slice::from_raw_parts(base.add(off as usize), len as usize) };
            file.write_all_at(bytes, l.file_offset + off).map_err(err)?;
            written += len;
        }
    }
    Ok(written)
}

/// Merges a Diff snapshot's memory file onto its base (Firecracker's `snapshot-editor
/// edit-memory rebase`): every range with data in `diff` is copied into `base` at the same
/// offset. Returns the bytes copied.
pub fn rebase(base: &File, diff: &File) -> std::io::Result<u64> {
    let len = diff.metadata()?.len();
    if base.metadata()?.len() < len {
        base.set_len(len)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for (start, end) in data_extents(diff, 0, len)? {
        let mut at = start;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            diff.read_exact_at(&mut buf[..n], at)?;
            base.write_all_at(&buf[..n], at)?;
            at += n as u64;
            copied += n as u64;
        }
    }
    base.sync_data()?;
    Ok(copied)
}

/// Maps every region of `layout` from `file` privately and lazily: a page is read from the file
/// (through the page cache) when first touched, and copied when first written.
pub fn map_file(
    file: &File,
    path: &str,
    layout: &[RegionLayout],
) -> Result<Vec<GuestRegionMmap>, MemoryFileError> {
    let len = file
        .metadata()
        .map_err(|source| MemoryFileError::Read {
            path: path.to_string(),
            source,
        })?
        .len();
    let need = file_len(layout);
    if len < need {
        // Touching a page past the end would be SIGBUS in the VMM, not a guest error.
        return Err(MemoryFileError::TooShort {
            path: path.to_string(),
            len,
            need,
        });
    }
    layout
        .iter()
        .map(|l| {
            let map_err = |source| MemoryFileError::Map {
                path: path.to_string(),
                offset: l.file_offset,
                len: l.len,
                source,
            };
            let size = usize::try_from(l.len)
                .map_err(|_| MemoryFileError::Layout(format!("{} bytes", l.len)))?;
            let dup = file.try_clone().map_err(|source| MemoryFileError::Read {
                path: path.to_string(),
                source,
            })?;
            let mapping = MmapRegionBuilder::new(size)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(dup, l.file_offset))
                .build()
                .map_err(map_err)?;
            GuestRegionMmap::new(mapping, GuestAddress(l.guest_addr)).ok_or_else(|| {
                MemoryFileError::Layout(format!("region at {:#x} overflows", l.guest_addr))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// A test's own directory, removed when the test ends (memory files are megabytes).
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("prescient-memfile-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, name: &str) -> std::path::PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn written_pages_come_back_through_a_private_lazy_mapping() {
        // Transparent huge pages (the default) make whole 2 MiB pieces resident around the two
        // values: a Full snapshot writes only the pages that hold data.
        let mem = crate::vstate::memory::create_guest_memory(
            64 << 20,
            crate::vmm_config::HugePages::Transparent,
        )
        .unwrap();
        mem.write_obj(0x1122_3344_u32, GuestAddress(0x5000))
            .unwrap();
        mem.write_obj(0xabcd_u16, GuestAddress((40 << 20) + 12))
            .unwrap();
        let bitmaps: Vec<_> = mem
            .iter()
            .map(|r| populated_pages(r, false).unwrap())
            .collect();
        let dir = TempDir::new("full");
        let path = dir.path("full.mem");
        let file = File::create(&path).unwrap();
        let resident: u64 = bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()) * PAGE)
            .sum();
        let every = File::create(dir.path("resident.mem")).unwrap();
        let written = write_pages(&mem, &bitmaps, ZeroPages::Write, &every, "resident.mem");
        assert_eq!(written.unwrap(), resident);
        let written = write_pages(&mem, &bitmaps, ZeroPages::Skip, &file, "full.mem").unwrap();
        assert_eq!(written, 2 * PAGE);
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);

        let file = File::open(&path).unwrap();
        let l = layout(&mem);
        let regions = map_file(&file, "full.mem", &l).unwrap();
        let restored = GuestMemoryMmap::from_regions(regions).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            restored
                .read_obj::<u16>(GuestAddress((40 << 20) + 12))
                .unwrap(),
            0xabcd
        );
        // Writes stay private: the file keeps what the snapshot saved.
        restored.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x5000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1122_3344);
        // Its populated pages include the file's data though the guest has not touched them.
        let again = populated_pages(restored.iter().next().unwrap(), false).unwrap();
        assert!(again[(40 << 20) / PAGE as usize / 64] != 0);
    }

    #[test]
    fn a_diff_rebased_onto_its_base_has_both_layers() {
        let dir = TempDir::new("rebase");
        let (base_path, diff_path) = (dir.path("base.mem"), dir.path("diff.mem"));
        let base = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&base_path)
            .unwrap();
        base.set_len(16 * PAGE).unwrap();
        base.write_all_at(&[1; 4096], 2 * PAGE).unwrap();
        base.write_all_at(&[2; 4096], 5 * PAGE).unwrap();
        let diff = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&diff_path)
            .unwrap();
        diff.set_len(16 * PAGE).unwrap();
        diff.write_all_at(&[3; 4096], 5 * PAGE).unwrap();
        diff.write_all_at(&[4; 4096], 9 * PAGE).unwrap();
        let copied = rebase(&base, &diff).unwrap();
        assert!(copied >= 2 * PAGE, "{copied}");
        let page = |n: u64| {
            let mut b = [0u8; 1];
            base.read_exact_at(&mut b, n * PAGE).unwrap();
            b[0]
        };
        assert_eq!([page(2), page(5), page(9), page(7)], [1, 3, 4, 0]);
    }

    #[test]
    fn the_idle_trim_leaves_memory_restored_from_a_file_alone() {
        // The file holds data everywhere; the guest then zeroes all but the first page. Given
        // back, the zeroed pages would read the file's data again.
        const LEN: u64 = 4 << 20;
        let dir = TempDir::new("trim");
        let path = dir.path("trim.mem");
        std::fs::write(&path, vec![0xa5u8; LEN as usize]).unwrap();
        let file = File::open(&path).unwrap();
        let l = [RegionLayout {
            guest_addr: 0,
            len: LEN,
            file_offset: 0,
        }];
        let mem = GuestMemoryMmap::from_regions(map_file(&file, "trim.mem", &l).unwrap()).unwrap();
        for page in 1..LEN / PAGE {
            mem.write_slice(&[0u8; PAGE as usize], GuestAddress(page * PAGE))
                .unwrap();
        }
        let (report, _) =
            crate::vstate::memory::trim_zero_pages(&mem, GuestAddress(0), u64::MAX, &mut |_, _| {});
        assert_eq!(report.freed_bytes, 0, "{report:?}");
        for page in 1..LEN / PAGE {
            let v: u64 = mem.read_obj(GuestAddress(page * PAGE)).unwrap();
            assert_eq!(v, 0, "page {page}");
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0xa5);
    }

    #[test]
    fn a_short_memory_file_is_refused_before_it_is_mapped() {
        let dir = TempDir::new("short");
        let path = dir.path("short.mem");
        let file = File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        let l = [RegionLayout {
            guest_addr: 0,
            len: 2 << 20,
            file_offset: 0,
        }];
        let e = map_file(&file, "short.mem", &l).unwrap_err();
        assert!(matches!(e, MemoryFileError::TooShort { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
