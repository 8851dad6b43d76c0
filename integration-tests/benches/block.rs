//! virtio-blk throughput: prescient, Firecracker and QEMU `-M microvm`, the same test guest and
//! the same backing file, alternated run by run. Sequential 64 KiB reads and writes (MiB/s) and
//! 4 KiB reads at queue depth 8 (IOPS), as the guest's own timer measures them. Then the same
//! with `io_engine: "Async"` (io_uring) on prescient and Firecracker, which QEMU has no form of
//! in a Firecracker config.
//! `cargo bench -p integration-tests --bench block` (`BLOCK_BENCH_RUNS`, default 3).

use std::time::Duration;

use integration_tests::bench::{alternate, env_or, Kind, Table, VmSpec, Vmm};
use integration_tests::{line_field, Scratch};

/// (label, guest parameters, result field, unit divisor)
const WORKLOADS: [(&str, &str, &str, f64); 3] = [
    (
        "seq read 64 KiB (MiB/s)",
        "blk_ops=2048 blk_op_kib=64",
        "kib_per_s",
        1024.0,
    ),
    (
        "seq write 64 KiB (MiB/s)",
        "blk_ops=2048 blk_op_kib=64 blk_write=1",
        "kib_per_s",
        1024.0,
    ),
    (
        "rand read 4 KiB qd8 (IOPS)",
        "blk_ops=20000 blk_qd=8",
        "ops_per_s",
        1.0,
    ),
];
const DISK_MIB: u64 = 256;
const DEADLINE: Duration = Duration::from_secs(120);

fn main() {
    let runs: usize = env_or("BLOCK_BENCH_RUNS", 3);
    let scratch = Scratch::new("block-bench");
    // Allocated, cached blocks rather than holes, so every VMM reads the same kind of data.
    let disk = scratch.zeroed_file("disk.img", (DISK_MIB << 20) as usize);
    std::fs::write(&disk, vec![0x5au8; (DISK_MIB << 20) as usize]).unwrap();
    for (engine, vmms) in [
        (None, Vmm::all()),
        (Some("Async"), Vmm::with(&[Kind::Firecracker])),
    ] {
        let mut t = Table::new(
            format!(
                "virtio-blk, io_engine {}, test guest (1 vCPU, polling driver), {DISK_MIB} MiB raw \
                 file, {runs} alternated runs (host shared)",
                engine.unwrap_or("Sync")
            ),
            &vmms,
        );
        for (label, args, field, div) in WORKLOADS {
            let mut spec = VmSpec::test_guest(1, 128, &format!("cpu_ms=1 mem_mib=1 {args}"));
            spec.drives.push(disk.clone());
            spec.io_engine = engine.map(str::to_string);
            let results = alternate(&vmms, runs, |vmm| {
                let vm = vmm.spawn(Some(&spec), scratch.path(), None).unwrap();
                let (_, line) = vm.expect_prefix("guest: blk0 ops=", DEADLINE);
                vm.wait_exit(DEADLINE);
                line_field(&line, field)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{}: no {field} in {line}", vmm.name()))
                    / div
            });
            t.row_of(label, &results);
        }
        t.print();
    }
}
