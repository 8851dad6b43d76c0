//! Scenario 7: cores on demand with a stock Linux. Debian's kernel (the one L1 runs; its virtio
//! drivers are modules, appended to the initrd, and its `virtio_mmio` has no command-line
//! devices) boots with the ACPI tables alone, finds every virtio device in the DSDT, starts
//! with 1 of at most 4 vCPUs, gets 2 more plugged (the agent onlines them, as udev would),
//! runs stress-ng on all 3, and gives 2 back through ACPI's eject: their threads end on the
//! host. Then the same with the predictor's CPU actuator deciding.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::agent::assert_output;
use integration_tests::nested::{on_hardware_kvm, L1_KERNEL, L1_KERNEL_GUEST_MODULES};
use integration_tests::{vcpu_changes, vcpu_thread_ticks};
use serde_json::{json, Value};

use crate::guest::{Guest, GuestSpec, READY};

const SCENARIO: Duration = Duration::from_secs(600);
/// From a plug or unplug request to the guest's and the host's view of it.
const CHANGE: Duration = Duration::from_secs(120);
/// /proc's clock ticks per second (USER_HZ, 100 on x86-64 Linux).
const USER_HZ: f64 = 100.0;
/// The devices of the VM, as the guest's rcS lists them: virtio device id and Linux driver.
const DEVICES: [(&str, &str); 5] = [
    ("0x0001", "virtio_net"),
    ("0x0002", "virtio_blk"),
    ("0x0004", "virtio_rng"),
    ("0x0005", "virtio_balloon"),
    ("0x0013", "vmw_vsock_virtio_transport"),
];

/// Debian's kernel with its virtio modules, the workloads and the agent's vsock link, 1 of at
/// most `max_vcpus` vCPUs, 512 MiB, described by the ACPI tables alone.
fn debian(name: &str, max_vcpus: u8) -> GuestSpec {
    GuestSpec::new(name, 1, 512)
        .kernel(Path::new(L1_KERNEL))
        .with_workloads_in_the_initrd()
        .append_to_initrd(Path::new(L1_KERNEL_GUEST_MODULES))
        .with_agent_link()
        .arg("prescient.agent.interval_ms=500")
        .section(
            "machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 512, "max_vcpus": max_vcpus, "acpi_only": true}),
        )
}

