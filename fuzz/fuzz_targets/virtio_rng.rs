//! virtio-rng request handling over fuzzed descriptor chains.
#![no_main]

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive, DriverInput};

fuzz_target!(|input: DriverInput| {
    let rng = Rng::new(RateLimiterConfig::default()).expect("virtio-rng");
    drive(rng, &input);
});
