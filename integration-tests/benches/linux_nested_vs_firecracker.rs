//! Linux guests under a real KVM: prescient vs Firecracker, same spec, alternating runs.
//!
//! Both VMMs boot the project's Linux guest (1 vCPU, 512 MiB, the rootfs on virtio-blk, a fresh
//! copy each run) with the same JSON spec and command line; the agent runs fio 4K random
//! reads/writes (which first lays out its 64 MiB file), a 64 MiB sequential write, and powers
//! off. Per run, from the VMM's start: the kernel banner, `agent: ready`, the fio steps, the
//! VMM's exit. Medians, and prescient / Firecracker ratios (for IOPS and MiB/s, higher is better).
//!
//! On a host with kvm_intel or kvm_amd this runs right there. Anywhere else it runs inside the
//! nested KVM host (`integration_tests::nested`): everything is then emulated, so absolute times
//! mean little and the ratios are what count.
//!
//! `cargo bench -p integration-tests --bench linux_nested_vs_firecracker`;
//! `NESTED_BENCH_RUNS` (default 3) runs per VMM; `FIRECRACKER_BIN` names the Firecracker binary
//! (default: the shared anchor, /work/shared/anchors/firecracker/firecracker).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration_tests::linux::{cmdline, images, Console, HostKvm};
use integration_tests::nested::{in_l1, Boot, L1Host, L1_BIN_DIR};
use integration_tests::{median, prescient_bin, Scratch};

const RESULT: &str = "nested-bench ";
const STEPS: [&str; 3] = ["fio-randrw:3", "fio-seqwrite:60:64M", "poweroff"];
const DEADLINE: Duration = Duration::from_secs(300);

fn firecracker_bin() -> PathBuf {
    let p = std::env::var_os("FIRECRACKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/anchors/firecracker/firecracker"));
    assert!(
        p.is_file(),
        "no Firecracker binary at {} (set FIRECRACKER_BIN)",
        p.display()
    );
    p
}

fn runs() -> usize {
    std::env::var("NESTED_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3)
}

/// One measured run; times in seconds from the VMM's start.
#[derive(Debug, Default, Clone)]
struct Run {
    banner: f64,
    ready: f64,
    randrw_read_iops: f64,
    randrw_step: f64,
    seqwrite_mibps: f64,
    seqwrite_step: f64,
    exit: f64,
    poweroff_to_exit: f64,
}

impl Run {
    const FIELDS: [&'static str; 8] = [
        "banner",
        "ready",
        "randrw_read_iops",
        "randrw_step",
        "seqwrite_mibps",
        "seqwrite_step",
        "exit",
        "poweroff_to_exit",
    ];

    fn values(&self) -> [f64; 8] {
        [
            self.banner,
            self.ready,
            self.randrw_read_iops,
            self.randrw_step,
            self.seqwrite_mibps,
            self.seqwrite_step,
            self.exit,
            self.poweroff_to_exit,
        ]
    }

    fn from_values(v: &[f64]) -> Run {
        Run {
            banner: v[0],
            ready: v[1],
            randrw_read_iops: v[2],
            randrw_step: v[3],
            seqwrite_mibps: v[4],
            seqwrite_step: v[5],
            exit: v[6],
            poweroff_to_exit: v[7],
        }
    }
}

/// The `workload`'s fio `IOPS=` of its first `read:` (or `write:`) summary line.
fn fio_iops(lines: &[String], workload: &str, kind: &str) -> f64 {
    let label = format!("agent: [{workload}]");
    lines
        .iter()
        .filter(|l| l.contains(&label))
        .find_map(|l| {
            let rest = &l[l.find(&format!("{kind}: IOPS="))? + kind.len() + 7..];
            let n = rest.split(',').next()?;
            let (digits, scale) = match n.strip_suffix('k') {
                Some(d) => (d, 1000.0),
                None => (n, 1.0),
            };
            digits.parse::<f64>().ok().map(|v| v * scale)
        })
        .unwrap_or(f64::NAN)
}

/// The `workload`'s fio `bw=` in MiB/s of its `WRITE:` group line.
fn fio_write_mibps(lines: &[String], workload: &str) -> f64 {
    let label = format!("agent: [{workload}]");
    lines
        .iter()
        .filter(|l| l.contains(&label))
        .find_map(|l| {
            let rest = &l[l.find("WRITE: bw=")? + 10..];
            let n = rest.split_whitespace().next()?;
            let (v, unit) = n.split_at(n.find(|c: char| c.is_ascii_alphabetic())?);
            let v: f64 = v.parse().ok()?;
            Some(match unit {
                "KiB/s" => v / 1024.0,
                "MiB/s" => v,
                "GiB/s" => v * 1024.0,
                _ => return None,
            })
        })
        .unwrap_or(f64::NAN)
}

/// Runs the guest once under `vmm` (prescient or firecracker) in `scratch`.
fn run_once(vmm: &str, scratch: &Scratch) -> Run {
    let img = images();
    let rootfs = scratch.path().join("rootfs.ext4");
    std::fs::copy(&img.rootfs, &rootfs).expect("copy the rootfs");
    let args = cmdline(&format!("prescient.workload={}", STEPS.join(",")));
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": img.vmlinux, "initrd_path": img.initramfs,
                        "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
        "drives": [{"drive_id": "rootfs", "path_on_host": rootfs,
                    "is_root_device": true, "is_read_only": false}],
    });
    let spec_path = scratch.write(&format!("{vmm}.json"), &spec.to_string());
    let mut cmd = match vmm {
        "prescient" => {
            let mut c = Command::new(prescient_bin());
            c.arg("--config-file").arg(&spec_path);
            c
        }
        _ => {
            let mut c = Command::new(firecracker_bin());
            c.args(["--no-api", "--level", "Error", "--config-file"])
                .arg(&spec_path);
            c
        }
    };
    let vm = Console::spawn(vmm, &mut cmd);
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
    // Its clock starts with the VMM; read right after the exit (polled every 20 ms).
    let clock = vm.stream().clone();
    let (status, stderr) = vm.wait_exit(DEADLINE);
    let exit = clock.elapsed().as_secs_f64();
    assert!(status.success(), "{vmm}: {status}\n{stderr}");
    Run {
        banner,
        ready,
        randrw_read_iops: fio_iops(&lines, "fio-randrw", "read"),
        randrw_step,
        seqwrite_mibps: fio_write_mibps(&lines, "fio-seqwrite"),
        seqwrite_step,
        exit,
        poweroff_to_exit: exit - poweroff,
    }
}

