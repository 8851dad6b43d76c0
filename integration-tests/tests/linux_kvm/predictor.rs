//! Scenario 6: the inline predictor with a Linux guest through stress-ng phases (CPU, a memory
//! ramp past the boot memory, fio on the virtio disk): memory is plugged ahead of the ramp and
//! the guest never runs out, the CPU quota and the drive's bucket follow the phases, a healthy
//! guest is never flagged, and the recorded trace replays to the same decisions.

use std::path::Path;
use std::time::Duration;

use integration_tests::nested::on_hardware_kvm;
use integration_tests::{ApiClient, Scratch};
use serde_json::{json, Value};

use integration_tests::agent::STEP_SLACK;

use crate::guest::{Guest, GuestSpec};

const SCENARIO: Duration = Duration::from_secs(540);
const DEADLINE: Duration = Duration::from_secs(120);
const BOOT_MIB: u64 = 256;
/// The ramp's steps: stress-ng keeps this much touched for 4 s each; the last is more than the
/// boot memory, so it only fits in memory the predictor plugged.
const RAMP: [&str; 3] = ["stress-mem:4:96M", "stress-mem:4:192M", "stress-mem:4:320M"];

fn decisions(api: &mut ApiClient) -> Vec<Value> {
    let page = api
        .request("GET", "/predictor/decisions?since=0", None)
        .json();
    page["decisions"].as_array().expect("decisions").clone()
}

fn applied<'a>(d: &'a Value, what: &str) -> Option<&'a Value> {
    d["applied"].as_array()?.iter().find(|a| a["what"] == what)
}

/// What the predictor was doing, for a failure: the VMM's threads with their CPU time (the
/// VMM thread runs the predictor and shares the quota with the vCPUs), its allocation and its
/// last decisions, one line each (what it saw, what it allocated, why). Nothing once the VMM
/// has ended (`failure` says so, with its stderr): asking its API would panic on the socket and
/// hide the cause, a triple fault the nested harness retries, say.
fn explain(vm: &mut Guest, failure: &str) -> String {
    if failure.contains("the VMM exited") {
        return String::new();
    }
    let status = vm.get("/predictor");
    let log = decisions(&mut vm.api());
    let mut out = format!(
        "--- the VMM's threads ---\n{}\n--- GET /predictor: allocation {} ---\n--- last of {} decisions ---\n",
        vm.console.threads(),
        status["allocation"],
        log.len()
    );
    for d in log.iter().rev().take(25).rev() {
        let i = &d["inputs"];
        out += &format!(
            "t {} ms: used cpu {:.2} mem {:.0} throttled {} unknown {} -> {} ({})\n",
            d["t_ms"],
            i["cpu"].as_f64().unwrap_or(0.0),
            i["mem"].as_f64().unwrap_or(0.0),
            i["cpu_throttled"],
            i["unknown_exits"],
            d["allocation"],
            d["reason"].as_str().unwrap_or("")
        );
    }
    out
}

/// Waits for `step` (running `secs`) to succeed, explaining the predictor if it does not.
fn done(vm: &mut Guest, step: &str, secs: u64) {
    let marker = format!("\"step\":\"{step}\"");
    let waited = vm.console.wait_for(
        &format!("{step} to finish"),
        Duration::from_secs(secs) + STEP_SLACK,
        |l| l.contains("agent: workload-done ") && l.contains(&marker),
    );
    if let Err(e) = waited {
        panic!("{e}\n{}", explain(vm, &e));
    }
    vm.done(step, secs);
}

/// The cgroup v2 or v1 quota of the VM's vCPU threads, in cores.
fn cgroup_cores(id: &str) -> Option<f64> {
    let v2 = Path::new("/sys/fs/cgroup/prescient")
        .join(id)
        .join("cpu.max");
    if let Ok(s) = std::fs::read_to_string(v2) {
        let mut f = s.split_whitespace();
        let quota: f64 = f.next()?.parse().ok()?;
        let period: f64 = f.next()?.parse().ok()?;
        return Some(quota / period);
    }
    let v1 = Path::new("/sys/fs/cgroup/cpu/prescient")
        .join(id)
        .join("cpu.cfs_quota_us");
    let quota: f64 = std::fs::read_to_string(v1).ok()?.trim().parse().ok()?;
    Some(quota / 100_000.0)
}

