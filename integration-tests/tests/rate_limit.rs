//! A bandwidth limit measured on a running guest. Alone in its test binary: cargo runs test
//! binaries one after another, so no other busy guest shares the 2 cores while it measures.

use std::time::{Duration, Instant};

use integration_tests::{drive_json, guest_spec_devices, prometheus_value, ApiClient, Scratch};

const DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn a_bandwidth_limit_holds_within_10_percent_and_a_live_doubling_takes_effect() {
    const MIB: f64 = 1048576.0;
    let scratch = Scratch::new("virtio-bandwidth");
    let socket = scratch.path().join("api.sock");
    let img = scratch.zeroed_file("disk.img", 16 << 20);
    let mut d = drive_json("disk0", &img, false);
    // 1 MiB/s in 100 ms refills (a small bucket, so the burst at start is negligible); 64 KiB
    // requests keep scheduling delays on a loaded 2-core host small against each wait.
    d["rate_limiter"] = serde_json::json!({"bandwidth": {"size": 104857, "refill_time": 100}});
    let spec_path = scratch.write(
        "vm.json",
        &guest_spec_devices(
            "blk_ops=1000000 blk_op_kib=64 exit=halt",
            serde_json::json!([d]),
            None,
        ),
    );
    let vmm = integration_tests::RunningVmm::spawn([
        std::ffi::OsStr::new("--api-sock"),
        socket.as_os_str(),
        std::ffi::OsStr::new("--config-file"),
        spec_path.as_os_str(),
    ]);
    let mut api = ApiClient::connect(&socket);
    // Answered by the VMM thread, so only once the VM from the spec file is built.
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");
    let bytes = |api: &mut ApiClient| {
        prometheus_value(
            &api.request("GET", "/metrics", None).body,
            "prescient_block_disk0_bytes_to_guest_total",
        )
    };
    // Let the guest start reading, then measure 5 s of host-side bytes served.
    let start = Instant::now();
    while bytes(&mut api) == 0 {
        assert!(start.elapsed() < DEADLINE, "the guest never read");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Each sample is dated at the middle of its request, so API latency does not skew the rate.
    let sample = |api: &mut ApiClient| {
        let before = Instant::now();
        let b = bytes(api);
        (b, before + before.elapsed() / 2)
    };
    let rate = |api: &mut ApiClient, over: Duration| {
        let (b0, t0) = sample(api);
        std::thread::sleep(over);
        let (b1, t1) = sample(api);
        (b1 - b0) as f64 / (t1 - t0).as_secs_f64()
    };
    let before = rate(&mut api, Duration::from_secs(5));
    assert!(
        (before / MIB - 1.0).abs() < 0.10,
        "1 MiB/s limit measured {:.3} MiB/s",
        before / MIB
    );

    let doubled = r#"{"drive_id": "disk0", "rate_limiter": {"bandwidth": {"size": 209715, "refill_time": 100}}}"#;
    assert_eq!(
        api.request("PATCH", "/drives/disk0", Some(doubled)).status,
        204
    );
    // One refill period later the new rate holds.
    std::thread::sleep(Duration::from_millis(100));
    let after = rate(&mut api, Duration::from_secs(2));
    assert!(
        (after / (2.0 * MIB) - 1.0).abs() < 0.10,
        "after doubling to 2 MiB/s measured {:.3} MiB/s",
        after / MIB
    );
    vmm.terminate(DEADLINE).assert_code(143);
}
