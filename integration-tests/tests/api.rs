//! The API socket of the real binary: configure and run a VM by API, every error path, several
//! clients at once, and the /vm/config round trip.

use std::path::Path;
use std::time::Duration;

use integration_tests::{run_prescient, ApiClient, Outcome, RunningVmm, Scratch, TEST_GUEST_PVH};

const DEADLINE: Duration = Duration::from_secs(60);

fn spawn_api(socket: &Path, extra: &[&str]) -> RunningVmm {
    let mut args = vec!["--api-sock", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    RunningVmm::spawn(args)
}

fn terminate(vmm: RunningVmm) -> Outcome {
    vmm.terminate(DEADLINE)
}

fn boot_source(args: &str) -> String {
    serde_json::json!({"kernel_image_path": TEST_GUEST_PVH, "boot_args": args}).to_string()
}

#[test]
fn a_vm_is_configured_started_paused_and_resumed_entirely_by_api() {
    let scratch = Scratch::new("api-lifecycle");
    let socket = scratch.path().join("api.sock");
    let child = spawn_api(&socket, &["--id", "vm-7"]);
    let mut api = ApiClient::connect(&socket);

    let info = api.request("GET", "/", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["state"], "Not started");
    assert_eq!(info.json()["id"], "vm-7");

    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 400, "no kernel yet");
    assert!(r.json()["fault_message"]
        .as_str()
        .unwrap()
        .contains("boot-source"));

    let r = api.request(
        "PUT",
        "/boot-source",
        Some(&boot_source("cpu_ms=10 mem_mib=4 exit=halt")),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let console = scratch.path().join("console.log");
    let serial = serde_json::json!({ "serial_out_path": console }).to_string();
    assert_eq!(api.request("PUT", "/serial", Some(&serial)).status, 204);
    let r = api.request(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api.request("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 96}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    let m = api.request("GET", "/machine-config", None).json();
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(96))
    );
    assert_eq!(m["huge_pages"], "Transparent", "the default: {m}");
    let r = api.request(
        "PATCH",
        "/machine-config",
        Some(r#"{"huge_pages": "None"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = api.request("PATCH", "/machine-config", Some(r#"{"huge_pages": "1G"}"#));
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("huge_pages") && r.body.contains("1G"),
        "{}",
        r.body
    );
    let m = api.request("GET", "/machine-config", None).json();
    assert_eq!(m["huge_pages"], "None");

    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");

    let r = api.request("PATCH", "/machine-config", Some(r#"{"vcpu_count": 4}"#));
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["fault_message"],
        "The requested operation is not supported after starting the microVM."
    );
    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 400, "a second start is refused");

    assert_eq!(
        api.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))
            .status,
        204
    );
    assert_eq!(api.request("GET", "/", None).json()["state"], "Paused");
    assert_eq!(
        api.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
            .status,
        204
    );
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");

    // The resumed guest runs to its end (it then halts, so the VMM stays up).
    let start = std::time::Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("prescient-test-guest: done") || start.elapsed() > DEADLINE {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("guest: cpus online=2 expected=2"), "{text}");
    assert!(text.contains("prescient-test-guest: done"), "{text}");
    terminate(child).assert_code(143);
    assert!(!socket.exists(), "the socket is removed at exit");
}

#[test]
fn vm_config_round_trips_into_a_spec_file() {
    let scratch = Scratch::new("api-roundtrip");
    let socket = scratch.path().join("api.sock");
    let child = spawn_api(&socket, &[]);
    let mut api = ApiClient::connect(&socket);
    assert_eq!(
        api.request(
            "PUT",
            "/boot-source",
            Some(&boot_source("cpu_ms=5 mem_mib=2"))
        )
        .status,
        204
    );
    assert_eq!(
        api.request(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 3, "mem_size_mib": 80, "smt": false}"#)
        )
        .status,
        204
    );
    let config = api.request("GET", "/vm/config", None);
    assert_eq!(config.status, 200);
    terminate(child).assert_code(143);

    let spec = scratch.write("from-api.json", &config.body);
    let out = run_prescient(&["--config-file", spec.to_str().unwrap()], DEADLINE);
    out.assert_code(0)
        .assert_line("guest: cpus online=3 expected=3")
        .assert_line("prescient-test-guest: done");
}

