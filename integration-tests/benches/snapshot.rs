//! Snapshots against Firecracker itself: the same test guest, the same spec (2 vCPUs, 256 MiB
//! and 2 GiB), runs alternated between the two VMMs in one process. Per run the guest writes
//! half its memory, announces a hold and spins; the VMM is paused and `PUT /snapshot/create`
//! (Full) writes the snapshot; a fresh VMM (`--api-sock` only) takes `PUT /snapshot/load` with
//! `resume_vm`, and the guest's next memory round, timed by the guest, is the first touch of
//! its working set after the restore (read back from the memory file through the page cache,
//! copied on write); the round after it is the same work warm.
//!
//! `cargo bench -p integration-tests --bench snapshot` (`SNAPSHOT_BENCH_ROUNDS` runs per VMM and
//! size, default 5; `SNAPSHOT_BENCH_SIZES`, MiB, default `256,2048`). Firecracker is
//! `$FIRECRACKER_BIN` or the shared anchor; without it only prescient's column is printed.
//! Medians, with min-max.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use integration_tests::{
    file_data_bytes, guest_spec, prescient_bin, ApiClient, Scratch, TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(180);

/// A VMM the benchmark runs.
struct Vmm {
    name: &'static str,
    bin: PathBuf,
    firecracker: bool,
}

impl Vmm {
    fn prescient() -> Vmm {
        Vmm {
            name: "prescient",
            bin: prescient_bin().to_path_buf(),
            firecracker: false,
        }
    }

    /// `$FIRECRACKER_BIN`, else the shared anchor beside the checkout.
    fn firecracker() -> Option<Vmm> {
        let candidates = [
            std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from),
            Some(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../shared/anchors/firecracker/firecracker"),
            ),
            Some(PathBuf::from(
                "/work/shared/anchors/firecracker/firecracker",
            )),
        ];
        let bin = candidates.into_iter().flatten().find(|p| p.is_file())?;
        Some(Vmm {
            name: "firecracker",
            bin,
            firecracker: true,
        })
    }

    /// Starts the VMM on the API socket `sock`, booting `config` if given; its stdout (the
    /// guest's console) is read line by line as it comes.
    fn spawn(&self, sock: &Path, config: Option<&Path>) -> Running {
        let _ = std::fs::remove_file(sock);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--api-sock").arg(sock);
        if let Some(config) = config {
            cmd.arg("--config-file").arg(config);
        }
        if self.firecracker {
            cmd.args(["--level", "Error"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }
}

struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Running {
    /// The first console line from now on that starts with `prefix`.
    fn line(&self, prefix: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line {prefix:?} ({e})"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects as soon as the VMM listens (polled every 0.2 ms: the test harness's 10 ms polling
/// would dwarf what is measured).
fn connect(sock: &Path) -> ApiClient {
    let end = Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < end, "no API socket {}", sock.display());
        std::thread::sleep(Duration::from_micros(200));
    }
    ApiClient::connect(sock)
}

/// One request, answered 2xx; how long it took.
fn call(api: &mut ApiClient, method: &str, path: &str, body: &str) -> Duration {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    api.send_raw(req.as_bytes());
    let r = api.read_response().expect("a response");
    let took = start.elapsed();
    assert!(
        (200..300).contains(&r.status),
        "{method} {path}: {} {}",
        r.status,
        r.body
    );
    took
}

/// The value of `key=` in a console line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// One run's measurements, in ms.
#[derive(Default)]
struct Run {
    create: f64,
    load: f64,
    spawn_to_resumed: f64,
    populate: f64,
    first_touch: f64,
    warm_round: f64,
    state_kib: f64,
    memory_written_mib: f64,
}

fn run(vmm: &Vmm, dir: &Path, mem_mib: u64) -> Run {
    let touched = mem_mib / 2;
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        2,
        mem_mib,
        &format!("cpu_ms=1 mem_mib={touched} mem_rounds=3 mem_hold_ms=2000"),
    ))
    .unwrap();
    // Firecracker requires the list, empty or not.
    spec["drives"] = serde_json::json!([]);
    let config = dir.join(format!("{}.json", vmm.name));
    std::fs::write(&config, spec.to_string()).unwrap();
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let mut out = Run::default();

    let sock = dir.join(format!("{}-boot.sock", vmm.name));
    let first = vmm.spawn(&sock, Some(&config));
    let mut api = ApiClient::connect(&sock);
    out.populate = field(&first.line("guest: mem_round n=0 "), "us") / 1e3;
    first.line("guest: mem hold");
    call(&mut api, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": state,
        "mem_file_path": mem,
    });
    out.create = call(&mut api, "PUT", "/snapshot/create", &body.to_string()).as_secs_f64() * 1e3;
    drop(first);
    out.state_kib = std::fs::metadata(&state).unwrap().len() as f64 / 1024.0;
    out.memory_written_mib = file_data_bytes(&mem) as f64 / (1 << 20) as f64;

    let sock = dir.join(format!("{}-load.sock", vmm.name));
    let spawned = Instant::now();
    let second = vmm.spawn(&sock, None);
    let mut api = connect(&sock);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    out.load = call(&mut api, "PUT", "/snapshot/load", &body.to_string()).as_secs_f64() * 1e3;
    out.spawn_to_resumed = spawned.elapsed().as_secs_f64() * 1e3;
    out.first_touch = field(&second.line("guest: mem_round n=1 "), "us") / 1e3;
    out.warm_round = field(&second.line("guest: mem_round n=2 "), "us") / 1e3;
    drop(second);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&mem);
    out
}

