//! Boot and memory benchmark: prescient, Firecracker and QEMU `-M microvm` booting the same test
//! guest from the same spec, alternated in one process.
//!
//! - Start to the guest's first console byte, and start to the VMM's exit after the guest's
//!   CPU phase, its first touch of 64 MiB and its i8042 reset (`cpu_ms=50 mem_mib=64`).
//! - The VMM's resident memory (VmRSS plus any hugetlbfs pages) with the guest halted after
//!   touching 1 MiB ("idle") and after touching 64 MiB: right when the guest prints its last
//!   line, and again `SETTLE` later (a settled VM, as a host full of idle microVMs has them).
//!   Also the VMM's own memory: resident memory outside the guest-RAM mapping.
//! - prescient's `machine-config.huge_pages` choices side by side: first-touch speed against
//!   the memory the host gives (the measurements behind the default, docs/memory.md).
//!
//! `cargo bench -p integration-tests --bench boot` (`BOOT_BENCH_RUNS` timing runs per VMM,
//! default 15; `BOOT_BENCH_MEM_RUNS` memory runs, default 3). Firecracker: see
//! `integration_tests::bench`. Times are medians (range in brackets) on a shared host; memory
//! does not depend on the load.

use std::time::Duration;

use integration_tests::bench::{
    alternate, env_or, resident_outside_guest_ram, Footprint, Kind, Stat, Table, VmSpec, Vmm,
};
use integration_tests::console::Console;
use integration_tests::Scratch;

const VCPUS: u8 = 2;
const MEM_MIB: u64 = 256;
const TIMED_ARGS: &str = "cpu_ms=50 mem_mib=64";
const TOUCH_MIB: u64 = 64;
/// How long a halted guest is left before its VMM's memory is read again.
const SETTLE: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(60);
const DONE: &str = "prescient-test-guest: done";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One timed boot: (first byte ms, exit ms).
fn timed(vmm: &Vmm, scratch: &Scratch, spec: &VmSpec) -> (f64, f64) {
    let vm = vmm.spawn(Some(spec), scratch.path(), None).unwrap();
    vm.expect_prefix(DONE, DEADLINE);
    let first = vm.first_byte().expect("the guest printed");
    let exit = vm.wait_exit_measured(DEADLINE);
    assert!(exit.status.success(), "{}: {exit:?}", vmm.name());
    (ms(first), ms(exit.at))
}

/// Memory of a VM whose guest touched `touch_mib` and halted: at its last line, after `SETTLE`,
/// and the VMM's own memory then (KiB).
struct Memory {
    at_done: Footprint,
    settled: Footprint,
    own_kib: u64,
}

