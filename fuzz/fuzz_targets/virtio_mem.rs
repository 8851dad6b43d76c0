//! virtio-mem over fuzzed descriptor chains: its region is the upper half of the fuzzer's guest
//! memory, its slots are shown and hidden by a fake (no KVM), and the host asks for a fuzzed size.
//! After the run, no more is plugged than was asked for, and exactly the slots holding a plugged
//! block are shown.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::virtio::mem::request::{BlockRange, BlockState, MemRequest, MemResponse};
use devices::virtio::mem::{HotplugSlots, MemLayout, VirtioMem};
use devices::virtio::test_utils::guest_memory;
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive_acking, DriverInput, MEM_SIZE};

const BLOCK: u64 = 0x1000;
const SLOT: u64 = 0x2_0000;

/// Which slots the device shows; showing a shown slot or hiding a hidden one is a device bug.
#[derive(Clone)]
struct FakeSlots(Arc<Mutex<Vec<bool>>>);

impl HotplugSlots for FakeSlots {
    fn set_present(&mut self, slot: usize, present: bool) -> std::io::Result<()> {
        let mut shown = self.0.lock().unwrap();
        assert_ne!(shown[slot], present, "slot {slot} set to {present} twice");
        shown[slot] = present;
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The requested size in blocks (modulo the region's blocks + 1).
    requested_blocks: u8,
    driver: DriverInput,
}

fuzz_target!(|input: Input| {
    let layout = MemLayout::new(MEM_SIZE / 2, MEM_SIZE / 2, BLOCK, SLOT).expect("a valid layout");
    let shown = FakeSlots(Arc::new(Mutex::new(vec![false; layout.slots()])));
    let mut dev = VirtioMem::new(layout, Box::new(shown.clone())).expect("virtio-mem");
    let requested = u64::from(input.requested_blocks) % (layout.blocks() + 1) * BLOCK;
    dev.set_requested_bytes(requested)
        .expect("a whole number of blocks inside the region");
    // The driver acks everything: without UNPLUGGED_INACCESSIBLE the device refuses to start.
    let acked = dev.avail_features();
    let mut dev = drive_acking(dev, acked, &input.driver);

    assert!(dev.plugged_bytes() <= dev.requested_bytes());
    let mem = guest_memory(MEM_SIZE as usize);
    for slot in 0..layout.slots() {
        let range = layout.slot_range(slot);
        let state = dev.serve(
            &mem,
            MemRequest::State(BlockRange {
                addr: range.start,
                nb_blocks: ((range.end - range.start) / BLOCK) as u16,
            }),
        );
        let MemResponse::State(state) = state else {
            panic!("STATE of slot {slot} answered {state:?}");
        };
        assert_eq!(
            state != BlockState::Unplugged,
            shown.0.lock().unwrap()[slot],
            "slot {slot} is {state:?}"
        );
    }
});
