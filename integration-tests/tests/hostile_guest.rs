//! The malicious-guest suite: the test guest misbehaves on purpose (`hostile=<mode>`, see
//! guest/README.md) and the VMM must stay up, keep answering its API, count the fault in its
//! metrics, and keep the guest's other device and a second VM beside it working.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::{
    drive_json, guest_spec_devices, line_field, prometheus_value, rss_bytes, run_spec, ApiClient,
    RunningVmm, Scratch,
};

const DEADLINE: Duration = Duration::from_secs(90);
/// How long the API may take to answer while the guest misbehaves.
const API_DEADLINE: Duration = Duration::from_secs(2);

/// A VM running the test guest in a hostile mode, with a disk (`disk0`, the usual target), an
/// entropy device (the bystander), its console in a file and its API socket.
struct HostileVm {
    _scratch: Scratch,
    console: PathBuf,
    api: ApiClient,
    vmm: RunningVmm,
}

impl HostileVm {
    /// `args` follow the mode; the bystander's workload (`rng_bytes`) and a disk workload after
    /// the mode (`blk_rw`) show that both devices still work.
    fn launch(mode: &str, args: &str) -> Self {
        Self::launch_with(mode, args, serde_json::json!({}))
    }

    /// [`HostileVm::launch`] with more top-level sections in the VM's spec.
    fn launch_with(mode: &str, args: &str, sections: serde_json::Value) -> Self {
        let scratch = Scratch::new(&format!("hostile-{mode}"));
        let img = scratch.zeroed_file("disk.img", 1 << 20);
        let console = scratch.path().join("console.log");
        let socket = scratch.path().join("api.sock");
        let mut spec: serde_json::Value = serde_json::from_str(&guest_spec_devices(
            &format!(
                "exit=halt virtio_timeout_ms=5000 hostile={mode} {args} blk_rw=8 rng_bytes=4096"
            ),
            serde_json::json!([drive_json("disk0", &img, false)]),
            Some(serde_json::json!({})),
        ))
        .unwrap();
        spec["serial"] = serde_json::json!({ "serial_out_path": console });
        for (key, value) in sections.as_object().expect("sections are an object") {
            spec[key] = value.clone();
        }
        let spec = scratch.write("vm.json", &spec.to_string());
        let vmm = RunningVmm::spawn([
            "--api-sock",
            socket.to_str().unwrap(),
            "--config-file",
            spec.to_str().unwrap(),
        ]);
        let api = ApiClient::connect(&socket);
        Self {
            _scratch: scratch,
            console,
            api,
            vmm,
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for the guest to print `line` (whole), failing on a guest failure line.
    fn wait_line(&self, line: &str) {
        let start = Instant::now();
        loop {
            if self.has_line(line) {
                return;
            }
            let out = self.console();
            assert!(
                !out.contains("prescient-test-guest: failed") && !out.contains("PANIC"),
                "the guest failed before {line:?}:\n{out}"
            );
            assert!(
                start.elapsed() < DEADLINE,
                "no {line:?} within {DEADLINE:?}:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VMM process is alive and answers `GET /` within [`API_DEADLINE`] with `state`.
    fn assert_responsive(&mut self, state: &str) {
        // SAFETY: kill(2) with signal 0 only checks that our child exists.
        let alive = unsafe { libc::kill(self.vmm.id() as libc::pid_t, 0) } == 0;
        assert!(alive, "the VMM died");
        let start = Instant::now();
        let info = self.api.request("GET", "/", None).json();
        let took = start.elapsed();
        assert!(took < API_DEADLINE, "GET / took {took:?}");
        assert_eq!(info["state"], state);
    }

    fn has_line(&self, line: &str) -> bool {
        self.console().lines().any(|l| l.trim_end() == line)
    }

    fn metric(&mut self, name: &str) -> u64 {
        let scrape = self.api.request("GET", "/metrics", None);
        assert_eq!(scrape.status, 200);
        prometheus_value(&scrape.body, name)
    }

    /// SIGTERM stops it cleanly however the guest behaves.
    fn terminate(self) {
        self.vmm.terminate(Duration::from_secs(10)).assert_code(143);
    }
}

/// A well-behaved VM started beside the hostile one runs its disk and entropy workloads to a
/// clean exit.
fn neighbour_runs_clean(name: &str) {
    let scratch = Scratch::new(&format!("hostile-neighbour-{name}"));
    let img = scratch.zeroed_file("disk.img", 1 << 20);
    let out = run_spec(
        &scratch,
        &guest_spec_devices(
            "blk_rw=16 rng_bytes=4096",
            serde_json::json!([drive_json("disk0", &img, false)]),
            Some(serde_json::json!({})),
        ),
        DEADLINE,
    );
    out.assert_code(0)
        .assert_line("guest: blk0 rw sectors=16 ok")
        .assert_line("guest: rng0 bytes=4096 ok");
}

/// The guest's disk and entropy workloads after the attack succeeded and the entropy device
/// counted nothing.
fn bystanders_fine(vm: &mut HostileVm, mode: &str) {
    let out = vm.console();
    for line in [
        format!("guest: hostile {mode} done"),
        "guest: blk0 rw sectors=8 ok".to_string(),
        "guest: rng0 bytes=4096 ok".to_string(),
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?}:\n{out}");
    }
    for c in ["invalid_requests", "invalid_register_access", "io_errors"] {
        assert_eq!(
            vm.metric(&format!("prescient_entropy_{c}_total")),
            0,
            "the bystander entropy device counted {c}"
        );
    }
}

/// The common checks of a mode aimed at the disk: the guest finished (its disk and entropy
/// workloads ran after the attack), the VMM answers, the disk counted `counter`, the entropy
/// device counted nothing, and a neighbour VM is unaffected.
fn disk_attack(mode: &str, counter: &str) -> HostileVm {
    let mut vm = HostileVm::launch(mode, "");
    vm.wait_line(&format!("guest: hostile {mode} start"));
    neighbour_runs_clean(mode);
    vm.wait_line("prescient-test-guest: done");
    bystanders_fine(&mut vm, mode);
    vm.assert_responsive("Running");
    let faults = vm.metric(&format!("prescient_block_disk0_{counter}_total"));
    assert!(faults >= 1, "the disk did not count the {mode} attack");
    vm
}

fn console_has(vm: &HostileVm, prefix: &str) -> String {
    let out = vm.console();
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{out}"))
        .to_string()
}

#[test]
fn a_descriptor_loop_is_refused_and_counted() {
    let vm = disk_attack("desc_loop", "invalid_requests");
    console_has(&vm, "guest: blk0 hostile desc_loop");
    vm.terminate();
}

#[test]
fn buffers_outside_guest_memory_are_refused_and_counted() {
    let vm = disk_attack("oob_addr", "invalid_requests");
    let line = console_has(&vm, "guest: blk0 hostile oob_addr data status=");
    assert_ne!(
        line, "guest: blk0 hostile oob_addr data status=0",
        "a read into memory that does not exist cannot succeed"
    );
    vm.terminate();
}

#[test]
fn queue_sizes_and_indices_out_of_range_are_refused_and_counted() {
    let mut vm = disk_attack("bad_queue", "invalid_requests");
    // The head past the table is a chain that can be neither parsed nor returned (2), the index
    // a ring ahead is counted each time the device looks at the queue (1 or more).
    assert!(vm.metric("prescient_block_disk0_invalid_requests_total") >= 3);
    assert!(
        vm.metric("prescient_block_disk0_invalid_register_access_total") >= 4,
        "queue registers written after DRIVER_OK / for a missing queue are counted"
    );
    vm.terminate();
}

#[test]
fn config_space_writes_past_the_end_are_ignored_and_counted() {
    let mut vm = disk_attack("cfg_overrun", "invalid_register_access");
    assert!(vm.metric("prescient_block_disk0_invalid_register_access_total") >= 4);
    let line = console_has(&vm, "guest: blk0 hostile cfg_overrun");
    assert_eq!(
        line, "guest: blk0 hostile cfg_overrun read_past=0x0 capacity=2048",
        "the config is unchanged and reads past it are zero"
    );
    vm.terminate();
}

/// A storm of `n` accesses to an address no device owns.
fn storm(mode: &str, n: u64) {
    let mut vm = HostileVm::launch(mode, &format!("hostile_n={n}"));
    vm.wait_line(&format!("guest: hostile {mode} start"));
    // The API answers while the storm runs.
    vm.assert_responsive("Running");
    neighbour_runs_clean(mode);
    vm.wait_line("prescient-test-guest: done");
    vm.assert_responsive("Running");
    let unclaimed = vm.metric("prescient_vcpu_unclaimed_access_total");
    assert!(
        unclaimed >= n,
        "{unclaimed} unclaimed accesses counted, the guest made {n}"
    );
    vm.terminate();
}

#[test]
fn an_mmio_storm_on_unmapped_addresses_is_absorbed_and_counted() {
    storm("mmio_storm", 20_000);
}

#[test]
fn a_pio_storm_on_unowned_ports_is_absorbed_and_counted() {
    storm("pio_storm", 5_000);
}

#[test]
fn a_vcpu_spinning_with_interrupts_off_can_be_paused_resumed_and_stopped() {
    let mut vm = HostileVm::launch("cli_spin", "");
    vm.wait_line("guest: hostile cli_spin start");
    // Let it spin a while.
    std::thread::sleep(Duration::from_millis(300));
    vm.assert_responsive("Running");
    let patch = |vm: &mut HostileVm, state: &str| {
        let start = Instant::now();
        let r = vm
            .api
            .request("PATCH", "/vm", Some(&format!(r#"{{"state": "{state}"}}"#)));
        assert_eq!(r.status, 204, "{state}: {}", r.body);
        assert!(
            start.elapsed() < API_DEADLINE,
            "{state} took {:?}",
            start.elapsed()
        );
    };
    patch(&mut vm, "Paused");
    vm.assert_responsive("Paused");
    patch(&mut vm, "Resumed");
    vm.assert_responsive("Running");
    neighbour_runs_clean("cli_spin");
    vm.assert_responsive("Running");
    assert!(
        !vm.console().contains("guest: hostile cli_spin done"),
        "the spin never ends by itself"
    );
    vm.terminate();
}

fn field(line: &str, key: &str) -> u64 {
    line_field(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {line:?}: {e}"))
}

#[test]
fn a_memory_plug_storm_is_answered_request_by_request_and_plugs_no_more_than_requested() {
    const MIB: u64 = 1 << 20;
    const REQUESTED_MIB: u64 = 64;
    const REQUESTS: u64 = 10_000;
    let mut vm = HostileVm::launch_with(
        "plug_storm",
        &format!("hostile_n={REQUESTS}"),
        serde_json::json!({ "memory-hotplug": { "total_size_mib": 256 } }),
    );
    vm.wait_line("guest: hostile plug_storm start");
    let rss_before = rss_bytes(vm.vmm.id());
    // The guest waits for a size to plug; the storm starts once it is set.
    let r = vm.api.request(
        "PATCH",
        "/hotplug/memory",
        Some(&format!(r#"{{"requested_size_mib": {REQUESTED_MIB}}}"#)),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let mut polls = 0;
    let mut peak_rss = rss_before;
    let start = Instant::now();
    while !vm.has_line("guest: hostile plug_storm done") {
        let out = vm.console();
        assert!(
            !out.contains("prescient-test-guest: failed") && start.elapsed() < DEADLINE,
            "the storm failed or did not end within {DEADLINE:?}:\n{out}"
        );
        vm.assert_responsive("Running");
        let status = vm.api.request("GET", "/hotplug/memory", None).json();
        assert_eq!(status["requested_size_mib"], REQUESTED_MIB);
        let plugged = status["plugged_size_mib"]
            .as_u64()
            .expect("plugged_size_mib");
        assert!(
            plugged <= REQUESTED_MIB,
            "{plugged} MiB plugged, {REQUESTED_MIB} MiB requested"
        );
        peak_rss = peak_rss.max(rss_bytes(vm.vmm.id()));
        polls += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    neighbour_runs_clean("plug_storm");
    vm.wait_line("prescient-test-guest: done");
    vm.assert_responsive("Running");
    bystanders_fine(&mut vm, "plug_storm");

    let line = console_has(&vm, "guest: hostile plug_storm requests=");
    assert!(
        polls >= 1,
        "the API was never asked during the storm: {line}"
    );
    eprintln!("{line}; {polls} API polls during it");
    assert_eq!(field(&line, "requests"), REQUESTS, "{line}");
    assert_eq!(field(&line, "mismatch"), 0, "{line}");
    assert_eq!(field(&line, "requested_mib"), REQUESTED_MIB, "{line}");
    for answer in ["ack", "nack", "error"] {
        assert!(field(&line, answer) > 0, "no {answer} in the storm: {line}");
    }
    let guest_plugged = field(&line, "plugged_mib");
    assert_eq!(field(&line, "state_plugged_mib"), guest_plugged, "{line}");
    let status = vm.api.request("GET", "/hotplug/memory", None).json();
    assert_eq!(status["plugged_size_mib"], guest_plugged, "{status}");
    assert_eq!(vm.metric("prescient_memory_hotplug_io_errors_total"), 0);
    // Every ERROR answer is one invalid request, and nothing else was invalid.
    assert_eq!(
        vm.metric("prescient_memory_hotplug_invalid_requests_total"),
        field(&line, "error"),
        "{line}"
    );
    // The guest touches no plugged memory, and unplugged blocks are discarded: the host holds at
    // most what is plugged, plus slack for the VMM's own allocations.
    peak_rss = peak_rss.max(rss_bytes(vm.vmm.id()));
    assert!(
        peak_rss <= rss_before + (REQUESTED_MIB + 32) * MIB,
        "RSS {} MiB before the storm, {} MiB at its peak ({polls} polls)",
        rss_before / MIB,
        peak_rss / MIB
    );
    vm.terminate();
}
