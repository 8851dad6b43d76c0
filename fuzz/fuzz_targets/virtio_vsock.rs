//! virtio-vsock packet handling over fuzzed descriptor chains (TX packets and RX buffers).
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive, DriverInput};

fuzz_target!(|input: DriverInput| {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "prescient-fuzz-vsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    // The device removes its listener's socket when dropped.
    let vsock = Vsock::new(3, &path).expect("a vsock listener");
    drive(vsock, &input);
});
