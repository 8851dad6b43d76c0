//! Every kind of bad spec gets its own one-line message, naming the JSON path and line:column,
//! and exit code 2.

use std::time::Duration;

use integration_tests::{run_prescient, run_spec, Outcome, Scratch, TEST_GUEST_PVH};

const DEADLINE: Duration = Duration::from_secs(30);

fn rejected(name: &str, spec: &str) -> Outcome {
    let scratch = Scratch::new(name);
    let out = run_spec(&scratch, spec, DEADLINE);
    out.assert_code(2);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stdout.is_empty(), "no guest ran: {}", out.stdout);
    out
}

fn expect(out: &Outcome, parts: &[&str]) {
    for part in parts {
        assert!(
            out.stderr.contains(part),
            "missing {part:?} in: {}",
            out.stderr
        );
    }
}

#[test]
fn zero_vcpus() {
    let spec = format!(
        "{{\"boot-source\": {{\"kernel_image_path\": \"{TEST_GUEST_PVH}\"}},\n\"machine-config\": {{\"vcpu_count\": 0, \"mem_size_mib\": 64}}}}"
    );
    let out = rejected("zero-vcpus", &spec);
    expect(
        &out,
        &[
            "vm.json:2:34:",
            "machine-config.vcpu_count: must be between 1 and 32, got 0",
        ],
    );
}

#[test]
fn kernel_that_does_not_exist() {
    let out = rejected(
        "no-kernel",
        r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#,
    );
    expect(&out, &["vm.json:1:39:", "boot-source.kernel_image_path: cannot open /nonexistent/vmlinux: No such file or directory"]);
}

#[test]
fn initrd_that_does_not_exist() {
    let spec = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{TEST_GUEST_PVH}", "initrd_path": "/nonexistent/initrd"}}}}"#
    );
    let out = rejected("no-initrd", &spec);
    expect(
        &out,
        &["boot-source.initrd_path: cannot open /nonexistent/initrd"],
    );
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    let scratch = Scratch::new("not-kernel-file");
    let k = scratch.write("kernel.txt", "#!/bin/sh\necho not a kernel\n");
    let spec = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
        k.display()
    );
    let out = rejected("not-kernel", &spec);
    expect(
        &out,
        &[
            "boot-source.kernel_image_path:",
            "is neither a 64-bit ELF (vmlinux) nor a bzImage",
        ],
    );
}

#[test]
fn memory_that_cannot_be_mapped() {
    let spec = format!(
        "{{\"boot-source\": {{\"kernel_image_path\": \"{TEST_GUEST_PVH}\"}},\n\"machine-config\": {{\"vcpu_count\": 1, \"mem_size_mib\": 1000000000}}}}"
    );
    let out = rejected("huge-mem", &spec);
    expect(
        &out,
        &[
            "vm.json:2:53:",
            "machine-config.mem_size_mib: cannot map 1000000000 MiB of guest memory",
        ],
    );
}

#[test]
fn unknown_field() {
    let spec = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{TEST_GUEST_PVH}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}}}}"#
    );
    let out = rejected("unknown-field", &spec);
    expect(&out, &["machine-config.vcpus: unknown field `vcpus`"]);
}

#[test]
fn malformed_json() {
    let out = rejected("malformed", "{\"boot-source\": {\"kernel_image_path\": \n");
    expect(&out, &["vm.json:2:", "EOF while parsing"]);
}

#[test]
fn missing_spec_file_and_missing_arguments() {
    let out = run_prescient(&["--config-file", "/nonexistent/vm.json"], DEADLINE);
    out.assert_code(2);
    expect(&out, &["cannot read VM spec /nonexistent/vm.json"]);

    // Firecracker's --no-api runs from a config file alone, so it needs one. (With no
    // arguments at all prescient serves Firecracker's default socket, /run/firecracker.socket.)
    let out = run_prescient(&["--no-api"], DEADLINE);
    out.assert_code(2);
    expect(&out, &["--config-file"]);

    let out = run_prescient(&["--log-level", "loud"], DEADLINE);
    out.assert_code(2);
}

#[test]
fn help_and_version() {
    let out = run_prescient(&["--help"], DEADLINE);
    out.assert_code(0);
    assert!(out.stdout.contains("--config-file"));
    assert!(out.stdout.contains("--log-level"));
    let out = run_prescient(&["--version"], DEADLINE);
    out.assert_code(0);
    assert!(out.stdout.starts_with("prescient "), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!(
            "Firecracker v{} compatible",
            vmm::FIRECRACKER_VERSION
        )),
        "{}",
        out.stdout
    );
}
