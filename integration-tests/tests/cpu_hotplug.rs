//! vCPU hot-plug end to end, with real KVM and real threads: the test guest finds its CPUs in
//! the MADT and follows the GED and the CPU hot-plug controller as an OS's ACPI code does
//! (`integration-tests/guest/cpuhp.c`); the API asks for vCPUs; the host sees the threads come
//! and go. Also the ACPI switch: without ACPI the guest boots from the MP table and command-line
//! devices, and the VM cannot change its vCPU count.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{
    guest_spec, run_spec, seccomp_filters, start_with_console, vcpu_thread_ticks,
    wait_for_console_line, ApiClient, Scratch, TEST_GUEST_LINUX64, TEST_GUEST_PVH,
};
use vmm::vstate::vcpu::thread_name;

const DEADLINE: Duration = Duration::from_secs(60);

/// The indices of `pid`'s vCPU threads (named `fc_vcpu <N>`).
fn vcpu_threads(pid: u32) -> BTreeSet<u8> {
    vcpu_thread_ticks(Path::new(&format!("/proc/{pid}/task")))
        .into_keys()
        .collect()
}

/// Waits until `pid`'s vCPU threads are exactly `want`.
fn wait_threads(pid: u32, want: &[u8]) {
    let want: BTreeSet<u8> = want.iter().copied().collect();
    let start = Instant::now();
    while vcpu_threads(pid) != want {
        assert!(
            start.elapsed() < DEADLINE,
            "vCPU threads {:?}, expected {want:?}",
            vcpu_threads(pid)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn patch_count(api: &mut ApiClient, n: u32) -> (u16, String) {
    let r = api.request(
        "PATCH",
        "/machine-config",
        Some(&format!(r#"{{"vcpu_count": {n}}}"#)),
    );
    (r.status, r.body)
}

fn vcpu_states(api: &mut ApiClient) -> Vec<String> {
    let v = api.request("GET", "/hotplug/vcpus", None).json();
    v["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap().to_string())
        .collect()
}

/// A guest that follows the controller for up to `ms` and `ops` inserts/ejects, 1 of 4 vCPUs.
fn hotplug_spec(kernel: &str, ms: u32, ops: u32) -> serde_json::Value {
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        kernel,
        1,
        128,
        &format!("cpu_ms=5 mem_mib=1 cpuhp_ms={ms} cpuhp_ops={ops}"),
    ))
    .unwrap();
    spec["machine-config"]["max_vcpus"] = 4.into();
    spec
}

#[test]
fn vcpus_are_plugged_run_guest_code_and_go_once_the_guest_ejects_them() {
    let scratch = Scratch::new("cpu-hotplug");
    let (vmm, mut api, console) =
        start_with_console(&scratch, hotplug_spec(TEST_GUEST_PVH, 50_000, 6));
    let pid = vmm.id();
    wait_for_console_line(&console, "guest: acpi madt lapics=4 enabled=1", DEADLINE);
    wait_for_console_line(&console, "guest: cpuhp following", DEADLINE);
    assert_eq!(vcpu_threads(pid), [0].into());
    let boot_filters = seccomp_filters(pid, &thread_name(0));

    // Bad requests change nothing and say why.
    let (status, body) = patch_count(&mut api, 0);
    assert_eq!(status, 400);
    assert!(body.contains("vcpu_count must be at least 1"), "{body}");
    let (status, body) = patch_count(&mut api, 5);
    assert_eq!(status, 400);
    assert!(body.contains("above max_vcpus 4"), "{body}");
    let r = api.request(
        "PATCH",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("mem_size_mib is fixed at boot"),
        "{}",
        r.body
    );
    assert_eq!(vcpu_threads(pid), [0].into());

    // The seccomp stage moves on before the plug: new vCPUs start at it.
    let r = api.request("PUT", "/seccomp", Some(r#"{"stage": "quarantine"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    let (status, body) = patch_count(&mut api, 3);
    assert_eq!((status, body.as_str()), (204, ""));
    wait_for_console_line(&console, "guest: cpu 1 apic=1 up", DEADLINE);
    wait_for_console_line(&console, "guest: cpu 2 apic=2 up", DEADLINE);
    wait_threads(pid, &[0, 1, 2]);
    let cfg = api.request("GET", "/machine-config", None).json();
    assert_eq!(
        (cfg["vcpu_count"].as_u64(), cfg["max_vcpus"].as_u64()),
        (Some(3), Some(4))
    );
    let states = vcpu_states(&mut api);
    assert_eq!(&states[..], ["running", "running", "running", "unplugged"]);
    // A plugged vCPU runs under the vCPU filters of the current stage, on top of those of the
    // thread that started it (which moved to the stage too before starting it).
    let (boot_vcpu, spawner) = (
        seccomp_filters(pid, &thread_name(0)),
        seccomp_filters(pid, "vcpu_spawner"),
    );
    assert_eq!(boot_vcpu, boot_filters + 1, "vcpu0 installed quarantine");
    assert_eq!(spawner, boot_vcpu, "the spawner's stages follow the vCPUs'");
    assert_eq!(seccomp_filters(pid, &thread_name(1)), spawner + boot_vcpu);

    // Unplug two: the guest parks and ejects them, and only then the threads end.
    assert_eq!(patch_count(&mut api, 1).0, 204);
    wait_for_console_line(&console, "guest: cpuhp cpu 2 ejected", DEADLINE);
    wait_for_console_line(&console, "guest: cpuhp cpu 1 ejected", DEADLINE);
    wait_threads(pid, &[0]);
    assert_eq!(
        &vcpu_states(&mut api)[..],
        ["running", "unplugged", "unplugged", "unplugged"]
    );

    // A vCPU comes back after its unplug.
    assert_eq!(patch_count(&mut api, 2).0, 204);
    wait_threads(pid, &[0, 1]);
    assert_eq!(patch_count(&mut api, 1).0, 204);
    vmm.wait(DEADLINE).assert_code(0);
    let text = std::fs::read_to_string(&console).unwrap();
    for line in [
        "guest: cpuhp done ops=6 short_ms=0 present=1",
        "prescient-test-guest: done",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert_eq!(text.matches("guest: cpu 1 apic=1 up").count(), 2, "{text}");
    assert_eq!(text.matches("guest: cpu 1 parked").count(), 2, "{text}");
}

/// A guest that never takes note of the controller: a plug starts a thread, but a removal
/// stays pending, and the count cannot change again meanwhile (409 with the reason). The
/// Linux 64-bit boot protocol passes the root pointer in `boot_params`.
#[test]
fn a_removal_the_guest_does_not_eject_stays_pending_and_blocks_further_changes() {
    let scratch = Scratch::new("cpu-hotplug-pending");
    let mut spec = hotplug_spec(TEST_GUEST_LINUX64, 0, 0);
    spec["boot-source"]["boot_args"] = "cpu_ms=1 mem_mib=1 exit=halt".into();
    let (vmm, mut api, console) = start_with_console(&scratch, spec);
    let pid = vmm.id();
    wait_for_console_line(&console, "guest: acpi rsdp=0xe0000", DEADLINE);
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    assert_eq!(patch_count(&mut api, 2).0, 204);
    wait_threads(pid, &[0, 1]);
    assert_eq!(&vcpu_states(&mut api)[..2], ["running", "plugged"]);
    assert_eq!(patch_count(&mut api, 1).0, 204);
    assert_eq!(vcpu_states(&mut api)[1], "removing");
    for n in [1, 2, 3] {
        let (status, body) = patch_count(&mut api, n);
        assert_eq!(status, 409, "{body}");
        assert!(
            body.contains("the guest has not ejected vCPU 1 yet"),
            "{body}"
        );
    }
    // Nothing changed: the thread runs on, and the configuration says what was asked last.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vcpu_threads(pid), [0, 1].into());
    let cfg = api.request("GET", "/machine-config", None).json();
    assert_eq!(cfg["vcpu_count"], 1);
    let out = vmm.terminate(DEADLINE);
    assert_eq!(out.code(), Some(143), "{}", out.stderr);
}

#[test]
fn without_acpi_the_guest_boots_from_the_mp_table_and_the_command_line() {
    let scratch = Scratch::new("no-acpi");
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        2,
        128,
        "cpu_ms=5 mem_mib=1 rng_bytes=64 exit=halt",
    ))
    .unwrap();
    spec["machine-config"]["acpi"] = false.into();
    spec["entropy"] = serde_json::json!({});
    let (vmm, mut api, console) = start_with_console(&scratch, spec.clone());
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    let text = std::fs::read_to_string(&console).unwrap();
    for line in [
        "guest: no acpi",
        "guest: cpus online=2 expected=2",
        "guest: virtio 0 id=4 base=0xc0001000 irq=5 version=2",
        "guest: rng0 bytes=64 ok",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(
        text.contains("virtio_mmio.device=4K@0xc0001000:5"),
        "{text}"
    );
    // No hot-plug: Firecracker's answer to a machine-config change after boot.
    let not_after_boot = "not supported after starting the microVM";
    let (status, body) = patch_count(&mut api, 1);
    assert_eq!(status, 400);
    assert!(body.contains(not_after_boot), "{body}");
    let hotplug = &api.request("GET", "/hotplug/vcpus", None).json()["hotplug"];
    assert_eq!(hotplug, false);
    vmm.terminate(DEADLINE);

    // The same VM with ACPI: the CPUs come from the MADT, the devices are in the DSDT.
    spec["machine-config"]["acpi"] = true.into();
    let (vmm, mut api, console) = start_with_console(&scratch, spec.clone());
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    let text = std::fs::read_to_string(&console).unwrap();
    for line in [
        "guest: acpi madt lapics=2 enabled=2",
        "guest: acpi dsdt devices=",
        "guest: cpus online=2 expected=2",
        "guest: virtio 0 id=4 base=0xc0001000 irq=5 version=2",
        "guest: rng0 bytes=64 ok",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    // The command line still names the device, as Firecracker's does, for kernels without ACPI.
    assert!(
        text.contains("guest: acpi dsdt devices=") && text.contains(" virtio=1"),
        "{text}"
    );
    assert!(
        text.contains("virtio_mmio.device=4K@0xc0001000:5"),
        "{text}"
    );
    let (status, body) = patch_count(&mut api, 1);
    assert_eq!(status, 400);
    assert!(body.contains(not_after_boot), "{body}");
    vmm.terminate(DEADLINE);

    // The ACPI tables alone: the command line names no device, the guest finds it in the DSDT
    // and its CPUs in the MADT.
    spec["machine-config"]["acpi_only"] = true.into();
    let (vmm, _api, console) = start_with_console(&scratch, spec.clone());
    wait_for_console_line(&console, "prescient-test-guest: done", DEADLINE);
    let text = std::fs::read_to_string(&console).unwrap();
    for line in [
        "guest: cmdline \"cpu_ms=5 mem_mib=1 rng_bytes=64 exit=halt\"",
        "guest: acpi madt lapics=2 enabled=2",
        "guest: cpus online=2 expected=2",
        "guest: virtio 0 id=4 base=0xc0001000 irq=5 version=2",
        "guest: rng0 bytes=64 ok",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(!text.contains("virtio_mmio.device="), "{text}");
    vmm.terminate(DEADLINE);
    spec["machine-config"]["acpi_only"] = false.into();

    // Hot-plug needs ACPI: the spec says so before anything boots.
    spec["machine-config"]["acpi"] = false.into();
    spec["machine-config"]["max_vcpus"] = 4.into();
    let out = run_spec(&scratch, &spec.to_string(), DEADLINE);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("machine-config.max_vcpus") && out.stderr.contains("needs ACPI"),
        "{}",
        out.stderr
    );
}
