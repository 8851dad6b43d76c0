//! Guest RAM: anonymous host mappings laid out around the 32-bit MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// Errors of creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{mib} MiB does not fit in this host's address space")]
    TooLarge { mib: u64 },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `mem_bytes` of guest RAM. Pages are reserved lazily (MAP_NORESERVE), so the host only
/// pays for what the guest touches.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = mem_bytes >> 20;
    let ranges = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| Ok((GuestAddress(start), usize::try_from(len)?)))
        .collect::<Result<Vec<_>, std::num::TryFromIntError>>()
        .map_err(|_| MemoryError::TooLarge { mib })?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_split_around_the_gap_and_usable() {
        let mem = create_guest_memory(4 << 30).unwrap();
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
    fn unmappable_sizes_are_errors_not_panics() {
        let e = create_guest_memory(1 << 62).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot map 4398046511104 MiB of guest memory"),
            "{e}"
        );
    }
}
