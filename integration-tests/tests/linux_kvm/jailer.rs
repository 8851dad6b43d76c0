//! Scenario 7: the jailer and the seccomp filters with a Linux guest. A jailed VMM (own user,
//! chroot, cgroup v2 where the host has it) runs Linux with every device (disk, network, entropy,
//! balloon with statistics and free page reporting, virtio-mem), moves to the steady seccomp
//! stage mid-run, and ends with the guest's poweroff: exit 0, and no thread was killed by or
//! denied a system call anywhere in the run.

use std::os::unix::fs::chown;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::agent::STEP_SLACK;
use integration_tests::nested::on_hardware_kvm;
use integration_tests::prescient_bin;
use serde_json::json;

use crate::guest::{GuestSpec, READY};

const SCENARIO: Duration = Duration::from_secs(420);
const UID: u32 = 40123;
const GID: u32 = 40124;

/// The kernel's record of seccomp kills (audit type 1326), if it keeps them.
fn seccomp_audit_lines() -> Vec<String> {
    let out = Command::new("dmesg")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.contains("type=1326") || l.contains("seccomp"))
        .map(str::to_string)
        .collect()
}

/// A persistent TAP owned by the jail's user (a jailed VMM may attach to it but not create
/// one), made with the tun ioctls so that no `ip tuntap` or `tunctl -u` is needed (busybox's have
/// neither); removed when dropped.
struct OwnedTap(String);

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

