//! The VMM's own lifecycle around a guest that does not end by itself.

use std::time::{Duration, Instant};

use integration_tests::{guest_spec, RunningVmm, Scratch, TEST_GUEST_PVH};

#[test]
fn sigterm_stops_a_vm_whose_vcpus_are_halted_forever() {
    let scratch = Scratch::new("sigterm");
    let spec = scratch.write(
        "vm.json",
        &guest_spec(TEST_GUEST_PVH, 2, 64, "cpu_ms=1 mem_mib=1 exit=halt"),
    );
    let vmm = RunningVmm::spawn(["--config-file", spec.to_str().unwrap()]);
    // Give the guest time to reach its halt; its exact progress does not matter.
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let out = vmm.terminate(Duration::from_secs(30));
    assert!(start.elapsed() < Duration::from_secs(30));
    out.assert_code(128 + libc::SIGTERM);
    assert!(out.stderr.contains("received signal 15"), "{}", out.stderr);
}
