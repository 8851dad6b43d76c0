//! Kata Containers' Firecracker drivers, replayed against prescient: the command lines, files,
//! mounts and API requests of Kata's Go runtime (and of its Rust runtime), in their order,
//! through the real jailer, the real binary and the test guest.
//!
//! Read from kata-containers/kata-containers `src/runtime/virtcontainers/fc.go` at commit
//! 7c6ba40c54ea29b459b4997cff948caaba4e658b (2026-08-22; fc.go last changed in 992a7233,
//! 2026-05-28), with `types/fcConfig.go`, the go-swagger models in
//! `pkg/firecracker/client/models` (which fields are `omitempty`), `fc_metrics.go` and
//! `hypervisor.go` (`GetKernelRootParams`). What Kata does, step by step, and what this test does
//! for each:
//!
//! 1. `firecracker --version`: the first line's second word, less its `v`, must be a semver of
//!    at least 0.21.1 (`checkVersion`). prescient is installed as `firecracker` and `jailer`
//!    (hard links), as Kata needs: it names the chroot `<base>/<basename of the hypervisor
//!    path>/<id>/root` and reads the VMM's pid from `firecracker.pid` there.
//! 2. `fcInitConfiguration`: `mkdir -p <root>/run`; `<root>` bind-mounted on itself, made
//!    shared, remounted without `noexec`; the kernel and the VM image bind-mounted to
//!    `<root>/vmlinux` and `<root>/rootfs`; eight empty placeholder files `<root>/drive_0..7`
//!    (`createDiskPool`); the FIFOs `logs.fifo` and `metrics.fifo` made in the VM's directory,
//!    opened for reading (`O_RDONLY|O_NONBLOCK`) and bind-mounted into `<root>`; the queued
//!    devices (a TAP endpoint, the hybrid vsock) added to the config.
//! 3. `StartVM`: the config written as `fcConfig.json` and bind-mounted to
//!    `<root>/fcConfig.json`; `jailer --id ID --exec-file PATH --uid 0 --gid 0
//!    --chroot-base-dir BASE --daemonize --netns NETNS -- --config-file /fcConfig.json`; then
//!    `GET /` on `<root>/run/firecracker.socket` every 10 ms until `state` is `Running` (10 s,
//!    `fcTimeout`); the pid from `<root>/firecracker.pid` (5 s); the vCPU threads by their names
//!    `fc_vcpu <N>` (`GetThreadIDs`); `chmod 0640 <root>/kata.hvsock`.
//! 4. The agent: `CONNECT 1024` on `kata.hvsock` (here the guest echoes, as an agent answers).
//! 5. `HotplugAddDevice` of a container's disk, block index 0: the disk bind-mounted over
//!    `<root>/drive_0`, then `PATCH /drives/drive_0 {"drive_id":"drive_0","path_on_host":
//!    "/drive_0"}`, answered 204 (`PatchGuestDriveByIDNoContent`). The guest
//!    (`blk_hotplug_ms`) sees the drive's capacity change and writes to it.
//! 6. `HotplugRemoveDevice`: `umount -l <root>/drive_0`, the same PATCH again (the placeholder
//!    again), after which the VMM must hold the disk no longer.
//! 7. `StopVM`: SIGTERM to that pid, which must end within 15 s (`fcStopSandboxTimeout`);
//!    `cleanupJail`: every mount undone and the VM's directory removed.
//!
//! Without `jailer_path` Kata runs `firecracker --api-sock <root>/run/firecracker.socket
//! --config-file <root>/fcConfig.json` itself, in the pod's network namespace, with host paths
//! under the same `<root>` and the child's pid: the second test.
//!
//! Kata's Rust runtime (runtime-rs, `src/runtime-rs/crates/hypervisor/src/firecracker/` at the
//! same commit; last changed in 658dffb0, 2026-08-18) drives the VMM differently, and the third
//! test replays it: the jailer without `--daemonize` and in the pod's network namespace by
//! `setns` (no `--netns`), `-- --api-sock /run//fc.sock` (sic), then `PUT /boot-source`,
//! `PUT /machine-config`, `PUT /drives/rootfs`, `PUT /drives/drive1..5` (placeholders named
//! `//driveN`), `PUT /vsock` with the relative `uds_path` `kata.hvsock`,
//! `PUT /network-interfaces/{id}`, `PUT /actions {"action_type":"InstanceStart"}`; a disk
//! plugged by `PATCH /drives/driveN` with its `rate_limiter` (`null` without limits); SIGKILL to
//! stop. Every request must succeed at once (Kata retries failures for 5 s, then gives up).
//!
//! Kata's metrics reader unmarshals each line of `metrics.fifo` into `FirecrackerMetrics`, whose
//! sections are objects of u64 counters: the lines must decode so. Deviations from Kata's exact
//! behaviour: the memory size (128 MiB, Kata's default is 2048), the guest's own parameters in
//! front of Kata's kernel parameters (Kata's `kernel_params` go there), and the remount of the
//! jail root done as a bind remount (Kata remounts the file system of `/run` itself, which on
//! this shared host would be the test's `/tmp`).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::{prescient_bin, vsock_connect, ApiClient, Netns, Scratch, TEST_GUEST_PVH};
use serde_json::{json, Value};

