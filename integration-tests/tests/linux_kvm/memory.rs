//! Scenarios 4 and 5: the balloon and virtio-mem with Linux's own drivers, driven over the API,
//! seen from inside (the agent's MemTotal/MemAvailable) and from the host (the VMM's RSS).

use std::time::{Duration, Instant};

use integration_tests::agent::{self, num, STEP_SLACK};
use integration_tests::nested::on_hardware_kvm;
use serde_json::{json, Value};

use crate::guest::{Guest, GuestSpec, MIB, READY};

const SCENARIO: Duration = Duration::from_secs(480);
/// How long a device change may take to show (the guest driver works in the background).
const SETTLE: Duration = Duration::from_secs(60);
/// The memory hog of the deflate-on-OOM step: more than fits beside 320 MiB of balloon.
const HOG: &str = "stress-mem:20:200M";

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

/// Polls `GET path` until `ok`; the last answer.
fn wait_api(vm: &mut Guest, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = vm.get(path);
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < SETTLE,
            "{what}: not within {SETTLE:?}; last GET {path}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls the VMM's RSS until `ok`; the last value.
fn wait_rss(vm: &Guest, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let start = Instant::now();
    loop {
        let rss = vm.rss();
        if ok(rss) {
            return rss;
        }
        assert!(
            start.elapsed() < SETTLE,
            "{what}: not within {SETTLE:?}; RSS {} MiB",
            mib(rss)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `step` (over vsock) to its end while sampling the VMM's RSS: the highest sample. The
/// memory steps run for long enough to populate all their memory however slow the host: under
/// a nested KVM on a loaded machine that took up to 10 s for 300 MiB.
fn run_sampling_rss(vm: &Guest, step: &str, secs: u64) -> u64 {
    vm.run(step);
    let start = vm.rss();
    let began = Instant::now();
    let mut samples = vec![(Duration::ZERO, start)];
    let marker = format!("\"step\":\"{step}\"");
    let deadline = began + Duration::from_secs(secs) + STEP_SLACK;
    while vm
        .console
        .wait_line(Duration::from_millis(100), |l| {
            l.contains("agent: workload-done ") && l.contains(&marker)
        })
        .is_err()
    {
        samples.push((began.elapsed(), vm.rss()));
        assert!(Instant::now() < deadline, "{step} did not finish");
    }
    vm.done(step, secs);
    let peak = samples.iter().map(|&(_, r)| r).max().unwrap_or(start);
    // How fast the guest made memory resident: the host side of every first touch.
    let most = start + (peak - start.min(peak)) * 9 / 10;
    if let Some((t, _)) = samples.iter().find(|&&(_, r)| r >= most) {
        eprintln!(
            "{step}: RSS {} -> {} MiB, 90 % of the growth within {:.1} s",
            mib(start),
            mib(peak),
            t.as_secs_f64()
        );
    }
    peak
}

fn assert_no_oom(vm: &Guest) {
    let console = vm.console.lines();
    let oom: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("Out of memory") || l.contains("invoked oom-killer"))
        .collect();
    assert!(oom.is_empty(), "the guest ran out of memory: {oom:?}");
}

fn kib(r: &Value, key: &str) -> i64 {
    num(r, &[key])
}

#[test]
fn balloon_statistics_follow_the_interval_and_inflating_lowers_memtotal_and_rss() {
    on_hardware_kvm(SCENARIO, || {
        let mut vm = GuestSpec::new("linux-balloon", 1, 512)
            .with_workloads_in_the_initrd()
            .with_agent_link()
            .arg("prescient.agent.interval_ms=500")
            .section(
                "balloon",
                json!({"amount_mib": 0, "deflate_on_oom": false,
                       "stats_polling_interval_s": 1, "free_page_reporting": false}),
            )
            .logger(json!({"level": "Debug", "module": "vmm::idle_trim"}))
            .start();
        vm.ready();

        // Statistics from Linux's driver, once a second: count the fresh reports over 6 s.
        let first = wait_api(&mut vm, "/balloon/statistics", "the first report", |s| {
            s.get("total_memory").is_some()
        });
        let total = first["total_memory"].as_u64().unwrap();
        assert!(
            (400 * MIB..=512 * MIB).contains(&total),
            "total_memory {} MiB of a 512 MiB guest: {first}",
            mib(total)
        );
        let (mut fresh, mut last_age) = (0, first["stats_age_ms"].as_u64().unwrap());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(6) {
            let age = vm.get("/balloon/statistics")["stats_age_ms"]
                .as_u64()
                .unwrap();
            if age < last_age {
                fresh += 1;
            }
            last_age = age;
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            (4..=7).contains(&fresh),
            "{fresh} fresh statistics in 6 s at a 1 s interval"
        );

        // The guest touches most of its memory, then frees it: the host backs it all.
        let idle = vm.rss();
        let touched = run_sampling_rss(&vm, "stress-mem:15:360M", 15);
        assert!(
            touched >= idle + 200 * MIB,
            "RSS {} -> {} MiB while 360 MiB were touched",
            mib(idle),
            mib(touched)
        );
        let before = vm.wait_report("a report after the workload", READY, |r| {
            r["workload"].is_null()
        });
        let rss = vm.rss();

        // Inflate by 128 MiB: without deflate-on-OOM Linux takes the pages out of MemTotal; the
        // host discards them.
        vm.send("PATCH", "/balloon", json!({"amount_mib": 128}));
        wait_api(&mut vm, "/balloon/statistics", "actual 128 MiB", |s| {
            s["actual_mib"] == 128
        });
        let inflated = vm.wait_report("MemTotal 128 MiB lower", SETTLE, |r| {
            kib(&before, "mem_total_kib") - kib(r, "mem_total_kib") >= 128 * 1024
        });
        assert_eq!(
            kib(&before, "mem_total_kib") - kib(&inflated, "mem_total_kib"),
            128 * 1024,
            "MemTotal {before} -> {inflated}"
        );
        let available_drop =
            kib(&before, "mem_available_kib") - kib(&inflated, "mem_available_kib");
        assert!(
            available_drop >= 120 * 1024,
            "MemAvailable fell by {available_drop} KiB"
        );
        let what = format!("RSS 100 MiB below {} MiB", mib(rss));
        let after = wait_rss(&vm, &what, |r| r + 100 * MIB <= rss);
        eprintln!(
            "balloon: inflating 128 MiB: RSS {} -> {} MiB",
            mib(rss),
            mib(after)
        );

        // Deflate: MemTotal comes back.
        vm.send("PATCH", "/balloon", json!({"amount_mib": 0}));
        wait_api(&mut vm, "/balloon/statistics", "actual 0", |s| {
            s["actual_mib"] == 0
        });
        vm.wait_report("MemTotal back", SETTLE, |r| {
            kib(r, "mem_total_kib") == kib(&before, "mem_total_kib")
        });
        let scrape = vm.api().request("GET", "/metrics", None).body;
        assert_eq!(
            integration_tests::prometheus_value(
                &scrape,
                "prescient_balloon_invalid_requests_total"
            ),
            0,
            "Linux's driver made requests the device refused"
        );
        assert_no_oom(&vm);
        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    });
}

#[test]
fn balloon_deflates_on_oom_under_a_memory_hog_and_free_page_reporting_returns_memory() {
    on_hardware_kvm(SCENARIO, || {
        let mut vm = GuestSpec::new("linux-balloon-oom", 1, 512)
            .with_workloads_in_the_initrd()
            .with_agent_link()
            .arg("prescient.agent.interval_ms=500")
            .section(
                "balloon",
                json!({"amount_mib": 0, "deflate_on_oom": true,
                       "stats_polling_interval_s": 1, "free_page_reporting": true}),
            )
            .logger(json!({"level": "Debug", "module": "vmm::idle_trim"}))
            .start();
        vm.ready();

        // Free page reporting: what the workload made resident and then freed goes back to the
        // host (Linux reports free 2 MiB blocks a few seconds after they are freed).
        let idle = vm.rss();
        let peak = run_sampling_rss(&vm, "stress-mem:15:300M", 15);
        let grew = peak.saturating_sub(idle);
        assert!(
            grew >= 150 * MIB,
            "RSS {} -> {} MiB while 300 MiB were touched",
            mib(idle),
            mib(peak)
        );
        let what = format!(
            "two thirds of the {} MiB the workload made resident reported back (RSS {} MiB idle, {} MiB at peak)",
            mib(grew),
            mib(idle),
            mib(peak)
        );
        let after = wait_rss(&vm, &what, |r| peak.saturating_sub(r) >= grew / 3 * 2);
        eprintln!(
            "balloon: free page reporting: RSS {} -> {} -> {} MiB",
            mib(idle),
            mib(peak),
            mib(after)
        );

        // Deflate on OOM: with 320 MiB in the balloon, a 200 MiB hog only fits if the guest
        // takes pages back from the balloon, which it may, and must not kill anything. Linux
        // gives back 1 MiB per OOM notification, each after a reclaim pass: under the nested
        // KVM on a loaded host ~13 MiB/s, so the hog runs long enough to populate all of it.
        vm.send("PATCH", "/balloon", json!({"amount_mib": 320}));
        wait_api(&mut vm, "/balloon/statistics", "actual 320 MiB", |s| {
            s["actual_mib"] == 320
        });
        let rss_before = vm.rss();
        let peak = run_sampling_rss(&vm, HOG, 20);
        let reports = vm.reports();
        let (before, during) = agent::reports_around(&reports, HOG);
        let s = vm.get("/balloon/statistics");
        assert_eq!(s["target_mib"], 320, "{s}");
        let deflated = 320 - s["actual_mib"].as_i64().unwrap();
        // With deflate-on-OOM Linux leaves the balloon's pages in MemTotal, so MemTotal less
        // MemAvailable counts them: the memory the hog got is what that rose by plus what the
        // balloon gave back.
        let used = |r: &Value| kib(r, "mem_total_kib") - kib(r, "mem_available_kib");
        let rose = (during.iter().map(used).max().unwrap_or(0) - used(&before)) / 1024;
        let free_mib = kib(&before, "mem_available_kib") / 1024;
        eprintln!(
            "balloon: deflate on OOM: {free_mib} MiB available outside the balloon, the hog \
             took {rose} MiB of it and {deflated} MiB from the balloon; RSS {} -> {} MiB",
            mib(rss_before),
            mib(peak)
        );
        assert!(
            free_mib < 120,
            "the 200 MiB hog fits beside the balloon ({free_mib} MiB available): nothing to deflate"
        );
        assert!(
            rose + deflated >= 180,
            "the 200 MiB hog got only {rose} MiB of free memory and {deflated} MiB from the balloon: {s}"
        );
        assert!(
            peak >= rss_before + 150 * MIB,
            "RSS {} -> {} MiB while the hog populated 200 MiB",
            mib(rss_before),
            mib(peak)
        );
        assert_no_oom(&vm);
        let scrape = vm.api().request("GET", "/metrics", None).body;
        assert_eq!(
            integration_tests::prometheus_value(
                &scrape,
                "prescient_balloon_invalid_requests_total"
            ),
            0
        );
        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    });
}

#[test]
fn virtio_mem_plugs_512_mib_that_comes_online_and_unplugging_returns_it() {
    on_hardware_kvm(SCENARIO, || {
        let mut vm = GuestSpec::new("linux-virtio-mem", 1, 512)
            .with_workloads_in_the_initrd()
            .with_agent_link()
            .arg("prescient.agent.interval_ms=500")
            .section(
                "memory-hotplug",
                json!({"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128}),
            )
            .logger(json!({"level": "Debug", "module": "vmm::idle_trim"}))
            .start();
        vm.ready();
        let before = vm.wait_report("a first report", READY, |_| true);

        // Plug 512 MiB: Linux adds it and onlines it by itself (prescient's command line).
        vm.send(
            "PATCH",
            "/hotplug/memory",
            json!({"requested_size_mib": 512}),
        );
        wait_api(&mut vm, "/hotplug/memory", "512 MiB plugged", |s| {
            s["plugged_size_mib"] == 512
        });
        let grown = vm.wait_report("MemTotal 512 MiB higher", SETTLE, |r| {
            kib(r, "mem_total_kib") - kib(&before, "mem_total_kib") >= 500 * 1024
        });
        let growth = kib(&grown, "mem_total_kib") - kib(&before, "mem_total_kib");
        assert!(
            growth <= 512 * 1024,
            "MemTotal grew by {growth} KiB for 512 MiB plugged"
        );

        // A workload larger than the boot memory runs in the plugged memory without OOM. (Under
        // the nested KVM 700 MiB take ~3 s with 2 MiB-mapped guest memory, over 40 s without.)
        let rss_before = vm.rss();
        let peak = run_sampling_rss(&vm, "stress-mem:15:700M", 15);
        assert!(
            peak >= rss_before + 500 * MIB,
            "RSS {} -> {} MiB while 700 MiB were touched",
            mib(rss_before),
            mib(peak)
        );
        assert_no_oom(&vm);

        // Unplug everything: the guest gives it back and the host discards it.
        vm.send("PATCH", "/hotplug/memory", json!({"requested_size_mib": 0}));
        wait_api(&mut vm, "/hotplug/memory", "all unplugged", |s| {
            s["plugged_size_mib"] == 0
        });
        vm.wait_report("MemTotal back", SETTLE, |r| {
            kib(r, "mem_total_kib") == kib(&before, "mem_total_kib")
        });
        let what = format!("RSS 400 MiB below its peak of {} MiB", mib(peak));
        let after = wait_rss(&vm, &what, |r| r + 400 * MIB <= peak);
        eprintln!(
            "virtio-mem: unplugging 512 MiB: RSS {} -> {} MiB",
            mib(peak),
            mib(after)
        );
        let scrape = vm.api().request("GET", "/metrics", None).body;
        assert_eq!(
            integration_tests::prometheus_value(
                &scrape,
                "prescient_memory_hotplug_invalid_requests_total"
            ),
            0,
            "Linux's driver made requests the device refused"
        );
        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    });
}
