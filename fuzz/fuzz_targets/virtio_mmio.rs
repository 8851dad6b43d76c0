//! The virtio-mmio register window: fuzzed sequences of reads and writes of any width at any
//! offset, in front of a real device (virtio-rng) and real guest memory.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::bus::BusDevice;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::device_writes::DeviceWrites;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use devices::virtio::rng::Rng;
use devices::virtio::test_utils::{guest_memory, interrupt};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Access {
    Read { offset: u16, width: u8 },
    Write { offset: u16, width: u8, value: u64 },
}

fuzz_target!(|accesses: Vec<Access>| {
    let dev = Arc::new(Mutex::new(
        Rng::new(RateLimiterConfig::default()).expect("virtio-rng"),
    ));
    let mem = guest_memory(1 << 20);
    // Tracked, as with dirty page tracking on: the marking walks guest-written chains too.
    let writes = Arc::new(DeviceWrites::new(&mem));
    let mut t = MmioTransport::new(dev, mem, interrupt(), writes).expect("transport");
    let width = |w: u8| usize::from(w % 9);
    for a in accesses.iter().take(256) {
        match *a {
            Access::Read { offset, width: w } => {
                let mut data = vec![0u8; width(w)];
                t.read(u64::from(offset) % MMIO_WINDOW_SIZE, &mut data);
            }
            Access::Write {
                offset,
                width: w,
                value,
            } => {
                let bytes = value.to_le_bytes();
                t.write(u64::from(offset) % MMIO_WINDOW_SIZE, &bytes[..width(w)]);
            }
        }
    }
});
