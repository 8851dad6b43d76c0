//! Linux boot benchmark: prescient vs QEMU `-M microvm -accel kvm` booting the same kernel,
//! initramfs and command line (resources/guest images), alternating runs.
//!
//! - Everywhere: process start to the kernel's banner (`Linux version ...` on the serial port),
//!   twice: with `earlyprintk=serial` (the banner shows as soon as the kernel parses its early
//!   parameters: VMM start-up plus the first steps of the kernel) and without (the banner shows
//!   when the serial console registers, after the kernel's early setup).
//! - On hosts with hardware KVM (kvm_intel/kvm_amd) also start to `agent: ready` (init ran and
//!   started the guest agent). On a software-KVM host a full boot takes many minutes, so only
//!   the early boot is measured there.
//!
//! `cargo bench -p integration-tests --bench linux_early_boot`; `LINUX_BOOT_BENCH_RUNS` sets the
//! runs per VMM (default 5). QEMU comes from Debian's qemu-system-x86.

use std::process::Command;
use std::time::Duration;

use integration_tests::linux::{
    cmdline, images, prescient_spec, qemu_available, qemu_microvm, Console, HostKvm,
};
use integration_tests::{median, prescient_bin, Scratch};

const VCPUS: u8 = 2;
const MEM_MIB: u64 = 256;
const DEADLINE: Duration = Duration::from_secs(300);

/// Start to banner, and start to agent-ready when `full` (the VMM is killed after).
fn measure(what: &str, cmd: &mut Command, full: bool) -> (Duration, Option<Duration>) {
    let vm = Console::spawn(what, cmd);
    let banner = vm
        .wait_for("the kernel banner", DEADLINE, |l| {
            l.contains("Linux version ")
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .0;
    let ready = full.then(|| {
        vm.wait_for("agent: ready", DEADLINE, |l| l.contains("agent: ready"))
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    });
    (banner, ready)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The medians of one VMM: banner with earlyprintk, banner on the console, agent ready.
type Row = (Duration, Duration, Option<Duration>);

fn summarize(early: &[Duration], console: &[(Duration, Option<Duration>)]) -> Row {
    let ready: Vec<Duration> = console.iter().filter_map(|m| m.1).collect();
    (
        median(early.to_vec()),
        median(console.iter().map(|m| m.0).collect()),
        (!ready.is_empty()).then(|| median(ready)),
    )
}

fn main() {
    let runs: usize = std::env::var("LINUX_BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let host = HostKvm::detect();
    let full = host.why_no_full_boot().is_none();
    let img = images();
    let scratch = Scratch::new("linux-boot-bench");
    // The same command line for both VMMs; the earlyprintk variant shows the banner as soon as
    // the kernel parses its early parameters, the plain one when the serial console registers.
    let args = cmdline("");
    let early_args = cmdline("earlyprintk=serial,ttyS0,115200");
    let spec = |name: &str, args: &str| {
        scratch.write(
            name,
            &prescient_spec(&img.vmlinux, Some(&img.initramfs), VCPUS, MEM_MIB, args),
        )
    };
    let (spec_console, spec_early) = (spec("vm.json", &args), spec("vm-early.json", &early_args));
    let prescient = |spec: &std::path::Path| {
        let mut c = Command::new(prescient_bin());
        c.args(["--config-file", spec.to_str().unwrap()]);
        c
    };
    let qemu = |args: &str| {
        qemu_microvm(
            "kvm",
            VCPUS,
            MEM_MIB,
            &img.vmlinux,
            Some(&img.initramfs),
            args,
        )
    };
    let qemu_there = qemu_available();
    const QEMU: &str = "qemu-system-x86_64 -M microvm -accel kvm";

    let (mut ours_early, mut ours) = (Vec::new(), Vec::new());
    let (mut theirs_early, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours_early.push(measure("prescient", &mut prescient(&spec_early), false).0);
        ours.push(measure("prescient", &mut prescient(&spec_console), full));
        if qemu_there {
            theirs_early.push(measure(QEMU, &mut qemu(&early_args), false).0);
            theirs.push(measure(QEMU, &mut qemu(&args), full));
        }
    }

    println!(
        "Linux {} ({} images), {VCPUS} vCPUs, {MEM_MIB} MiB, host KVM: {host:?}, median of {runs} runs",
        img.kernel_release, img.variant
    );
    println!("command line: {args} [earlyprintk=serial,ttyS0,115200]");
    println!(
        "{:<42} {:>22} {:>20} {:>18}",
        "process start to (ms)", "banner (earlyprintk)", "banner (console)", "agent ready"
    );
    let row = |name: &str, (early, console, ready): Row| {
        let ready = ready.map_or("-".into(), |r| format!("{:.1}", ms(r)));
        println!(
            "{:<42} {:>22.1} {:>20.1} {:>18}",
            name,
            ms(early),
            ms(console),
            ready
        );
    };
    let p = summarize(&ours_early, &ours);
    row("prescient", p);
    if qemu_there {
        let q = summarize(&theirs_early, &theirs);
        row(QEMU, q);
        let ready_ratio = match (p.2, q.2) {
            (Some(a), Some(b)) => format!("{:.2}", ms(a) / ms(b)),
            _ => "-".into(),
        };
        println!(
            "{:<42} {:>22.2} {:>20.2} {:>18}",
            "ratio prescient / qemu",
            ms(p.0) / ms(q.0),
            ms(p.1) / ms(q.1),
            ready_ratio
        );
    } else {
        println!(
            "qemu-system-x86_64 not found: install Debian's qemu-system-x86 for the reference run"
        );
    }
    if let Some(why) = host.why_no_full_boot() {
        println!("agent ready not measured: {why}");
    }
}
