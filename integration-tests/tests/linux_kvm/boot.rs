//! Scenarios 1 and 2: Linux to `agent: ready`, workloads, and a clean poweroff; the initramfs
//! alone, the rootfs on virtio-blk, and Debian's own bzImage.

use std::time::Duration;

use integration_tests::agent::{
    assert_output, assert_reports_match_the_vm, assert_root_on_vda, assert_stress_mem_seen,
    growth_during, reports,
};
use integration_tests::nested::{on_hardware_kvm, L1_KERNEL, L1_KERNEL_RELEASE};
use integration_tests::Scratch;
use serde_json::json;

use crate::guest::{GuestSpec, READY};

/// One L1 boot: L1 itself, the guest's boot and its workloads.
const SCENARIO: Duration = Duration::from_secs(600);

/// stress-ng's CPU and memory workers and fio, then the agent's poweroff.
const WORKLOADS: [(&str, u64); 3] = [
    ("stress-cpu:3", 3),
    ("stress-mem:3:64M", 3),
    ("fio-randrw:3:16M", 3),
];

/// Boots `spec` (2 vCPUs, 512 MiB) with `WORKLOADS` on its command line, requires each to succeed
/// and the VMM to end cleanly on the guest's poweroff, and checks what every such run shows: the
/// workloads' own output and the agent's reports. The console.
fn run_workloads(spec: GuestSpec) -> Vec<String> {
    let mut steps: Vec<&str> = WORKLOADS.iter().map(|(s, _)| *s).collect();
    steps.push("poweroff");
    let vm = spec
        .arg("prescient.agent.interval_ms=500")
        .steps(&steps)
        .start();
    vm.ready();
    for (step, secs) in WORKLOADS {
        vm.done(step, secs);
    }
    let lines = vm.console.lines();
    let (status, stderr) = vm.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "the guest's reboot -f (i8042 reset) ends prescient cleanly: {status}\n{stderr}"
    );
    assert_output(&lines, "stress-cpu", "successful run completed");
    assert_output(&lines, "fio-randrw", "READ: bw=");
    assert_output(&lines, "fio-randrw", "WRITE: bw=");
    assert_reports_match_the_vm(&reports(&lines), 2, 512);
    assert_stress_mem_seen(&lines, "stress-mem:3:64M", 64);
    // The guest's own view of stress-ng: user time while it ran (how much depends on the host;
    // nested under an emulator it is little).
    let busy = growth_during(&reports(&lines), "stress-cpu:3", &["cpu", "user_ms"]);
    assert!(busy > 0, "no user time while stress-ng --cpu ran");
    lines
}

#[test]
fn initramfs_runs_stress_ng_and_fio_then_powers_off_cleanly() {
    on_hardware_kvm(SCENARIO, || {
        run_workloads(GuestSpec::new("linux-initramfs", 2, 512).with_workloads_in_the_initrd());
    });
}

#[test]
fn rootfs_on_virtio_blk_runs_stress_ng_and_fio_then_powers_off_cleanly() {
    on_hardware_kvm(SCENARIO, || {
        let lines = run_workloads(GuestSpec::new("linux-rootfs", 2, 512).with_rootfs());
        assert_root_on_vda(&lines);
        // fio runs with O_DIRECT on the ext4 root: its writes reach /dev/vda.
        let written = growth_during(&reports(&lines), "fio-randrw:3:16M", &["io", "write_kib"]);
        assert!(written >= 1024, "fio wrote only {written} KiB to /dev/vda");
    });
}

/// Debian's stock kernel: a bzImage with its own config (virtio as modules, so no devices
/// here), booted through the 64-bit entry of its setup header, runs stress-ng from the
/// initramfs and powers off. Being a distribution kernel it probes what a PC has and a microVM
/// lacks (the CMOS clock, COM2 to COM4, PCI configuration, the POST port for I/O delays): the
/// predictor watches every window and none may count an unknown exit or raise a finding.
#[test]
fn debian_bzimage_boots_to_init_runs_stress_ng_and_is_never_flagged() {
    on_hardware_kvm(SCENARIO, || {
        let release = std::fs::read_to_string(L1_KERNEL_RELEASE).expect("L1's kernel release");
        let release = release.trim();
        let spec = GuestSpec::new("linux-bzimage", 2, 512)
            .kernel(std::path::Path::new(L1_KERNEL))
            .with_workloads_in_the_initrd()
            .steps(&["stress-cpu:3", "poweroff"]);
        // Outlives the VM (its scratch directory goes with it): read after the exit.
        let traces = Scratch::new("linux-bzimage-traces");
        let trace = traces.path().join("run.jsonl");
        let vm = spec
            .section(
                "predictor",
                // The quota stays at both vCPUs (here that is all of L1's CPUs): this
                // scenario is about what the predictor sees, not what it sizes. One-second
                // windows: the devices a guest uses are learned over its first 300 windows,
                // and under a nested KVM Debian's kernel probes the i8042 44 s into its boot
                // (a second into it on hardware); with 100 ms windows that first use came after
                // the learning and was flagged as a new device.
                json!({
                    "window_ms": 1000,
                    "trace_path": trace,
                    "budget": {"cpu_cores": {"min": 2, "max": 2}},
                }),
            )
            // Every access no device answered, with its port, on the VMM's stderr.
            .vmm_arg("--log-level=trace")
            .start();
        let banner = vm
            .console
            .expect("the kernel banner", READY, |l| l.contains("Linux version "));
        assert!(
            banner.contains(&format!("Linux version {release} ")),
            "{banner}"
        );
        vm.console.expect("the command line", READY, |l| {
            l.contains("Command line: ") && l.contains("prescient.workload=stress-cpu:3,poweroff")
        });
        vm.console.expect("init from the initramfs", READY, |l| {
            l.contains("Run /init as init process")
        });
        vm.ready();
        vm.done("stress-cpu:3", 3);
        let (status, stderr) = vm.wait_exit();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
        let unclaimed: Vec<&str> = stderr.lines().filter(|l| l.contains("unclaimed")).collect();
        assert!(
            unclaimed.is_empty(),
            "accesses no device answered: {unclaimed:#?}"
        );

        // Every window, not only those that acted.
        let t = predictor::trace::read(&trace).expect("the recorded trace");
        // Boot, init and 3 s of stress-ng take well over 10 one-second windows (about 20 with
        // ACPI, where the kernel finds the i8042 in the DSDT instead of probing for it).
        assert!(t.samples.len() >= 10, "{} windows", t.samples.len());
        for s in &t.samples {
            assert_eq!(s.signals.unknown_exits, 0, "window at {} ms", s.t_ms);
        }
        let decisions = predictor_tools::eval::replay_recorded(&t)
            .expect("replay")
            .expect("the trace names its policy");
        let flagged: Vec<String> = decisions
            .iter()
            .filter(|d| d.anomaly.findings.any())
            .map(|d| format!("{} ms: {:?} ({})", d.t_ms, d.anomaly, d.reason))
            .collect();
        assert!(
            flagged.is_empty(),
            "a healthy Linux guest was flagged: {flagged:#?}"
        );
    });
}
