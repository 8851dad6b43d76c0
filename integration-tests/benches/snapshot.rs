//! Snapshots against Firecracker itself: the same test guest, the same spec (2 vCPUs, 256 MiB
//! and 2 GiB), runs alternated between the two VMMs in one process. Per run the guest writes
//! half its memory, announces a hold and spins; the VMM is paused and `PUT /snapshot/create`
//! (Full) writes the snapshot; a fresh VMM (`--api-sock` only) takes `PUT /snapshot/load` with
//! `resume_vm`, and the guest's next memory round, timed by the guest, is the first touch of
//! its working set after the restore (read back from the memory file through the page cache,
//! copied on write); the round after it is the same work warm.
//!
//! `cargo bench -p integration-tests --bench snapshot` (`SNAPSHOT_BENCH_ROUNDS` runs per VMM and
//! size, default 5; `SNAPSHOT_BENCH_SIZES`, MiB, default `256,2048`; `SNAPSHOT_BENCH_HUGE_PAGES`,
//! `machine-config.huge_pages` for both, default each VMM's own). Firecracker is
//! `$FIRECRACKER_BIN` or the shared anchor (the shared bench harness finds it); without it only
//! prescient's column is printed. Medians, with min-max.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::bench::{alternate, env_or, Table, VmSpec, Vmm};
use integration_tests::console::Console;
use integration_tests::{file_data_bytes, ApiClient, Scratch};

const DEADLINE: Duration = Duration::from_secs(180);

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

fn run(vmm: &Vmm, dir: &Path, mem_mib: u64, huge_pages: Option<&str>) -> Run {
    let touched = mem_mib / 2;
    let mut spec = VmSpec::test_guest(
        2,
        mem_mib,
        &format!("cpu_ms=1 mem_mib={touched} mem_rounds=3 mem_hold_ms=2000"),
    );
    spec.huge_pages = huge_pages.map(str::to_string);
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let mut out = Run::default();
    let spawn = |spec: Option<&VmSpec>, sock: &Path| -> Console {
        vmm.spawn(spec, dir, Some(sock))
            .unwrap_or_else(|e| panic!("{}: {e}", vmm.name()))
    };
    let line = |console: &Console, prefix: &str| console.expect_prefix(prefix, DEADLINE).1;

    let sock = dir.join("boot.sock");
    let first = spawn(Some(&spec), &sock);
    let mut api = connect(&sock);
    out.populate = field(&line(&first, "guest: mem_round n=0 "), "us") / 1e3;
    line(&first, "guest: mem hold");
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

    let sock = dir.join("load.sock");
    let spawned = Instant::now();
    let second = spawn(None, &sock);
    let mut api = connect(&sock);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    out.load = call(&mut api, "PUT", "/snapshot/load", &body.to_string()).as_secs_f64() * 1e3;
    out.spawn_to_resumed = spawned.elapsed().as_secs_f64() * 1e3;
    out.first_touch = field(&line(&second, "guest: mem_round n=1 "), "us") / 1e3;
    out.warm_round = field(&line(&second, "guest: mem_round n=2 "), "us") / 1e3;
    drop(second);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&mem);
    out
}

fn main() {
    let rounds: usize = env_or("SNAPSHOT_BENCH_ROUNDS", 5);
    let sizes: Vec<u64> = env_or("SNAPSHOT_BENCH_SIZES", "256,2048".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // Unset: each VMM's default (prescient Transparent, Firecracker None).
    let huge_pages = std::env::var("SNAPSHOT_BENCH_HUGE_PAGES").ok();
    let vmms = Vmm::with(&[integration_tests::bench::Kind::Firecracker]);
    let scratch = Scratch::new("snapshot-bench");
    for &mem_mib in &sizes {
        let runs = alternate(&vmms, rounds, |vmm| {
            run(vmm, scratch.path(), mem_mib, huge_pages.as_deref())
        });
        let mut t = Table::new(
            format!(
                "snapshots of the test guest (2 vCPUs, {mem_mib} MiB, huge_pages {}), the guest \
                 writing half its memory before the Full snapshot: {rounds} alternated runs, \
                 ms unless named (host shared)",
                huge_pages.as_deref().unwrap_or("each VMM's default")
            ),
            &vmms,
        );
        type Metric = (&'static str, fn(&Run) -> f64);
        let metrics: [Metric; 8] = [
            ("create (PUT /snapshot/create)", |r| r.create),
            ("load to resumed (PUT /snapshot/load, resume_vm)", |r| {
                r.load
            }),
            ("process start to resumed", |r| r.spawn_to_resumed),
            (
                "first touch at boot: the guest writing half its memory",
                |r| r.populate,
            ),
            (
                "first touch after restore: the same, from the memory file",
                |r| r.first_touch,
            ),
            ("the same once more, warm", |r| r.warm_round),
            ("state file (KiB)", |r| r.state_kib),
            ("memory file data (MiB)", |r| r.memory_written_mib),
        ];
        for (name, get) in metrics {
            let per_vmm: Vec<Vec<f64>> = runs.iter().map(|r| r.iter().map(get).collect()).collect();
            t.row_of(name, &per_vmm);
        }
        t.note(
            "prescient's create syncs both files before renaming them into place (Firecracker's \
             does not sync) and writes only the pages holding data (Firecracker all of guest \
             memory); both memory files are in the page cache when loaded (just written).",
        );
        t.print();
    }
}
