//! vhost-user-block against the built-in block device: the same test guest reads the same file,
//! once through prescient's own virtio-blk (Sync engine) and once through a vhost-user drive
//! served by `qemu-storage-daemon`, on prescient and on Firecracker, alternated run by run.
//! 4 KiB reads (the guest reads sectors 0, 8, 16, ... wrapping; queue depth 1 and 8, IOPS) and
//! 64 KiB reads (MiB/s), as the guest's own timer measures them.
//! `cargo bench -p integration-tests --bench vhost_user_block` (`VHOST_BENCH_RUNS`, default 3).

use std::time::Duration;

use integration_tests::bench::{alternate, env_or, Kind, Table, VmSpec, Vmm};
use integration_tests::vhost_user::StorageDaemon;
use integration_tests::{line_field, Scratch};

/// (label, guest parameters, result field, unit divisor)
const WORKLOADS: [(&str, &str, &str, f64); 3] = [
    (
        "read 4 KiB qd1 (IOPS)",
        "blk_ops=5000 blk_qd=1",
        "ops_per_s",
        1.0,
    ),
    (
        "read 4 KiB qd8 (IOPS)",
        "blk_ops=20000 blk_qd=8",
        "ops_per_s",
        1.0,
    ),
    (
        "read 64 KiB (MiB/s)",
        "blk_ops=2048 blk_op_kib=64",
        "kib_per_s",
        1024.0,
    ),
];
const DISK_MIB: usize = 64;
const DEADLINE: Duration = Duration::from_secs(120);

fn main() {
    let runs: usize = env_or("VHOST_BENCH_RUNS", 3);
    let scratch = Scratch::new("vhost-user-bench");
    let disk = scratch.path().join("disk.img");
    std::fs::write(&disk, vec![0x5au8; DISK_MIB << 20]).unwrap();
    let backend = StorageDaemon::start(&disk, &scratch.path().join("vu.sock"));
    let vmms = Vmm::with(&[Kind::Firecracker]);
    let mut t = Table::new(
        format!(
            "block reads, test guest (1 vCPU, polling driver), {DISK_MIB} MiB raw file: \
             built-in virtio-blk vs vhost-user (qemu-storage-daemon), {runs} alternated runs \
             (host shared)"
        ),
        &vmms,
    );
    for (label, args, field, div) in WORKLOADS {
        for vhost in [false, true] {
            let mut spec = VmSpec::test_guest(1, 128, &format!("cpu_ms=1 mem_mib=1 {args}"));
            if vhost {
                spec.vhost_user_drives.push(backend.socket.clone());
            } else {
                spec.drives.push(disk.clone());
            }
            let results = alternate(&vmms, runs, |vmm| {
                let vm = vmm.spawn(Some(&spec), scratch.path(), None).unwrap();
                let (_, line) = vm.expect_prefix("guest: blk0 ops=", DEADLINE);
                vm.wait_exit(DEADLINE);
                line_field(&line, field)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{}: no {field} in {line}", vmm.name()))
                    / div
            });
            let how = if vhost { "vhost-user" } else { "built-in" };
            t.row_of(format!("{label}, {how}"), &results);
        }
    }
    t.print();
}
