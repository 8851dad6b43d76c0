//! Boot benchmark: prescient vs QEMU `-M microvm` booting the same test guest, in the same run.
//!
//! For each VMM, alternating runs: process start to the guest's first serial byte, start to the
//! VMM's exit after the guest's i8042 reset, and the VMM's own memory: resident memory outside the
//! guest-RAM mapping once the guest has done all its work (it then halts instead of resetting), read
//! from /proc/PID/smaps. Peak RSS minus the MiB the guest touched is shown too; it overstates the
//! VMM's share because guest RAM is backed by 2 MiB transparent huge pages. Prints medians and
//! ratios. `cargo bench -p integration-tests --bench boot_vs_qemu`
//! (`BOOT_BENCH_RUNS` sets the number of runs per VMM; QEMU comes from Debian's qemu-system-x86).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{guest_spec, median, prescient_bin, Scratch, TEST_GUEST_PVH};

const VCPUS: u8 = 2;
const MEM_MIB: u64 = 256;
/// The guest touches this much in its memory phase; its image, stacks and page tables add
/// about 2 MiB more, which the overhead column therefore still contains.
const TOUCH_MIB: u64 = 64;
const GUEST_ARGS: &str = "cpu_ms=50 mem_mib=64";

#[derive(Debug, Clone, Copy)]
struct Sample {
    first_byte: Duration,
    exit: Duration,
    max_rss_kib: u64,
}

/// Runs `cmd` to completion, timing the first byte of its stdout and reading its peak RSS.
// The child is reaped with wait4(2), which alone reports its rusage.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn VMM");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let first = match stdout.read(&mut byte) {
            Ok(1) => Some(start.elapsed()),
            _ => None,
        };
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        (first, [&byte[..], &rest].concat())
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both out-pointers are live locals.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exit = start.elapsed();
    assert_eq!(
        ret,
        pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    let (first, out) = reader.join().unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("prescient-test-guest: done"),
        "guest did not finish ({cmd:?}):\n{text}"
    );
    Sample {
        first_byte: first.expect("the guest printed nothing"),
        exit,
        max_rss_kib: usage.ru_maxrss as u64,
    }
}

/// Resident KiB of `pid` outside its guest-RAM mapping: the anonymous mapping whose size is the
/// guest's memory (QEMU pads its RAM block by up to 2 MiB for alignment).
fn resident_outside_guest_ram(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let (mut total, mut guest) = (0u64, 0u64);
    let mut in_guest_ram = false;
    let kib = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            let size = kib(line);
            in_guest_ram = (MEM_MIB * 1024..=MEM_MIB * 1024 + 4096).contains(&size);
        } else if line.starts_with("Rss:") {
            total += kib(line);
            if in_guest_ram {
                guest += kib(line);
            }
        }
    }
    assert!(
        guest > 0,
        "no guest-RAM mapping of {MEM_MIB} MiB found in /proc/{pid}/smaps"
    );
    total - guest
}

/// Boots the guest with `exit=halt`, waits for its last line, and measures the VMM's own memory.
fn measure_own_memory(cmd: &mut Command) -> u64 {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn VMM");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read console");
        assert!(n > 0, "the guest ended before its done line");
        if line.starts_with("prescient-test-guest: done") {
            break;
        }
    }
    let own = resident_outside_guest_ram(child.id());
    let _ = child.kill();
    let _ = child.wait();
    own
}

struct Summary {
    first_byte: Duration,
    exit: Duration,
    own_mib: f64,
    peak_minus_touched_mib: f64,
}

fn summarize(samples: &[Sample], own_kib: Vec<u64>) -> Summary {
    let rss = median(samples.iter().map(|s| s.max_rss_kib).collect());
    Summary {
        first_byte: median(samples.iter().map(|s| s.first_byte).collect()),
        exit: median(samples.iter().map(|s| s.exit).collect()),
        own_mib: median(own_kib) as f64 / 1024.0,
        peak_minus_touched_mib: rss as f64 / 1024.0 - TOUCH_MIB as f64,
    }
}

fn qemu_command(guest_args: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    // -device i8042 gives microvm the reset port the guest ends with; the default CPU model
    // because `-cpu host` aborts on hosts whose KVM refuses MSR 0x10a.
    c.args(["-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm"])
        .args(["-smp", &VCPUS.to_string(), "-m", &MEM_MIB.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-no-reboot", "-device", "i8042", "-kernel", TEST_GUEST_PVH])
        .args(["-append", guest_args]);
    c
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::var("BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let scratch = Scratch::new("boot-bench");
    let spec = scratch.write(
        "vm.json",
        &guest_spec(TEST_GUEST_PVH, VCPUS, MEM_MIB, GUEST_ARGS),
    );
    let halt_args = format!("{GUEST_ARGS} exit=halt");
    let halt_spec = scratch.write(
        "vm-halt.json",
        &guest_spec(TEST_GUEST_PVH, VCPUS, MEM_MIB, &halt_args),
    );
    let prescient = prescient_bin();
    let qemu_available = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut ours_own, mut theirs_own) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(measure(
            Command::new(prescient).args(["--config-file", spec.to_str().unwrap()]),
        ));
        ours_own.push(measure_own_memory(
            Command::new(prescient).args(["--config-file", halt_spec.to_str().unwrap()]),
        ));
        if qemu_available {
            theirs.push(measure(&mut qemu_command(GUEST_ARGS)));
            theirs_own.push(measure_own_memory(&mut qemu_command(&halt_args)));
        }
    }

    println!(
        "boot of the test guest ({VCPUS} vCPUs, {MEM_MIB} MiB, \"{GUEST_ARGS}\"), median of {runs} runs"
    );
    println!(
        "{:<32} {:>15} {:>10} {:>20} {:>22}",
        "VMM", "first byte (ms)", "exit (ms)", "VMM memory (MiB)", "peak RSS - touched"
    );
    let p = summarize(&ours, ours_own);
    let row = |name: &str, s: &Summary| {
        println!(
            "{:<32} {:>15.1} {:>10.1} {:>20.1} {:>22.1}",
            name,
            ms(s.first_byte),
            ms(s.exit),
            s.own_mib,
            s.peak_minus_touched_mib
        );
    };
    row("prescient", &p);
    if qemu_available {
        let q = summarize(&theirs, theirs_own);
        row("qemu-system-x86_64 -M microvm", &q);
        println!(
            "{:<32} {:>15.2} {:>10.2} {:>20.2} {:>22.2}",
            "ratio prescient / qemu",
            ms(p.first_byte) / ms(q.first_byte),
            ms(p.exit) / ms(q.exit),
            p.own_mib / q.own_mib,
            p.peak_minus_touched_mib / q.peak_minus_touched_mib
        );
    } else {
        println!(
            "qemu-system-x86_64 not found: install Debian's qemu-system-x86 for the reference run"
        );
    }
}
