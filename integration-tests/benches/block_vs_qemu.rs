//! virtio-blk throughput: prescient vs QEMU `-M microvm`, the same test guest and the same
//! backing file, alternating runs. Sequential 64 KiB reads and writes (MiB/s) and 4 KiB reads at
//! queue depth 8 (IOPS), as the guest's own timer measures them.
//! `cargo bench -p integration-tests --bench block_vs_qemu` (`BLOCK_BENCH_RUNS`, default 3).

use std::process::{Command, Stdio};

use integration_tests::{guest_spec, median, prescient_bin, Scratch, TEST_GUEST_PVH};

/// (label, guest parameters, result field, unit divisor, unit)
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

/// The guest's result field from a run's console output.
fn result(stdout: &str, field: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("guest: blk0 ops="))
        .unwrap_or_else(|| panic!("no result line:\n{stdout}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run VMM");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let runs: usize = std::env::var("BLOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scratch = Scratch::new("block-bench");
    let disk = scratch.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    // Touch the file once so both VMMs read allocated, cached blocks rather than holes.
    std::fs::write(&disk, vec![0x5au8; (DISK_MIB << 20) as usize]).unwrap();

    println!("virtio-blk, test guest (1 vCPU, polling driver), {DISK_MIB} MiB raw file, median of {runs} runs");
    println!(
        "{:<22} {:>14} {:>14} {:>10}",
        "workload", "prescient", "qemu microvm", "ratio"
    );
    for (label, args, field, div, unit) in WORKLOADS {
        let args = format!("cpu_ms=1 mem_mib=1 {args}");
        let mut spec: serde_json::Value =
            serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 1, 128, &args)).unwrap();
        spec["drives"] = serde_json::json!([{"drive_id": "disk0", "path_on_host": disk, "is_root_device": false}]);
        let spec_path = scratch.write("vm.json", &spec.to_string());
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let out =
                run(Command::new(prescient_bin())
                    .args(["--config-file", spec_path.to_str().unwrap()]));
            ours.push(result(&out, field) / div);
            let out = run(Command::new("qemu-system-x86_64")
                .args([
                    "-M",
                    "microvm,x-option-roms=off,rtc=off,acpi=off",
                    "-accel",
                    "kvm",
                ])
                .args([
                    "-smp",
                    "1",
                    "-m",
                    "128",
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                ])
                .args(["-serial", "stdio", "-no-reboot", "-device", "i8042"])
                .args(["-global", "virtio-mmio.force-legacy=false"])
                .arg("-drive")
                .arg(format!("if=none,id=d0,format=raw,file={}", disk.display()))
                .args([
                    "-device",
                    "virtio-blk-device,drive=d0",
                    "-kernel",
                    TEST_GUEST_PVH,
                ])
                .args(["-append", &args]));
            theirs.push(result(&out, field) / div);
        }
        let (p, q) = (median(ours), median(theirs));
        println!(
            "{label:<22} {:>9.0} {unit:<4} {:>9.0} {unit:<4} {:>10.2}",
            p,
            q,
            p / q
        );
    }
}
