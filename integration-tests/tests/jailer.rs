//! `prescient jail`: the jailed VMM boots the test guest inside its chroot, as its own user, in
//! its own cgroup; the host's files are out of its reach; bad arguments each get their error.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    guest_spec, prescient_bin, run_prescient, ApiClient, RunningVmm, Scratch, TEST_GUEST_PVH,
};

const DEADLINE: Duration = Duration::from_secs(60);
const UID: u32 = 40123;
const GID: u32 = 40124;
/// Where the jail test leaves an inheritable fd for the jailer to close.
const LEAKED_FD: i32 = 57;

/// Removes a cgroup directory the jailer made (empty once the VMM has gone).
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `/proc/<pid>/status` field `name` (e.g. "Uid"), first value.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_jailed_vmm_boots_the_guest_as_its_user_in_its_chroot_and_cgroup() {
    let scratch = Scratch::new("jail-boot");
    let base = scratch.path().join("jail");
    let id = format!("it-{}", std::process::id());
    // Inside the chroot; its host path must still fit a socket address (108 bytes).
    let socket = PathBuf::from("/run/api.sock");
    let config = scratch.write(
        "vm.json",
        &guest_spec(TEST_GUEST_PVH, 1, 64, "cpu_ms=2000 mem_mib=1"),
    );
    // A host file the VMM must not reach, in a directory the jail does not map.
    let elsewhere = Scratch::new("jail-elsewhere");
    let outside = elsewhere.write("outside.log", "");
    // Declared before the VMM, so dropped after it is killed (a group with a task stays).
    let cpu_dir = CgroupDir(PathBuf::from(format!("/sys/fs/cgroup/cpu/prescient/{id}")));
    let pids_dir = CgroupDir(PathBuf::from(format!("/sys/fs/cgroup/pids/prescient/{id}")));
    let _memory_dir = CgroupDir(PathBuf::from(format!(
        "/sys/fs/cgroup/memory/prescient/{id}"
    )));
    let _cpuacct_dir = CgroupDir(PathBuf::from(format!(
        "/sys/fs/cgroup/cpuacct/prescient/{id}"
    )));
    // An fd the caller forgot to mark close-on-exec, which the jail must not pass on.
    let leaked = std::fs::File::open(&outside).unwrap();
    let leaked_fd = leaked.as_raw_fd();
    let mut jail = Command::new(prescient_bin());
    // SAFETY: dup2 is async-signal-safe; the fd is open in the parent and inherited.
    unsafe {
        jail.pre_exec(move || {
            if libc::dup2(leaked_fd, LEAKED_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let vmm = RunningVmm::from_command(
        jail.env("PRESCIENT_SECRET", "must-not-reach-the-vmm")
            .args(["jail", "--id", &id])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&base)
            .args(["--cgroup", "cpu.cfs_quota_us=50000"])
            .args(["--cgroup", "pids.max=64"])
            .args(["--resource-limit", "no-file=256"])
            .arg("--")
            .arg("--api-sock")
            .arg(&socket)
            .arg("--config-file")
            .arg(&config),
    );
    let pid = vmm.id();

    let root = base.join("prescient").join(&id).join("root");
    let host_socket = root.join(socket.strip_prefix("/").unwrap());
    wait_for("the jailed API socket", || host_socket.exists());
    let mut api = ApiClient::connect(&host_socket);
    assert_eq!(api.request("GET", "/", None).json()["id"], id.as_str());

    // What it inherited: no environment, not the leaked fd.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    let fd = std::fs::read_link(format!("/proc/{pid}/fd/{LEAKED_FD}"));
    assert!(
        fd.as_ref().map_or(true, |target| target != &outside),
        "the jail passed on fd {LEAKED_FD}: {fd:?}"
    );
    drop(leaked);

    // Its identity and limits.
    assert_eq!(status_field(pid, "Uid"), UID.to_string());
    assert_eq!(status_field(pid, "Gid"), GID.to_string());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(open_files.contains(" 256 "), "{open_files}");

    // Its cgroup: made, limited, holding it, and handed to its user.
    let read = |dir: &Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read(&cpu_dir.0, "cpu.cfs_quota_us").trim(), "50000");
    assert_eq!(read(&pids_dir.0, "pids.max").trim(), "64");
    assert!(read(&cpu_dir.0, "cgroup.procs")
        .lines()
        .any(|l| l == pid.to_string()));
    assert_eq!(std::fs::metadata(&cpu_dir.0).unwrap().uid(), UID);
    // Delegated: a process of the VMM's user can change the quota (what the predictor does).
    let status = Command::new("sh")
        .args(["-c", "echo 30000 > \"$1\"", "sh"])
        .arg(cpu_dir.0.join("cpu.cfs_quota_us"))
        .uid(UID)
        .gid(GID)
        .status()
        .unwrap();
    assert!(status.success(), "the VMM's user cannot set its CPU quota");
    assert_eq!(read(&cpu_dir.0, "cpu.cfs_quota_us").trim(), "30000");

    // Its root is the chroot: the host's files are not there, the VM's are.
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(!proc_root.join("etc/passwd").exists());
    assert!(!proc_root.join(outside.strip_prefix("/").unwrap()).exists());
    assert!(proc_root.join("dev/kvm").exists());
    assert!(proc_root
        .join(TEST_GUEST_PVH.trim_start_matches('/'))
        .exists());
    // From inside the VMM: a host path outside the chroot cannot be opened, one inside can.
    let log = |path: &Path| serde_json::json!({"log_path": path}).to_string();
    let r = api.request("PUT", "/logger", Some(&log(&outside)));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("No such file or directory"), "{}", r.body);
    let inside = Path::new("/run/vmm.log");
    let r = api.request("PUT", "/logger", Some(&log(inside)));
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(root.join(inside.strip_prefix("/").unwrap()).exists());

    let out = vmm.wait(DEADLINE);
    out.assert_code(0).assert_line("prescient-test-guest: done");
    assert!(!host_socket.exists(), "the VMM left its API socket");
    // The cgroup held the VMM until it exited, so it is left, empty, for the caller.
    assert_eq!(read(&cpu_dir.0, "cgroup.procs"), "");
    std::fs::remove_dir(&cpu_dir.0).expect("an empty VM cgroup can be removed");
}

/// Snapshot files are named by paths inside the jail, as Firecracker's are: a jailed VMM
/// creates them inside its chroot as its own user; linked by the operator into another jail's
/// chroot, they load there, and the guest finishes. That jail holds no kernel: a restore does not
/// read it.
#[test]
fn a_snapshot_made_in_one_jail_loads_in_another() {
    let scratch = Scratch::new("jail-snapshot");
    let base = scratch.path().join("jail");
    let ids = ["sa", "sb"].map(|j| format!("{j}-{}", std::process::id()));
    let _cgroups: Vec<CgroupDir> = ids
        .iter()
        .flat_map(|id| {
            ["cpu", "cpuacct", "memory", "pids"]
                .map(|c| CgroupDir(PathBuf::from(format!("/sys/fs/cgroup/{c}/prescient/{id}"))))
        })
        .collect();
    let config = scratch.write(
        "vm.json",
        &guest_spec(TEST_GUEST_PVH, 1, 64, "cpu_ms=3000 mem_mib=8"),
    );
    let root = |id: &str| base.join("prescient").join(id).join("root");
    let jail = |id: &str, vmm_args: &[&std::ffi::OsStr]| {
        RunningVmm::from_command(
            Command::new(prescient_bin())
                .args(["jail", "--id", id])
                .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
                .arg("--chroot-base-dir")
                .arg(&base)
                .args(["--", "--api-sock", "/run/api.sock"])
                .args(vmm_args),
        )
    };
    let connect = |id: &str| {
        let socket = root(id).join("run/api.sock");
        wait_for("the jailed API socket", || socket.exists());
        ApiClient::connect(&socket)
    };

    let first = jail(&ids[0], &["--config-file".as_ref(), config.as_os_str()]);
    let mut api = connect(&ids[0]);
    wait_for("the guest to run", || {
        api.request("GET", "/", None).json()["state"] == "Running"
    });
    let r = api.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    let create = r#"{"snapshot_path": "/run/vm.state", "mem_file_path": "/run/vm.mem"}"#;
    let r = api.request("PUT", "/snapshot/create", Some(create));
    assert_eq!(r.status, 204, "{}", r.body);
    drop(first);
    let made = root(&ids[0]).join("run");
    for name in ["vm.state", "vm.mem"] {
        let meta = std::fs::metadata(made.join(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{name}");
    }

    // The operator's step: the files into the second jail, at the paths the load names.
    let snap = root(&ids[1]).join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    for name in ["vm.state", "vm.mem"] {
        std::fs::hard_link(made.join(name), snap.join(name)).unwrap();
    }
    let second = jail(&ids[1], &[]);
    let mut api = connect(&ids[1]);
    let load = r#"{"snapshot_path": "/snap/vm.state",
        "mem_backend": {"backend_type": "File", "backend_path": "/snap/vm.mem"},
        "resume_vm": true}"#;
    let r = api.request("PUT", "/snapshot/load", Some(load));
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(!root(&ids[1])
        .join(TEST_GUEST_PVH.trim_start_matches('/'))
        .exists());
    second
        .wait(DEADLINE)
        .assert_code(0)
        .assert_line("prescient-test-guest: done");
    for dir in &_cgroups {
        let _ = std::fs::remove_dir(&dir.0);
    }
}

/// `prescient jail` with `args` (before `--`), which must fail with exit code 2 and `message`.
fn assert_refused(args: &[&str], message: &str) {
    let mut all = vec!["jail"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", "--config-file", "/nonexistent.json"]);
    let out = run_prescient(&all, DEADLINE);
    out.assert_code(2);
    assert!(
        out.stderr.contains(message),
        "{args:?}: expected {message:?} in\n{}",
        out.stderr
    );
}

#[test]
fn each_invalid_jailer_argument_has_its_own_error() {
    let ok = [
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--chroot-base-dir",
        "/srv/jailer",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v: Vec<&str> = ok.to_vec();
        v.extend_from_slice(extra);
        v
    };
    assert_refused(
        &with(&["--id", "../escape"]),
        "--id \"../escape\" may only hold",
    );
    assert_refused(&with(&["--id", "a/b"]), "--id \"a/b\" may only hold");
    let long = "a".repeat(65);
    let mut args = with(&[]);
    args.extend_from_slice(&["--id", &long]);
    assert_refused(&args, "--id is 65 bytes long");
    assert_refused(&with(&["--id", ""]), "--id \"\" is empty");
    let mut args: Vec<&str> = vec!["--id", "vm", "--uid", "1", "--gid", "1"];
    args.extend_from_slice(&["--chroot-base-dir", "relative/dir"]);
    assert_refused(&args, "must be an absolute path");
    let mut args: Vec<&str> = vec!["--id", "vm", "--uid", "1", "--gid", "1"];
    args.extend_from_slice(&["--chroot-base-dir", "/srv/../etc"]);
    assert_refused(&args, "must not contain '..'");
    assert_refused(
        &with(&["--id", "vm", "--netns", "/var/run/netns/../../x"]),
        "--netns",
    );
    assert_refused(
        &with(&["--id", "vm", "--cgroup", "cpu.cfs_quota_us"]),
        "is not FILE=VALUE",
    );
    assert_refused(
        &with(&["--id", "vm", "--cgroup", "../tasks=1"]),
        "is not FILE=VALUE",
    );
    assert_refused(
        &with(&["--id", "vm", "--cgroup-version", "3"]),
        "--cgroup-version 3",
    );
    assert_refused(
        &with(&["--id", "vm", "--resource-limit", "stack=1"]),
        "--resource-limit \"stack=1\"",
    );
    assert_refused(
        &with(&["--id", "vm", "--exec-file", "prescient"]),
        "--exec-file",
    );
    // clap's own checks: a missing required argument and a non-numeric uid.
    let out = run_prescient(&["jail", "--uid", "1", "--gid", "1"], DEADLINE);
    out.assert_code(2);
    assert!(out.stderr.contains("--id"), "{}", out.stderr);
    let out = run_prescient(
        &["jail", "--id", "vm", "--uid", "me", "--gid", "1"],
        DEADLINE,
    );
    out.assert_code(2);
    assert!(out.stderr.contains("invalid value 'me'"), "{}", out.stderr);
}

/// The v2 path through the jailer, on this host's cgroup2 mount (/sys/fs/cgroup/unified). Here
/// every controller but hugetlb is bound to a v1 hierarchy, so a v2 group can have no cpu.max:
/// asking for one is refused, naming the controller; without it the jailed VMM runs in a v2
/// group and boots the guest.
#[test]
fn a_v2_cgroup_gets_what_v2_offers_here_and_refuses_the_rest() {
    let scratch = Scratch::new("jail-v2");
    let base = scratch.path().join("jail");
    let available =
        std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").unwrap_or_default();
    assert!(
        !available.split_whitespace().any(|c| c == "cpu"),
        "this test expects cpu bound to cgroup v1, as on the CI hosts (v2 has: {available})"
    );
    let jail = |id: &str, extra: &[&str]| {
        let mut cmd = Command::new(prescient_bin());
        cmd.args(["jail", "--id", id, "--uid", "1000", "--gid", "1000"])
            .arg("--chroot-base-dir")
            .arg(&base)
            .args(["--cgroup-version", "2"])
            .args(extra);
        cmd
    };

    let refused = format!("v2r-{}", std::process::id());
    let out = integration_tests::wait_with_deadline(
        jail(
            &refused,
            &[
                "--cgroup",
                "cpu.max=50000 100000",
                "--",
                "--api-sock",
                "/x.sock",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
        DEADLINE,
    );
    out.assert_code(1);
    assert!(
        out.stderr.contains("controller \"cpu\" cannot be enabled"),
        "{}",
        out.stderr
    );

    let id = format!("v2-{}", std::process::id());
    let dir = CgroupDir(PathBuf::from(format!(
        "/sys/fs/cgroup/unified/prescient/{id}"
    )));
    let config = scratch.write(
        "vm.json",
        &guest_spec(TEST_GUEST_PVH, 1, 64, "cpu_ms=1500 mem_mib=1"),
    );
    let config = config.to_str().unwrap();
    let vmm = RunningVmm::from_command(&mut jail(&id, &["--", "--config-file", config]));
    let pid = vmm.id().to_string();
    wait_for("the VMM in its v2 cgroup", || {
        std::fs::read_to_string(dir.0.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l == pid))
    });
    // Every v2 group has cpu.stat: the predictor's CPU usage works without the cpu controller.
    assert!(dir.0.join("cpu.stat").exists());
    assert_eq!(std::fs::metadata(&dir.0).unwrap().uid(), 1000);
    vmm.wait(DEADLINE)
        .assert_code(0)
        .assert_line("prescient-test-guest: done");
}

/// A network namespace made for one test, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(name: String) -> Self {
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip (iproute2)");
        assert!(status.success(), "ip netns add {name}");
        Self(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_daemon_jail_runs_the_vmm_as_pid_1_of_a_new_pid_namespace_in_the_given_netns() {
    let scratch = Scratch::new("jail-daemon");
    let base = scratch.path().join("jail");
    let id = format!("d-{}", std::process::id());
    let netns = NetNs::new(format!("prescient-jail-{}", std::process::id()));
    let _cgroups = ["cpu", "cpuacct", "memory", "pids"]
        .map(|c| CgroupDir(PathBuf::from(format!("/sys/fs/cgroup/{c}/prescient/{id}"))));
    let config = scratch.write(
        "vm.json",
        &guest_spec(TEST_GUEST_PVH, 1, 64, "cpu_ms=60000 mem_mib=1"),
    );
    let out = run_prescient(
        &[
            "jail",
            "--id",
            &id,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
            "--chroot-base-dir",
            base.to_str().unwrap(),
            "--netns",
            netns.path().to_str().unwrap(),
            "--daemonize",
            "--new-pid-ns",
            "--",
            "--api-sock",
            "/run/api.sock",
            "--config-file",
            config.to_str().unwrap(),
        ],
        DEADLINE,
    );
    out.assert_code(0);

    let root = base.join("prescient").join(&id).join("root");
    let pid: u32 = std::fs::read_to_string(root.join("prescient.pid"))
        .expect("the daemon's pid file")
        .trim()
        .parse()
        .unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the daemon this test started, if it is still there.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
    let _kill = Kill(pid);
    let socket = root.join("run/api.sock");
    wait_for("the daemon's API socket", || socket.exists());
    let mut api = ApiClient::connect(&socket);
    assert_eq!(api.request("GET", "/", None).json()["state"], "Running");

    let nspid = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = nspid.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        ["NSpid:", &pid.to_string(), "1"],
        "the VMM is pid 1 of its own pid namespace"
    );
    assert_eq!(status_field(pid, "Uid"), UID.to_string());
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let ino = std::fs::metadata(netns.path()).unwrap().ino();
    assert_eq!(ns, PathBuf::from(format!("net:[{ino}]")));
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = sid[sid.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!(fields[3], pid.to_string(), "a daemon leads its own session");

    // SAFETY: kill(2) of the daemon started above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    // Reaped by init: a zombie still counts as a member of its cgroups.
    wait_for("the daemon to exit", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(!socket.exists(), "SIGTERM left the daemon's API socket");
    for dir in &_cgroups {
        std::fs::remove_dir(&dir.0).expect("the daemon's empty cgroup can be removed");
    }
}

/// `prescient jail` with a valid command line plus `extra`, which must fail (exit 1) with
/// `message` and leave no cgroup behind.
fn assert_failed_jail_leaves_no_cgroup(name: &str, extra: &[&str], message: &str) {
    let scratch = Scratch::new(name);
    let id = format!("{name}-{}", std::process::id());
    let base = scratch.path().join("jail");
    let mut args = vec!["jail", "--id", &id, "--uid", "1000", "--gid", "1000"];
    args.extend_from_slice(&["--chroot-base-dir", base.to_str().unwrap()]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "--api-sock", "/run/api.sock"]);
    let out = run_prescient(&args, DEADLINE);
    out.assert_code(1);
    assert!(out.stderr.contains(message), "{}", out.stderr);
    for c in ["cpu", "cpuacct", "memory", "pids"] {
        let dir = PathBuf::from(format!("/sys/fs/cgroup/{c}/prescient/{id}"));
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
}

#[test]
fn a_failed_jail_leaves_no_cgroup_behind() {
    // Refused by the kernel before the jailer joined the group.
    assert_failed_jail_leaves_no_cgroup(
        "bad-value",
        &["--cgroup", "pids.max=lots"],
        "cannot write \"lots\" to /sys/fs/cgroup/pids/prescient/",
    );
    // Failing after it joined the group: it moves back out first.
    assert_failed_jail_leaves_no_cgroup(
        "bad-netns",
        &["--netns", "/var/run/netns/prescient-no-such-ns"],
        "cannot join network namespace /var/run/netns/prescient-no-such-ns",
    );
}