/// The side that runs the guests (in L1, or here on a hardware host): one result line per run,
/// printed as it comes.
fn measure() -> Vec<String> {
    let mut out = Vec::new();
    let scratch = Scratch::new("nested-bench");
    let vmms = ["prescient", "firecracker"];
    for i in 0..runs() {
        // Alternate which goes first, so neither always runs on a warmer host.
        let order: Vec<&str> = if i % 2 == 0 {
            vmms.to_vec()
        } else {
            vmms.iter().rev().copied().collect()
        };
        for vmm in order {
            let r = run_once(vmm, &scratch);
            let values: Vec<String> = r.values().iter().map(|v| format!("{v:.3}")).collect();
            let line = format!("{RESULT}{vmm} {}", values.join(" "));
            println!("{line}");
            out.push(line);
        }
    }
    out
}

fn main() {
    if in_l1() {
        measure();
        return;
    }
    let output = if let HostKvm::Hardware(_) = HostKvm::detect() {
        measure()
    } else {
        let exe = std::env::current_exe().expect("the bench binary");
        let program = format!("{L1_BIN_DIR}/nested-bench");
        let fc = format!("{L1_BIN_DIR}/firecracker");
        let outcome = L1Host::get().boot(
            &Boot::new(
                "linux_nested_vs_firecracker",
                Duration::from_secs(300 * runs() as u64),
            )
            .file(&exe, &program)
            .file(&firecracker_bin(), &fc)
            .env("FIRECRACKER_BIN", &fc)
            .env("NESTED_BENCH_RUNS", &runs().to_string())
            .command(&program, &[]),
        );
        if outcome.exit != Ok(0) {
            panic!("{}", outcome.report("the nested benchmark", None));
        }
        outcome.output
    };
    table(&output);
}

fn table(output: &[String]) {
    let mut per: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    for l in output {
        let Some(rest) = l.strip_prefix(RESULT) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let i = match f.next() {
            Some("prescient") => 0,
            Some("firecracker") => 1,
            _ => continue,
        };
        per[i].push(f.filter_map(|v| v.parse().ok()).collect());
    }
    let med = |runs: &[Vec<f64>]| -> Run {
        let v: Vec<f64> = (0..Run::FIELDS.len())
            .map(|k| median(runs.iter().map(|r| r[k]).collect()))
            .collect();
        Run::from_values(&v)
    };
    for (name, runs) in [("prescient", &per[0]), ("firecracker", &per[1])] {
        for r in runs.iter() {
            let v: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
            println!("run {name}: {}", v.join(" "));
        }
    }
    let (p, f) = (med(&per[0]), med(&per[1]));
    println!(
        "Linux guest under a real KVM ({} runs each, alternating; medians)",
        per[0].len()
    );
    println!("| from the VMM's start | prescient | Firecracker | prescient / Firecracker |");
    println!("| --- | --- | --- | --- |");
    let rows: [(&str, f64, f64, &str); 8] = [
        ("kernel banner (s)", p.banner, f.banner, "lower is better"),
        ("agent: ready (s)", p.ready, f.ready, "lower is better"),
        (
            "fio randrw 4K read IOPS",
            p.randrw_read_iops,
            f.randrw_read_iops,
            "higher is better",
        ),
        (
            "fio randrw step incl. 64 MiB layout (s)",
            p.randrw_step,
            f.randrw_step,
            "lower is better",
        ),
        (
            "64 MiB sequential write (MiB/s)",
            p.seqwrite_mibps,
            f.seqwrite_mibps,
            "higher is better",
        ),
        (
            "64 MiB sequential write step (s)",
            p.seqwrite_step,
            f.seqwrite_step,
            "lower is better",
        ),
        ("VMM exit (s)", p.exit, f.exit, "lower is better"),
        (
            "agent's poweroff to VMM exit (s)",
            p.poweroff_to_exit,
            f.poweroff_to_exit,
            "lower is better",
        ),
    ];
    for (name, a, b, better) in rows {
        println!("| {name} | {a:.2} | {b:.2} | {:.2} ({better}) |", a / b);
    }
}
