//! Elastic memory speed: how long a virtio-mem resize takes until the guest has the memory
//! (plugged and written) or has given it back, and balloon inflate/deflate rates, for prescient,
//! Firecracker (the same API requests) and, where it can run the same guest, QEMU `-M microvm`
//! (balloon over QMP), alternated run by run.
//! `cargo bench -p integration-tests --bench elastic_memory` (`ELASTIC_BENCH_RUNS`, default 3).
//!
//! Times are taken on the host from the resize request (API PATCH / QMP `balloon`) to the
//! guest's console line for that step, which it prints once every request is answered.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::bench::{alternate, env_or, Cell, Kind, Stat, Table, VmSpec, Vmm};
use integration_tests::console::Console;
use integration_tests::{ApiClient, Scratch};

const DEADLINE: Duration = Duration::from_secs(120);
const GUEST_MIB: u64 = 1024;
const BALLOON_MIB: u64 = 512;
const VMEM_SIZES: [u64; 4] = [128, 0, 1024, 0];
const VMEM_LABELS: [&str; 4] = [
    "virtio-mem 0 -> 128 MiB (ms)",
    "virtio-mem 128 MiB -> 0 (ms)",
    "virtio-mem 0 -> 1 GiB (ms)",
    "virtio-mem 1 GiB -> 0 (ms)",
];

/// Times each resize: `resize(size)` asks, then the guest's console line of that step is awaited.
fn timed_steps(
    vm: &Console,
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
            vm.expect_prefix(&format!("{prefix} step={} ", i + 1), DEADLINE);
            t0.elapsed()
        })
        .collect()
}

/// One PATCH on the VMM's API (prescient's or Firecracker's: the same path and body).
fn patch(api: &mut ApiClient, path: &str, body: &str) {
    let req = format!(
        "PATCH {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    api.send_raw(req.as_bytes());
    let r = api.read_response().expect("an API response");
    assert_eq!(r.status, 204, "PATCH {path} {body}: {}", r.body);
}

/// A QMP connection to QEMU.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
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
        let mut qmp = Qmp { stream, reader };
        qmp.command(r#"{"execute": "qmp_capabilities"}"#);
        qmp
    }

    /// One command and its answer (events in between are skipped).
    fn command(&mut self, command: &str) {
        self.stream.write_all(command.as_bytes()).unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("QMP answer");
            if line.contains("\"return\"") {
                return;
            }
            assert!(!line.contains("\"error\""), "QMP {command}: {line}");
        }
    }
}

/// virtio-mem resize times of one run, or why this VMM cannot run it.
fn vmem(vmm: &Vmm, dir: &Path) -> Result<Vec<Duration>, String> {
    let mut spec = VmSpec::test_guest(1, 128, "cpu_ms=1 mem_mib=1 vmem_steps=4");
    spec.hotplug_mib = Some(2048);
    let sock = dir.join("api.sock");
    let vm = vmm.spawn(Some(&spec), dir, Some(&sock))?;
    vm.expect_prefix("guest: vmem0 unplugged memory inaccessible", DEADLINE);
    let mut api = ApiClient::connect(&sock);
    let times = timed_steps(&vm, "guest: vmem0", &VMEM_SIZES, |mib| {
        patch(
            &mut api,
            "/hotplug/memory",
            &format!(r#"{{"requested_size_mib": {mib}}}"#),
        );
    });
    let (status, stderr) = vm.wait_exit(DEADLINE);
    assert!(status.success(), "{}: {status}: {stderr}", vmm.name());
    Ok(times)
}

fn balloon_args() -> String {
    format!("cpu_ms=1 mem_mib={} balloon_steps=2", BALLOON_MIB + 64)
}

/// Balloon inflate and deflate times of one run.
fn balloon(vmm: &Vmm, dir: &Path) -> Vec<Duration> {
    let mut spec = VmSpec::test_guest(1, GUEST_MIB, &balloon_args());
    spec.balloon = true;
    let sock = dir.join("api.sock");
    let vm = vmm.spawn(Some(&spec), dir, Some(&sock)).unwrap();
    vm.expect_prefix("guest: balloon0 stats=", DEADLINE);
    let sizes = [BALLOON_MIB, 0];
    let times = if vmm.kind == Kind::Qemu {
        let mut qmp = Qmp::connect(&sock);
        timed_steps(&vm, "guest: balloon0", &sizes, |mib| {
            // QEMU's target is the guest's memory size with the balloon taken off.
            let value = (GUEST_MIB - mib) << 20;
            qmp.command(&format!(
                r#"{{"execute": "balloon", "arguments": {{"value": {value}}}}}"#
            ));
        })
    } else {
        let mut api = ApiClient::connect(&sock);
        timed_steps(&vm, "guest: balloon0", &sizes, |mib| {
            patch(&mut api, "/balloon", &format!(r#"{{"amount_mib": {mib}}}"#));
        })
    };
    let (status, stderr) = vm.wait_exit(DEADLINE);
    assert!(status.success(), "{}: {status}: {stderr}", vmm.name());
    times
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = env_or("ELASTIC_BENCH_RUNS", 3);
    let scratch = Scratch::new("elastic-bench");
    let vmms = Vmm::all();
    let mut t = Table::new(
        format!(
            "elastic memory, test guest (1 vCPU, polling drivers), {runs} alternated runs (host shared); \
             virtio-mem: request -> guest has plugged and written / unplugged the memory; balloon: \
             {BALLOON_MIB} MiB of {GUEST_MIB} MiB, pages the guest had written"
        ),
        &vmms,
    );
    let vmem_runs = alternate(&vmms, runs, |v| vmem(v, scratch.path()));
    for (i, label) in VMEM_LABELS.iter().enumerate() {
        let cells: Vec<Cell> = vmem_runs
            .iter()
            .map(|runs| {
                let times: Result<Vec<f64>, String> = runs
                    .iter()
                    .map(|r| r.as_ref().map(|t| ms(t[i])).map_err(Clone::clone))
                    .collect();
                times.map(|v| Stat::of(&v))
            })
            .collect();
        t.row(*label, cells);
    }
    let balloon_runs = alternate(&vmms, runs, |v| balloon(v, scratch.path()));
    for (i, label) in ["balloon inflate (MiB/s)", "balloon deflate (MiB/s)"]
        .iter()
        .enumerate()
    {
        let rates: Vec<Vec<f64>> = balloon_runs
            .iter()
            .map(|runs| {
                runs.iter()
                    .map(|t| BALLOON_MIB as f64 / t[i].as_secs_f64())
                    .collect()
            })
            .collect();
        t.row_of(*label, &rates);
    }
    t.print();
}
