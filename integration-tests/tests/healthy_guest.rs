//! A healthy guest is never flagged: the test guest with every device a VM can have (block, net,
//! vsock, entropy, a balloon reporting statistics every 100 ms, virtio-mem that the predictor
//! plugs and unplugs) runs a normal workload for more than 20 s under `anomaly.action: "pause"`.
//! No window may raise a finding, no exit may go to an unknown device, the VM is never paused.
//! Alone in its test binary so no other guest shares the cores.

use std::time::{Duration, Instant};

use integration_tests::{
    drive_json, guest_spec, prescient_bin, prometheus_value, wait_for_console_line, ApiClient,
    Netns, RunningVmm, Scratch, TEST_GUEST_PVH,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(180);
/// How long the virtio-mem workload follows the predictor's plugging, after the other devices'
/// workloads: the run under the predictor is longer than this.
const FOLLOW_MS: u64 = 22_000;

fn line_u64(line: &str, key: &str) -> u64 {
    integration_tests::line_field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key}= in {line:?}"))
}

#[test]
fn every_device_at_once_under_the_pause_action_raises_no_finding() {
    let scratch = Scratch::new("healthy-guest");
    let ns = Netns::with_tap(format!("prescient-healthy-{}", std::process::id()), "htap0");
    let disk = scratch.zeroed_file("disk.img", 16 << 20);
    let uds = scratch.path().join("v.sock");
    let echo = integration_tests::unix_echo_server(&scratch.path().join("v.sock_5000"), DEADLINE);
    let trace_dir = scratch.path().join("traces");
    std::fs::create_dir_all(&trace_dir).unwrap();
    let trace = trace_dir.join("run.jsonl");
    let console = scratch.path().join("console.txt");
    let socket = scratch.path().join("api.sock");

    let args = format!(
        "cpu_ms=500 mem_mib=32 blk_rw=64 blk_ops=1000 blk_qd=4 rng_bytes=65536 net_tx=20 \
         vsock_connect=5000 vsock_send=65536 vmem_follow_ms={FOLLOW_MS} vmem_ramp_start_ms=3000 \
         vmem_ramp_mib=192 vmem_ramp_ms=5000 virtio_timeout_ms=30000 exit=halt"
    );
    let mut spec: Value = serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 2, 128, &args)).unwrap();
    spec["drives"] = serde_json::json!([drive_json("disk0", &disk, false)]);
    spec["network-interfaces"] = serde_json::json!([
        {"iface_id": "eth0", "host_dev_name": "htap0", "guest_mac": "06:00:ac:10:00:02"}
    ]);
    spec["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": uds});
    spec["entropy"] = serde_json::json!({});
    spec["balloon"] = serde_json::json!({
        "amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_ms": 100
    });
    spec["memory-hotplug"] =
        serde_json::json!({"total_size_mib": 512, "block_size_mib": 2, "slot_size_mib": 128});
    spec["serial"] = serde_json::json!({ "serial_out_path": console });
    // What the user wrote, plus room above boot RAM for virtio-mem to fill.
    spec["predictor"] = serde_json::json!({
        "window_ms": 100,
        "budget": {"memory_mib": {"min": 128, "max": 640}},
        "anomaly": {"action": "pause", "threshold": 4.0},
        "trace_path": trace,
    });
    let spec_path = scratch.write("vm.json", &spec.to_string());
    let vmm = RunningVmm::from_command(ns.exec(prescient_bin()).args([
        "--api-sock",
        socket.to_str().unwrap(),
        "--config-file",
        spec_path.to_str().unwrap(),
    ]));
    let mut api = ApiClient::connect(&socket);

    // Watch the state the whole time the guest works: a pause, however short, fails the test.
    let start = Instant::now();
    let mut polls = 0u32;
    let done_line = loop {
        let state = api.request("GET", "/", None).json()["state"].clone();
        polls += 1;
        assert_eq!(
            state,
            "Running",
            "after {:?}: the predictor acted against a healthy guest; decisions: {:#}",
            start.elapsed(),
            api.request("GET", "/predictor/decisions?since=0", None)
                .json()
        );
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("guest: vmem0 follow done"))
        {
            break line.to_string();
        }
        assert!(
            !text.contains("prescient-test-guest: failed") && start.elapsed() < DEADLINE,
            "the guest did not finish its workload:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ran = start.elapsed();
    assert!(ran >= Duration::from_secs(20), "the guest ran {ran:?}");
    assert!(polls >= 100, "{polls} state polls");
    let done = wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    assert_eq!(done.trim(), "prescient-test-guest: done");
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");

    // Every device did its work.
    let text = std::fs::read_to_string(&console).unwrap();
    for line in [
        "guest: blk0 rw sectors=64 ok",
        "guest: blk0 ops=1000",
        "guest: rng0 bytes=65536 ok",
        "guest: net0 tx=20 ok",
        "guest: vsock0 connect port=5000 bytes=65536 ok",
        "guest: balloon0 stats=1",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
    assert_eq!(echo.join().unwrap(), Ok(65536));
    // The predictor plugged memory for the ramp and unplugged it after. (The guest samples its
    // demand curve once a loop; on a loaded host a loop can step over the top of the ramp.)
    let demand = line_u64(&done_line, "max_demand_mib");
    assert!((128..=192).contains(&demand), "{done_line}");
    let peak = line_u64(&done_line, "peak_plugged_mib");
    assert!(peak >= demand, "{done_line}");
    assert!(
        line_u64(&done_line, "final_plugged_mib") < peak,
        "{done_line}"
    );

    // The bus knew every exit's device.
    let scrape = api.request("GET", "/metrics", None).body;
    assert_eq!(
        prometheus_value(&scrape, "prescient_vcpu_unclaimed_access_total"),
        0
    );
    let status = api.request("GET", "/predictor", None).json();
    let devices = status["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /predictor lists the VM's devices: {status:#}"));
    let mut kinds: Vec<&str> = devices
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    kinds.sort_unstable();
    // "other" is the entropy device; the three "platform": the i8042, and ACPI's GED and CPU
    // hot-plug controller.
    assert_eq!(
        kinds,
        [
            "absent", "balloon", "block", "console", "mem", "net", "other", "platform", "platform",
            "platform", "vsock"
        ],
        "{devices:#?}"
    );
    let log = api
        .request("GET", "/predictor/decisions?since=0", None)
        .json();
    let mem_changes = log["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["resized"]["mem"] == true)
        .count();
    assert!(mem_changes >= 2, "{log:#}");
    vmm.terminate(DEADLINE).assert_code(143);

    // Every window, not only those that acted: the recorded trace replays to the live decisions.
    let t = predictor::trace::read(&trace).expect("the recorded trace");
    let windows = t.samples.len();
    assert!(windows >= 200, "{windows} windows");
    let mut touched = 0u32;
    for s in &t.samples {
        assert_eq!(s.signals.unknown_exits, 0, "window at {} ms", s.t_ms);
        touched |= s.signals.devices | s.signals.platform_devices;
    }
    // The platform devices are there for what this guest never does (the i8042 for a reset,
    // ACPI's GED and CPU hot-plug controller for vCPU hot-plug, which a VM without max_vcpus
    // never has); the absent hardware's ports are no device in use even when probed.
    let idle = ["platform", "absent"];
    for d in devices
        .iter()
        .filter(|d| !idle.contains(&d["kind"].as_str().unwrap()))
    {
        let id = d["id"].as_u64().unwrap();
        assert!(
            touched & (1 << id) != 0,
            "no exit or request of {d} in any window"
        );
    }
    let decisions = predictor_tools::eval::replay_recorded(&t)
        .expect("replay")
        .expect("the trace names its policy");
    let highest = decisions
        .iter()
        .map(|d| d.anomaly.score)
        .fold(0.0, f64::max);
    println!(
        "{windows} windows, {polls} state polls over {ran:?}; highest anomaly score {highest:.3}"
    );
    for d in &decisions {
        assert!(
            !d.anomaly.findings.any(),
            "a finding at {} ms: {:?} ({})",
            d.t_ms,
            d.anomaly,
            d.reason
        );
    }
}
