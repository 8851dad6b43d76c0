//! Linux guests under a real KVM: prescient vs Firecracker, same VM, alternated runs.
//!
//! Both VMMs boot the project's Linux guest (1 vCPU, 512 MiB, the rootfs on virtio-blk, a fresh
//! copy each run) with the same config file and command line; the agent runs fio 4K random
//! reads/writes (which first lays out its 64 MiB file), a 64 MiB sequential write, and powers
//! off. Per run, from the VMM's start: the kernel banner, `agent: ready`, the fio steps, the
//! VMM's exit, and from the agent's poweroff to that exit. Medians with their range, and
//! prescient / Firecracker (for IOPS and MiB/s higher is better, for times lower).
//!
//! On a host with kvm_intel or kvm_amd this runs right there. Anywhere else it runs inside the
//! nested KVM host (`integration_tests::nested`), the benchmark binary itself measuring in L1:
//! everything is then emulated, so absolute times mean little and the ratios are what count.
//!
//! `cargo bench -p integration-tests --bench linux_nested_vs_firecracker`;
//! `NESTED_BENCH_RUNS` (default 3) rounds; Firecracker as in `integration_tests::bench`.

use std::time::Duration;

use integration_tests::agent::fio_figure;
use integration_tests::bench::{alternate, env_or, firecracker_path, Table, VmSpec, Vmm};
use integration_tests::linux::{cmdline, images, HostKvm};
use integration_tests::nested::{in_l1, Boot, L1Host, L1_BIN_DIR};
use integration_tests::Scratch;

const RESULT: &str = "nested-bench ";
const STEPS: [&str; 3] = ["fio-randrw:3", "fio-seqwrite:60:64M", "poweroff"];
const DEADLINE: Duration = Duration::from_secs(300);

/// What one run measures, in seconds from the VMM's start unless said otherwise.
const METRICS: [&str; 8] = [
    "kernel banner (s)",
    "agent: ready (s)",
    "fio randrw 4K read IOPS (higher is better)",
    "fio randrw step incl. 64 MiB layout (s)",
    "64 MiB sequential write, MiB/s (higher is better)",
    "64 MiB sequential write step (s)",
    "VMM exit (s)",
    "agent's poweroff to VMM exit (s)",
];

/// Runs the guest once under `vmm` in `scratch`: the values of `METRICS`.
fn run_once(vmm: &Vmm, scratch: &Scratch) -> Vec<f64> {
    let img = images();
    let rootfs = scratch.path().join("rootfs.ext4");
    std::fs::copy(&img.rootfs, &rootfs).expect("copy the rootfs");
    let spec = VmSpec {
        initrd: Some(img.initramfs.clone()),
        drives: vec![rootfs],
        ..VmSpec::test_guest(
            1,
            512,
            &cmdline(&format!(
                "root=/dev/vda prescient.workload={}",
                STEPS.join(",")
            )),
        )
    };
    let spec = VmSpec {
        kernel: img.vmlinux.clone(),
        ..spec
    };
    let vm = vmm
        .spawn(Some(&spec), scratch.path(), None)
        .unwrap_or_else(|e| panic!("{}: {e}", vmm.name()));
    let at = |what: &str, pred: &dyn Fn(&str) -> bool| {
        vm.wait_for(what, DEADLINE, pred)
            .unwrap_or_else(|e| panic!("{e}"))
            .0
            .as_secs_f64()
    };
    let banner = at("the banner", &|l| l.contains("Linux version "));
    let ready = at("agent: ready", &|l| l.contains("agent: ready"));
    let step = |name: &str| {
        let marker = format!("\"step\":\"{name}\"");
        let start = at(name, &|l| {
            l.contains(&format!("agent: workload-start {name}"))
        });
        let done = at(name, &|l| {
            l.contains("agent: workload-done ") && l.contains(&marker)
        });
        done - start
    };
    let randrw_step = step(STEPS[0]);
    let seqwrite_step = step(STEPS[1]);
    let poweroff = at("agent: poweroff", &|l| l.contains("agent: poweroff"));
    let lines = vm.lines();
    let exit = vm.wait_exit_measured(DEADLINE);
    assert!(
        exit.status.success(),
        "{}: {}\n{}",
        vmm.name(),
        exit.status,
        exit.stderr
    );
    let exit_at = exit.at.as_secs_f64();
    vec![
        banner,
        ready,
        fio_figure(&lines, "fio-randrw", "read: IOPS="),
        randrw_step,
        fio_figure(&lines, "fio-seqwrite", "WRITE: bw="),
        seqwrite_step,
        exit_at,
        exit_at - poweroff,
    ]
}

fn vmms() -> Vec<Vmm> {
    let fc = Vmm::firecracker().unwrap_or_else(|e| panic!("this benchmark compares: {e}"));
    vec![Vmm::prescient(), fc]
}

/// The side that runs the guests (in L1, or here on a hardware host): one line per run,
/// printed as it comes.
fn measure(rounds: usize) -> Vec<String> {
    let scratch = Scratch::new("nested-bench");
    let vmms = vmms();
    let mut out = Vec::new();
    alternate(&vmms, rounds, |vmm| {
        let values: Vec<String> = run_once(vmm, &scratch)
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect();
        let line = format!("{RESULT}{} {}", vmm.name(), values.join(" "));
        println!("{line}");
        out.push(line);
    });
    out
}

fn main() {
    let rounds = env_or("NESTED_BENCH_RUNS", 3usize).max(1);
    if in_l1() {
        measure(rounds);
        return;
    }
    let output = if let HostKvm::Hardware(_) = HostKvm::detect() {
        measure(rounds)
    } else {
        let exe = std::env::current_exe().expect("the bench binary");
        let program = format!("{L1_BIN_DIR}/nested-bench");
        let fc = format!("{L1_BIN_DIR}/firecracker");
        let fc_host = firecracker_path().unwrap_or_else(|e| panic!("this benchmark compares: {e}"));
        let outcome = L1Host::get().boot(
            &Boot::new(
                "linux_nested_vs_firecracker",
                Duration::from_secs(300 * rounds as u64),
            )
            .file(&exe, &program)
            .file(&fc_host, &fc)
            .env("FIRECRACKER_BIN", &fc)
            .env("NESTED_BENCH_RUNS", &rounds.to_string())
            .command(&program, &[]),
        );
        if outcome.exit != Ok(0) {
            panic!("{}", outcome.report("the nested benchmark", None));
        }
        outcome.output
    };
    let vmms = vmms();
    // per_vmm[vmm][metric]: every run's value.
    let mut per_vmm: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); METRICS.len()]; vmms.len()];
    for l in &output {
        let Some(rest) = l.strip_prefix(RESULT) else {
            continue;
        };
        println!("{l}");
        let Some(i) = vmms.iter().position(|v| rest.starts_with(v.name())) else {
            continue;
        };
        let values = rest[vmms[i].name().len()..].split_whitespace();
        for (m, v) in values.enumerate().take(METRICS.len()) {
            if let Ok(v) = v.parse() {
                per_vmm[i][m].push(v);
            }
        }
    }
    let mut table = Table::new(
        format!(
            "Linux guest under a real KVM (nested under TCG where the host has none), {rounds} \
             alternated rounds"
        ),
        &vmms,
    );
    for (m, metric) in METRICS.iter().enumerate() {
        let cells: Vec<Vec<f64>> = per_vmm.iter().map(|v| v[m].clone()).collect();
        table.row_of(*metric, &cells);
    }
    table.print();
}