#[test]
#[ignore = "nested KVM on a shared 2-core host: 3 runs on 2026-12-07 evening with 500 ms windows: 2 passed (153.5 s in L1; 109.9 s after the harness retried a first attempt), and in 2 of the 3 the guest triple-faulted (KVM_EXIT_SHUTDOWN at the reset state) during or right after the memory ramp, as virtio-mem plugged memory: far more often than the ~1 in 15 L2 boots QEMU's SVM breaks, so suspect the plug path (not proven); with 100 ms windows the guest made no progress in stress-cpu:5 (90-130 ms of guest user time in 60-110 s) while the debug build's VMM thread running the predictor took 58.9 s of L1 CPU in 106 s, more than either vCPU thread (47.6, 36.6 s), the quota at 1.5-2 cores not the limit; run with --ignored on a hardware KVM host"]
fn the_predictor_follows_stress_ng_phases_without_oom_or_false_alarms_and_replays() {
    on_hardware_kvm(SCENARIO, || {
        let id = format!("linux-predictor-{}", std::process::id());
        // Outlives the VM: the trace is replayed after it ends.
        let traces = Scratch::new("linux-predictor-traces");
        let trace_dir = traces.path().to_path_buf();
        std::fs::create_dir_all(trace_dir.join("recorded")).unwrap();
        let mut steps = vec!["stress-cpu:5"];
        steps.extend(RAMP);
        steps.push("fio-randrw:5:32M");
        let spec = GuestSpec::new("linux-predictor", 2, BOOT_MIB)
            .with_rootfs()
            .with_agent_link()
            .arg("prescient.agent.interval_ms=500")
            .steps(&steps)
            .section("memory-hotplug", json!({"total_size_mib": 1024}))
            .section(
                "balloon",
                json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_ms": 100}),
            )
            // Any access no device answered, with its address, on stderr (shown on failure).
            .logger(json!({"level": "Trace", "module": "vmm::vstate::vcpu::exits"}))
            .section(
                "predictor",
                json!({
                    // Not 100 ms: under the nested KVM the debug build's VMM thread, which runs
                    // the predictor, then took more of L1's 2 CPUs than either vCPU thread and
                    // the guest made no progress in stress-ng (8 to 10 windows per step still).
                    "window_ms": 500,
                    "budget": {
                        "memory_mib": {"min": BOOT_MIB + 64, "max": BOOT_MIB + 1024},
                        // Down to a tenth of a core: the quota the boot settles at is far
                        // below what stress-ng asks for, and the vCPUs can never use more
                        // than it, so only the periods the group was throttled in show the
                        // demand (before they were a signal the quota never rose again).
                        "cpu_cores": {"min": 0.1, "max": 2},
                        "blk_mibps": {"min": 8, "max": 400},
                    },
                    "trace_path": trace_dir.join("recorded/run.jsonl"),
                }),
            );
        let socket = spec.scratch().path().join("api.sock");
        let spec_path = spec.write_spec();
        let mut cmd = std::process::Command::new(integration_tests::prescient_bin());
        cmd.arg("--api-sock")
            .arg(&socket)
            .arg("--config-file")
            .arg(&spec_path)
            .args(["--id", &id]);
        let mut vm = spec.start_with(&mut cmd, &socket);
        if let Err(e) = vm
            .console
            .wait_for("agent: ready", crate::guest::READY, |l| {
                l.contains("agent: ready")
            })
        {
            panic!("{e}\n{}", explain(&mut vm, &e));
        }

        // CPU: the quota is raised for stress-ng and the cgroup holds the allocation.
        done(&mut vm, "stress-cpu:5", 5);
        let log = decisions(&mut vm.api());
        let cpu_peak = log
            .iter()
            .filter(|d| d["resized"]["cpu"] == true)
            .filter_map(|d| d["allocation"]["cpu"].as_f64())
            .fold(0.0, f64::max);
        assert!(
            cpu_peak >= 1.5,
            "the CPU quota never rose for stress-ng: peak {cpu_peak}"
        );
        let alloc = vm.get("/predictor")["allocation"]["cpu"].as_f64().unwrap();
        let cores = cgroup_cores(&id).expect("the VM's cgroup");
        assert!(
            (cores - alloc).abs() < 0.05 || (cores - alloc).abs() < 0.1 * alloc,
            "cgroup quota {cores} cores, allocation {alloc}"
        );

        // Memory: each ramp step finds its memory plugged.
        for step in RAMP {
            done(&mut vm, step, 4);
        }
        let hotplug = vm.get("/hotplug/memory");
        done(&mut vm, "fio-randrw:5:32M", 5);
        let log = decisions(&mut vm.api());
        let console = vm.console.lines();
        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
        assert!(
            !console
                .iter()
                .any(|l| l.contains("Out of memory") || l.contains("oom-killer")),
            "the guest ran out of memory; plugged {hotplug}"
        );
        let mem_peak = log
            .iter()
            .filter(|d| applied(d, "mem").is_some_and(|a| a["applied"] == true))
            .filter_map(|d| d["allocation"]["mem"].as_f64())
            .fold(0.0, f64::max);
        assert!(
            mem_peak >= (BOOT_MIB + 128) as f64,
            "memory never grew past the boot memory for a 320 MiB ramp: peak {mem_peak} MiB"
        );
        let mem: Vec<&Value> = log.iter().filter_map(|d| applied(d, "mem")).collect();
        assert!(
            mem.iter().all(|a| a["applied"] == true),
            "memory decisions that did not reach the devices: {mem:#?}"
        );

        // The drive's bucket: small while the disk idles, larger for fio.
        let blk: Vec<f64> = log
            .iter()
            .filter(|d| d["resized"]["blk"] == true)
            .filter_map(|d| d["allocation"]["blk"].as_f64())
            .collect();
        let low = blk.iter().position(|a| *a <= 16.0);
        assert!(
            low.is_some_and(|i| blk[i..].iter().any(|a| *a > 16.0)),
            "the block bucket did not shrink while idle and grow for fio: {blk:?}"
        );

        // A healthy guest is never flagged: every exit is a known device's, no device is new,
        // and no anomaly action was taken.
        let flagged: Vec<&Value> = log
            .iter()
            .filter(|d| {
                let f = &d["anomaly"]["findings"];
                f["unknown_exits"] == true
                    || f["new_devices"].as_u64().unwrap_or(0) != 0
                    || !matches!(d["anomaly"]["action"].as_str(), Some("hold" | "log"))
            })
            .collect();
        assert!(
            flagged.is_empty(),
            "a healthy Linux guest was flagged: {flagged:#?}"
        );

        // The trace replays to the same decisions.
        let (replayed, live) = integration_tests::replay_beside_live(
            &trace_dir.join("recorded"),
            &traces.path().join("replayed.jsonl"),
            &log,
            DEADLINE,
        );
        // The trace runs on past the last decisions fetched, so the replay has a few more.
        assert!(
            live.len() >= 30 && replayed.len() >= live.len(),
            "replayed {} of {} decisions",
            replayed.len(),
            live.len()
        );
        assert_eq!(live[..], replayed[..live.len()]);
    });
}
