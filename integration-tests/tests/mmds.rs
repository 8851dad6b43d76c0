//! The metadata service from the test guest: ARP, TCP and HTTP to 169.254.169.254 through the
//! virtio-net device, answered inside the VMM (V1 and V2, tokens, listings, bad requests, a SYN
//! flood), while the guest's other frames still reach the TAP and no MMDS frame does.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::bench::firecracker_path;
use integration_tests::{
    prescient_bin, wait_with_deadline, Netns, RunningVmm, Scratch, TEST_GUEST_PVH,
};

const AMI: &str = "ami-12345678";

/// Boots the guest with `mmds=1 net_tx=3 {extra}` on a TAP watched from the host, with the
/// given MMDS version, on prescient; returns the guest's console and the watcher's verdict.
fn run(name: &str, version: &str, extra: &str) -> (String, String) {
    run_on(prescient_bin(), name, version, extra)
}

/// [`run`] on the VMM binary `vmm` (prescient or Firecracker: the same flags and spec).
fn run_on(vmm: &Path, name: &str, version: &str, extra: &str) -> (String, String) {
    let scratch = Scratch::new(name);
    let tap = format!("pmm{}", std::process::id() % 100_000);
    let ns = Netns::with_tap(format!("prescient-it-{name}-{}", std::process::id()), &tap);
    let ready = scratch.path().join("watch-ready");
    let watch = ns
        .exec(Path::new("python3"))
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/clients/tap_watch.py"),
            &tap,
            "3",
            "169.254.169.254",
        ])
        .arg(&ready)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the TAP watcher never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let metadata = scratch.write(
        "metadata.json",
        &serde_json::json!({"latest": {"meta-data": {"ami-id": AMI, "placement": {"zone": "a"}}}})
            .to_string(),
    );
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH,
                        "boot_args": format!("cpu_ms=1 mem_mib=1 mmds=1 net_tx=3 {extra}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        // Firecracker requires the list, even empty.
        "drives": [],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": "06:00:ac:10:00:02"}],
        "mmds-config": {"network_interfaces": ["eth0"], "version": version},
    });
    let spec = scratch.write("vm.json", &spec.to_string());
    let vm = RunningVmm::from_command(ns.exec(vmm).args([
        "--no-api",
        "--config-file",
        spec.to_str().unwrap(),
        "--metadata",
        metadata.to_str().unwrap(),
    ]));
    let out = vm.wait(Duration::from_secs(120));
    let watch = wait_with_deadline(watch, Duration::from_secs(90));
    out.assert_code(0)
        .assert_line("guest: mmds arp mac=06:01:23:45:67:01")
        .assert_line("guest: mmds done")
        .assert_line("guest: net0 tx=3 ok");
    (out.stdout, format!("{}{}", watch.stdout, watch.stderr))
}

fn exchange(console: &str, n: u32) -> (u32, String) {
    let prefix = format!("guest: mmds {n} status=");
    let line = console
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no exchange {n}:\n{console}"));
    let rest = &line[prefix.len()..];
    let (status, body) = rest.split_once(" body=").unwrap();
    let body = body.strip_prefix('"').and_then(|b| b.strip_suffix('"'));
    (
        status.parse().unwrap(),
        body.unwrap_or_default().to_string(),
    )
}

#[test]
fn a_v2_guest_needs_a_session_token_and_nothing_reaches_the_tap() {
    let (console, watch) = run("mmds-v2", "V2", "");
    let (status, body) = exchange(&console, 0);
    assert_eq!(status, 401, "{body}");
    assert!(body.starts_with("No MMDS token provided"), "{body}");
    let (status, token) = exchange(&console, 1);
    assert_eq!(status, 200);
    assert_eq!(token.len(), mmds::token::TOKEN_LEN, "{token}");
    assert_eq!(exchange(&console, 2), (200, format!("\"{AMI}\"")));
    assert_eq!(
        exchange(&console, 3),
        (200, "ami-id|placement/".to_string())
    );
    assert_eq!(exchange(&console, 4).0, 400);
    assert_eq!(
        exchange(&console, 5),
        (401, "MMDS token not valid.".to_string())
    );
    assert!(watch.contains("peer: test=3 leaks=0"), "{watch}");
}

#[test]
fn a_v1_guest_reads_without_a_token_even_after_a_syn_flood() {
    let (console, watch) = run("mmds-v1", "V1", "mmds_flood=300");
    assert!(console.contains("guest: mmds flood sent=300"), "{console}");
    assert_eq!(exchange(&console, 0), (200, AMI.to_string()));
    assert_eq!(exchange(&console, 1).0, 200);
    // V1 answers whatever the token (it only counts bad ones).
    assert_eq!(exchange(&console, 5), (200, AMI.to_string()));
    assert_eq!(exchange(&console, 4).0, 400);
    assert!(watch.contains("peer: test=3 leaks=0"), "{watch}");
}

/// The guest side against Firecracker itself: the same guest, spec and metadata on both VMMs,
/// each exchange's status and body compared (the session token only by status: its contents
/// are each VMM's own).
#[test]
fn the_guest_gets_the_answers_firecracker_gives() {
    let fc = firecracker_path().unwrap_or_else(|why| panic!("no reference to compare with: {why}"));
    for version in ["V2", "V1"] {
        let (ours, _) = run(&format!("mmds-cmp-p{version}"), version, "");
        let (theirs, watch) = run_on(&fc, &format!("mmds-cmp-f{version}"), version, "");
        assert!(watch.contains("peer: test=3 leaks=0"), "{watch}");
        for n in 0..14 {
            let (a, b) = (exchange(&ours, n), exchange(&theirs, n));
            if n == 1 {
                assert_eq!(
                    a.0, b.0,
                    "{version} token request: prescient {a:?}, firecracker {b:?}"
                );
            } else {
                assert_eq!(a, b, "{version} exchange {n}: prescient, then firecracker");
            }
        }
    }
}