/// Median and range of `v`.
fn stat(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn main() {
    let rounds: usize = std::env::var("SNAPSHOT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sizes: Vec<u64> = std::env::var("SNAPSHOT_BENCH_SIZES")
        .unwrap_or_else(|_| "256,2048".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut vmms = vec![Vmm::prescient()];
    match Vmm::firecracker() {
        Some(fc) => vmms.push(fc),
        None => println!("firecracker: not run (set FIRECRACKER_BIN)"),
    }
    let scratch = Scratch::new("snapshot-bench");
    println!(
        "snapshot bench: {rounds} runs per VMM and size, alternated; 2 vCPUs, the guest writes \
         half its memory before the snapshot; medians (min-max), ms"
    );
    for &mem_mib in &sizes {
        let mut results: Vec<Vec<Run>> = vmms.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Alternate who goes first, so a slow moment of the host falls on both.
            for k in 0..vmms.len() {
                let i = (k + round) % vmms.len();
                results[i].push(run(&vmms[i], scratch.path(), mem_mib));
            }
        }
        println!();
        let mut head = format!("| {mem_mib} MiB guest |");
        let mut rule = "|---|".to_string();
        for v in &vmms {
            head.push_str(&format!(" {} |", v.name));
            rule.push_str("---|");
        }
        if vmms.len() == 2 {
            head.push_str(" prescient / firecracker |");
            rule.push_str("---|");
        }
        println!("{head}\n{rule}");
        type Metric = (&'static str, fn(&Run) -> f64);
        let metrics: [Metric; 8] = [
            ("create (PUT /snapshot/create)", |r| r.create),
            ("load to resumed (PUT /snapshot/load, resume_vm)", |r| {
                r.load
            }),
            ("process start to resumed", |r| r.spawn_to_resumed),
            (
                "the guest writing half its memory at boot (first touch)",
                |r| r.populate,
            ),
            (
                "the same after restore (faulted in from the memory file)",
                |r| r.first_touch,
            ),
            ("the same once more, warm", |r| r.warm_round),
            ("state file, KiB", |r| r.state_kib),
            ("memory file data, MiB", |r| r.memory_written_mib),
        ];
        for (name, get) in metrics {
            let mut line = format!("| {name} |");
            let mut medians = Vec::new();
            for r in &results {
                let mut v: Vec<f64> = r.iter().map(get).collect();
                let (median, lo, hi) = stat(&mut v);
                medians.push(median);
                line.push_str(&format!(" {median:.2} ({lo:.2}-{hi:.2}) |"));
            }
            if medians.len() == 2 {
                line.push_str(&format!(" {:.2}x |", medians[0] / medians[1]));
            }
            println!("{line}");
        }
    }
    println!(
        "\nprescient's create syncs both files to disk before renaming them into place \
         (Firecracker's does not sync) and writes only the pages the guest ever populated \
         (Firecracker writes all of guest memory). The memory file is in the page cache when \
         it is loaded (just written), for both."
    );
}
