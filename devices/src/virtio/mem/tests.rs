//! virtio-mem over real descriptor chains: plugging, unplugging, slot mapping and every kind of
//! request the device must refuse.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestMemoryBackend, GuestRegionMmap};

use super::*;
use crate::virtio::{VirtioInterrupt, INTERRUPT_CONFIG_CHANGE};

const MIB: u64 = 1 << 20;
/// 8 blocks of 1 MiB in 2 slots of 4 MiB.
const BASE: u64 = 0x1000_0000;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x10_1000;

/// Records what the device maps and unmaps; can be told to fail.
#[derive(Clone, Default)]
struct FakeSlots {
    present: Arc<Mutex<Vec<bool>>>,
    calls: Arc<Mutex<Vec<(usize, bool)>>>,
    fail: Arc<Mutex<bool>>,
}

impl HotplugSlots for FakeSlots {
    fn set_present(&mut self, slot: usize, present: bool) -> std::io::Result<()> {
        if *self.fail.lock().unwrap() {
            return Err(std::io::Error::other("refused"));
        }
        self.calls.lock().unwrap().push((slot, present));
        self.present.lock().unwrap()[slot] = present;
        Ok(())
    }
}

fn layout() -> MemLayout {
    MemLayout::new(BASE, 8 * MIB, MIB, 4 * MIB).unwrap()
}

fn memory() -> GuestMemoryMmap {
    let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * MIB as usize)]).unwrap();
    let region = GuestRegionMmap::from_range(GuestAddress(BASE), 8 * MIB as usize, None).unwrap();
    boot.insert_region(Arc::new(region)).unwrap()
}

struct Rig<'a> {
    dev: VirtioMem,
    slots: FakeSlots,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    sent: u16,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let slots = FakeSlots::default();
        *slots.present.lock().unwrap() = vec![false; 2];
        let mut dev = VirtioMem::new(layout(), Box::new(slots.clone())).unwrap();
        let mock = MockSplitQueue::new(mem, 32);
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![mock.create_queue().unwrap()],
            acked_features: dev.avail_features(),
            interrupt: Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            writes: Arc::default(),
        })
        .unwrap();
        Rig {
            dev,
            slots,
            mock,
            mem,
            sent: 0,
        }
    }

    /// Sends `raw` as a request with a response buffer of `resp_len` bytes; returns the used
    /// length and the response type and state.
    fn send_raw(&mut self, raw: &[u8], resp_len: u32) -> (u32, u16, u16) {
        self.mem.write_slice(raw, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xff; 16], GuestAddress(RESP))
            .unwrap();
        let at = (self.sent * 2) % 32;
        let chain = [
            RawDescriptor::from(SplitDescriptor::new(REQ, raw.len() as u32, 1, at + 1)),
            RawDescriptor::from(SplitDescriptor::new(RESP, resp_len, 2, 0)),
        ];
        self.mock.add_desc_chains(&chain, at).unwrap();
        self.dev.process_queue();
        let used = self
            .mock
            .used()
            .ring()
            .ref_at(self.sent as usize)
            .unwrap()
            .load();
        self.sent += 1;
        let kind: u16 = self.mem.read_obj(GuestAddress(RESP)).unwrap();
        let state: u16 = self.mem.read_obj(GuestAddress(RESP + 8)).unwrap();
        (used.len(), kind, state)
    }

    fn send(&mut self, req: MemRequest) -> (u16, u16) {
        let (len, kind, state) = self.send_raw(&req.encode(), 16);
        assert_eq!(len, RESPONSE_SIZE as u32);
        (kind, state)
    }

    fn present(&self) -> Vec<bool> {
        self.slots.present.lock().unwrap().clone()
    }
}

fn range(block: u64, n: u16) -> BlockRange {
    BlockRange {
        addr: BASE + block * MIB,
        nb_blocks: n,
    }
}

const ACK: u16 = 0;
const NACK: u16 = 1;
const ERROR: u16 = 3;