/// Kata's `fcTimeout`: seconds it waits for `GET /` to say `Running`.
const FC_TIMEOUT: Duration = Duration::from_secs(10);
/// Kata's `fcStopSandboxTimeout`.
const FC_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the guest waits for the hot-plug, and the test for the guest's writes.
const HOTPLUG_WAIT: Duration = Duration::from_secs(60);
/// Kata's `vSockPort`: the agent's port.
const AGENT_PORT: u32 = 1024;
/// The sections of Kata's `FirecrackerMetrics` (fc_metrics.go); every field in them is a u64.
const KATA_METRICS_SECTIONS: [&str; 17] = [
    "api_server",
    "block",
    "get_api_requests",
    "i8042",
    "latencies_us",
    "logger",
    "mmds",
    "net",
    "patch_api_requests",
    "put_api_requests",
    "rtc",
    "seccomp",
    "vcpu",
    "vmm",
    "uart",
    "signals",
    "vsock",
];

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mount(src: Option<&Path>, dst: &Path, flags: libc::c_ulong) {
    let src = src.map(cstr);
    let dst_c = cstr(dst);
    // SAFETY: NUL-terminated strings alive for the call, or null where mount(2) takes null.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            dst_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount {src:?} {dst:?} {flags:#x}: {}",
        std::io::Error::last_os_error()
    );
}

fn umount_lazy(p: &Path) -> std::io::Result<()> {
    let c = cstr(p);
    // SAFETY: a NUL-terminated path alive for the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Kata's `bindMount(src, dst, readonly=false, pgtype)`: the destination made (a file for a
/// file), bound, given its propagation type.
fn bind_mount(src: &Path, dst: &Path, propagation: libc::c_ulong) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
    } else if !dst.exists() {
        std::fs::write(dst, b"").unwrap();
    }
    mount(Some(src), dst, libc::MS_BIND);
    mount(None, dst, propagation);
}

