//! Seccomp filters of the real binary: a syscall outside a thread's filter kills the VMM, and
//! tightening to "steady" makes the VMM thread's opens fail while the guest runs on. Also the
//! API socket's removal on every exit path.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use integration_tests::{
    guest_spec, run_prescient, vcpu_ticks, ApiClient, Outcome, RunningVmm, Scratch, TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// A spec for a 1-vCPU test guest that computes for `cpu_ms`, with its console on stdout.
fn spec(scratch: &Scratch, cpu_ms: u32) -> String {
    scratch
        .write(
            "vm.json",
            &guest_spec(TEST_GUEST_PVH, 1, 64, &format!("cpu_ms={cpu_ms} mem_mib=1")),
        )
        .display()
        .to_string()
}

fn assert_killed_by_sigsys(out: &Outcome, what: &str) {
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{what}: expected death by SIGSYS, got {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

#[test]
fn a_syscall_outside_a_threads_filter_kills_the_vmm() {
    let scratch = Scratch::new("seccomp-kill");
    let config = spec(&scratch, 1);
    for kind in ["vmm", "vcpu"] {
        let out = run_prescient(
            &["--config-file", &config, "--seccomp-test-violation", kind],
            DEADLINE,
        );
        assert_killed_by_sigsys(&out, kind);
    }
    let socket = scratch.path().join("api.sock");
    let out = run_prescient(
        &[
            "--api-sock",
            socket.to_str().unwrap(),
            "--seccomp-test-violation",
            "api",
        ],
        DEADLINE,
    );
    assert_killed_by_sigsys(&out, "api");

    // The same forbidden syscall without filters is harmless: the filter is what kills.
    let out = run_prescient(
        &[
            "--config-file",
            &config,
            "--no-seccomp",
            "--seccomp-test-violation",
            "vcpu",
        ],
        DEADLINE,
    );
    out.assert_code(0).assert_line("prescient-test-guest: done");
}

fn put_logger(api: &mut ApiClient, path: &Path) -> integration_tests::ApiResponse {
    let body = serde_json::json!({"log_path": path, "level": "Info"}).to_string();
    api.request("PUT", "/logger", Some(&body))
}

#[test]
fn steady_stage_fails_opens_from_the_vmm_thread_while_the_guest_runs_on() {
    let scratch = Scratch::new("seccomp-steady");
    let socket = scratch.path().join("api.sock");
    let config = spec(&scratch, 3000);
    let vmm = RunningVmm::spawn([
        "--api-sock",
        socket.to_str().unwrap(),
        "--config-file",
        &config,
    ]);
    let mut api = ApiClient::connect(&socket);

    let r = put_logger(&mut api, &scratch.path().join("boot.log"));
    assert_eq!(r.status, 204, "the boot stage may open files: {}", r.body);

    let r = api.request("PUT", "/seccomp", Some(r#"{"stage": "steady"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    let r = put_logger(&mut api, &scratch.path().join("steady.log"));
    assert_eq!(r.status, 400);
    let fault = r.json()["fault_message"].as_str().unwrap().to_string();
    assert!(fault.contains("Operation not permitted"), "{fault}");
    assert!(!scratch.path().join("steady.log").exists());

    let r = api.request("PUT", "/seccomp", Some(r#"{"stage": "boot"}"#));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("only get stricter"), "{}", r.body);
    let r = api.request("PUT", "/seccomp", Some(r#"{"stage": "lenient"}"#));
    assert_eq!(r.status, 400);

    // The guest is still computing: its vCPU burns CPU and the API answers.
    let before = vcpu_ticks(Path::new(&format!("/proc/{}/task", vmm.id())));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vcpu_ticks(Path::new(&format!("/proc/{}/task", vmm.id()))) > before,
        "the vCPU stopped running"
    );
    let r = api.request("PUT", "/seccomp", Some(r#"{"stage": "quarantine"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");

    // ... and finishes its work under the tightened filters, printing as it goes.
    let out = vmm.wait(DEADLINE);
    out.assert_code(0).assert_line("prescient-test-guest: done");
    assert!(!socket.exists(), "the API socket outlived the VMM");
}

#[test]
fn without_seccomp_a_stage_request_is_refused() {
    let scratch = Scratch::new("seccomp-off");
    let socket = scratch.path().join("api.sock");
    let vmm = RunningVmm::spawn(["--api-sock", socket.to_str().unwrap(), "--no-seccomp"]);
    let mut api = ApiClient::connect(&socket);
    let r = api.request("PUT", "/seccomp", Some(r#"{"stage": "steady"}"#));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("seccomp is off"), "{}", r.body);
    vmm.terminate(DEADLINE).assert_code(128 + libc::SIGTERM);
    assert!(!socket.exists(), "SIGTERM left the API socket behind");
}

#[test]
fn a_failed_start_removes_the_api_socket() {
    let scratch = Scratch::new("seccomp-cleanup");
    let socket = scratch.path().join("api.sock");
    // A readable file that is no kernel passes the spec's checks and fails the boot, after
    // the socket exists.
    let kernel = scratch.write("kernel", "not a kernel");
    let config = scratch.write(
        "vm.json",
        &guest_spec(kernel.to_str().unwrap(), 1, 64, "cpu_ms=1"),
    );
    let out = run_prescient(
        &[
            "--api-sock",
            socket.to_str().unwrap(),
            "--config-file",
            config.to_str().unwrap(),
        ],
        DEADLINE,
    );
    out.assert_code(2);
    assert!(out.stderr.contains("kernel"), "{}", out.stderr);
    assert!(!socket.exists(), "an error exit left the API socket behind");
}