#[test]
fn layouts_that_cannot_work_are_refused() {
    assert!(MemLayout::new(BASE, 8 * MIB, 3 * MIB, 6 * MIB).is_err());
    assert!(MemLayout::new(BASE, 8 * MIB, 2048, 4 * MIB).is_err());
    assert!(MemLayout::new(BASE, 8 * MIB, MIB, 3 * MIB / 2).is_err());
    assert!(MemLayout::new(BASE, 6 * MIB, MIB, 4 * MIB).is_err());
    assert!(MemLayout::new(BASE + MIB, 8 * MIB, MIB, 4 * MIB).is_err());
    assert!(MemLayout::new(u64::MAX - 4 * MIB + 1, 8 * MIB, MIB, 4 * MIB).is_err());
    assert!(MemLayout::new(BASE, 0, MIB, 4 * MIB).is_err());
}

#[test]
fn plugging_maps_slots_only_up_to_the_requested_size() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    assert_eq!(rig.send(MemRequest::Plug(range(0, 1))), (NACK, 0));
    rig.dev.set_requested_bytes(5 * MIB).unwrap();
    assert_eq!(
        rig.dev.active.as_ref().unwrap().interrupt.status() & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(rig.send(MemRequest::Plug(range(0, 2))), (ACK, 0));
    assert_eq!(rig.present(), vec![true, false]);
    assert_eq!(rig.send(MemRequest::Plug(range(3, 2))), (ACK, 0));
    assert_eq!(rig.present(), vec![true, true]);
    // One more block would pass the requested 5 MiB.
    assert_eq!(rig.send(MemRequest::Plug(range(5, 2))), (NACK, 0));
    assert_eq!(rig.dev.plugged_bytes(), 4 * MIB);
    assert_eq!(rig.send(MemRequest::Plug(range(2, 1))), (ACK, 0));
    assert_eq!(rig.dev.plugged_bytes(), 5 * MIB);
    assert_eq!(
        *rig.slots.calls.lock().unwrap(),
        vec![(0, true), (1, true)],
        "a slot is mapped once, when its first block is plugged"
    );

    let mut config = [0u8; 8];
    rig.dev.read_config(40, &mut config);
    assert_eq!(u64::from_le_bytes(config), 5 * MIB);
    rig.dev.read_config(48, &mut config);
    assert_eq!(u64::from_le_bytes(config), 5 * MIB);
    assert_eq!(rig.send(MemRequest::State(range(0, 3))), (ACK, 0));
    assert_eq!(rig.send(MemRequest::State(range(4, 2))), (ACK, 2));
    assert_eq!(rig.send(MemRequest::State(range(5, 3))), (ACK, 1));
}

#[test]
fn unplugging_discards_memory_and_unmaps_empty_slots() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev.set_requested_bytes(8 * MIB).unwrap();
    assert_eq!(rig.send(MemRequest::Plug(range(0, 8))), (ACK, 0));
    for b in 0..8 {
        mem.write_obj(0x99_u64, GuestAddress(BASE + b * MIB))
            .unwrap();
    }
    assert_eq!(rig.send(MemRequest::Unplug(range(4, 3))), (ACK, 0));
    assert_eq!(rig.present(), vec![true, true]);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(BASE + 4 * MIB)).unwrap(),
        0
    );
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(BASE + 7 * MIB)).unwrap(),
        0x99
    );
    assert_eq!(rig.send(MemRequest::Unplug(range(7, 1))), (ACK, 0));
    assert_eq!(rig.present(), vec![true, false]);
    assert_eq!(rig.send(MemRequest::UnplugAll), (ACK, 0));
    assert_eq!(rig.present(), vec![false, false]);
    assert_eq!(rig.dev.plugged_bytes(), 0);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(BASE)).unwrap(), 0);
    let a = rig.dev.activity();
    assert_eq!((a.plugged_requests, a.unplugged_requests), (1, 3));
}

