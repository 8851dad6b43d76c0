//! virtio-net between the test guest and a host TAP, inside a network namespace the test makes
//! and removes itself (the host's own interfaces are never touched).

use std::time::Duration;

use integration_tests::{
    prescient_bin, wait_with_deadline, Netns, RunningVmm, Scratch, TEST_GUEST_PVH,
};

#[test]
fn frames_cross_between_the_guest_and_a_host_tap() {
    let scratch = Scratch::new("virtio-net");
    let ns = Netns::with_tap(format!("prescient-it-{}", std::process::id()), "ptap0");
    let ready = scratch.path().join("peer-ready");
    let peer = ns
        .exec(std::path::Path::new("python3"))
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/clients/tap_peer.py"),
            "ptap0",
            "5",
            "3",
        ])
        .arg(&ready)
        .spawn()
        .unwrap();

    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH,
                        "boot_args": "cpu_ms=1 mem_mib=1 net_tx=5 net_rx=3 net_rx_ethertype=0x88b6"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "ptap0",
                                "guest_mac": "06:00:ac:10:00:02"}],
    });
    let spec = scratch.write("vm.json", &spec.to_string());
    // The guest sends once: the peer's socket must be bound first.
    let start = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the TAP peer never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let vm = RunningVmm::from_command(
        ns.exec(prescient_bin())
            .args(["--config-file", spec.to_str().unwrap()]),
    );
    let out = vm.wait(Duration::from_secs(90));
    let peer = wait_with_deadline(peer, Duration::from_secs(90));
    out.assert_code(0)
        .assert_line("guest: net0 mac=06:00:ac:10:00:02")
        .assert_line("guest: net0 tx=5 ok")
        .assert_line("guest: net0 rx=3 ok");
    assert!(
        peer.stdout.contains("peer: got 5 sent 3"),
        "{}\n{}",
        peer.stdout,
        peer.stderr
    );
}

#[test]
fn a_missing_tap_device_is_a_spec_error() {
    let scratch = Scratch::new("virtio-net-bad");
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "bad name"}],
    });
    let out = integration_tests::run_spec(&scratch, &spec.to_string(), Duration::from_secs(30));
    out.assert_code(2);
    assert!(
        out.stderr.contains("network-interfaces[0].host_dev_name"),
        "{}",
        out.stderr
    );
}
