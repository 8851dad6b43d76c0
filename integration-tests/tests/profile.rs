//! Workload profiles end to end: `prescient profile` measures test-guest workloads of known
//! demand, `prescient --profile` sizes the VM from the profile (and refuses or ignores bad
//! ones), a flagged workload starts in the steady seccomp stage, and a second launch's
//! predictor starts warm from the model store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{
    run_prescient, seccomp_filters, wait_for_console_line, ApiClient, Outcome, RunningVmm, Scratch,
    TEST_GUEST_LINUX64, TEST_GUEST_PVH,
};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);

/// A test-guest spec with its console in `scratch/<name>.console`.
fn spec(scratch: &Scratch, name: &str, kernel: &Path, vcpus: u8, mem: u64, args: &str) -> Value {
    json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": args},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem},
        "serial": {"serial_out_path": scratch.path().join(format!("{name}.console"))},
    })
}

fn write_spec(scratch: &Scratch, name: &str, spec: &Value) -> PathBuf {
    scratch.write(&format!("{name}.json"), &spec.to_string())
}

/// Runs `prescient profile` and returns the profile it wrote.
fn profile(scratch: &Scratch, spec: &Path, duration: &str) -> (PathBuf, Value) {
    let out = scratch.path().join("profile.json");
    run_prescient(
        &[
            "profile",
            "--config-file",
            spec.to_str().unwrap(),
            "--duration",
            duration,
            "--out",
            out.to_str().unwrap(),
        ],
        DEADLINE,
    )
    .assert_code(0);
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    (out, p)
}

fn launch(
    scratch: &Scratch,
    spec: &Path,
    profile: &Path,
    extra: &[&str],
) -> (RunningVmm, ApiClient) {
    let socket = scratch.path().join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let mut args = vec![
        "--api-sock",
        socket.to_str().unwrap(),
        "--config-file",
        spec.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let vmm = RunningVmm::spawn(args);
    let api = ApiClient::connect(&socket);
    (vmm, api)
}

fn within(what: &str, measured: f64, truth: f64) {
    assert!(
        (measured - truth).abs() <= truth * 0.2,
        "{what}: measured {measured}, truth {truth} (more than 20% off)"
    );
}

fn bad_launch(spec: &Path, profile: &Path) -> Outcome {
    run_prescient(
        &[
            "--config-file",
            spec.to_str().unwrap(),
            "--profile",
            profile.to_str().unwrap(),
        ],
        DEADLINE,
    )
}

/// Mean memory slack (1 - used / allocated) over a trace's first minute.
fn first_minute_slack(samples: &[Value], window_ms: u64, allocated_mib: f64) -> f64 {
    let first: Vec<f64> = samples
        .iter()
        .take((60_000 / window_ms) as usize)
        .map(|s| 1.0 - s["mem"].as_f64().unwrap() / allocated_mib)
        .collect();
    first.iter().sum::<f64>() / first.len() as f64
}

fn trace_samples(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_known_workload_is_measured_within_20_percent_and_its_profiled_launch_fits() {
    let scratch = Scratch::new("profile-known");
    let disk = scratch.zeroed_file("disk.img", 64 << 20);
    // 2 busy vCPUs for 2.5 s, 300 MiB touched, then 64 KiB writes against a 20 MiB/s bucket.
    let args = "cpu_ms=2500 mem_mib=300 blk_ops=1200 blk_write=1 blk_op_kib=64 exit=halt";
    let mut s = spec(&scratch, "probe", Path::new(TEST_GUEST_PVH), 2, 512, args);
    s["drives"] = json!([{"drive_id": "data", "path_on_host": disk, "is_root_device": false,
        "is_read_only": false,
        "rate_limiter": {"bandwidth": {"size": 2097152, "refill_time": 100}}}]);
    s["predictor"] = json!({});
    let spec_path = write_spec(&scratch, "probe", &s);
    let (profile_path, p) = profile(&scratch, &spec_path, "12");

    within(
        "cpu_demand.p95",
        p["cpu_demand"]["p95"].as_f64().unwrap(),
        2.0,
    );
    let peak = p["memory_footprint"]["peak_mib"].as_f64().unwrap();
    within("memory_footprint.peak_mib", peak, 300.0);
    within(
        "memory_footprint.working_set_mib",
        p["memory_footprint"]["working_set_mib"].as_f64().unwrap(),
        300.0,
    );
    let blk = &p["io_intensity"][0];
    assert_eq!(
        (&blk["kind"], &blk["device"], &blk["source"]),
        (&json!("block"), &json!("data"), &json!("metrics"))
    );
    within(
        "data MiB/s p50",
        blk["mib_per_s"]["p50"].as_f64().unwrap(),
        20.0,
    );
    // 64 KiB requests at 20 MiB/s.
    within(
        "data ops/s p50",
        blk["ops_per_s"]["p50"].as_f64().unwrap(),
        320.0,
    );
    assert_eq!(p["security_flags"], json!([]));
    assert_eq!(p["static"]["kernel"]["format"], "elf64");
    assert!(p["probe"]["windows"].as_u64().unwrap() > 50, "{p:#}");
    // The probe wrote to a copy: the workload's disk is untouched.
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));

    let store = scratch.path().join("models");
    let (vmm, mut api) = launch(
        &scratch,
        &spec_path,
        &profile_path,
        &["--model-store", store.to_str().unwrap()],
    );
    let console = scratch.path().join("probe.console");
    // Sizes that fit: the memory phase and every write complete (no OOM, no stall).
    wait_for_console_line(&console, "guest: mem_phase touched_mib=300 ok", DEADLINE);
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    let config = api.request("GET", "/vm/config", None).json();
    let mem = config["machine-config"]["mem_size_mib"].as_u64().unwrap();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert!(
        (peak as u64..512).contains(&mem),
        "profiled memory {mem} MiB should hold the peak {peak} and be below the spec's 512"
    );
    let trace = PathBuf::from(config["predictor"]["trace_path"].as_str().unwrap());
    assert!(
        trace.starts_with(&store),
        "{trace:?} not in the model store"
    );
    let predictor = api.request("GET", "/predictor", None).json();
    assert_eq!(predictor["actuators"]["model"], "cold start");
    vmm.terminate(DEADLINE).assert_code(128 + libc::SIGTERM);

    // First-minute memory slack over the launch's recorded windows: the spec's 512 MiB (a cold
    // start) against the profiled size.
    let windows = trace_samples(&trace);
    let cold = first_minute_slack(&windows, 100, 512.0);
    let profiled = first_minute_slack(&windows, 100, mem as f64);
    assert!(
        profiled < cold,
        "profiled slack {profiled} not below cold {cold}"
    );
}