#[test]
fn invalid_requests_get_error_and_change_nothing() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev.set_requested_bytes(8 * MIB).unwrap();
    assert_eq!(rig.send(MemRequest::Plug(range(0, 2))), (ACK, 0));
    let bad = [
        MemRequest::Plug(range(1, 2)),   // block 1 already plugged
        MemRequest::Unplug(range(1, 2)), // block 2 not plugged
        MemRequest::Plug(range(7, 2)),   // past the end
        MemRequest::Plug(BlockRange {
            addr: BASE + MIB / 2, // misaligned
            nb_blocks: 1,
        }),
        MemRequest::Plug(BlockRange {
            addr: BASE - MIB, // below the region
            nb_blocks: 1,
        }),
        MemRequest::Plug(range(2, 0)), // no blocks
        MemRequest::Plug(BlockRange {
            addr: u64::MAX - MIB + 1, // overflow
            nb_blocks: u16::MAX,
        }),
        MemRequest::State(range(8, 1)),
        MemRequest::Unknown(9),
    ];
    for req in bad {
        assert_eq!(rig.send(req), (ERROR, 0), "{req:?}");
    }
    assert_eq!(rig.dev.plugged_bytes(), 2 * MIB);
    assert_eq!(rig.present(), vec![true, false]);
    assert_eq!(rig.dev.activity().errors, bad.len() as u64);

    // Too short to hold a request: ERROR if there is room for the answer.
    let (len, kind, _) = rig.send_raw(&[0u8; 8], 16);
    assert_eq!((len, kind), (RESPONSE_SIZE as u32, ERROR));
    // No room for the answer: returned unused.
    let (len, _, _) = rig.send_raw(&MemRequest::Plug(range(4, 1)).encode(), 4);
    assert_eq!(len, 0);
    assert_eq!(
        rig.dev.plugged_bytes(),
        3 * MIB,
        "the request itself was served"
    );
    assert_eq!(
        rig.dev.counters.invalid_requests.load(Ordering::Relaxed),
        bad.len() as u64 + 2
    );
}

#[test]
fn a_slot_that_cannot_be_mapped_fails_the_plug_and_is_rolled_back() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.dev.set_requested_bytes(8 * MIB).unwrap();
    *rig.slots.fail.lock().unwrap() = true;
    assert_eq!(rig.send(MemRequest::Plug(range(0, 8))), (ERROR, 0));
    assert_eq!(rig.dev.plugged_bytes(), 0);
    assert_eq!(rig.dev.counters.io_errors.load(Ordering::Relaxed), 1);
    *rig.slots.fail.lock().unwrap() = false;
    assert_eq!(rig.send(MemRequest::Plug(range(0, 8))), (ACK, 0));
}

#[test]
fn requested_sizes_must_be_whole_blocks_inside_the_region() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    assert!(rig.dev.set_requested_bytes(MIB / 2).is_err());
    assert!(rig.dev.set_requested_bytes(9 * MIB).is_err());
    rig.dev.set_requested_bytes(3 * MIB).unwrap();
    assert_eq!(rig.dev.config_generation(), 1);
    rig.dev.set_requested_bytes(3 * MIB).unwrap();
    assert_eq!(
        rig.dev.config_generation(),
        1,
        "no change, no new generation"
    );
}

#[test]
fn drivers_that_would_touch_unplugged_memory_are_not_served() {
    let mem = memory();
    let mut dev = VirtioMem::new(layout(), Box::new(FakeSlots::default())).unwrap();
    let mock = MockSplitQueue::new(&mem, 32);
    let e = dev
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![mock.create_queue().unwrap()],
            acked_features: 1 << VIRTIO_F_VERSION_1,
            interrupt: Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            writes: Arc::default(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("UNPLUGGED_INACCESSIBLE"), "{e}");
    assert_eq!(mem.num_regions(), 2);
}