#[test]
fn a_vm_from_the_config_file_is_served_by_the_api_and_its_end_ends_the_process() {
    let scratch = Scratch::new("api-with-file");
    let socket = scratch.path().join("api.sock");
    let spec = scratch.write(
        "vm.json",
        &integration_tests::guest_spec(TEST_GUEST_PVH, 1, 64, "cpu_ms=300 mem_mib=2"),
    );
    let child = spawn_api(&socket, &["--config-file", spec.to_str().unwrap()]);
    let mut api = ApiClient::connect(&socket);
    let state = api.request("GET", "/", None).json()["state"].clone();
    assert!(state == "Running", "state {state}");
    let out = child.wait(DEADLINE);
    out.assert_code(0).assert_line("prescient-test-guest: done");
    assert!(!socket.exists());
}

#[test]
fn every_bad_request_is_answered_and_the_server_keeps_serving() {
    let scratch = Scratch::new("api-errors");
    let socket = scratch.path().join("api.sock");
    let child = spawn_api(&socket, &[]);

    // Each case on its own connection: (raw request, expected status or None for a close).
    let huge_header = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000));
    let big_body = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: 60000\r\n\r\n{}",
        "a".repeat(60_000)
    );
    let with_body = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        (
            "malformed request line",
            b"HELLO\r\n\r\n".to_vec(),
            Some(400),
        ),
        ("huge headers", huge_header.into_bytes(), Some(431)),
        ("body over the limit", big_body.into_bytes(), Some(400)),
        (
            "bad content length",
            b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "chunked body",
            b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            Some(501),
        ),
        (
            "invalid JSON",
            with_body("PUT", "/machine-config", "{nope"),
            Some(400),
        ),
        (
            "unknown field",
            with_body("PATCH", "/machine-config", r#"{"cpus": 2}"#),
            Some(400),
        ),
        (
            "out of range",
            with_body(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 0, "mem_size_mib": 64}"#,
            ),
            Some(400),
        ),
        (
            "wrong type",
            with_body("PATCH", "/machine-config", r#"{"smt": "yes"}"#),
            Some(400),
        ),
        (
            "missing body",
            with_body("PUT", "/boot-source", ""),
            Some(400),
        ),
        (
            "unknown path",
            b"GET /nope HTTP/1.1\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "wrong method",
            b"DELETE /machine-config HTTP/1.1\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "kernel that does not exist",
            with_body(
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/no/such"}"#,
            ),
            Some(400),
        ),
        (
            "pause before start",
            with_body("PATCH", "/vm", r#"{"state": "Paused"}"#),
            Some(400),
        ),
        (
            "truncated body",
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"vcpu".to_vec(),
            None,
        ),
    ];
    for (what, raw, expected) in cases {
        let mut c = ApiClient::connect(&socket);
        c.send_raw(&raw);
        if expected.is_none() {
            // Half-close: the server sees the body can never complete.
            drop(c);
            continue;
        }
        let r = c
            .read_response()
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(Some(r.status), expected, "{what}: {}", r.body);
        let fault = r.json()["fault_message"].as_str().map(str::to_owned);
        assert!(fault.is_some_and(|m| !m.is_empty()), "{what}: {}", r.body);
    }
    let mut api = ApiClient::connect(&socket);
    assert_eq!(api.request("GET", "/", None).status, 200, "still serving");
    let m = api.request("GET", "/machine-config", None).json();
    assert_eq!(m["vcpu_count"], 1, "no bad request changed the config");
    terminate(child).assert_code(143);
}

