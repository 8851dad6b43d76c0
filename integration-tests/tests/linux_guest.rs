//! Linux guests built by resources/guest/build-guest-images.sh (cached; the first run builds a
//! kernel, see resources/guest/README.md).
//!
//! - Under QEMU's emulator (`-accel tcg`), which runs anywhere: the images boot to the guest
//!   agent and run stress-ng and fio, from the ext4 rootfs and from the initramfs alone.
//! - Under the real binary on this host's KVM: the early boot (banner, command line, e820 map,
//!   MP table CPUs) and the kernel registering the virtio-mmio devices prescient announced on the
//!   command line, then SIGTERM. On a software-KVM host that is as far as a boot gets quickly.
//!
//! Full boots under prescient need a hardware KVM: they are in `linux_kvm`, which runs them in a
//! nested KVM host where this host has none.

use std::process::Command;
use std::time::Duration;

use integration_tests::agent::{
    assert_output, assert_reports_match_the_vm, assert_root_on_vda, assert_stress_mem_seen,
    growth_during, initrd_with_workloads, reports as agent_reports, run_steps_to_poweroff,
    workload_arg,
};
use integration_tests::console::Console;
use integration_tests::linux::{
    cmdline, images, prescient_spec, qemu_available, qemu_disk, qemu_microvm, BASE_CMDLINE,
};
use integration_tests::{prescient_bin, Scratch};

/// TCG reaches init in about 1.2 s of guest time; a loaded 2-core CI host stretches that.
const TCG_READY: Duration = Duration::from_secs(180);
/// The first ~60 kernel lines appear within seconds even when kernel code is emulated.
const EARLY_BOOT: Duration = Duration::from_secs(180);
const EXIT: Duration = Duration::from_secs(60);

fn require_qemu() -> bool {
    if !qemu_available() {
        eprintln!(
            "not run: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"
        );
    }
    qemu_available()
}

#[test]
fn tcg_images_boot_to_agent_ready_and_run_stress_ng_and_fio_from_the_rootfs() {
    if !require_qemu() {
        return;
    }
    let img = images();
    let steps = [("stress-cpu:3", 3), ("fio-randrw:3:16M", 3)];
    let args = format!(
        "{BASE_CMDLINE} root=/dev/vda prescient.agent.interval_ms=500 {}",
        workload_arg(&steps)
    );
    let mut qemu = qemu_microvm("tcg", 2, 512, &img.vmlinux, Some(&img.initramfs), &args);
    qemu_disk(&mut qemu, &img.rootfs);
    let vm = Console::spawn("qemu-system-x86_64 -accel tcg", &mut qemu);
    let lines = run_steps_to_poweroff(&vm, TCG_READY, &steps);
    let (status, stderr) = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "QEMU: {status}\n{stderr}");

    assert_root_on_vda(&lines);
    assert_output(&lines, "stress-cpu", "successful run completed");
    assert_output(&lines, "fio-randrw", "READ: bw=");
    assert_output(&lines, "fio-randrw", "WRITE: bw=");

    let reports = agent_reports(&lines);
    assert_reports_match_the_vm(&reports, 2, 512);
    // The guest's own view of the workloads: CPU time while stress-ng ran, disk writes (fio
    // uses O_DIRECT on the ext4 root) while fio ran.
    let busy = growth_during(&reports, "stress-cpu:3", &["cpu", "user_ms"]);
    assert!(
        busy >= 1000,
        "stress-ng --cpu added only {busy} ms of user time\n{reports:?}"
    );
    let written = growth_during(&reports, "fio-randrw:3:16M", &["io", "write_kib"]);
    assert!(written > 0, "fio wrote nothing to /dev/vda\n{reports:?}");
}

#[test]
fn tcg_initramfs_with_the_workloads_archive_runs_stress_ng_without_a_disk() {
    if !require_qemu() {
        return;
    }
    let img = images();
    let scratch = Scratch::new("linux-tcg-initrd");
    let initrd = initrd_with_workloads(&scratch);
    let steps = [("stress-mem:3:64M", 3)];
    let args = format!(
        "{BASE_CMDLINE} prescient.agent.interval_ms=500 {}",
        workload_arg(&steps)
    );
    let mut qemu = qemu_microvm("tcg", 1, 384, &img.vmlinux, Some(&initrd), &args);
    let vm = Console::spawn("qemu-system-x86_64 -accel tcg", &mut qemu);
    let lines = run_steps_to_poweroff(&vm, TCG_READY, &steps);
    let (status, stderr) = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "QEMU: {status}\n{stderr}");
    assert_reports_match_the_vm(&agent_reports(&lines), 1, 384);
    assert_stress_mem_seen(&lines, "stress-mem:3:64M", 64);
}

/// The e820 ranges the kernel printed (`BIOS-e820: [mem 0xA-0xB] usable`): total usable bytes.
fn usable_e820_bytes(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter(|l| l.contains("BIOS-e820: [mem ") && l.trim_end().ends_with("] usable"))
        .map(|l| {
            let range = &l[l.find("[mem ").unwrap() + 5..l.rfind(']').unwrap()];
            let (a, b) = range.split_once('-').expect("a range");
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            hex(b) - hex(a) + 1
        })
        .sum()
}

