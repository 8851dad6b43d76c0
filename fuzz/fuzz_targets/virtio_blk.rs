//! virtio-blk request handling over fuzzed descriptor chains, on a small scratch disk.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::block::Block;
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive, DriverInput};

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    driver: DriverInput,
}

/// A 64-sector disk per fuzzing process; its content carries over between inputs, as a disk's does.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("prescient-fuzz-blk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 * 512]).expect("scratch disk");
        path
    })
}

fuzz_target!(|input: Input| {
    let blk = Block::new(
        "fuzz",
        disk(),
        input.read_only,
        RateLimiterConfig::default(),
    )
    .expect("open the scratch disk");
    drive(blk, &input.driver);
});
