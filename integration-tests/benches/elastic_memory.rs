//! Elastic memory speed: how long a virtio-mem resize takes until the guest has the memory
//! (plugged and written) or has given it back, and balloon inflate/deflate rates, for prescient
//! and, where it can run the same guest, QEMU `-M microvm` (balloon over QMP).
//! `cargo bench -p integration-tests --bench elastic_memory` (`ELASTIC_BENCH_RUNS`, default 3).
//!
//! Times are taken on the host from the resize request (API PATCH / QMP `balloon`) to the
//! guest's console line for that step, which it prints once every request is answered.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    guest_spec, median, start_with_console, wait_for_console_line, ApiClient, RunningVmm, Scratch,
    TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(120);
const GUEST_MIB: u64 = 1024;
const BALLOON_MIB: u64 = 512;

/// Times each resize: `resize(step, size)` asks, then the console line of that step is awaited.
fn timed_steps(
    console: &Path,
    prefix: &str,
    sizes: &[u64],
    mut resize: impl FnMut(u64),
) -> Vec<Duration> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let t0 = Instant::now();
            resize(size);
            wait_for_console_line(console, &format!("{prefix} step={} ", i + 1), DEADLINE);
            t0.elapsed()
        })
        .collect()
}

fn prescient_run(
    scratch: &Scratch,
    spec: serde_json::Value,
    ready: &str,
) -> (RunningVmm, ApiClient) {
    let (vmm, api, console) = start_with_console(scratch, spec);
    wait_for_console_line(&console, ready, DEADLINE);
    (vmm, api)
}

fn prescient_vmem(scratch: &Scratch) -> Vec<Duration> {
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        1,
        128,
        "cpu_ms=1 mem_mib=1 vmem_steps=4",
    ))
    .unwrap();
    spec["memory-hotplug"] = serde_json::json!({"total_size_mib": 2048});
    let (vmm, mut api) = prescient_run(scratch, spec, "guest: vmem0 unplugged memory inaccessible");
    let console = scratch.path().join("console.txt");
    let times = timed_steps(&console, "guest: vmem0", &[128, 0, 1024, 0], |mib| {
        let body = format!(r#"{{"requested_size_mib": {mib}}}"#);
        assert_eq!(
            api.request("PATCH", "/hotplug/memory", Some(&body)).status,
            204
        );
    });
    vmm.wait(DEADLINE).assert_code(0);
    times
}

fn balloon_args() -> String {
    format!("cpu_ms=1 mem_mib={} balloon_steps=2", BALLOON_MIB + 64)
}

fn prescient_balloon(scratch: &Scratch) -> Vec<Duration> {
    let mut spec: serde_json::Value =
        serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 1, GUEST_MIB, &balloon_args())).unwrap();
    spec["balloon"] =
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1});
    let (vmm, mut api) = prescient_run(scratch, spec, "guest: balloon0 stats=");
    let console = scratch.path().join("console.txt");
    let times = timed_steps(&console, "guest: balloon0", &[BALLOON_MIB, 0], |mib| {
        let body = format!(r#"{{"amount_mib": {mib}}}"#);
        assert_eq!(api.request("PATCH", "/balloon", Some(&body)).status, 204);
    });
    vmm.wait(DEADLINE).assert_code(0);
    times
}

/// One QMP command and its answer (events in between are skipped).
fn qmp(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, command: &str) {
    stream.write_all(command.as_bytes()).unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("QMP answer");
        if line.contains("\"return\"") {
            return;
        }
        assert!(!line.contains("\"error\""), "QMP {command}: {line}");
    }
}

fn qemu_balloon(scratch: &Scratch) -> Vec<Duration> {
    let console = scratch.path().join("qemu-console.txt");
    let qmp_path = scratch.path().join("qmp.sock");
    let _ = std::fs::remove_file(&console);
    let mut child: Child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-accel",
            "kvm",
        ])
        .args(["-smp", "1", "-m", &GUEST_MIB.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-device",
            "i8042",
            "-global",
            "virtio-mmio.force-legacy=false",
        ])
        .args(["-device", "virtio-balloon-device,deflate-on-oom=on"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args(["-kernel", TEST_GUEST_PVH, "-append", &balloon_args()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu");
    let start = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(&qmp_path) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("QMP: {e}"),
        }
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    qmp(
        &mut stream,
        &mut reader,
        r#"{"execute": "qmp_capabilities"}"#,
    );
    wait_for_console_line(&console, "guest: balloon0 stats=", DEADLINE);
    let times = timed_steps(&console, "guest: balloon0", &[BALLOON_MIB, 0], |mib| {
        // QEMU's target is the guest's memory size with the balloon taken off.
        let value = (GUEST_MIB - mib) << 20;
        qmp(
            &mut stream,
            &mut reader,
            &format!(r#"{{"execute": "balloon", "arguments": {{"value": {value}}}}}"#),
        );
    });
    let _ = child.wait();
    times
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::var("ELASTIC_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scratch = Scratch::new("elastic-bench");
    println!("elastic memory, test guest (1 vCPU, polling drivers), median of {runs} runs");
    println!("virtio-mem: request -> guest has plugged and written / unplugged the memory");
    let vmem: Vec<Vec<Duration>> = (0..runs).map(|_| prescient_vmem(&scratch)).collect();
    println!(
        "{:<28} {:>12} {:>14}",
        "resize", "prescient ms", "qemu microvm"
    );
    for (i, label) in ["0 -> 128 MiB", "128 MiB -> 0", "0 -> 1 GiB", "1 GiB -> 0"]
        .iter()
        .enumerate()
    {
        let m = median(vmem.iter().map(|r| ms(r[i])).collect());
        println!("{label:<28} {m:>12.1} {:>14}", "n/a (1)");
    }
    println!("balloon ({BALLOON_MIB} MiB of {GUEST_MIB} MiB, pages the guest had written)");
    let ours: Vec<Vec<Duration>> = (0..runs).map(|_| prescient_balloon(&scratch)).collect();
    let theirs: Vec<Vec<Duration>> = (0..runs).map(|_| qemu_balloon(&scratch)).collect();
    println!(
        "{:<28} {:>12} {:>14} {:>8}",
        "operation", "prescient", "qemu microvm", "ratio"
    );
    for (i, label) in ["inflate MiB/s", "deflate MiB/s"].iter().enumerate() {
        let rate = |r: &Vec<Vec<Duration>>| {
            median(
                r.iter()
                    .map(|t| BALLOON_MIB as f64 / t[i].as_secs_f64())
                    .collect(),
            )
        };
        let (p, q) = (rate(&ours), rate(&theirs));
        println!("{label:<28} {p:>12.0} {q:>14.0} {:>8.2}", p / q);
    }
    println!("(1) QEMU 7.2's virtio-mem on -M microvm gets no device memory region (the guest reads addr=0x0),");
    println!("    so the same guest cannot be compared there; virtio-mem-pci needs a PCI guest.");
}
