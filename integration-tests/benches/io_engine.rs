//! virtio-blk engines side by side: prescient and Firecracker (`../shared/anchors/firecracker`,
//! or `$PRESCIENT_FIRECRACKER`), each with `io_engine` Sync and Async (io_uring), the same test
//! guest, spec and backing file, runs alternated. Sequential 64 KiB reads and writes (MiB/s) and
//! 4 KiB reads at queue depth 8 (IOPS), as the guest's own timer measures them.
//! `cargo bench -p integration-tests --bench io_engine` (`BLOCK_BENCH_RUNS`, default 3).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use integration_tests::{guest_spec, median, prescient_bin, Scratch, TEST_GUEST_PVH};

const WORKLOADS: [(&str, &str, &str, f64, &str); 3] = [
    (
        "seq read 64 KiB",
        "blk_ops=2048 blk_op_kib=64",
        "kib_per_s",
        1024.0,
        "MiB/s",
    ),
    (
        "seq write 64 KiB",
        "blk_ops=2048 blk_op_kib=64 blk_write=1",
        "kib_per_s",
        1024.0,
        "MiB/s",
    ),
    (
        "rand read 4 KiB qd8",
        "blk_ops=20000 blk_qd=8",
        "ops_per_s",
        1.0,
        "IOPS",
    ),
];
const DISK_MIB: u64 = 256;

fn firecracker() -> PathBuf {
    std::env::var_os("PRESCIENT_FIRECRACKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/anchors/firecracker/firecracker")
        })
}

fn result(stdout: &str, field: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.contains("guest: blk0 ops="))
        .unwrap_or_else(|| panic!("no result line:\n{stdout}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

fn main() {
    let runs: usize = std::env::var("BLOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scratch = Scratch::new("io-engine-bench");
    let disk = scratch.path().join("disk.img");
    std::fs::write(&disk, vec![0x5au8; (DISK_MIB << 20) as usize]).unwrap();
    let fc = firecracker();
    let vmms: [(&str, PathBuf, &str); 4] = [
        ("prescient Sync", prescient_bin().to_path_buf(), "Sync"),
        ("prescient Async", prescient_bin().to_path_buf(), "Async"),
        ("firecracker Sync", fc.clone(), "Sync"),
        ("firecracker Async", fc, "Async"),
    ];
    println!("virtio-blk engines, test guest (1 vCPU, polling driver), {DISK_MIB} MiB file in the page cache, median of {runs} alternated runs");
    print!("{:<22}", "workload");
    for (name, _, _) in &vmms {
        print!(" {name:>18}");
    }
    println!(" {:>12} {:>12}", "pr/fc Sync", "pr/fc Async");
    for (label, args, field, div, unit) in WORKLOADS {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
        for _ in 0..runs {
            for (i, (_, bin, engine)) in vmms.iter().enumerate() {
                let args = format!("cpu_ms=1 mem_mib=1 {args}");
                let mut spec: serde_json::Value =
                    serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 1, 128, &args)).unwrap();
                spec["drives"] = serde_json::json!([{"drive_id": "disk0", "path_on_host": disk,
                    "is_root_device": false, "is_read_only": false, "io_engine": engine,
                    "cache_type": "Writeback"}]);
                let path = scratch.write("vm.json", &spec.to_string());
                let out = Command::new(bin)
                    .args(["--no-api", "--config-file", path.to_str().unwrap()])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .expect("run VMM");
                samples[i].push(result(&String::from_utf8_lossy(&out.stdout), field) / div);
            }
        }
        let m: Vec<f64> = samples.into_iter().map(median).collect();
        print!("{label:<22}");
        for v in &m {
            print!(" {:>12.0} {unit:<5}", v);
        }
        println!(" {:>12.2} {:>12.2}", m[0] / m[2], m[1] / m[3]);
    }
}
