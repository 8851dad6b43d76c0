//! Elastic memory end to end: the test guest's virtio-mem and balloon drivers against the real
//! VMM, driven over the API, with the host's resident memory measured from outside.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{
    guest_spec, line_field, prometheus_value, rss_bytes, start_with_console, wait_for_console_line,
    ApiClient, RunningVmm, Scratch, TEST_GUEST_PVH,
};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(120);

fn field(line: &str, key: &str) -> u64 {
    line_field(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {line:?}: {e}"))
}

fn patch(api: &mut ApiClient, path: &str, body: serde_json::Value) {
    let r = api.request("PATCH", path, Some(&body.to_string()));
    assert_eq!(r.status, 204, "PATCH {path} {body}: {}", r.body);
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Waits for the guest's final line, then lets it go (it waits for Ctrl-Alt-Del, so that the
/// API can still be asked about its last step) and expects a clean exit.
fn finish(vmm: RunningVmm, mut api: ApiClient, console: &Path) {
    wait_for_console_line(console, "prescient-test-guest: done", DEADLINE);
    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    vmm.wait(DEADLINE).assert_code(0);
}

#[test]
fn virtio_mem_plugs_what_is_requested_and_gives_it_back() {
    let scratch = Scratch::new("elastic-vmem");
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        1,
        128,
        "cpu_ms=1 mem_mib=1 vmem_steps=3 exit=kbd",
    ))
    .unwrap();
    spec["memory-hotplug"] =
        serde_json::json!({"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128});
    let (vmm, mut api, console) = start_with_console(&scratch, spec);

    let init = wait_for_console_line(&console, "guest: vmem0 addr=", DEADLINE);
    assert_eq!(field(&init, "region_mib"), 1024, "{init}");
    assert_eq!(field(&init, "block_kib"), 2048, "{init}");
    wait_for_console_line(
        &console,
        "guest: vmem0 unplugged memory inaccessible",
        DEADLINE,
    );
    let status = api.request("GET", "/hotplug/memory", None).json();
    assert_eq!(status["plugged_size_mib"], 0);
    assert_eq!(status["total_size_mib"], 1024);

    // Wrong sizes are refused and change nothing.
    for bad in [513, 2048] {
        let r = api.request(
            "PATCH",
            "/hotplug/memory",
            Some(&format!(r#"{{"requested_size_mib": {bad}}}"#)),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.body.contains("requested_size_mib"), "{}", r.body);
    }

    let rss_before = rss_bytes(vmm.id());
    let mut rss = rss_before;
    for (step, requested) in [(1, 512u64), (2, 128), (3, 0)] {
        patch(
            &mut api,
            "/hotplug/memory",
            serde_json::json!({ "requested_size_mib": requested }),
        );
        let line = wait_for_console_line(&console, &format!("guest: vmem0 step={step} "), DEADLINE);
        assert_eq!(field(&line, "plugged_mib"), requested, "{line}");
        assert_eq!(field(&line, "device_plugged_mib"), requested, "{line}");
        assert!(line.contains("state=ok"), "{line}");
        let status = api.request("GET", "/hotplug/memory", None).json();
        assert_eq!(status["plugged_size_mib"], requested);
        assert_eq!(status["requested_size_mib"], requested);
        let now = rss_bytes(vmm.id());
        match step {
            // The guest wrote every page it plugged: the host now backs them.
            1 => assert!(
                now >= rss + 480 * MIB,
                "plugging 512 MiB: RSS {:.0} -> {:.0} MiB",
                mib(rss),
                mib(now)
            ),
            // Unplugged blocks are discarded at once.
            2 => assert!(
                now + 350 * MIB <= rss,
                "unplugging 384 MiB: RSS {:.0} -> {:.0} MiB",
                mib(rss),
                mib(now)
            ),
            _ => assert!(
                now <= rss_before + 32 * MIB,
                "all unplugged: RSS {:.0} MiB, {:.0} MiB before plugging",
                mib(now),
                mib(rss_before)
            ),
        }
        rss = now;
    }
    let scrape = api.request("GET", "/metrics", None).body;
    assert_eq!(
        prometheus_value(&scrape, "prescient_memory_hotplug_invalid_requests_total"),
        0
    );
    assert!(prometheus_value(&scrape, "prescient_memory_hotplug_requests_total") >= 3);
    finish(vmm, api, &console);
}

#[test]
fn balloon_inflates_deflates_reports_free_pages_and_keeps_guest_stats() {
    let scratch = Scratch::new("elastic-balloon");
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        1,
        256,
        "cpu_ms=1 mem_mib=160 balloon_steps=2 balloon_report_mib=64 exit=kbd",
    ))
    .unwrap();
    spec["balloon"] = serde_json::json!({
        "amount_mib": 0, "deflate_on_oom": true,
        "stats_polling_interval_ms": 100, "free_page_reporting": true,
    });
    let (vmm, mut api, console) = start_with_console(&scratch, spec);

    let init = wait_for_console_line(&console, "guest: balloon0 stats=1", DEADLINE);
    assert!(
        init.contains("deflate_on_oom=1 hinting=0 reporting=1"),
        "{init}"
    );
    let free_mib = field(&init, "free_mib");
    let stats = |api: &mut ApiClient| api.request("GET", "/balloon/statistics", None).json();
    let wait_stats = |api: &mut ApiClient, what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let start = Instant::now();
        loop {
            let s = stats(api);
            if ok(&s) {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "{what}: last statistics {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let s = wait_stats(&mut api, "first report", &|s| {
        s.get("free_memory").is_some()
    });
    let free = s["free_memory"].as_u64().unwrap();
    assert_eq!(free >> 20, free_mib);
    assert!(s["total_memory"].as_u64().unwrap() > 250 * MIB, "{s}");
    assert!(s["stats_age_ms"].as_u64().is_some(), "{s}");

    // Inflating over the pages the memory phase wrote gives them back to the host.
    let rss = rss_bytes(vmm.id());
    patch(&mut api, "/balloon", serde_json::json!({"amount_mib": 128}));
    let line = wait_for_console_line(&console, "guest: balloon0 step=1 ", DEADLINE);
    assert_eq!(field(&line, "actual_pages"), 128 * 256, "{line}");
    let after = rss_bytes(vmm.id());
    assert!(
        after + 110 * MIB <= rss,
        "inflating 128 MiB: RSS {:.0} -> {:.0} MiB",
        mib(rss),
        mib(after)
    );
    // The guest's next report agrees with its console and with the device.
    let s = wait_stats(&mut api, "report after inflating", &|s| {
        s["free_memory"].as_u64() == Some(free - 128 * MIB)
    });
    assert_eq!(
        (s["actual_mib"].clone(), s["target_mib"].clone()),
        (128.into(), 128.into())
    );
    assert_eq!(s["minor_faults"], 1, "steps done, as the guest counts them");

    patch(&mut api, "/balloon", serde_json::json!({"amount_mib": 0}));
    let line = wait_for_console_line(&console, "guest: balloon0 step=2 ", DEADLINE);
    assert_eq!(field(&line, "actual_pages"), 0, "{line}");
    wait_stats(&mut api, "report after deflating", &|s| {
        s["actual_mib"] == 0
    });

    // Free page reporting: memory the guest wrote and then reported goes back to the host.
    wait_for_console_line(&console, "guest: balloon0 touched_mib=64", DEADLINE);
    let touched = rss_bytes(vmm.id());
    wait_for_console_line(&console, "guest: balloon0 reported_mib=64", DEADLINE);
    let reported = rss_bytes(vmm.id());
    assert!(
        reported + 56 * MIB <= touched,
        "reporting 64 MiB: RSS {:.0} -> {:.0} MiB",
        mib(touched),
        mib(reported)
    );

    // Statistics cannot be switched off once the guest uses them; the interval can change.
    let r = api.request(
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    patch(
        &mut api,
        "/balloon/statistics",
        serde_json::json!({"stats_polling_interval_s": 1}),
    );
    let config = api.request("GET", "/balloon", None).json();
    assert_eq!(config["amount_mib"], 0);
    assert_eq!(config["stats_polling_interval_s"], 1);
    let scrape = api.request("GET", "/metrics", None).body;
    assert_eq!(
        prometheus_value(&scrape, "prescient_balloon_invalid_requests_total"),
        0
    );
    finish(vmm, api, &console);
}

#[test]
fn a_hinting_run_gives_back_what_the_guest_lists_as_free() {
    let scratch = Scratch::new("elastic-hinting");
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        1,
        256,
        "cpu_ms=1 mem_mib=1 balloon_hint_mib=64 exit=kbd",
    ))
    .unwrap();
    spec["balloon"] =
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true});
    let (vmm, mut api, console) = start_with_console(&scratch, spec);

    let init = wait_for_console_line(&console, "guest: balloon0 stats=", DEADLINE);
    assert!(init.contains("hinting=1"), "{init}");
    let status = |api: &mut ApiClient| {
        let r = api.request("GET", "/balloon/hinting/status", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    assert_eq!(status(&mut api)["host_cmd"], 0, "no run yet");

    // The guest wrote 64 MiB and lists them as free in the run the host starts.
    wait_for_console_line(&console, "guest: balloon0 touched_hint_mib=64", DEADLINE);
    let touched = rss_bytes(vmm.id());
    patch(
        &mut api,
        "/balloon/hinting/start",
        serde_json::json!({"acknowledge_on_stop": true}),
    );
    let hinted = wait_for_console_line(&console, "guest: balloon0 hinted_mib=64", DEADLINE);
    assert_eq!(field(&hinted, "cmd"), 2, "the first run's id: {hinted}");
    // Its STOP ended the run at once (acknowledge_on_stop): DONE lets it use the pages again.
    wait_for_console_line(&console, "guest: balloon0 hint_done cmd=1", DEADLINE);
    let after = rss_bytes(vmm.id());
    assert!(
        after + 56 * MIB <= touched,
        "hinting 64 MiB: RSS {:.0} -> {:.0} MiB",
        mib(touched),
        mib(after)
    );
    let s = status(&mut api);
    assert_eq!(
        (s["host_cmd"].clone(), s["guest_cmd"].clone()),
        (1.into(), 0.into()),
        "{s}"
    );
    let scrape = api.request("GET", "/metrics", None).body;
    assert_eq!(
        prometheus_value(&scrape, "prescient_balloon_invalid_requests_total"),
        0
    );
    finish(vmm, api, &console);
}

#[test]
fn elastic_memory_api_refuses_what_the_vm_state_does_not_allow() {
    let scratch = Scratch::new("elastic-api");
    let socket = scratch.path().join("api.sock");
    let _vmm = RunningVmm::spawn([OsStr::new("--api-sock"), socket.as_os_str()]);
    let mut api = ApiClient::connect(&socket);
    let r = api.request("GET", "/balloon", None);
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("No balloon device configured"),
        "{}",
        r.body
    );
    // Firecracker answers the hotplug status after boot only.
    let r = api.request("GET", "/hotplug/memory", None);
    assert!(r.body.contains("before starting"), "{}", r.body);
    let r = api.request(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 512, "deflate_on_oom": false}"#),
    );
    assert!(r.body.contains("balloon.amount_mib"), "{}", r.body);
    let r = api.request(
        "PUT",
        "/hotplug/memory",
        Some(r#"{"total_size_mib": 1000}"#),
    );
    assert!(
        r.body.contains("memory-hotplug.total_size_mib"),
        "{}",
        r.body
    );
    let ok = api.request("PUT", "/hotplug/memory", Some(r#"{"total_size_mib": 256}"#));
    assert_eq!(ok.status, 204, "{}", ok.body);
    let r = api.request(
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size_mib": 128}"#),
    );
    assert!(r.body.contains("before starting"), "{}", r.body);
    let config = api.request("GET", "/vm/config", None).json();
    assert_eq!(config["memory-hotplug"]["total_size_mib"], 256);
    assert_eq!(config["memory-hotplug"]["slot_size_mib"], 128);
    let r = api.request("GET", "/balloon/statistics", None);
    assert!(r.body.contains("before starting"), "{}", r.body);
}

#[test]
fn the_elastic_memory_example_spec_boots_and_follows_the_api() {
    let scratch = Scratch::new("elastic-example");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/examples/elastic-memory.json"
    ))
    .unwrap()
    .replace("@TEST_GUEST@", TEST_GUEST_PVH);
    let (vmm, mut api, console) =
        start_with_console(&scratch, serde_json::from_str(&text).unwrap());
    wait_for_console_line(&console, "guest: balloon0 stats=1", DEADLINE);
    for (step, mib) in [(1, 64), (2, 32), (3, 0)] {
        patch(
            &mut api,
            "/balloon",
            serde_json::json!({ "amount_mib": mib }),
        );
        let line =
            wait_for_console_line(&console, &format!("guest: balloon0 step={step} "), DEADLINE);
        assert_eq!(field(&line, "actual_pages"), mib * 256, "{line}");
    }
    wait_for_console_line(
        &console,
        "guest: vmem0 unplugged memory inaccessible",
        DEADLINE,
    );
    for (step, mib) in [(1, 256), (2, 1024), (3, 0)] {
        patch(
            &mut api,
            "/hotplug/memory",
            serde_json::json!({ "requested_size_mib": mib }),
        );
        let line = wait_for_console_line(&console, &format!("guest: vmem0 step={step} "), DEADLINE);
        assert_eq!(field(&line, "plugged_mib"), mib, "{line}");
    }
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    vmm.wait(DEADLINE).assert_code(0);
}
