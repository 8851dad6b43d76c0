//! Linux boot benchmark: prescient, Firecracker and QEMU `-M microvm -accel kvm` booting the same
//! kernel, initramfs and command line (resources/guest images), alternated run by run.
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
//! runs per VMM (default 5). QEMU comes from Debian's qemu-system-x86, Firecracker as in
//! `integration_tests::bench`.

use std::process::Command;
use std::time::Duration;

use integration_tests::bench::{alternate, env_or, Table, VmSpec, Vmm};
use integration_tests::console::Console;
use integration_tests::linux::{cmdline, images, HostKvm};
use integration_tests::Scratch;

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

/// One run, ms from the start: banner with earlyprintk, banner on the console, agent ready.
type Run = (f64, f64, Option<f64>);

fn main() {
    let runs: usize = env_or("LINUX_BOOT_BENCH_RUNS", 5).max(1);
    let host = HostKvm::detect();
    let full = host.why_no_full_boot().is_none();
    let img = images();
    let scratch = Scratch::new("linux-boot-bench");
    // The same command line for every VMM; the earlyprintk variant shows the banner as soon as
    // the kernel parses its early parameters, the plain one when the serial console registers.
    let args = cmdline("");
    let early_args = cmdline("earlyprintk=serial,ttyS0,115200");
    let spec = |args: &str| {
        let mut s = VmSpec::test_guest(VCPUS, MEM_MIB, args);
        s.kernel = img.vmlinux.clone();
        s.initrd = Some(img.initramfs.clone());
        // Linux's own command line, without the test guest's clock parameter.
        s.args = args.to_string();
        s
    };
    let (console_spec, early_spec) = (spec(&args), spec(&early_args));
    let vmms = Vmm::all();
    let results: Vec<Vec<Run>> = alternate(&vmms, runs, |vmm| {
        let mut early = vmm
            .command(Some(&early_spec), scratch.path(), None)
            .unwrap();
        let early = measure(vmm.name(), &mut early, false).0;
        let mut plain = vmm
            .command(Some(&console_spec), scratch.path(), None)
            .unwrap();
        let (banner, ready) = measure(vmm.name(), &mut plain, full);
        (ms(early), ms(banner), ready.map(ms))
    });
    let mut t = Table::new(
        format!(
            "Linux {} ({} images), {VCPUS} vCPUs, {MEM_MIB} MiB, host KVM: {host:?}, {runs} alternated \
             runs, ms from the VMM's start (host shared)\ncommand line: {args} [earlyprintk=serial,ttyS0,115200]",
            img.kernel_release, img.variant
        ),
        &vmms,
    );
    let col = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<Vec<f64>> {
        results
            .iter()
            .map(|runs| runs.iter().filter_map(f).collect())
            .collect()
    };
    t.row_of("kernel banner (earlyprintk)", &col(&|r| Some(r.0)));
    t.row_of("kernel banner (console)", &col(&|r| Some(r.1)));
    if full {
        t.row_of("agent: ready", &col(&|r| r.2));
    }
    if let Some(why) = host.why_no_full_boot() {
        t.note(format!("agent ready not measured: {why}"));
    }
    t.print();
}
