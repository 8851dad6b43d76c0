//! Booting the test guest with the real binary under real KVM.

use std::time::Duration;

use integration_tests::{guest_spec, run_spec, Scratch, TEST_GUEST_LINUX64, TEST_GUEST_PVH};

/// Generous for a 2-core CI host running tests in parallel; a healthy boot takes well under 1 s.
const DEADLINE: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// RAM the guest is told about for `mem_mib`: the e820 map leaves out the legacy hole
/// [0x9fc00, 1 MiB), so the guest reports this many whole MiB.
fn reported_mib(mem_mib: u64) -> u64 {
    (0x9fc00 + mem_mib * MIB - MIB) / MIB
}

fn boot_and_check(name: &str, kernel: &str, boot: &str, vcpus: u8, mem_mib: u64) {
    let scratch = Scratch::new(name);
    let args = "cpu_ms=20 mem_mib=16";
    let out = run_spec(
        &scratch,
        &guest_spec(kernel, vcpus, mem_mib, args),
        DEADLINE,
    );
    out.assert_code(0)
        .assert_line(&format!("prescient-test-guest: hello boot={boot}"))
        .assert_line(&format!("guest: cmdline \"{args}\""))
        .assert_line(&format!("guest: cpus online={vcpus} expected={vcpus}"))
        .assert_line("guest: mem_phase touched_mib=16 ok")
        .assert_line("prescient-test-guest: done");
    assert_eq!(
        out.field("guest: memory", "total_mib"),
        Some(reported_mib(mem_mib).to_string()),
        "{}",
        out.stdout
    );
    for cpu in 0..vcpus {
        out.assert_line(&format!("guest: cpu {cpu} apic={cpu} up"));
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("guest: cpu {cpu} cpu_phase done"))),
            "cpu {cpu} did not finish its CPU phase\n{}",
            out.stdout
        );
    }
    assert!(
        out.stderr.is_empty(),
        "a clean run prints nothing on stderr: {}",
        out.stderr
    );
}

#[test]
fn boots_one_vcpu_through_pvh() {
    boot_and_check("pvh1", TEST_GUEST_PVH, "pvh", 1, 128);
}

#[test]
fn boots_four_vcpus_through_pvh() {
    boot_and_check("pvh4", TEST_GUEST_PVH, "pvh", 4, 256);
}

#[test]
fn boots_through_the_linux_64bit_protocol() {
    boot_and_check("linux64", TEST_GUEST_LINUX64, "linux64", 2, 128);
}

#[test]
fn memory_above_the_32bit_gap_is_reported_and_usable() {
    // 4 GiB: 3 GiB below the MMIO gap, 1 GiB above 4 GiB.
    let scratch = Scratch::new("himem");
    let spec = guest_spec(TEST_GUEST_PVH, 1, 4096, "cpu_ms=1 mem_mib=8");
    let out = run_spec(&scratch, &spec, DEADLINE);
    out.assert_code(0).assert_line("prescient-test-guest: done");
    assert_eq!(
        out.field("guest: memory", "total_mib"),
        Some(reported_mib(4096).to_string())
    );
    assert_eq!(out.field("guest: memory", "entries"), Some("3".into()));
}

#[test]
fn a_triple_faulting_guest_ends_the_vmm_with_a_clear_message() {
    let scratch = Scratch::new("triple");
    let out = run_spec(
        &scratch,
        &guest_spec(TEST_GUEST_PVH, 2, 64, "mode=triple"),
        DEADLINE,
    );
    out.assert_code(3)
        .assert_line("prescient-test-guest: hello boot=pvh");
    assert!(
        out.stderr
            .contains("vCPU 0: guest triple fault (KVM_EXIT_SHUTDOWN); registers rip=0x"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "one line names the cause: {}",
        out.stderr
    );
}

#[test]
fn a_guest_exception_is_reported_by_the_guest_and_ends_the_vm() {
    let scratch = Scratch::new("panic");
    let out = run_spec(
        &scratch,
        &guest_spec(TEST_GUEST_PVH, 1, 64, "mode=panic"),
        DEADLINE,
    );
    out.assert_code(3);
    assert!(
        out.stdout.contains("guest: PANIC exception 6 "),
        "the guest's #UD handler reports the fault\n{}",
        out.stdout
    );
}

#[test]
fn console_goes_to_the_serial_out_path_file() {
    let scratch = Scratch::new("serialfile");
    let log = scratch.path().join("console.log");
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH, "boot_args": "cpu_ms=1 mem_mib=1"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "serial": {"serial_out_path": log},
    });
    let out = run_spec(&scratch, &spec.to_string(), DEADLINE);
    out.assert_code(0);
    assert!(
        out.stdout.is_empty(),
        "console went to stdout: {}",
        out.stdout
    );
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("prescient-test-guest: done"), "{console}");
}

/// A custom CPU template's MSR modifiers are applied at boot (the guest boots with them); one
/// KVM does not take fails the start with exit code 1, naming the MSR.
#[test]
fn cpu_template_msr_modifiers_are_applied_and_a_bad_msr_is_named() {
    let scratch = Scratch::new("boot-msr-template");
    let with_msr = |msr: &str| {
        let mut spec: serde_json::Value =
            serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 2, 64, "cpu_ms=1 mem_mib=1")).unwrap();
        // KERNEL_GS_BASE: its low 16 bits set, the rest kept.
        spec["cpu-config"] = serde_json::json!({
            "msr_modifiers": [{"addr": msr, "bitmap": format!("0b{}{}", "x".repeat(48), "1".repeat(16))}]
        });
        spec.to_string()
    };
    run_spec(&scratch, &with_msr("0xc0000102"), DEADLINE)
        .assert_code(0)
        .assert_line("prescient-test-guest: done");
    let bad = run_spec(&scratch, &with_msr("0x2fff0000"), DEADLINE);
    bad.assert_code(1);
    assert!(
        bad.stderr.contains("MSR 0x2fff0000 of the CPU template"),
        "{}",
        bad.stderr
    );
}