/// Waits for an agent report with `n` CPUs online; when it came (from the VMM's start).
fn online(vm: &Guest, skip: usize, n: i64) -> Duration {
    let (at, _) = vm
        .console
        .wait_for_after(skip, &format!("{n} CPUs online"), CHANGE, |l| {
            l.contains("agent: report ") && l.contains(&format!("\"cpus_online\":{n},"))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    at
}

/// Waits until the VMM at `tasks` has `n` vCPU threads: how long that took.
fn wait_threads(tasks: &Path, n: usize) -> Duration {
    let t = Instant::now();
    while vcpu_thread_ticks(tasks).len() != n {
        assert!(
            t.elapsed() < CHANGE,
            "vCPU threads {:?}, expected {n}",
            vcpu_thread_ticks(tasks).keys()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

/// stress-ng's `--metrics-brief` line for its CPU stressor: real, usr and sys seconds.
fn stress_ng_times(lines: &[String]) -> (f64, f64, f64) {
    let line = lines
        .iter()
        .find(|l| l.contains("stress-ng: metrc:") && l.contains("] cpu "))
        .unwrap_or_else(|| panic!("no stress-ng metrics line for cpu: {lines:#?}"));
    // `cpu <bogo ops> <real> <usr> <sys> <bogo ops/s> <bogo ops/s>`
    let f: Vec<f64> = line[line.find("] cpu ").unwrap() + 6..]
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(f.len() >= 4, "{line}");
    (f[1], f[2], f[3])
}

fn vcpu_states(vm: &mut Guest) -> Vec<(u64, String)> {
    let v = vm.get("/hotplug/vcpus");
    v["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().unwrap(),
                c["state"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[test]
fn debian_finds_its_devices_in_the_dsdt_and_plugs_runs_and_unplugs_vcpus() {
    on_hardware_kvm(SCENARIO, || {
        let spec = debian("linux-cpu-hotplug", 4);
        let disk = spec.scratch().path().join("scratch.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(8 << 20))
            .expect("a scratch disk");
        let mut vm = spec
            .section(
                "drives",
                json!([{"drive_id": "scratch", "path_on_host": disk,
                        "is_root_device": false, "is_read_only": false}]),
            )
            .section(
                "network-interfaces",
                json!([{"iface_id": "eth0", "host_dev_name": "phot0",
                        "guest_mac": "06:00:ac:10:00:03"}]),
            )
            .section("entropy", json!({}))
            .section("balloon", json!({"amount_mib": 0, "deflate_on_oom": false}))
            .start();
        let pid = vm.console.pid();
        let tasks = std::path::PathBuf::from(format!("/proc/{pid}/task"));
        let threads = || vcpu_thread_ticks(&tasks);

        // ACPI alone: no device on the command line, 3 possible CPUs beside the boot one.
        let cmdline = vm
            .console
            .expect("the command line", READY, |l| l.contains("Command line: "));
        assert!(!cmdline.contains("virtio_mmio.device="), "{cmdline}");
        vm.console.expect("4 possible CPUs", READY, |l| {
            l.contains("Allowing 4 CPUs, 3 hotplug CPUs")
        });
        vm.ready();
        let lines = vm.console.lines();
        let virtio: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("rcS: virtio "))
            .collect();
        assert_eq!(virtio.len(), DEVICES.len(), "{virtio:#?}");
        for (id, driver) in DEVICES {
            assert!(
                virtio
                    .iter()
                    .any(|l| l.contains(&format!("device {id} at LNRO0005:"))
                        && l.ends_with(&format!("driver {driver}"))),
                "no virtio device {id} found in the DSDT with {driver}: {virtio:#?}"
            );
        }
        let skip = vm.console.line_count();
        online(&vm, skip, 1);
        assert_eq!(threads().len(), 1);

        // Plug 2: the guest's ACPI code sees them, the agent onlines them.
        let skip = vm.console.line_count();
        let asked = vm.console.elapsed();
        let t = Instant::now();
        vm.send("PATCH", "/machine-config", json!({"vcpu_count": 3}));
        let answered = t.elapsed();
        let started = answered + wait_threads(&tasks, 3);
        let (hot_added, _) = vm
            .console
            .wait_for_after(skip, "Linux's hot-add of CPU 2", CHANGE, |l| {
                l.contains("CPU2 has been hot-added")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let all_online = online(&vm, skip, 3);
        for cpu in [1, 2] {
            vm.console.expect("the agent's online", CHANGE, |l| {
                l.contains(&format!("agent: cpu {cpu} hot-added, online"))
            });
        }
        assert_eq!(
            vcpu_states(&mut vm),
            [
                (0, "running".into()),
                (1, "running".into()),
                (2, "running".into()),
                (3, "unplugged".into())
            ]
        );
        eprintln!(
            "hotplug: plug of 2: API answered in {answered:?}, 3 vCPU threads after {started:?}; \
             Linux hot-added CPU 2 {:?} and reported 3 online {:?} after the request",
            hot_added.saturating_sub(asked),
            all_online.saturating_sub(asked)
        );

        // stress-ng on every online CPU: 3 workers, and the guest's CPUs busy with them.
        let before = threads();
        let t = Instant::now();
        vm.run("stress-cpu:8");
        vm.done("stress-cpu:8", 8);
        let wall = t.elapsed();
        let after = threads();
        let lines = vm.console.lines();
        assert_output(&lines, "stress-cpu", "dispatching hogs: 3 cpu");
        assert_output(&lines, "stress-cpu", "successful run completed");
        // What stress-ng's workers got (their usr + sys time over the run's real time; the
        // guest's tick-based /proc/stat loses most ticks of a vCPU the host did not run, and
        // under a nested KVM misses half of that time): more than one CPU can give, as much
        // as the host's CPUs allow (a nested L1 has 2 for the 3 vCPUs).
        let (real, usr, sys) = stress_ng_times(&lines);
        let got = (usr + sys) / real;
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected = host_cpus.min(3) as f64;
        assert!(
            got >= 1.3 && got >= 0.6 * expected,
            "stress-ng's 3 workers got {got:.2} CPUs ({usr} s usr + {sys} s sys in {real} s) on \
             {host_cpus} host CPUs"
        );
        // Each vCPU thread ran on the host for a good share of the run.
        let per_thread: Vec<f64> = after
            .iter()
            .map(|(i, ticks)| (ticks - before.get(i).copied().unwrap_or(0)) as f64 / USER_HZ)
            .collect();
        for (i, s) in per_thread.iter().enumerate() {
            assert!(
                *s >= 0.25 * real * expected / 3.0,
                "vCPU {i}'s thread ran {s:.1} s of stress-ng's {real} s: {per_thread:?}"
            );
        }
        eprintln!(
            "hotplug: stress-ng on 3 vCPUs: its workers got {got:.2} CPUs ({usr} s usr + {sys} s \
             sys in {real} s, {host_cpus} host CPUs); host vCPU threads {per_thread:.1?} s in \
             the step's {wall:.1?}"
        );

        // Unplug 2: Linux offlines them and ejects; their threads end.
        let skip = vm.console.line_count();
        let asked = vm.console.elapsed();
        let t = Instant::now();
        vm.send("PATCH", "/machine-config", json!({"vcpu_count": 1}));
        let offline = online(&vm, skip, 1);
        wait_threads(&tasks, 1);
        let gone = t.elapsed();
        assert_eq!(threads().keys().copied().collect::<Vec<_>>(), [0]);
        let states: Vec<(u64, String)> = vcpu_states(&mut vm);
        assert_eq!(states[0], (0, "running".into()));
        assert!(
            states[1..].iter().all(|(_, s)| s == "unplugged"),
            "{states:?}"
        );
        let cfg: Value = vm.get("/machine-config");
        assert_eq!(cfg["vcpu_count"], 1);
        eprintln!(
            "hotplug: unplug of 2: reported 1 online {:?} and threads gone {gone:?} after the \
             request",
            offline.saturating_sub(asked)
        );

        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    });
}

/// The predictor's CPU actuator with the same guest, 1 of at most 2 vCPUs: stress-ng's first
/// phase (one worker, all the guest has) saturates the vCPU, the forecast's upper band asks for
/// more than one, and a vCPU is plugged while that phase runs, so that the next phase finds 2
/// CPUs online and starts 2 workers; once the demand has gone the vCPU is unplugged again
/// through the guest's eject.
#[test]
#[ignore = "nested KVM on a shared 2-core host: never passed there (2026-12-07, 6 runs): a vCPU the predictor plugged in early boot broke Debian's kernel inside the emulator (invalid opcode on `ret` in start_kernel, 2 of 2); with the budget held at 1 core through boot and 15 s of idle, the idle guest's vCPU thread still took 0.4 to 0.9 of an L1 core per 500 ms window (emulated timer ticks), the calibrated upper band (q 0.99) stood at 2 cores, and the predictor plugged at once when the budget was released: nothing is 'ahead' of the stress phase there; then the guest soft-locked or the VM ended; run with --ignored on a hardware KVM host"]
fn the_predictor_plugs_a_vcpu_during_a_stress_ng_phase_ahead_of_the_next_and_unplugs_after() {
    on_hardware_kvm(SCENARIO, || {
        let mut vm = debian("linux-predictor-vcpus", 2)
            .section(
                "predictor",
                // An anomaly alarm is not what this is about: only logged.
                // One core until the guest is up: a vCPU plugged while Debian's kernel patched
                // its text in early boot (its boot keeps 1 vCPU busy, and the forecast asks for
                // more) broke the guest inside the nested emulator, twice of two: an invalid
                // opcode on `ret` in start_kernel, then "Attempted to kill the idle task".
                json!({
                    "budget": {"cpu_cores": {"min": 1, "max": 1}},
                    "window_ms": 500,
                    "vcpus": {"unplug_after_ms": 3000},
                    "anomaly": {"threshold": 2.5, "action": "log"},
                }),
            )
            .start();
        let tasks = std::path::PathBuf::from(format!("/proc/{}/task", vm.console.pid()));
        vm.ready();
        // Idle a while before the budget lets it plug: the forecast comes down from the boot's
        // busy vCPU (released at once, it plugged a vCPU for the boot that had just ended).
        for _ in 0..30 {
            online(&vm, vm.console.line_count(), 1);
        }
        vm.send(
            "PATCH",
            "/predictor",
            json!({"budget": {"cpu_cores": {"min": 0.1, "max": 2}}}),
        );
        let skip = vm.console.line_count();
        for _ in 0..6 {
            online(&vm, vm.console.line_count(), 1);
        }
        assert!(vcpu_changes(&mut vm.api()).is_empty(), "a plug while idle");

        vm.run("stress-cpu:30,stress-cpu:10");
        let (first_start, _) = vm
            .console
            .wait_for_after(skip, "the first phase", CHANGE, |l| {
                l.contains("agent: workload-start stress-cpu:30")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let (online_at, _) = vm
            .console
            .wait_for_after(
                skip,
                "vCPU 1 plugged and online",
                Duration::from_secs(30) + CHANGE,
                |l| l.contains("agent: cpu 1 hot-added, online"),
            )
            .unwrap_or_else(|e| panic!("{e}\n{:#?}", vcpu_changes(&mut vm.api())));
        let changes = vcpu_changes(&mut vm.api());
        assert!(
            changes[0].2 && changes[0].3.starts_with("plugged vCPU [1]"),
            "{changes:#?}"
        );
        vm.done("stress-cpu:30", 30);
        let (second_start, _) = vm
            .console
            .wait_for_after(skip, "the second phase", CHANGE, |l| {
                l.contains("agent: workload-start stress-cpu:10")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        vm.done("stress-cpu:10", 10);
        let lines = vm.console.lines();
        let dispatched: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("dispatching hogs:"))
            .collect();
        assert!(
            dispatched.len() == 2
                && dispatched[0].contains("dispatching hogs: 1 cpu")
                && dispatched[1].contains("dispatching hogs: 2 cpu"),
            "{dispatched:#?}"
        );

        // The demand gone, the vCPU goes: the guest ejects it and its thread ends.
        let skip = vm.console.line_count();
        let done_at = vm.console.elapsed();
        let offline_at = online(&vm, skip, 1);
        wait_threads(&tasks, 1);
        let changes = vcpu_changes(&mut vm.api());
        assert_eq!(changes.len(), 2, "one plug, one unplug: {changes:#?}");
        assert!(
            changes[1].2
                && changes[1]
                    .3
                    .starts_with("asked the guest to unplug vCPU [1]"),
            "{changes:#?}"
        );
        eprintln!(
            "hotplug: predictor: vCPU 1 online {:?} into the 1-worker phase, {:?} before the \
             2-worker one; back to 1 CPU {:?} after the last phase; changes {changes:?}",
            online_at.saturating_sub(first_start),
            second_start.saturating_sub(online_at),
            offline_at.saturating_sub(done_at)
        );
        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    });
}