#[test]
fn concurrent_clients_are_all_served() {
    let scratch = Scratch::new("api-concurrent");
    let socket = scratch.path().join("api.sock");
    let child = spawn_api(&socket, &[]);
    ApiClient::connect(&socket); // wait for the socket
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut api = ApiClient::connect(&socket);
                for i in 0..50 {
                    assert_eq!(api.request("GET", "/", None).status, 200);
                    let body = format!(r#"{{"mem_size_mib": {}}}"#, 64 + t * 100 + i);
                    assert_eq!(
                        api.request("PATCH", "/machine-config", Some(&body)).status,
                        204
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let mut api = ApiClient::connect(&socket);
    let mem = api.request("GET", "/machine-config", None).json()["mem_size_mib"]
        .as_u64()
        .unwrap();
    assert!(
        (64..64 + 800).contains(&mem) && (mem - 64) % 100 == 49,
        "last write of some client: {mem}"
    );
    terminate(child).assert_code(143);
}

#[test]
fn an_existing_socket_path_is_refused() {
    let scratch = Scratch::new("api-exists");
    let socket = scratch.write("api.sock", "");
    let out = run_prescient(&["--api-sock", socket.to_str().unwrap()], DEADLINE);
    out.assert_code(1);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
}

#[test]
fn logger_and_metrics_are_configured_flushed_and_scraped_by_api() {
    let scratch = Scratch::new("api-metrics");
    let socket = scratch.path().join("api.sock");
    let console = scratch.path().join("console.log");
    let mut spec: serde_json::Value = serde_json::from_str(&integration_tests::guest_spec(
        TEST_GUEST_PVH,
        1,
        64,
        "cpu_ms=1 mem_mib=1 exit=halt",
    ))
    .unwrap();
    spec["serial"] = serde_json::json!({ "serial_out_path": console });
    let spec = scratch.write("vm.json", &spec.to_string());
    let child = spawn_api(&socket, &["--config-file", spec.to_str().unwrap()]);
    let mut api = ApiClient::connect(&socket);

    let log = scratch.path().join("prescient.log");
    let logger = serde_json::json!({"log_path": log, "level": "Debug", "show_level": true});
    let r = api.request("PUT", "/logger", Some(&logger.to_string()));
    assert_eq!(r.status, 204, "{}", r.body);
    api.request("GET", "/machine-config", None);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("API: GET /machine-config"),
        "debug lines go to the log file: {text}"
    );

    let metrics = scratch.path().join("metrics.json");
    let cfg = serde_json::json!({ "metrics_path": metrics }).to_string();
    assert_eq!(api.request("PUT", "/metrics", Some(&cfg)).status, 204);
    let again = api.request("PUT", "/metrics", Some(&cfg));
    assert_eq!(again.status, 400, "metrics are configured once");

    // Once the guest has printed its last line, every console byte must have been counted.
    let start = std::time::Instant::now();
    let console_len = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("prescient-test-guest: done") {
            break text.len() as u64;
        }
        assert!(start.elapsed() < DEADLINE, "guest never finished: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let scrape = api.request("GET", "/metrics", None);
    assert_eq!(scrape.status, 200);
    let value = |name: &str| -> u64 {
        scrape
            .body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{}", scrape.body))
            .parse()
            .unwrap()
    };
    assert_eq!(value("prescient_uart_bytes_out_total"), console_len);
    assert!(
        value("prescient_vcpu_exit_io_out_total") >= console_len,
        "each byte is a port write"
    );
    assert!(value("prescient_api_server_requests_total") >= 4);
    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let flushed = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(flushed.lines().last().unwrap()).unwrap();
    assert_eq!(
        line["uart"]["bytes_out"].as_u64(),
        Some(console_len),
        "{line}"
    );
    assert!(
        line["vcpu"]["exit_io_out"].as_u64().unwrap() >= console_len,
        "{line}"
    );
    assert!(
        line["api_server"]["client_errors"].as_u64().unwrap() >= 1,
        "{line}"
    );
    terminate(child).assert_code(143);
}

#[test]
fn send_ctrl_alt_del_reaches_the_guest_keyboard_and_the_guest_resets() {
    let scratch = Scratch::new("api-ctrl-alt-del");
    let socket = scratch.path().join("api.sock");
    let console = scratch.path().join("console.log");
    let child = spawn_api(&socket, &[]);
    let mut api = ApiClient::connect(&socket);
    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 400, "no keyboard before the VM starts");

    api.request(
        "PUT",
        "/boot-source",
        Some(&boot_source("cpu_ms=1 mem_mib=1 exit=kbd")),
    );
    let serial = serde_json::json!({ "serial_out_path": console }).to_string();
    api.request("PUT", "/serial", Some(&serial));
    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("guest: kbd waiting for ctrl-alt-del")
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the guest never waited for its keyboard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = api.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);

    // The guest sees the keys and resets; a reset ends prescient cleanly.
    let out = child.wait(DEADLINE);
    out.assert_code(0);
    let text = std::fs::read_to_string(&console).unwrap();
    for line in [
        "guest: kbd scancode 0x14",
        "guest: kbd scancode 0x11",
        "guest: kbd scancode 0xe0",
        "guest: kbd scancode 0x71",
        "guest: ctrl-alt-del",
    ] {
        assert!(text.contains(line), "missing {line:?}:\n{text}");
    }
}