impl OwnedTap {
    fn new(name: &str, uid: u32, gid: u32) -> Self {
        let tun = Self::attach(name).unwrap_or_else(|e| panic!("TUNSETIFF {name}: {e}"));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tun);
        Self::ioctl(
            fd,
            name,
            TUNSETOWNER,
            libc::c_ulong::from(uid),
            "TUNSETOWNER",
        );
        Self::ioctl(
            fd,
            name,
            TUNSETGROUP,
            libc::c_ulong::from(gid),
            "TUNSETGROUP",
        );
        Self::ioctl(fd, name, TUNSETPERSIST, 1, "TUNSETPERSIST");
        // Closed now: a single-queue TAP takes one attached file at a time, the VMM's.
        Self(name.to_string())
    }

    /// A tun file attached to TAP `name` (made if missing).
    fn attach(name: &str) -> std::io::Result<std::fs::File> {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // struct ifreq: the name, then the flags (IFF_TAP | IFF_NO_PI), padded to 40 bytes.
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&(0x0002u16 | 0x1000).to_ne_bytes());
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tun);
        // SAFETY: `fd` is our open tun fd; the argument points to `req`, alive for the call and
        // the size TUNSETIFF expects.
        let rc = unsafe { libc::ioctl(fd, TUNSETIFF, req.as_mut_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(tun)
    }

    fn ioctl(fd: i32, name: &str, request: libc::c_ulong, arg: libc::c_ulong, what: &str) {
        // SAFETY: `fd` is an open tun fd; `arg` is an integer the request takes by value.
        let rc = unsafe { libc::ioctl(fd, request, arg) };
        assert!(
            rc >= 0,
            "{what} on {name}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for OwnedTap {
    fn drop(&mut self) {
        // The VMM is gone: attach again and let the device go with the file.
        if let Ok(tun) = Self::attach(&self.0) {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&tun);
            // SAFETY: our open tun fd, attached to the device; the argument is by value.
            unsafe { libc::ioctl(fd, TUNSETPERSIST, 0 as libc::c_ulong) };
        }
    }
}

#[test]
fn a_jailed_vmm_runs_linux_with_every_device_in_the_steady_stage_without_sigsys() {
    on_hardware_kvm(SCENARIO, || {
        // Its own id each attempt: a retried attempt's jail and cgroup may still be there.
        static ATTEMPT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("linux-jail-{}-{attempt}", std::process::id());
        let tap = "pjail0";
        let _tap = OwnedTap::new(tap, UID, GID);
        let audit_before = seccomp_audit_lines().len();
        let spec = GuestSpec::new("linux-jail", 2, 256)
            .with_rootfs()
            .section(
                "network-interfaces",
                json!([{"iface_id": "eth0", "host_dev_name": tap}]),
            )
            .section("entropy", json!({}))
            .section(
                "balloon",
                json!({"amount_mib": 0, "deflate_on_oom": true,
                       "stats_polling_interval_s": 1, "free_page_reporting": true}),
            )
            .section("memory-hotplug", json!({"total_size_mib": 512}))
            .arg("prescient.agent.interval_ms=500")
            .arg("ip=172.16.1.2::172.16.1.1:255.255.255.0::eth0:off")
            .steps(&[
                "stress-cpu:4",
                "fio-randrw:4:16M",
                "stress-mem:3:96M",
                "poweroff",
            ]);
        let rootfs: PathBuf = spec.scratch().path().join("rootfs.ext4");
        chown(&rootfs, Some(UID), Some(GID)).expect("hand the disk to the jail's user");
        let spec_path = spec.write_spec();
        let base = spec.scratch().path().join("jail");
        let root = base.join("prescient").join(&id).join("root");
        let cgroup_version = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "2"
        } else {
            "1"
        };
        let mut jail = Command::new(prescient_bin());
        jail.args(["jail", "--id", &id])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&base)
            .args(["--cgroup-version", cgroup_version])
            .arg("--")
            .args(["--api-sock", "/run/api.sock", "--config-file"])
            .arg(&spec_path);
        let socket = root.join("run/api.sock");
        let start = Instant::now();
        // The jail makes its root first; the API socket appears inside it.
        let mut vm = spec.spawn(&mut jail);
        while !socket.exists() {
            assert!(
                start.elapsed() < READY,
                "no API socket at {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm.connect_api(&socket);
        vm.console.expect("stress-cpu running", READY, |l| {
            l.contains("agent: workload-start stress-cpu:4")
        });

        // The steady stage for every thread, then every device used under it.
        vm.send("PUT", "/seccomp", json!({"stage": "steady"}));
        vm.send(
            "PATCH",
            "/hotplug/memory",
            json!({"requested_size_mib": 128}),
        );
        vm.send("PATCH", "/balloon", json!({"amount_mib": 32}));
        let deadline = Instant::now() + READY;
        loop {
            let s = vm.get("/balloon/statistics");
            let m = vm.get("/hotplug/memory");
            if s["actual_mib"] == 32 && m["plugged_size_mib"] == 128 {
                break;
            }
            assert!(Instant::now() < deadline, "balloon {s}, virtio-mem {m}");
            std::thread::sleep(Duration::from_millis(100));
        }
        vm.send("PATCH", "/balloon", json!({"amount_mib": 0}));
        for (step, secs) in [
            ("stress-cpu:4", 4),
            ("fio-randrw:4:16M", 4),
            ("stress-mem:3:96M", 3),
        ] {
            vm.done(step, secs);
        }
        let lines = vm.console.lines();
        assert!(
            lines.iter().any(|l| l.contains("rcS: eth0 172.16.1.2")),
            "the guest's network did not come up"
        );
        vm.console.expect("agent: poweroff", STEP_SLACK, |l| {
            l.contains("agent: poweroff")
        });
        let (status, stderr) = vm.console.wait_exit(crate::guest::EXIT);
        assert_eq!(
            status.code(),
            Some(0),
            "the jailed VMM did not end cleanly (159 is SIGSYS): {status}\n{stderr}"
        );
        for bad in [
            "SIGSYS",
            "Bad system call",
            "Operation not permitted",
            "EPERM",
        ] {
            assert!(!stderr.contains(bad), "{bad} in the VMM's log:\n{stderr}");
        }
        let audit = seccomp_audit_lines();
        assert_eq!(
            audit.len(),
            audit_before,
            "the kernel logged seccomp events: {:?}",
            &audit[audit_before..]
        );
    });
}
