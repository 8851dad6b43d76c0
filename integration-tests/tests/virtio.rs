//! virtio-blk and virtio-rng under real KVM, driven by the test guest's virtio drivers: data
//! reaches the host file, read-only drives refuse writes, rate limiters slow the guest and can be
//! changed while it runs.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{run_spec, ApiClient, Scratch, TEST_GUEST_PVH};

const DEADLINE: Duration = Duration::from_secs(90);

fn spec(args: &str, drives: serde_json::Value, entropy: Option<serde_json::Value>) -> String {
    let mut s = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH, "boot_args": format!("cpu_ms=1 mem_mib=1 {args}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": drives,
    });
    if let Some(e) = entropy {
        s["entropy"] = e;
    }
    s.to_string()
}

fn disk(scratch: &Scratch, name: &str, bytes: usize) -> std::path::PathBuf {
    let p = scratch.path().join(name);
    std::fs::write(&p, vec![0u8; bytes]).unwrap();
    p
}

fn drive(id: &str, path: &Path, read_only: bool) -> serde_json::Value {
    serde_json::json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": read_only})
}

/// FNV-1a 64, as the guest's `blk_read` reports it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn guest_writes_reach_the_host_file_and_read_back_identically() {
    let scratch = Scratch::new("virtio-blk-rw");
    let img = disk(&scratch, "disk.img", 4 << 20);
    let args = "blk_rw=64 blk_sector=100 blk_read=64";
    let out = run_spec(
        &scratch,
        &spec(args, serde_json::json!([drive("disk0", &img, false)]), None),
        DEADLINE,
    );
    out.assert_code(0)
        .assert_line("guest: blk0 capacity=8192 id=disk0 ro=0")
        .assert_line("guest: blk0 flush ok")
        .assert_line("guest: blk0 rw sectors=64 ok");
    let file = std::fs::read(&img).unwrap();
    let written = &file[100 * 512..164 * 512];
    assert!(
        written.iter().any(|&b| b != 0),
        "the guest's data is on the host file"
    );
    assert!(
        file[..100 * 512].iter().all(|&b| b == 0),
        "nothing written before the range"
    );
    assert!(
        file[164 * 512..].iter().all(|&b| b == 0),
        "nothing written after the range"
    );
    out.assert_line(&format!(
        "guest: blk0 read sectors=64 ok fnv1a=0x{:016x}",
        fnv1a(written)
    ));
}

#[test]
fn a_read_only_drive_answers_guest_writes_with_ioerr() {
    let scratch = Scratch::new("virtio-blk-ro");
    let img = disk(&scratch, "ro.img", 1 << 20);
    let out = run_spec(
        &scratch,
        &spec(
            "blk_rw=8",
            serde_json::json!([drive("ro", &img, true)]),
            None,
        ),
        DEADLINE,
    );
    out.assert_code(3) // the guest treats the failed write as fatal
        .assert_line("guest: blk0 capacity=2048 id=ro ro=1")
        .assert_line("guest: blk0 status=1 op=write");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn entropy_reaches_the_guest() {
    let scratch = Scratch::new("virtio-rng");
    let out = run_spec(
        &scratch,
        &spec(
            "rng_bytes=65536",
            serde_json::json!([]),
            Some(serde_json::json!({})),
        ),
        DEADLINE,
    );
    out.assert_code(0).assert_line("guest: rng0 bytes=65536 ok");
}

#[test]
fn rate_limiters_hold_the_guest_to_its_budget() {
    let scratch = Scratch::new("virtio-limits");
    let img = disk(&scratch, "disk.img", 1 << 20);
    let mut d = drive("disk0", &img, false);
    // 100 ops per second, starting full: 300 reads need about 2 s (unlimited: ~0.1 s).
    d["rate_limiter"] = serde_json::json!({"ops": {"size": 100, "refill_time": 1000}});
    // 8 KiB per second: 32 KiB of entropy need about 3 s.
    let entropy =
        serde_json::json!({"rate_limiter": {"bandwidth": {"size": 8192, "refill_time": 1000}}});
    let out = run_spec(
        &scratch,
        &spec(
            "blk_ops=300 rng_bytes=32768",
            serde_json::json!([d]),
            Some(entropy),
        ),
        DEADLINE,
    );
    out.assert_code(0).assert_line("guest: rng0 bytes=32768 ok");
    assert!(
        out.elapsed >= Duration::from_millis(4500),
        "limits not applied: {:?}",
        out.elapsed
    );
    let ops_per_s: u64 = out
        .field("guest: blk0 ops=300", "ops_per_s")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        ops_per_s <= 200,
        "guest saw {ops_per_s} ops/s under a 100 ops/s limit"
    );
}

#[test]
fn a_live_rate_limiter_update_releases_a_throttled_guest() {
    let scratch = Scratch::new("virtio-live-limit");
    let socket = scratch.path().join("api.sock");
    let console = scratch.path().join("console.log");
    let img = disk(&scratch, "disk.img", 1 << 20);
    let child = std::process::Command::new(integration_tests::prescient_bin())
        .arg("--api-sock")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut api = ApiClient::connect(&socket);
    let boot = serde_json::json!({"kernel_image_path": TEST_GUEST_PVH, "boot_args": "cpu_ms=1 mem_mib=1 blk_ops=400 exit=halt"});
    assert_eq!(
        api.request("PUT", "/boot-source", Some(&boot.to_string()))
            .status,
        204
    );
    // 10 ops per second: 400 reads would take about 40 s.
    let mut d = drive("disk0", &img, false);
    d["rate_limiter"] = serde_json::json!({"ops": {"size": 10, "refill_time": 1000}});
    let r = api.request("PUT", "/drives/disk0", Some(&d.to_string()));
    assert_eq!(r.status, 204, "{}", r.body);
    let serial = serde_json::json!({"serial_out_path": console}).to_string();
    assert_eq!(api.request("PUT", "/serial", Some(&serial)).status, 204);
    let start = Instant::now();
    assert_eq!(
        api.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .status,
        204
    );

    let wait_for = |text: &str, limit: Duration| loop {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        if c.contains(text) {
            return c;
        }
        assert!(start.elapsed() < limit, "no {text:?} after {limit:?}:\n{c}");
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for("guest: blk0 capacity=2048", DEADLINE);
    std::thread::sleep(Duration::from_millis(1500));
    let scrape = api.request("GET", "/metrics", None).body;
    let throttled: u64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("prescient_block_disk0_throttled_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(throttled > 0, "the limiter made the queue wait");
    let so_far = std::fs::read_to_string(&console).unwrap();
    assert!(
        !so_far.contains("guest: blk0 ops=400"),
        "not throttled: {so_far}"
    );

    let update =
        r#"{"drive_id": "disk0", "rate_limiter": {"ops": {"size": 100000, "refill_time": 100}}}"#;
    let r = api.request("PATCH", "/drives/disk0", Some(update));
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for("guest: blk0 ops=400", Duration::from_secs(15));
    let config = api.request("GET", "/vm/config", None).json();
    assert_eq!(config["drives"][0]["rate_limiter"]["ops"]["size"], 100000);
    let r = api.request(
        "PATCH",
        "/drives/disk0",
        Some(r#"{"drive_id": "disk0", "path_on_host": "/tmp/x"}"#),
    );
    assert_eq!(r.status, 400, "a running drive keeps its file");
    // SAFETY: plain kill(2) of our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    integration_tests::wait_with_deadline(child, DEADLINE).assert_code(143);
}