/// Boots every `(vmm, spec)` at once (memory does not depend on the load), waits for each
/// guest's last line, reads each VMM's memory, then again after `SETTLE`.
fn memory(runs: &[(&Vmm, VmSpec)], scratch: &Scratch) -> Vec<Memory> {
    let vms: Vec<(Console, u64)> = runs
        .iter()
        .enumerate()
        .map(|(i, (vmm, spec))| {
            let dir = scratch.path().join(format!("m{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            (vmm.spawn(Some(spec), &dir, None).unwrap(), spec.mem_mib)
        })
        .collect();
    let at_done: Vec<Footprint> = vms
        .iter()
        .map(|(vm, _)| {
            vm.expect_prefix(DONE, DEADLINE);
            Footprint::of(vm.pid())
        })
        .collect();
    std::thread::sleep(SETTLE);
    vms.iter()
        .zip(at_done)
        .map(|((vm, mem_mib), at_done)| Memory {
            at_done,
            settled: Footprint::of(vm.pid()),
            own_kib: resident_outside_guest_ram(vm.pid(), *mem_mib),
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Each VMM from a fresh copy of its binary, so that all start from the same page-cache state
/// (`Vmm::fresh_copy`); one folder per memory run.
fn fresh_copies(vmms: &[Vmm], scratch: &Scratch, run: usize) -> Vec<Vmm> {
    let dir = scratch.path().join(format!("bin{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    vmms.iter().map(|v| v.fresh_copy(&dir).unwrap()).collect()
}

/// Free pages in the host's 2 MiB hugetlbfs pool.
fn free_hugetlb_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let runs = env_or("BOOT_BENCH_RUNS", 15);
    let mem_runs = env_or("BOOT_BENCH_MEM_RUNS", 3);
    let scratch = Scratch::new("boot-bench");
    let vmms = Vmm::all();

    let timed_spec = VmSpec::test_guest(VCPUS, MEM_MIB, TIMED_ARGS);
    let times = alternate(&vmms, runs, |vmm| timed(vmm, &scratch, &timed_spec));

    let idle_spec = VmSpec::test_guest(VCPUS, MEM_MIB, "cpu_ms=1 mem_mib=1 exit=halt");
    let touch_spec = VmSpec::test_guest(
        VCPUS,
        MEM_MIB,
        &format!("cpu_ms=1 mem_mib={TOUCH_MIB} exit=halt"),
    );
    let mut idle: Vec<Vec<Memory>> = vmms.iter().map(|_| Vec::new()).collect();
    let mut touched: Vec<Vec<Memory>> = vmms.iter().map(|_| Vec::new()).collect();
    for run in 0..mem_runs {
        let copies = fresh_copies(&vmms, &scratch, run);
        let mut batch = Vec::new();
        for vmm in &copies {
            batch.push((vmm, idle_spec.clone()));
            batch.push((vmm, touch_spec.clone()));
        }
        let mut measured = memory(&batch, &scratch).into_iter();
        for i in 0..vmms.len() {
            idle[i].push(measured.next().unwrap());
            touched[i].push(measured.next().unwrap());
        }
    }

    let mut t = Table::new(
        format!(
            "boot of the test guest ({VCPUS} vCPUs, {MEM_MIB} MiB): times over {runs} alternated runs, \
             memory over {mem_runs} (host shared with other work)"
        ),
        &vmms,
    );
    let col = |f: &dyn Fn(&(f64, f64)) -> f64| -> Vec<Vec<f64>> {
        times.iter().map(|v| v.iter().map(f).collect()).collect()
    };
    t.row_of("first console byte (ms)", &col(&|s| s.0));
    t.row_of(format!("exit after \"{TIMED_ARGS}\" (ms)"), &col(&|s| s.1));
    let mem_row = |set: &Vec<Vec<Memory>>, f: &dyn Fn(&Memory) -> u64| -> Vec<Vec<f64>> {
        set.iter()
            .map(|v| v.iter().map(|m| mib(f(m))).collect())
            .collect()
    };
    t.row_of(
        "VMM RSS, idle guest, settled (MiB)",
        &mem_row(&idle, &|m| m.settled.host_kib()),
    );
    t.row_of(
        "  at the guest's last line",
        &mem_row(&idle, &|m| m.at_done.host_kib()),
    );
    t.row_of(
        "  of which anonymous, settled",
        &mem_row(&idle, &|m| m.settled.anon_kib),
    );
    t.row_of(
        format!("VMM RSS after {TOUCH_MIB} MiB touched, settled"),
        &mem_row(&touched, &|m| m.settled.host_kib()),
    );
    t.row_of(
        "  at the guest's last line",
        &mem_row(&touched, &|m| m.at_done.host_kib()),
    );
    t.row_of(
        "VMM's own memory (outside guest RAM)",
        &mem_row(&idle, &|m| m.own_kib),
    );
    t.note(format!(
        "settled = {} s after the guest's last line; RSS includes hugetlbfs pages; each VMM with its \
         default huge pages (prescient: Transparent with idle trim, Firecracker: None), run from a \
         fresh copy of its binary for the memory rows (Vmm::fresh_copy)",
        SETTLE.as_secs()
    ));
    t.print();
    if let Some(fc) = vmms.iter().position(|v| v.kind == Kind::Firecracker) {
        let med = |set: &Vec<Vec<Memory>>, i: usize| {
            let mut v: Vec<u64> = set[i].iter().map(|m| m.settled.host_kib()).collect();
            v.sort();
            v[v.len() / 2]
        };
        let (pi, fi) = (med(&idle, 0), med(&idle, fc));
        let (pt, ft) = (med(&touched, 0), med(&touched, fc));
        println!(
            "targets (issue 22), settled: idle RSS {pi} KiB <= Firecracker {fi} KiB: {}; after {TOUCH_MIB} MiB \
             {pt} KiB <= Firecracker + 1 MiB ({} KiB): {}\n",
            if pi <= fi { "met" } else { "MISSED" },
            ft + 1024,
            if pt <= ft + 1024 { "met" } else { "MISSED" },
        );
    }

    huge_page_choices(&scratch, mem_runs);
}

/// prescient with each `huge_pages` value, and Firecracker with its default (`None`),
/// alternated: first-touch speed against host memory.
fn huge_page_choices(scratch: &Scratch, runs: usize) {
    let mut variants: Vec<(String, Vmm, Option<&str>)> = ["None", "Transparent"]
        .into_iter()
        .map(|c| (format!("prescient {c}"), Vmm::prescient(), Some(c)))
        .collect();
    let free = free_hugetlb_pages();
    let pool_note = if free * 2 >= 2 * MEM_MIB {
        variants.push(("prescient 2M".into(), Vmm::prescient(), Some("2M")));
        None
    } else {
        Some(format!(
            "prescient 2M: not run: the host's 2 MiB hugetlbfs pool has {free} free pages, {} \
             needed (vm.nr_hugepages)",
            MEM_MIB / 2
        ))
    };
    if let Ok(fc) = Vmm::firecracker() {
        variants.push(("firecracker None".into(), fc, None));
    }
    let with = |pages: Option<&str>, args: &str| {
        let mut s = VmSpec::test_guest(VCPUS, MEM_MIB, args);
        s.huge_pages = pages.map(str::to_string);
        s
    };
    // Per variant: exit times, idle RSS at the last line, settled idle RSS, settled 64 MiB RSS.
    let mut results: Vec<[Vec<f64>; 4]> = variants.iter().map(|_| Default::default()).collect();
    for run in 0..runs {
        for ((_, vmm, pages), out) in variants.iter().zip(&mut results) {
            out[0].push(timed(vmm, scratch, &with(*pages, TIMED_ARGS)).1);
            let vmm = &fresh_copies(std::slice::from_ref(vmm), scratch, run)[0];
            let m = memory(
                &[
                    (vmm, with(*pages, "cpu_ms=1 mem_mib=1 exit=halt")),
                    (vmm, with(*pages, "cpu_ms=1 mem_mib=64 exit=halt")),
                ],
                scratch,
            );
            out[1].push(mib(m[0].at_done.host_kib()));
            out[2].push(mib(m[0].settled.host_kib()));
            out[3].push(mib(m[1].settled.host_kib()));
        }
    }
    println!(
        "machine-config.huge_pages ({VCPUS} vCPUs, {MEM_MIB} MiB), medians of {runs} alternated runs; \
         RSS includes hugetlbfs pages; memory from fresh copies of the binaries"
    );
    println!(
        "{:<22} {:>20} {:>22} {:>18} {:>18}",
        "", "exit after 64 MiB", "idle RSS: last line", "settled", "64 MiB: settled"
    );
    for ((label, _, _), r) in variants.iter().zip(&results) {
        let med = |v: &[f64]| Stat::of(v).median;
        println!(
            "{label:<22} {:>17.0} ms {:>18.1} MiB {:>14.1} MiB {:>14.1} MiB",
            med(&r[0]),
            med(&r[1]),
            med(&r[2]),
            med(&r[3]),
        );
    }
    if let Some(note) = pool_note {
        println!("{note}");
    }
}