#[test]
fn prescient_boots_the_kernel_and_its_early_boot_shows_our_cmdline_e820_map_and_cpus() {
    let img = images();
    let scratch = Scratch::new("linux-early");
    const VCPUS: u8 = 2;
    const MEM_MIB: u64 = 256;
    let args = cmdline("prescient.test=early-boot");
    let spec = scratch.write(
        "vm.json",
        &prescient_spec(&img.vmlinux, Some(&img.initramfs), VCPUS, MEM_MIB, &args),
    );
    let vm = Console::spawn(
        "prescient",
        Command::new(prescient_bin()).args(["--config-file", spec.to_str().unwrap()]),
    );
    let banner = vm.expect("the kernel banner", EARLY_BOOT, |l| {
        l.contains("Linux version ")
    });
    assert!(
        banner.contains(&format!("Linux version {} ", img.kernel_release)),
        "banner of another kernel than {}: {banner}",
        img.kernel_release
    );
    let line = vm.expect("Command line:", EARLY_BOOT, |l| {
        l.contains("Command line: ")
    });
    assert_eq!(
        &line[line.find("Command line: ").unwrap() + 14..],
        args,
        "the kernel saw another command line"
    );
    let mp = vm.expect("the MP table", EARLY_BOOT, |l| {
        l.contains("MultiProcessor Specification")
    });
    assert!(mp.contains("v1.4"), "{mp}");
    let cpus = vm.expect("smpboot: Allowing N CPUs", EARLY_BOOT, |l| {
        l.contains("smpboot: Allowing ")
    });
    assert!(
        cpus.contains(&format!("smpboot: Allowing {VCPUS} CPUs, 0 hotplug CPUs")),
        "{cpus}"
    );
    // The map is printed before the CPUs are counted, so it is complete by now. Usable RAM is
    // the whole of mem_size_mib less the legacy hole [0x9fc00, 1 MiB).
    let lines = vm.lines();
    assert_eq!(
        usable_e820_bytes(&lines),
        MEM_MIB * (1 << 20) - ((1 << 20) - 0x9fc00),
        "e820 usable RAM for mem_size_mib={MEM_MIB}\n{}",
        lines.join("\n")
    );
    let (status, stderr) = vm.terminate(EXIT);
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "prescient should end the VM cleanly on SIGTERM: {status}\n{stderr}"
    );
}

/// `virtio_mmio.device=<size>@<base>:<irq>` entries of a kernel command line.
fn virtio_mmio_devices(cmdline: &str) -> Vec<(u64, u64, u32)> {
    cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("virtio_mmio.device="))
        .map(|d| {
            let (size, rest) = d.split_once('@').expect("<size>@<base>:<irq>");
            let (base, irq) = rest.split_once(':').expect("<base>:<irq>");
            let size = match size.split_at(size.len() - 1) {
                (n, "K") => n.parse::<u64>().unwrap() << 10,
                (n, "M") => n.parse::<u64>().unwrap() << 20,
                _ => size.parse().unwrap(),
            };
            let base = u64::from_str_radix(base.trim_start_matches("0x"), 16).unwrap();
            (size, base, irq.parse().unwrap())
        })
        .collect()
}

/// Registering the command-line devices comes well after the console on a software-KVM host
/// (about 35 s of guest time, some minutes of wall time: 77-160 s measured alone, more than
/// 420 s once with builds and a fuzzer on the same 2 cores); seconds on hardware.
const VIRTIO_REGISTERED: Duration = Duration::from_secs(600);

#[test]
fn prescient_announces_its_virtio_devices_and_the_kernel_registers_them() {
    let img = images();
    let scratch = Scratch::new("linux-virtio");
    let args = cmdline("");
    let mut spec: serde_json::Value = serde_json::from_str(&prescient_spec(
        &img.vmlinux,
        Some(&img.initramfs),
        1,
        256,
        &args,
    ))
    .unwrap();
    // Read-only: the cached image must stay as built.
    spec["drives"] = serde_json::json!([{
        "drive_id": "scratch", "path_on_host": img.rootfs,
        "is_root_device": false, "is_read_only": true,
    }]);
    spec["entropy"] = serde_json::json!({});
    let spec = scratch.write("vm.json", &spec.to_string());
    let vm = Console::spawn(
        "prescient",
        Command::new(prescient_bin()).args(["--config-file", spec.to_str().unwrap()]),
    );
    let line = vm.expect("Command line:", EARLY_BOOT, |l| {
        l.contains("Command line: ")
    });
    let seen = &line[line.find("Command line: ").unwrap() + 14..];
    assert!(
        seen.starts_with(&args),
        "prescient should append its devices to our command line: {seen}"
    );
    let devices = virtio_mmio_devices(seen);
    assert_eq!(devices.len(), 2, "one block and one entropy device: {seen}");
    for (i, (size, base, irq)) in devices.into_iter().enumerate() {
        let want = format!(
            "virtio-mmio: Registering device virtio-mmio.{i} at {base:#x}-{:#x}, IRQ {irq}.",
            base + size - 1
        );
        vm.expect(&want, VIRTIO_REGISTERED, |l| l.contains(&want));
    }
    // The virtio-mmio driver probes each device as it is registered (magic, version, device
    // ID) and complains as `virtio-mmio virtio-mmio.N: ...` if it does not like one. The block
    // layer's I/O schedulers register next; the blk and rng drivers come minutes later here.
    vm.expect("the boot to go on (io scheduler)", EARLY_BOOT, |l| {
        l.contains("io scheduler")
    });
    let complaints: Vec<String> = vm
        .lines()
        .into_iter()
        .filter(|l| l.contains("virtio-mmio virtio-mmio."))
        .collect();
    assert!(
        complaints.is_empty(),
        "the virtio-mmio driver rejected a device: {complaints:?}"
    );
    let (status, stderr) = vm.terminate(EXIT);
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{status}\n{stderr}"
    );
}