#[test]
fn a_workload_hammering_an_unknown_port_starts_in_the_steady_stage() {
    let scratch = Scratch::new("profile-flagged");
    let kernel = Path::new(TEST_GUEST_PVH);
    let args = "cpu_ms=10 mem_mib=1 port_hammer=2000 exit=halt";
    let spec_path = write_spec(&scratch, "vm", &spec(&scratch, "vm", kernel, 1, 64, args));
    let (profile_path, p) = profile(&scratch, &spec_path, "3");
    assert_eq!(
        p["security_flags"][0]["flag"], "unknown_port_or_mmio",
        "{p:#}"
    );

    // The same spec without the profile: the VMM thread stays in its boot stage.
    let socket = scratch.path().join("plain.sock");
    let plain = RunningVmm::spawn([
        "--api-sock",
        socket.to_str().unwrap(),
        "--config-file",
        spec_path.to_str().unwrap(),
    ]);
    let _ = ApiClient::connect(&socket);
    let console = scratch.path().join("vm.console");
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    let boot_filters = seccomp_filters(plain.id(), "prescient");
    plain.terminate(DEADLINE).assert_code(128 + libc::SIGTERM);

    let (vmm, _api) = launch(&scratch, &spec_path, &profile_path, &[]);
    let start = std::time::Instant::now();
    while seccomp_filters(vmm.id(), "prescient") <= boot_filters {
        assert!(
            start.elapsed() < DEADLINE,
            "the VMM thread never moved to steady"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vmm.terminate(DEADLINE).assert_code(128 + libc::SIGTERM);
}

#[test]
fn bad_profiles_are_refused_stale_ones_ignored_and_the_store_warms_the_next_launch() {
    let scratch = Scratch::new("profile-bad");
    // A copy of the kernel, so that the test can change it to make the profile stale.
    let kernel = scratch.path().join("guest.elf");
    std::fs::copy(TEST_GUEST_PVH, &kernel).unwrap();
    let args = "cpu_ms=10 mem_mib=64 exit=halt";
    let mut s = spec(&scratch, "vm", &kernel, 1, 256, args);
    // Short windows: the step of the memory touch soon weighs little in the band.
    s["predictor"] = json!({"window_ms": 20});
    let spec_path = write_spec(&scratch, "vm", &s);
    let (profile_path, p) = profile(&scratch, &spec_path, "2");

    // The model store: a first launch starts cold, the next one warm from its trace.
    let store = scratch.path().join("models");
    let store_arg = ["--model-store", store.to_str().unwrap()];
    let console = scratch.path().join("vm.console");
    let (vmm, mut api) = launch(&scratch, &spec_path, &profile_path, &store_arg);
    let cold = api.request("GET", "/predictor", None).json();
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    // Windows of the steady state after the touch, so that the band the next launch replays
    // to is not the step's.
    let windows = |api: &mut ApiClient| {
        api.request("GET", "/predictor", None).json()["windows"]
            .as_u64()
            .unwrap()
    };
    let done_at = windows(&mut api);
    while windows(&mut api) < done_at + 150 {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cold["actuators"]["model"], "cold start");
    vmm.terminate(DEADLINE).assert_code(128 + libc::SIGTERM);
    let (vmm, mut api) = launch(&scratch, &spec_path, &profile_path, &store_arg);
    let warm = api.request("GET", "/predictor", None).json();
    // A cold predictor holds the budget maximum while it learns; a warm one starts where the
    // last run ended (the guest idles in `halt`), so the first minute's slack is lower: less
    // CPU, and no more memory (its band may still carry the touch's step on a loaded host).
    let alloc = |s: &Value, r: &str| s["allocation"][r].as_f64().unwrap();
    assert!(
        alloc(&warm, "cpu") < alloc(&cold, "cpu") && alloc(&warm, "mem") <= alloc(&cold, "mem"),
        "warm {warm:#} cold {cold:#}"
    );
    let model = warm["actuators"]["model"].as_str().unwrap().to_string();
    let entry = store.join(p["fingerprint"].as_str().unwrap());
    assert!(
        model.starts_with(&format!("warm start from {}", entry.display()))
            && model.contains("(same fingerprint)"),
        "{model}"
    );
    vmm.terminate(DEADLINE).assert_code(128 + libc::SIGTERM);

    let text = std::fs::read_to_string(&profile_path).unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    let variant = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut v = doc.clone();
        f(&mut v);
        scratch.write(name, &v.to_string())
    };
    let cases: [(&str, PathBuf); 4] = [
        (
            "has version 2",
            variant("v2.json", &|v| v["version"] = json!(2)),
        ),
        (
            "memory_footprint: missing field `peak_mib`",
            variant("missing.json", &|v| {
                v["memory_footprint"]
                    .as_object_mut()
                    .unwrap()
                    .remove("peak_mib");
            }),
        ),
        (
            "unknown field `surprise`",
            variant("unknown.json", &|v| v["surprise"] = json!(1)),
        ),
        ("(document)", scratch.write("garbage.json", "{not json")),
    ];
    for (message, path) in cases {
        let out = bad_launch(&spec_path, &path);
        out.assert_code(2);
        assert!(
            out.stderr.contains(message),
            "{message:?} not in {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(path.to_str().unwrap()),
            "{}",
            out.stderr
        );
    }

    // Another workload's profile (the other test-guest image) is refused.
    let other = write_spec(
        &scratch,
        "other",
        &spec(
            &scratch,
            "other",
            Path::new(TEST_GUEST_LINUX64),
            1,
            128,
            args,
        ),
    );
    let out = bad_launch(&other, &profile_path);
    out.assert_code(2);
    assert!(
        out.stderr.contains("is for another workload"),
        "{}",
        out.stderr
    );

    // A changed kernel under the profiled path: stale, reported, ignored.
    doc["memory_footprint"]["peak_mib"] = json!(4000.0);
    let big = scratch.write("big.json", &doc.to_string());
    let mut bytes = std::fs::read(&kernel).unwrap();
    bytes.push(0);
    std::fs::write(&kernel, bytes).unwrap();
    let (vmm, mut api) = launch(&scratch, &spec_path, &big, &[]);
    let config = api.request("GET", "/vm/config", None).json();
    assert_eq!(
        config["machine-config"]["mem_size_mib"], 256,
        "the stale profile was used"
    );
    let out = vmm.terminate(DEADLINE);
    assert!(
        out.stderr.contains("is stale, ignored") && out.stderr.contains("kernel"),
        "{}",
        out.stderr
    );
}
