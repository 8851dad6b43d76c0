//! virtio-balloon over fuzzed descriptor chains, under any subset of the features it offers (which
//! decide what its five queues are), with a statistics timer fast enough to fire between kicks.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use devices::virtio::balloon::{Balloon, BalloonOptions};
use devices::virtio::test_utils::VERSION_1_ONLY;
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive_activated, DriverInput};

#[derive(Arbitrary, Debug)]
struct Input {
    /// The driver acks these of the offered feature bits 0 to 7 (STATS_VQ 1, DEFLATE_ON_OOM 2,
    /// FREE_PAGE_HINT 3, REPORTING 5).
    features: u8,
    /// Statistics interval in microseconds; zero offers no statistics queue.
    stats_us: u8,
    target_pages: u32,
    /// Starts this many hinting runs once the driver is up (the last one current: hints under
    /// its id are discarded).
    hinting_runs: u8,
    driver: DriverInput,
}

fuzz_target!(|input: Input| {
    let balloon = Balloon::new(BalloonOptions {
        target_pages: input.target_pages,
        deflate_on_oom: true,
        stats_interval: Duration::from_micros(u64::from(input.stats_us)),
        free_page_hinting: true,
        free_page_reporting: true,
    })
    .expect("virtio-balloon");
    let acked = balloon.avail_features() & (u64::from(input.features) | VERSION_1_ONLY);
    let balloon = drive_activated(balloon, acked, &input.driver, |b| {
        for _ in 0..input.hinting_runs % 4 {
            // Refused only without the feature, which the options always offer.
            b.start_hinting(input.target_pages % 2 == 0)
                .expect("a hinting run starts on an active balloon");
        }
    });
    // What the API serves from it must still be computable.
    let stats = balloon.stats();
    assert_eq!(stats.actual_pages, balloon.actual_pages());
});