/// The mounts Kata made, undone (lazily, last first) even when the test fails half way.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn bind(&mut self, src: &Path, dst: &Path, propagation: libc::c_ulong) {
        bind_mount(src, dst, propagation);
        self.0.push(dst.to_path_buf());
    }

    /// Kata's `cleanupJail`: every mount undone; an error is a mount that was not there.
    fn cleanup(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(p) = self.0.pop() {
            if let Err(e) = umount_lazy(&p) {
                errors.push(format!("umount {}: {e}", p.display()));
            }
        }
        errors
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kata's `fcListenToFifo`: the FIFO made and opened for reading before the VMM starts; its
/// lines go to the returned channel.
fn listen_to_fifo(path: &Path) -> mpsc::Receiver<String> {
    let c = cstr(path);
    // SAFETY: mkfifo(3) and open(2) with a live NUL-terminated path.
    let fd = unsafe {
        assert_eq!(libc::mkfifo(c.as_ptr(), 0o600), 0, "mkfifo {path:?}");
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    assert!(
        fd >= 0,
        "open {path:?}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor we just opened and own from here on.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(20)),
                Ok(_) => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Kata's `parseVersion` + `checkVersion`: the first line's second word, without its `v`, a
/// semver of at least 0.21.1.
fn kata_accepts_version(output: &str) -> Result<(u64, u64, u64), String> {
    let first = output.lines().next().unwrap_or_default();
    let word = first
        .split(' ')
        .nth(1)
        .ok_or_else(|| format!("getting FC version failed, the output is malformed: {first:?}"))?;
    let version = word.trim().trim_start_matches('v');
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<u64> = core
        .split('.')
        .map(|p| {
            p.parse()
                .map_err(|_| format!("Malformed version {version:?}"))
        })
        .collect::<Result<_, _>>()?;
    let [major, minor, patch] = parts[..] else {
        return Err(format!("Malformed version {version:?}"));
    };
    if (major, minor, patch) < (0, 21, 1) {
        return Err(format!("version {version} is not supported"));
    }
    Ok((major, minor, patch))
}

/// Kata's `vmRunning` on a fresh connection: the `state` of `GET /`, if the VMM answers.
fn instance_state(socket: &Path) -> Option<String> {
    let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut stream = stream;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        .ok()?;
    let mut text = Vec::new();
    let mut buf = [0u8; 1024];
    // One response; its body is small and the VMM keeps the connection open.
    while !text.ends_with(b"}") {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    let body = text.split("\r\n\r\n").nth(1)?;
    let info: Value = serde_json::from_str(body).ok()?;
    info["state"].as_str().map(String::from)
}

/// Kata's `GetThreadIDs`: the threads of `pid` whose name starts with `fc_vcpu`, by the vCPU
/// index after it (Kata moves them into the pod's cgroup and counts them as the VM's CPUs).
fn kata_vcpu_threads(pid: u32) -> Result<BTreeMap<i64, u32>, String> {
    let mut vcpus = BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).map_err(|e| e.to_string())?;
        let comm = comm.trim_end_matches('\n');
        let Some(rest) = comm.strip_prefix("fc_vcpu") else {
            continue;
        };
        let index = rest
            .trim()
            .parse()
            .map_err(|_| format!("Invalid fc thread info: {comm}"))?;
        let tid = task.file_name().to_string_lossy().parse().unwrap();
        vcpus.insert(index, tid);
    }
    Ok(vcpus)
}

/// The (device, inode) of every file process `pid` has open.
fn open_inodes(pid: u32) -> Vec<(u64, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .map(|m| (m.dev(), m.ino()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped: the jailer's daemon is not our
/// child).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// A VMM the jailer started: killed if the test ends before it stopped it, and the cgroups the
/// jailer made for it (its `--cgroup-dir` arguments) removed once it has ended, which neither
/// Kata nor the VMM does (see docs/cluster.md).
struct JailedVmm {
    pid: u32,
    cgroups: Vec<PathBuf>,
}

impl JailedVmm {
    fn new(pid: u32) -> Self {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cgroups = args
            .windows(2)
            .filter(|w| w[0] == "--cgroup-dir")
            .map(|w| PathBuf::from(&w[1]))
            .collect();
        Self { pid, cgroups }
    }
}

impl Drop for JailedVmm {
    fn drop(&mut self) {
        if !ended(self.pid) {
            // SAFETY: kill(2) with a plain signal; the pid is the VMM's (or already gone).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
        let start = Instant::now();
        while !ended(self.pid) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in &self.cgroups {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// Installs prescient under Firecracker's names (hard links, or copies across file systems).
fn install_as(bin_dir: &Path, name: &str) -> PathBuf {
    let dst = bin_dir.join(name);
    if std::fs::hard_link(prescient_bin(), &dst).is_err() {
        std::fs::copy(prescient_bin(), &dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dst
}

/// What both Kata runtimes prepare: prescient installed under Firecracker's names, the jail's
/// root `<base>/firecracker/<id>/root` made and, for a jailer, bound on itself, made shared (so
/// that mounts made into it later reach the jail) and remounted with `remount` (to drop
/// `noexec`).
struct KataJail {
    /// Undone before the scratch directory goes.
    mounts: Mounts,
    scratch: Scratch,
    firecracker: PathBuf,
    jailer: PathBuf,
    id: String,
    base: PathBuf,
    vm_path: PathBuf,
    root: PathBuf,
}

impl KataJail {
    fn new(name: &str, kata_dir: &str, remount: Option<libc::c_ulong>) -> Self {
        let scratch = Scratch::new(name);
        let bin = scratch.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let firecracker = install_as(&bin, "firecracker");
        let jailer = install_as(&bin, "jailer");
        let id = format!("{name}{}", std::process::id()).replace('-', "");
        let base = scratch.path().join("run").join(kata_dir);
        let vm_path = base.join("firecracker").join(&id);
        let root = vm_path.join("root");
        std::fs::create_dir_all(root.join("run")).unwrap();
        let mut mounts = Mounts(Vec::new());
        if let Some(flags) = remount {
            mounts.bind(&root, &root, libc::MS_SHARED);
            mount(None, &root, libc::MS_REMOUNT | libc::MS_BIND | flags);
        }
        Self {
            mounts,
            scratch,
            firecracker,
            jailer,
            id,
            base,
            vm_path,
            root,
        }
    }

    /// The kernel and the VM's image jailed as `/vmlinux` and `/rootfs`.
    fn jail_kernel_and_image(&mut self) {
        self.mounts.bind(
            Path::new(TEST_GUEST_PVH),
            &self.root.join("vmlinux"),
            libc::MS_SLAVE,
        );
        let image = self.scratch.zeroed_file("kata-containers.img", 1 << 20);
        self.mounts
            .bind(&image, &self.root.join("rootfs"), libc::MS_SLAVE);
    }

    /// A container's disk (2 MiB of 0xab) bound over placeholder `drive`; its (device, inode).
    fn plug_disk(&mut self, name: &str, drive: &str) -> (PathBuf, (u64, u64)) {
        let disk = self.scratch.path().join(name);
        std::fs::write(&disk, vec![0xabu8; 2 << 20]).unwrap();
        let m = std::fs::metadata(&disk).unwrap();
        self.mounts
            .bind(&disk, &self.root.join(drive), libc::MS_SLAVE);
        (disk, (m.dev(), m.ino()))
    }

    /// Kata's clean-up: every mount undone, the VM's directory removed.
    fn clean_up(mut self) {
        let errors = self.mounts.cleanup();
        assert!(errors.is_empty(), "{errors:?}");
        std::fs::remove_dir_all(&self.vm_path).expect("removing the VM's directory");
    }
}

/// The test guest's part of the kernel command line (Kata's `kernel_params` go first): halt when
/// done, so that the VM runs until it is stopped, and write 8 sectors to blk1 (drive 0 after the
/// VM's image) once it is plugged.
fn guest_args() -> String {
    format!(
        "cpu_ms=1 mem_mib=1 exit=halt virtio_timeout_ms=30000 blk_hotplug_ms={} \
         blk_hotplug_dev=1 blk_rw=8",
        HOTPLUG_WAIT.as_millis()
    )
}

/// `cmd` runs in network namespace `ns` (setns before the exec), as Kata starts its VMM in the
/// pod's namespace; `ns` must stay open until the spawn.
fn in_netns(cmd: &mut Command, ns: &std::fs::File) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(ns);
    // SAFETY: setns(2) on a descriptor the parent keeps open; async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Until the guest has written to `disk` (its first 4 KiB no longer all 0xab).
fn wait_guest_wrote(disk: &Path) -> Duration {
    wait_until(
        "the guest's writes to the plugged disk",
        HOTPLUG_WAIT,
        || std::fs::read(disk).is_ok_and(|d| d[..4096].iter().any(|&b| b != 0xab)),
    )
}

#[test]
fn kata_fc_go_jailed_start_hotplug_and_stop() {
    replay_fc_go(true);
}

/// Kata without `jailer_path`: `firecracker --api-sock PATH --config-file PATH` in the pod's
/// network namespace, every path a host path under the same `<root>`.
#[test]
fn kata_fc_go_unjailed_start_hotplug_and_stop() {
    replay_fc_go(false);
}

fn replay_fc_go(jailed: bool) {
    // 2 (setPaths, fcInitConfiguration): <base>/<basename of the hypervisor path>/<id>/root,
    // remounted only for the jailer.
    let mut kata = KataJail::new(
        if jailed { "kata" } else { "kata-nj" },
        "kata-containers",
        jailed.then_some(libc::MS_NOSUID | libc::MS_RELATIME),
    );
    let (firecracker, jailer) = (kata.firecracker.clone(), kata.jailer.clone());
    let (id, base, vm_path, root) = (
        kata.id.clone(),
        kata.base.clone(),
        kata.vm_path.clone(),
        kata.root.clone(),
    );

    // 1. The version check.
    let out = Command::new(&firecracker)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    let parsed = kata_accepts_version(&version);
    assert!(parsed.is_ok(), "Kata refuses {version:?}: {parsed:?}");

    let socket = root.join("run").join("firecracker.socket");
    let hvsock = root.join("kata.hvsock");
    assert!(socket.as_os_str().len() < 108, "{socket:?} is too long");
    kata.jail_kernel_and_image();
    // fcJailResource: a path inside the jail, or without one the host path under <root>.
    let at = |name: &str| {
        if jailed {
            format!("/{name}")
        } else {
            root.join(name).display().to_string()
        }
    };
    let boot_args = format!(
        "{} vsock_echo_listen={AGENT_PORT} \
         root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 \
         pci=off reboot=k panic=1 iommu=off net.ifnames=0 random.trust_cpu=on acpi=off \
         8250.nr_uarts=0 agent.log_vport=1025",
        guest_args()
    );
    let mut drives = vec![json!({
        "drive_id": "rootfs",
        "is_read_only": true,
        "is_root_device": false,
        "path_on_host": at("rootfs")
    })];
    for i in 0..8 {
        std::fs::write(root.join(format!("drive_{i}")), b"").unwrap();
        drives.push(json!({
            "drive_id": format!("drive_{i}"),
            "is_read_only": false,
            "is_root_device": false,
            "path_on_host": at(&format!("drive_{i}"))
        }));
    }
    let logs = listen_to_fifo(&vm_path.join("logs.fifo"));
    kata.mounts.bind(
        &vm_path.join("logs.fifo"),
        &root.join("logs.fifo"),
        libc::MS_SLAVE,
    );
    let metrics = listen_to_fifo(&vm_path.join("metrics.fifo"));
    kata.mounts.bind(
        &vm_path.join("metrics.fifo"),
        &root.join("metrics.fifo"),
        libc::MS_SLAVE,
    );
    // The queued devices: the pod's network endpoint (a TAP in the pod's network namespace;
    // Kata always sends both rate limiters, empty without limits) and the hybrid vsock.
    let netns = Netns::with_tap(format!("prescient-{id}"), "tap0_kata");
    let netns_path = format!("/var/run/netns/prescient-{id}");
    let config = json!({
        "boot-source": {"boot_args": boot_args, "kernel_image_path": at("vmlinux")},
        "machine-config": {"mem_size_mib": 128, "smt": false, "vcpu_count": 1},
        "vsock": {"guest_cid": 3, "uds_path": at("kata.hvsock"), "vsock_id": "root"},
        "logger": {"level": "Error", "log_path": at("logs.fifo")},
        "metrics": {"metrics_path": at("metrics.fifo")},
        "drives": drives,
        "network-interfaces": [{
            "guest_mac": "02:00:ca:fe:00:01",
            "host_dev_name": "tap0_kata",
            "iface_id": "eth0",
            "rx_rate_limiter": {},
            "tx_rate_limiter": {}
        }]
    });

    // 3. StartVM: the config, the jailer, the wait for Running.
    // Kata writes json.MarshalIndent's output (tab-indented); whitespace aside, the same.
    let text = serde_json::to_string_pretty(&config).unwrap();
    std::fs::write(vm_path.join("fcConfig.json"), text).unwrap();
    kata.mounts.bind(
        &vm_path.join("fcConfig.json"),
        &root.join("fcConfig.json"),
        libc::MS_SLAVE,
    );
    let ns_file = std::fs::File::open(&netns_path).unwrap();
    let started = Instant::now();
    let mut cmd = if jailed {
        let mut c = Command::new(&jailer);
        c.args(["--id", &id, "--exec-file"])
            .arg(&firecracker)
            .args(["--uid", "0", "--gid", "0", "--chroot-base-dir"])
            .arg(&base)
            .args(["--daemonize", "--netns", &netns_path])
            .args(["--", "--config-file", "/fcConfig.json"]);
        c
    } else {
        let mut c = Command::new(&firecracker);
        c.arg("--api-sock")
            .arg(&socket)
            .arg("--config-file")
            .arg(root.join("fcConfig.json"));
        in_netns(&mut c, &ns_file);
        c
    };
    // Kata without debug leaves the VMM's output alone (the jailer's daemon: /dev/null).
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(ns_file);
    let child_pid = child.id();
    while instance_state(&socket).as_deref() != Some("Running") {
        assert!(
            started.elapsed() < FC_TIMEOUT,
            "Failed to connect to firecrackerinstance (timeout {FC_TIMEOUT:?}); child: {:?}",
            child.try_wait()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("Running after {:?}", started.elapsed());
    let pid = if jailed {
        // The jailer's parent has exited (reaped here); the VMM is its daemon.
        let _ = child.wait();
        let pid_file = root.join("firecracker.pid");
        wait_until("firecracker.pid", Duration::from_secs(5), || {
            std::fs::read_to_string(&pid_file).is_ok_and(|t| t.trim().parse::<u32>().is_ok())
        });
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pid > 0 && pid != child_pid, "pid {pid}, jailer {child_pid}");
        pid
    } else {
        child_pid
    };
    assert!(!ended(pid), "the VMM {pid} is not running");
    let vmm = JailedVmm::new(pid);
    // constrainHypervisor and the sandbox's stats find the one vCPU by its thread's name (a
    // new thread names itself once it runs: Kata asks well after the start).
    wait_until("a thread named fc_vcpu 0", FC_TIMEOUT, || {
        kata_vcpu_threads(pid).is_ok_and(|v| !v.is_empty())
    });
    let vcpus = kata_vcpu_threads(pid).unwrap();
    assert_eq!(vcpus.keys().copied().collect::<Vec<_>>(), [0], "{vcpus:?}");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe.file_name(), firecracker.file_name(), "{exe:?}");
    std::fs::set_permissions(&hvsock, std::fs::Permissions::from_mode(0o640))
        .expect("Could not change socket permissions");
    let mut api = ApiClient::connect(&socket);
    let info = api.request("GET", "/", None);
    assert_eq!(info.status, 200);
    // The jailer passes its --id on; alone, Kata names none (Firecracker's default then).
    let expected_id = if jailed {
        id.as_str()
    } else {
        "anonymous-instance"
    };
    assert_eq!(info.json()["id"], expected_id);

    // 5. The container's disk, plugged into drive_0.
    let (disk, disk_inode) = kata.plug_disk("container.img", "drive_0");
    let patch = json!({"drive_id": "drive_0", "path_on_host": at("drive_0")}).to_string();
    let patch = patch.as_str();
    let answer = api.request("PATCH", "/drives/drive_0", Some(patch));
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));
    assert!(
        open_inodes(pid).contains(&disk_inode),
        "the VMM does not hold the container's disk after the PATCH"
    );
    // The guest saw the capacity (blk1: drive_0 after the rootfs) and wrote its pattern
    // (blk_rw=8: sectors 0-7).
    let took = wait_guest_wrote(&disk);
    eprintln!("guest wrote to the plugged disk {took:?} after the PATCH");
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written[4096..].iter().all(|&b| b == 0xab),
        "the guest wrote beyond the 8 sectors it was asked to"
    );

    // 4. The agent's channel (here after the hot-plug: the guest listens once its disk work is
    // done): CONNECT on the hybrid vsock, bytes echoed back.
    let (mut agent, reply) = vsock_connect(&hvsock, AGENT_PORT);
    assert!(reply.starts_with("OK "), "{reply:?}");
    agent.write_all(b"kata-agent-hello").unwrap();
    agent.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    agent.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"kata-agent-hello");

    // 6. The disk unplugged: the bind mount gone, the placeholder pointed at again.
    let mounted_disk = kata.mounts.0.pop().unwrap();
    umount_lazy(&mounted_disk).unwrap();
    let answer = api.request("PATCH", "/drives/drive_0", Some(patch));
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));
    let placeholder = std::fs::metadata(root.join("drive_0")).unwrap();
    let inodes = open_inodes(pid);
    assert!(
        !inodes.contains(&disk_inode),
        "the VMM still holds the container's disk after the unplug"
    );
    assert!(inodes.contains(&(placeholder.dev(), placeholder.ino())));
    drop(api);

    // 7. StopVM.
    // SAFETY: kill(2) with a pid read from the jail and a plain signal.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    wait_until("the VMM to stop on SIGTERM", FC_STOP_TIMEOUT, || ended(pid));

    // Kata's readers: an error-level log line would be a fault of a healthy VM; every metrics
    // line decodes into FirecrackerMetrics.
    let log_lines: Vec<String> = logs.try_iter().collect();
    assert!(log_lines.is_empty(), "errors logged: {log_lines:#?}");
    let first = metrics.recv_timeout(Duration::from_secs(5));
    let metric_lines: Vec<String> = first.into_iter().chain(metrics.try_iter()).collect();
    assert!(!metric_lines.is_empty(), "no metrics line on the FIFO");
    for line in &metric_lines {
        let v: Value = serde_json::from_str(line).expect("a metrics line is JSON");
        for section in KATA_METRICS_SECTIONS {
            if let Some(s) = v.get(section) {
                let fields = s.as_object().unwrap_or_else(|| panic!("{section}: {s}"));
                for (k, n) in fields {
                    assert!(n.is_u64(), "{section}.{k} = {n}: not a u64 for Kata");
                }
            }
        }
    }
    // Kata's block section counts what the guest wrote to the plugged disk (8 sectors).
    let written: u64 = metric_lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["block"]["write_bytes"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        written >= 4096,
        "block.write_bytes {written}: {metric_lines:?}"
    );

    // cleanupJail.
    drop(vmm);
    // The VMM itself without a jailer, the jailer's exited parent with one: reaped.
    let _ = child.wait();
    kata.clean_up();
    drop(netns);
}

#[test]
fn kata_version_parsing_refuses_what_kata_refuses() {
    // The check above must be able to fail: prescient's own version line is too old for Kata.
    assert!(kata_accepts_version("prescient v0.1.0 (Firecracker v1.17.0-dev compatible)").is_err());
    assert!(kata_accepts_version("Firecracker").is_err());
    assert_eq!(
        kata_accepts_version("Firecracker v1.17.0-dev\n\nmore"),
        Ok((1, 17, 0))
    );
}

/// One request on a fresh connection, as runtime-rs's hyper client sends it.
fn runtime_rs_request(socket: &Path, method: &str, path: &str, body: &Value) -> (u16, String) {
    let mut api = ApiClient::connect(socket);
    let r = api.request(method, path, Some(&body.to_string()));
    (r.status, r.body)
}

#[test]
fn kata_runtime_rs_jailed_start_hotplug_and_kill() {
    // prepare_vm: KATA_PATH (/run/kata) under the scratch directory; the jail's root bound on
    // itself, shared, remounted (bind_remount).
    let mut kata = KataJail::new("kata-rs", "kata", Some(0));
    let (firecracker, jailer) = (kata.firecracker.clone(), kata.jailer.clone());
    let (id, base, root) = (kata.id.clone(), kata.base.clone(), kata.root.clone());
    let socket = root.join("run").join("fc.sock");
    let hvsock = root.join("kata.hvsock");

    // prepare_vmm: the jailer, in the pod's network namespace (setns before the exec).
    let netns_name = format!("prescient-katars-{}", std::process::id());
    let netns = Netns::with_tap(netns_name.clone(), "tap0_kata");
    let ns_file = std::fs::File::open(format!("/var/run/netns/{netns_name}")).unwrap();
    let mut cmd = Command::new(&jailer);
    cmd.args(["--id", &id, "--gid", "0", "--uid", "0", "--exec-file"])
        .arg(&firecracker)
        .arg("--chroot-base-dir")
        .arg(&base)
        .args(["--", "--api-sock", "/run//fc.sock"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    in_netns(&mut cmd, &ns_file);
    let vmm = integration_tests::RunningVmm::from_command(&mut cmd);
    drop(ns_file);
    wait_until("the API socket", FC_TIMEOUT, || socket.exists());
    // Declared after the child: dropped first, so its cgroups go once the child is killed.
    let jailed = JailedVmm::new(vmm.id());

    // prepare_vmm_resources.
    // (After the VMM started: the slave jail receives these mounts too.)
    kata.jail_kernel_and_image();
    let boot_args = format!(
        "{} pci=off iommu=off root=/dev/vda1 \
         rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4",
        guest_args()
    );
    let put = |path: &str, body: Value| {
        let (status, answer) = runtime_rs_request(&socket, "PUT", path, &body);
        assert_eq!(status, 204, "PUT {path} {body}: {answer}");
    };
    put(
        "/boot-source",
        json!({"kernel_image_path": "/vmlinux", "boot_args": boot_args}),
    );
    put(
        "/machine-config",
        json!({"mem_size_mib": 128, "vcpu_count": 1}),
    );
    put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": "/rootfs",
               "is_root_device": false, "is_read_only": true}),
    );
    for i in 1..6 {
        std::fs::write(root.join(format!("drive{i}")), b"").unwrap();
        put(
            &format!("/drives/drive{i}"),
            json!({"drive_id": format!("drive{i}"), "path_on_host": format!("//drive{i}"),
                   "is_root_device": false, "is_read_only": false}),
        );
    }
    // prepare_hvsock, then the queued devices: the network endpoint and the hybrid vsock again.
    let vsock = json!({"guest_cid": 3, "uds_path": "kata.hvsock", "vsock_id": "root"});
    put("/vsock", vsock.clone());
    put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "guest_mac": "02:00:ca:fe:00:02", "host_dev_name": "tap0_kata"}),
    );
    put("/vsock", vsock);
    // start_vm.
    put("/actions", json!({"action_type": "InstanceStart"}));
    wait_until("the hybrid vsock socket", FC_TIMEOUT, || hvsock.exists());

    // add_device(BlockModern) of a container's disk, index 1 (index 0 is the VM's image):
    // bound over the placeholder, then patched with the disk's rate limiter.
    let (disk, disk_inode) = kata.plug_disk("container.img", "drive1");
    let limiter = json!({
        "bandwidth": {"size": 100 << 20, "one_time_burst": null, "refill_time": 1000},
        "ops": null
    });
    let (status, answer) = runtime_rs_request(
        &socket,
        "PATCH",
        "/drives/drive1",
        &json!({"drive_id": "drive1", "path_on_host": "/drive1", "rate_limiter": limiter}),
    );
    assert_eq!(status, 204, "{answer}");
    assert!(open_inodes(vmm.id()).contains(&disk_inode));
    wait_guest_wrote(&disk);
    // A second container without disk limits: `rate_limiter` is null.
    let (_, disk2_inode) = kata.plug_disk("container2.img", "drive2");
    let (status, answer) = runtime_rs_request(
        &socket,
        "PATCH",
        "/drives/drive2",
        &json!({"drive_id": "drive2", "path_on_host": "/drive2", "rate_limiter": null}),
    );
    assert_eq!(status, 204, "{answer}");
    assert!(open_inodes(vmm.id()).contains(&disk2_inode));

    // stop_vm: SIGKILL; the jailer exec'ed the VMM, so it is this child. (Its console shows the
    // guest saw the plug before it wrote; the write's own check may still be under way.)
    let out = vmm.signal(libc::SIGKILL, FC_STOP_TIMEOUT);
    assert!(
        out.stdout.contains("guest: blk1 hotplug capacity=4096"),
        "{}",
        out.stdout
    );
    drop(jailed);
    kata.clean_up();
    drop(netns);
}
