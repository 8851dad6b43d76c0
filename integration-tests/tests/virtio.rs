//! virtio-blk and virtio-rng under real KVM, driven by the test guest's virtio drivers: data
//! reaches the host file, read-only drives refuse writes, rate limiters slow the guest and can be
//! changed while it runs.

use std::time::{Duration, Instant};

use integration_tests::{
    drive_json, fnv1a, guest_spec_devices, prometheus_value, run_spec, ApiClient, Scratch,
    TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn guest_writes_reach_the_host_file_and_read_back_identically() {
    round_trip("virtio-blk-rw", None);
}

/// The same through the Async engine (io_uring), under the VMM thread's seccomp filter.
#[test]
fn an_async_drive_round_trips_through_io_uring() {
    round_trip("virtio-blk-async", Some("Async"));
}

fn round_trip(name: &str, io_engine: Option<&str>) {
    let scratch = Scratch::new(name);
    let img = scratch.zeroed_file("disk.img", 4 << 20);
    let args = "blk_rw=64 blk_sector=100 blk_read=64";
    let mut drive = drive_json("disk0", &img, false);
    if let Some(engine) = io_engine {
        drive["io_engine"] = engine.into();
    }
    let out = run_spec(
        &scratch,
        &guest_spec_devices(args, serde_json::json!([drive]), None),
        DEADLINE,
    );
    out.assert_code(0)
        .assert_line("guest: blk0 capacity=8192 id=disk0 ro=0")
        .assert_line("guest: blk0 flush ok")
        .assert_line("guest: blk0 rw sectors=64 ok");
    let file = std::fs::read(&img).unwrap();
    let written = &file[100 * 512..164 * 512];
    assert!(
        written.iter().any(|&b| b != 0),
        "the guest's data is on the host file"
    );
    assert!(
        file[..100 * 512].iter().all(|&b| b == 0),
        "nothing written before the range"
    );
    assert!(
        file[164 * 512..].iter().all(|&b| b == 0),
        "nothing written after the range"
    );
    out.assert_line(&format!(
        "guest: blk0 read sectors=64 ok fnv1a=0x{:016x}",
        fnv1a(written)
    ));
}

#[test]
fn a_read_only_drive_answers_guest_writes_with_ioerr() {
    let scratch = Scratch::new("virtio-blk-ro");
    let img = scratch.zeroed_file("ro.img", 1 << 20);
    let out = run_spec(
        &scratch,
        &guest_spec_devices(
            "blk_rw=8",
            serde_json::json!([drive_json("ro", &img, true)]),
            None,
        ),
        DEADLINE,
    );
    out.assert_code(3) // the guest treats the failed write as fatal
        .assert_line("guest: blk0 capacity=2048 id=ro ro=1")
        .assert_line("guest: blk0 status=1 op=write");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn entropy_reaches_the_guest() {
    let scratch = Scratch::new("virtio-rng");
    let out = run_spec(
        &scratch,
        &guest_spec_devices(
            "rng_bytes=65536",
            serde_json::json!([]),
            Some(serde_json::json!({})),
        ),
        DEADLINE,
    );
    out.assert_code(0).assert_line("guest: rng0 bytes=65536 ok");
}

#[test]
fn rate_limiters_hold_the_guest_to_its_budget() {
    let scratch = Scratch::new("virtio-limits");
    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let mut d = drive_json("disk0", &img, false);
    // 100 ops per second, starting full: 300 reads need about 2 s (unlimited: ~0.1 s).
    d["rate_limiter"] = serde_json::json!({"ops": {"size": 100, "refill_time": 1000}});
    // 8 KiB per second: 32 KiB of entropy need about 3 s.
    let entropy =
        serde_json::json!({"rate_limiter": {"bandwidth": {"size": 8192, "refill_time": 1000}}});
    let out = run_spec(
        &scratch,
        &guest_spec_devices(
            "blk_ops=300 rng_bytes=32768",
            serde_json::json!([d]),
            Some(entropy),
        ),
        DEADLINE,
    );
    out.assert_code(0).assert_line("guest: rng0 bytes=32768 ok");
    // Timed on the host (the guest's clock is only as good as its calibration): unlimited, both
    // workloads take well under a second; limited, about 2 s + 3 s.
    assert!(
        out.elapsed >= Duration::from_millis(4500),
        "limits not applied: {:?}",
        out.elapsed
    );
}

#[test]
fn a_live_rate_limiter_update_releases_a_throttled_guest() {
    let scratch = Scratch::new("virtio-live-limit");
    let socket = scratch.path().join("api.sock");
    let console = scratch.path().join("console.log");
    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let vmm = integration_tests::RunningVmm::spawn([
        std::ffi::OsStr::new("--api-sock"),
        socket.as_os_str(),
    ]);
    let mut api = ApiClient::connect(&socket);
    let boot = serde_json::json!({"kernel_image_path": TEST_GUEST_PVH, "boot_args": "cpu_ms=1 mem_mib=1 blk_ops=400 exit=halt"});
    assert_eq!(
        api.request("PUT", "/boot-source", Some(&boot.to_string()))
            .status,
        204
    );
    // 10 ops per second: 400 reads would take about 40 s.
    let mut d = drive_json("disk0", &img, false);
    d["rate_limiter"] = serde_json::json!({"ops": {"size": 10, "refill_time": 1000}});
    let r = api.request("PUT", "/drives/disk0", Some(&d.to_string()));
    assert_eq!(r.status, 204, "{}", r.body);
    let serial = serde_json::json!({"serial_out_path": console}).to_string();
    assert_eq!(api.request("PUT", "/serial", Some(&serial)).status, 204);
    let start = Instant::now();
    assert_eq!(
        api.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .status,
        204
    );

    let wait_for = |text: &str, limit: Duration| loop {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        if c.contains(text) {
            return c;
        }
        assert!(start.elapsed() < limit, "no {text:?} after {limit:?}:\n{c}");
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for("guest: blk0 capacity=2048", DEADLINE);
    std::thread::sleep(Duration::from_millis(1500));
    let scrape = api.request("GET", "/metrics", None).body;
    let throttled = prometheus_value(&scrape, "prescient_block_disk0_throttled_total");
    assert!(throttled > 0, "the limiter made the queue wait");
    let so_far = std::fs::read_to_string(&console).unwrap();
    assert!(
        !so_far.contains("guest: blk0 ops=400"),
        "not throttled: {so_far}"
    );

    let update =
        r#"{"drive_id": "disk0", "rate_limiter": {"ops": {"size": 100000, "refill_time": 100}}}"#;
    let r = api.request("PATCH", "/drives/disk0", Some(update));
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for("guest: blk0 ops=400", Duration::from_secs(15));
    let config = api.request("GET", "/vm/config", None).json();
    assert_eq!(config["drives"][0]["rate_limiter"]["ops"]["size"], 100000);
    let r = api.request(
        "PATCH",
        "/drives/disk0",
        Some(r#"{"drive_id": "disk0", "path_on_host": "/tmp/x"}"#),
    );
    assert_eq!(r.status, 400, "a running drive keeps its file");
    vmm.terminate(DEADLINE).assert_code(143);
}

#[test]
fn data_acknowledged_after_flush_survives_kill_9_of_the_vmm() {
    let scratch = Scratch::new("virtio-blk-kill9");
    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let console = scratch.path().join("console.log");
    let mut s: serde_json::Value = serde_json::from_str(&guest_spec_devices(
        "blk_rw=128 blk_sector=16 blk_read=128 exit=halt",
        serde_json::json!([drive_json("disk0", &img, false)]),
        None,
    ))
    .unwrap();
    s["serial"] = serde_json::json!({ "serial_out_path": console });
    let spec_path = scratch.write("vm.json", &s.to_string());
    let vmm = integration_tests::RunningVmm::spawn(["--config-file", spec_path.to_str().unwrap()]);
    // A whole line: the console is written a byte at a time, so "ok" may come before the sum.
    integration_tests::wait_for_console_line(&console, "guest: blk0 read sectors=128 ok", DEADLINE);
    let text = std::fs::read_to_string(&console).unwrap();
    // The guest has had its write and FLUSH acknowledged: SIGKILL the VMM, no clean-up at all.
    drop(vmm);
    assert!(text.contains("guest: blk0 rw sectors=128 ok"));
    let file = std::fs::read(&img).unwrap();
    let expected = format!(
        "guest: blk0 read sectors=128 ok fnv1a=0x{:016x}",
        fnv1a(&file[16 * 512..144 * 512])
    );
    assert!(
        text.contains(&expected),
        "host file differs from what the guest wrote:\n{text}"
    );
}
