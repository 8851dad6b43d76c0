//! The guest pages the virtio devices wrote since the last snapshot. KVM's dirty log holds only
//! the guest's own writes; a device writes through the VMM's mapping (a block read, a packet
//! received, a used ring entry), which KVM never sees. A Diff snapshot without these pages
//! restores a guest whose completed reads hold the data that was there before them.
//!
//! A virtio device writes guest memory only into the device-writable buffers of the chains it
//! returns and into the used ring, so returning a chain ([`DeviceWrites::mark_used`]) marks
//! exactly those; no device needs to know about it.

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

const PAGE: u64 = 4096;
/// `struct virtq_used`: flags and idx, then one 8-byte element per entry, then avail_event.
const USED_HEADER: u64 = 4;
const USED_ELEM: u64 = 8;

struct Region {
    start: u64,
    len: u64,
    /// One bit per page, as KVM's dirty log.
    pages: Vec<AtomicU64>,
}

/// One page bitmap per guest memory region, in the memory's region order; empty (marking
/// nothing) where no Diff snapshot will be asked for.
#[derive(Default)]
pub struct DeviceWrites {
    regions: Vec<Region>,
}

impl DeviceWrites {
    /// Bitmaps for every region of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| Region {
                start: r.start_addr().0,
                len: r.len(),
                pages: (0..r.len().div_ceil(PAGE).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            })
            .collect();
        Self { regions }
    }

    /// Marks the pages of `[addr, addr + len)` that lie in guest memory.
    pub fn mark(&self, addr: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.0.saturating_add(len);
        for r in &self.regions {
            let from = addr.0.max(r.start);
            let to = end.min(r.start + r.len);
            if from >= to {
                continue;
            }
            for page in (from - r.start) / PAGE..=(to - 1 - r.start) / PAGE {
                r.pages[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    /// Marks what returning chain `head` of `queue` lets the device have written: every
    /// device-writable buffer of the chain (through an indirect table too) and the used ring. The
    /// chain is the driver's: a descriptor that cannot be read, or a chain longer than its table,
    /// ends the walk (the device already refused or served such a chain).
    pub fn mark_used(&self, mem: &GuestMemoryMmap, queue: &Queue, head: u16) {
        if self.regions.is_empty() {
            return;
        }
        let size = u64::from(queue.size());
        self.mark(
            GuestAddress(queue.used_ring()),
            USED_HEADER + USED_ELEM * size + 2,
        );
        let mut table = GuestAddress(queue.desc_table());
        let mut entries = size;
        let mut index = u64::from(head);
        let mut budget = entries;
        let mut indirect = false;
        while index < entries && budget > 0 {
            budget -= 1;
            let Some(at) = table.checked_add(index * 16) else {
                return;
            };
            let Ok(d) = mem.read_obj::<Descriptor>(at) else {
                return;
            };
            if d.refers_to_indirect_table() && !indirect {
                indirect = true;
                table = d.addr();
                entries = u64::from(d.len()) / 16;
                budget = entries;
                index = 0;
                continue;
            }
            if d.is_write_only() {
                self.mark(d.addr(), u64::from(d.len()));
            }
            if !d.has_next() {
                return;
            }
            index = u64::from(d.next());
        }
    }

    /// The marked pages per region, as KVM's dirty log gives them, and clears them: the next
    /// snapshot holds what the devices wrote after this one.
    pub fn take(&self) -> Vec<Vec<u64>> {
        self.regions
            .iter()
            .map(|r| {
                r.pages
                    .iter()
                    .map(|w| w.swap(0, Ordering::Relaxed))
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{DriverQueue, INDIRECT, NEXT, WRITE};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap()
    }

    /// The marked pages as (region, page).
    fn pages(bits: &[Vec<u64>]) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (r, words) in bits.iter().enumerate() {
            for (i, w) in words.iter().enumerate() {
                for b in 0..64 {
                    if w & (1 << b) != 0 {
                        out.push((r, (i * 64 + b) as u64));
                    }
                }
            }
        }
        out
    }

    /// The pages of the used ring of a 16-entry queue at 0 (one page: the tables come first).
    fn used_pages(q: &Queue) -> Vec<(usize, u64)> {
        let first = q.used_ring() / PAGE;
        let last = (q.used_ring() + USED_HEADER + USED_ELEM * 16 + 1) / PAGE;
        (first..=last).map(|p| (0, p)).collect()
    }

    #[test]
    fn marks_the_pages_of_a_range_in_each_region_and_take_clears_them() {
        let mem = mem();
        let w = DeviceWrites::new(&mem);
        // Across a page boundary, past the end of the first region into the hole, outside.
        w.mark(GuestAddress(0x1ff0), 0x20);
        w.mark(GuestAddress(0xf_f000), 0x2000);
        w.mark(GuestAddress(0x20_0000), 1);
        w.mark(GuestAddress(0x50_0000), 0x1000);
        w.mark(GuestAddress(0x3000), 0);
        assert_eq!(pages(&w.take()), [(0, 1), (0, 2), (0, 255), (1, 0)]);
        assert_eq!(pages(&w.take()), []);
        // Without regions (no Diff wanted) nothing is marked.
        let none = DeviceWrites::default();
        none.mark(GuestAddress(0), 0x1000);
        assert!(none.take().is_empty());
    }

    #[test]
    fn a_returned_chain_marks_its_writable_buffers_and_the_used_ring() {
        let mem = mem();
        let mut d = DriverQueue::new(&mem, GuestAddress(0), 16);
        // A read-only header, a writable data buffer over two pages, a writable status byte.
        d.add_chain(&[
            (0x8_0000, 16, 0),
            (0x9_0800, 0x1000, WRITE),
            (0xa_0000, 1, WRITE),
        ]);
        let q = d.queue();
        let w = DeviceWrites::new(&mem);
        w.mark_used(&mem, &q, 0);
        let mut want = vec![(0, 0x90), (0, 0x91), (0, 0xa0)];
        want.extend(used_pages(&q));
        want.sort();
        assert_eq!(pages(&w.take()), want);
    }

    #[test]
    fn an_indirect_table_is_followed_and_a_looping_chain_ends() {
        let mem = mem();
        let d = DriverQueue::new(&mem, GuestAddress(0), 16);
        let table = GuestAddress(0xc_0000);
        // The second entry points at itself: the walk stops at the table's size.
        let inner = [
            Descriptor::new(0x4_0000, 16, NEXT, 1),
            Descriptor::new(0x5_0000, 0x100, WRITE | NEXT, 1),
        ];
        for (i, desc) in inner.iter().enumerate() {
            mem.write_obj(*desc, table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        d.store_raw(0, table.0, 32, INDIRECT, 0);
        // A looping direct chain, too.
        d.store_raw(1, 0x6_0000, 8, WRITE | NEXT, 1);
        let q = d.queue();
        let w = DeviceWrites::new(&mem);
        w.mark_used(&mem, &q, 0);
        w.mark_used(&mem, &q, 1);
        let mut want = vec![(0, 0x50), (0, 0x60)];
        want.extend(used_pages(&q));
        want.sort();
        assert_eq!(pages(&w.take()), want);
    }
}
