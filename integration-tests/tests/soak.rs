//! Soak: the test guest is launched, booted and shut down many times in a row and 20 at once,
//! and every host resource the runs touch returns to its starting count.
//!
//! Counted (see [`probes`]; a new kind of resource, e.g. the jailer's cgroups, is one more
//! entry there): this process's file descriptors and threads, live child processes, Unix
//! sockets and files left in the scratch directory. Each VMM is also sampled once its guest is
//! done: its descriptors and threads must be the same in every run, its RSS within a band of the
//! first run's.
//!
//! `PRESCIENT_SOAK_RUNS` sets the sequential count (default 200).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{drive_json, guest_spec_devices, prescient_bin, Scratch};

const CONCURRENT: usize = 20;
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// A later VMM may use this much more RSS than the first one (page cache and allocator noise;
/// a per-run leak in a fresh process cannot hide in it, a shared one would show in the counts).
const RSS_SLACK: f64 = 1.25;

fn count_dir(path: &Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |d| d.count() as u64)
}

/// Children of this process that still exist (zombies included).
fn live_children() -> u64 {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // The fields after the parenthesised name: state, then the parent's pid.
            let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
            rest.split_whitespace().nth(1) == Some(me.as_str())
        })
        .count() as u64
}

/// Unix sockets bound under `dir`, from the kernel's table.
fn unix_sockets_under(dir: &Path) -> u64 {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(7)
                .is_some_and(|p| p.starts_with(&dir))
        })
        .count() as u64
}

/// Every counted resource: name and current count.
fn probes(scratch: &Path) -> Vec<(&'static str, u64)> {
    vec![
        (
            "file descriptors of the test",
            count_dir(Path::new("/proc/self/fd")),
        ),
        (
            "threads of the test",
            count_dir(Path::new("/proc/self/task")),
        ),
        ("live child processes", live_children()),
        (
            "unix sockets in the scratch dir",
            unix_sockets_under(scratch),
        ),
        ("files in the runs' dir", count_dir(&scratch.join("runs"))),
    ]
}

/// A VMM's own counts once its guest is done.
#[derive(Debug, Clone, Copy, PartialEq)]
struct VmmSample {
    fds: u64,
    threads: u64,
    rss_kib: u64,
}

fn sample_vmm(pid: u32) -> VmmSample {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status")).expect("VMM status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    VmmSample {
        fds: count_dir(&proc.join("fd")),
        threads: count_dir(&proc.join("task")),
        rss_kib,
    }
}

/// One booted VM: a disk, an entropy device, a vsock (a Unix listener) and an API socket, all in
/// `runs/<name>*`.
struct Vm {
    child: Child,
    console: BufReader<std::process::ChildStdout>,
    name: String,
}

impl Vm {
    fn launch(scratch: &Scratch, name: &str, guest_exit: &str) -> Self {
        let runs = scratch.path().join("runs");
        let img = runs.join(format!("{name}.img"));
        std::fs::write(&img, vec![0u8; 64 << 10]).unwrap();
        let mut spec: serde_json::Value = serde_json::from_str(&guest_spec_devices(
            &format!("exit={guest_exit} blk_rw=4 rng_bytes=256"),
            serde_json::json!([drive_json("disk0", &img, false)]),
            Some(serde_json::json!({})),
        ))
        .unwrap();
        spec["machine-config"]["mem_size_mib"] = 32.into();
        spec["vsock"] =
            serde_json::json!({"guest_cid": 3, "uds_path": runs.join(format!("{name}.vsock"))});
        let spec_path = runs.join(format!("{name}.json"));
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let mut child = Command::new(prescient_bin())
            .args(["--config-file", spec_path.to_str().unwrap()])
            .arg("--api-sock")
            .arg(runs.join(format!("{name}.api")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prescient");
        let console = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            console,
            name: name.to_string(),
        }
    }

    /// Reads the console up to the guest's final line.
    fn wait_done(&mut self) {
        let start = Instant::now();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.console.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "{}: console closed before the guest was done",
                self.name
            );
            assert!(
                !line.starts_with("prescient-test-guest: failed"),
                "{}: the guest failed",
                self.name
            );
            if line.starts_with("prescient-test-guest: done") {
                return;
            }
            assert!(
                start.elapsed() < BOOT_DEADLINE,
                "{}: boot too slow",
                self.name
            );
        }
    }

    /// Waits for the exit and removes what the test itself created for the run.
    fn finish(mut self, scratch: &Scratch, code: i32) {
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{}: {status}", self.name);
        let runs = scratch.path().join("runs");
        for ext in ["img", "json"] {
            std::fs::remove_file(runs.join(format!("{}.{ext}", self.name))).unwrap();
        }
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }
}

fn assert_back_to_start(start: &[(&str, u64)], now: &[(&str, u64)], after: &str) {
    for ((name, before), (_, after_count)) in start.iter().zip(now) {
        assert_eq!(
            before, after_count,
            "{name}: {before} before, {after_count} after {after}"
        );
    }
}

#[test]
fn launch_boot_shutdown_leaves_no_trace() {
    let runs: usize = std::env::var("PRESCIENT_SOAK_RUNS")
        .map(|v| v.parse().expect("PRESCIENT_SOAK_RUNS is a number"))
        .unwrap_or(200);
    let scratch = Scratch::new("soak");
    std::fs::create_dir(scratch.path().join("runs")).unwrap();
    let start = probes(scratch.path());
    let t0 = Instant::now();

    // Sequential: even runs end by the guest's reset, odd ones by SIGTERM after a sample.
    let mut first: Option<VmmSample> = None;
    for i in 0..runs {
        let by_reset = i % 2 == 0;
        let mut vm = Vm::launch(
            &scratch,
            &format!("seq{i}"),
            if by_reset { "reset" } else { "halt" },
        );
        vm.wait_done();
        if by_reset {
            vm.finish(&scratch, 0);
            continue;
        }
        let s = sample_vmm(vm.child.id());
        let base = *first.get_or_insert(s);
        assert_eq!(
            (s.fds, s.threads),
            (base.fds, base.threads),
            "run {i}: {s:?}, first {base:?}"
        );
        assert!(
            s.rss_kib as f64 <= base.rss_kib as f64 * RSS_SLACK,
            "run {i}: RSS {} KiB, first run {} KiB",
            s.rss_kib,
            base.rss_kib
        );
        vm.sigterm();
        vm.finish(&scratch, 143);
    }
    assert_back_to_start(
        &start,
        &probes(scratch.path()),
        &format!("{runs} sequential runs"),
    );
    let sequential = t0.elapsed();

    // Concurrent: all booted and sampled at once, then stopped.
    let t1 = Instant::now();
    let mut vms: Vec<Vm> = (0..CONCURRENT)
        .map(|i| Vm::launch(&scratch, &format!("par{i}"), "halt"))
        .collect();
    for vm in &mut vms {
        vm.wait_done();
    }
    let base = first.expect("at least one sampled sequential run");
    for vm in &vms {
        let s = sample_vmm(vm.child.id());
        assert_eq!(
            (s.fds, s.threads),
            (base.fds, base.threads),
            "{}: {s:?}",
            vm.name
        );
    }
    for vm in &vms {
        vm.sigterm();
    }
    for vm in vms {
        vm.finish(&scratch, 143);
    }
    assert_back_to_start(&start, &probes(scratch.path()), "20 concurrent runs");
    eprintln!(
        "soak: {runs} sequential runs in {sequential:?}, {CONCURRENT} concurrent in {:?}",
        t1.elapsed()
    );
}
