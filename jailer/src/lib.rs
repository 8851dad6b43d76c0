//! `prescient jail`: runs one microVM's VMM isolated, with Firecracker's jailer semantics.
//!
//! In order: inherited fds closed; the VM's cgroup made, limited, joined and handed to the
//! VMM's user; resource limits set; the network namespace joined; a mount namespace of its own
//! whose new root `<base>/<exec name>/<id>/root` holds only the VMM binary and its shared
//! libraries, the files its spec names, `/dev/kvm`, `/dev/net/tun` and the cgroup's directories;
//! pivot_root into it; optionally a new pid namespace and/or a daemon; the VMM's pid in
//! `/<exec name>.pid`; then the uid/gid dropped and the VMM exec'ed with an empty environment.
//!
//! Paths the VMM is given may be host paths (bind-mounted at the same path inside) or, as with
//! Firecracker's jailer, paths inside the chroot of files the caller put there: a path the host
//! lacks and the chroot has is left to the chroot. A VMM given a `--config-file` and neither
//! `--api-sock` nor `--no-api` serves Firecracker's default socket `/run/firecracker.socket`
//! inside the jail, as Firecracker does (Kata Containers relies on it).
//!
//! What stays in `<base>/<exec name>/<id>/root` after the VMM exits: the directory tree, empty
//! files where host files were bind-mounted (the mounts lived in the VMM's mount namespace and
//! went with it), the device nodes, the pid file, and any file the VMM created (logs, metrics,
//! vsock sockets; the API socket it removes itself). The VM's cgroup holds the VMM until it
//! exits, so the VMM cannot remove it: it is left, empty, for the caller to rmdir.

pub mod args;
pub mod cgroup;
pub mod chroot;
pub mod process;

use std::convert::Infallible;
use std::path::{Path, PathBuf};

pub use args::{ArgsError, JailArgs, JailSpec};
use cgroup::{Cgroup, CgroupError, Mounts};
use chroot::{Chroot, ChrootError};
use process::ProcessError;

/// Controllers of the VM's cgroup besides those its `--cgroup` files name: CPU (the
/// predictor's quota), CPU accounting (its usage), memory and pids.
pub const DEFAULT_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// The host devices the VMM opens.
pub const DEVICES: [&str; 2] = ["/dev/kvm", "/dev/net/tun"];

/// Where Firecracker serves its API when no socket is named.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// Errors of jailing a VMM.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("chroot: {0}")]
    Chroot(#[from] ChrootError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot read the VM spec {path}: {detail}")]
    Spec { path: PathBuf, detail: String },
    #[error("cannot find this executable: {0}")]
    CurrentExe(std::io::Error),
    #[error(
        "{what} {path:?} must be an absolute path: the VMM runs with / as its working directory"
    )]
    RelativePath { what: &'static str, path: PathBuf },
}

/// Host files the VMM's arguments and spec name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VmmFiles {
    /// Files it reads or writes in place, with whether they are read-only to it.
    pub inputs: Vec<(PathBuf, bool)>,
    /// Files it writes (the spec's log and metrics files or FIFOs): bound when the host has
    /// them, else created by the VMM in their directory.
    pub outputs: Vec<PathBuf>,
    /// Directories where it creates files (sockets, logs).
    pub output_dirs: Vec<PathBuf>,
}

/// The value of `--name VALUE` or `--name=VALUE` in `args`.
fn option_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

/// `path` if it is absolute.
fn absolute(what: &'static str, path: &Path) -> Result<PathBuf, JailError> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Err(JailError::RelativePath {
            what,
            path: path.to_path_buf(),
        })
    }
}

/// The API socket the VMM serves: the one `args` name, else Firecracker's default unless they
/// say `--no-api`.
fn api_sock(args: &[String]) -> Option<&str> {
    match option_value(args, "--api-sock") {
        Some(sock) => Some(sock),
        None if args.iter().any(|a| a == "--no-api") => None,
        None => Some(DEFAULT_API_SOCK),
    }
}

/// Whether the VMM's `path` is a file the caller put in the chroot at `root` (Firecracker's
/// way) rather than a host file: the host lacks it and the chroot has it.
fn placed_in_jail(root: &Path, path: &Path) -> bool {
    !path.exists() && chroot::inside(root, path).exists()
}

impl VmmFiles {
    /// The files of VMM arguments `args` and of the spec they name, for the chroot at `root`.
    /// The spec is read from the host, or from the chroot when only the chroot has it; files
    /// only the chroot has are left out (they are there already).
    pub fn of(args: &[String], root: &Path) -> Result<Self, JailError> {
        let mut files = VmmFiles::default();
        if let Some(sock) = api_sock(args) {
            let sock = absolute("--api-sock", Path::new(sock))?;
            files
                .output_dirs
                .extend(sock.parent().map(Path::to_path_buf));
        }
        if let Some(path) = option_value(args, "--config-file") {
            let path = absolute("--config-file", Path::new(path))?;
            let spec_err = |detail: String| JailError::Spec {
                path: path.clone(),
                detail,
            };
            let source = if placed_in_jail(root, &path) {
                chroot::inside(root, &path)
            } else {
                files.inputs.push((path.clone(), true));
                path.clone()
            };
            let text = std::fs::read_to_string(&source).map_err(|e| spec_err(e.to_string()))?;
            let spec: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| spec_err(e.to_string()))?;
            files.add_spec(&spec)?;
        }
        files.inputs.retain(|(p, _)| !placed_in_jail(root, p));
        files.outputs.retain(|p| !placed_in_jail(root, p));
        Ok(files)
    }

    fn add_spec(&mut self, spec: &serde_json::Value) -> Result<(), JailError> {
        let path = |what, v: &serde_json::Value| {
            v.as_str().map(|p| absolute(what, Path::new(p))).transpose()
        };
        for key in ["kernel_image_path", "initrd_path"] {
            if let Some(p) = path(key, &spec["boot-source"][key])? {
                self.inputs.push((p, true));
            }
        }
        for drive in spec["drives"].as_array().into_iter().flatten() {
            if let Some(p) = path("path_on_host", &drive["path_on_host"])? {
                let read_only = drive["is_read_only"].as_bool().unwrap_or(false);
                self.inputs.push((p, read_only));
            }
        }
        for (what, out) in [
            ("serial_out_path", &spec["serial"]["serial_out_path"]),
            ("uds_path", &spec["vsock"]["uds_path"]),
        ] {
            if let Some(dir) = path(what, out)?.as_deref().and_then(Path::parent) {
                self.output_dirs.push(dir.to_path_buf());
            }
        }
        for (what, out) in [
            ("log_path", &spec["logger"]["log_path"]),
            ("metrics_path", &spec["metrics"]["metrics_path"]),
        ] {
            self.outputs.extend(path(what, out)?);
        }
        Ok(())
    }
}

/// The VM's cgroup, created empty.
fn create_cgroup(spec: &JailSpec) -> Result<Cgroup, JailError> {
    let mut controllers: Vec<String> = DEFAULT_CONTROLLERS.map(String::from).into();
    for (file, _) in &spec.cgroups {
        let controller = file.split('.').next().unwrap_or_default().to_string();
        if !controllers.contains(&controller) {
            controllers.push(controller);
        }
    }
    let relative = Path::new("prescient").join(&spec.id);
    let mounts = Mounts::current()?;
    if spec
        .cgroup_version
        .unwrap_or_else(|| mounts.default_version())
        == 1
    {
        return Ok(Cgroup::create_v1(&mounts, &controllers, &relative)?);
    }
    let (mount_point, _) = mounts.v2.clone().ok_or(CgroupError::NoUnifiedMount)?;
    // v2 offers no separate cpuacct: CPU usage is in every group's cpu.stat.
    let available =
        std::fs::read_to_string(mount_point.join("cgroup.controllers")).unwrap_or_default();
    let named: Vec<String> = controllers
        .into_iter()
        .filter(|c| {
            spec.cgroups
                .iter()
                .any(|(f, _)| f.starts_with(&format!("{c}.")))
                || available.split_whitespace().any(|a| a == c)
        })
        .collect();
    Ok(Cgroup::create_v2(&mount_point, &named, &relative)?)
}

/// Jails this process as `spec` says and execs the VMM; returns only on failure. A failed jail
/// leaves no cgroup behind where it can help it: the process goes back to the groups it came
/// from and the VM's group is removed.
pub fn jail(spec: &JailSpec) -> Result<Infallible, JailError> {
    process::close_inherited_fds()?;
    let exec = match &spec.exec_file {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(JailError::CurrentExe)?,
    };
    let files = VmmFiles::of(&spec.vmm_args, &spec.chroot_dir())?;
    let home = Cgroup::current().ok();
    let cgroup = create_cgroup(spec)?;
    let Err(e) = jail_in(spec, &exec, &files, &cgroup);
    if let Some(home) = home {
        // Best effort: after the pivot the host's cgroup files are out of reach.
        let _ = home.add_process(std::process::id());
    }
    let _ = cgroup.remove();
    Err(e)
}

/// Everything after the cgroup exists: its settings, the namespaces, the chroot, the exec.
fn jail_in(
    spec: &JailSpec,
    exec: &Path,
    files: &VmmFiles,
    cgroup: &Cgroup,
) -> Result<Infallible, JailError> {
    for (file, value) in &spec.cgroups {
        cgroup.set(file, value)?;
    }
    cgroup.add_process(std::process::id())?;
    cgroup.delegate(spec.uid, spec.gid)?;
    process::set_rlimits(&spec.resource_limits)?;
    if let Some(netns) = &spec.netns {
        process::join_netns(netns)?;
    }
    let daemon_stdio = if spec.daemonize {
        Some(process::open_dev_null()?)
    } else {
        None
    };

    let chroot = Chroot::create(&spec.chroot_dir(), spec.uid, spec.gid)?;
    chroot.bind_executable(exec)?;
    for (path, read_only) in &files.inputs {
        chroot.bind_file("VM file", path, *read_only)?;
    }
    for out in &files.outputs {
        if out.exists() {
            chroot.bind_file("VM output file", out, false)?;
        } else if let Some(dir) = out.parent() {
            chroot.writable_dir(dir)?;
        }
    }
    for dir in &files.output_dirs {
        chroot.writable_dir(dir)?;
    }
    for device in DEVICES {
        chroot.device_node(Path::new(device))?;
    }
    for dir in cgroup.dirs() {
        chroot.bind_file("cgroup directory", dir, false)?;
    }
    chroot.enter()?;

    process::split(spec.new_pid_ns, daemon_stdio, &spec.pid_file())?;
    process::drop_privileges(spec.uid, spec.gid)?;
    let mut args = spec.vmm_args.clone();
    if option_value(&args, "--id").is_none() {
        args.extend(["--id".to_string(), spec.id.clone()]);
    }
    // prescient alone runs a --config-file without an API (README: it must not take one
    // system-wide path); in a jail that path is the jail's own, and Firecracker serves it.
    if option_value(&args, "--api-sock").is_none() && option_value(&args, "--config-file").is_some()
    {
        if let Some(sock) = api_sock(&args) {
            args.extend(["--api-sock".to_string(), sock.to_string()]);
        }
    }
    for dir in cgroup.dirs() {
        args.extend(["--cgroup-dir".to_string(), dir.display().to_string()]);
    }
    Ok(process::exec(exec, &args)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_found_in_both_spellings() {
        let args: Vec<String> = ["--api-sock", "/run/a.sock", "--config-file=/vm.json"]
            .map(String::from)
            .into();
        assert_eq!(option_value(&args, "--api-sock"), Some("/run/a.sock"));
        assert_eq!(option_value(&args, "--config-file"), Some("/vm.json"));
        assert_eq!(option_value(&args, "--id"), None);
    }

    #[test]
    fn spec_files_are_inputs_and_socket_dirs_are_outputs() {
        let spec = serde_json::json!({
            "boot-source": {"kernel_image_path": "/k/vmlinux", "initrd_path": "/k/initrd"},
            "drives": [
                {"drive_id": "a", "path_on_host": "/d/a.img", "is_read_only": true},
                {"drive_id": "b", "path_on_host": "/d/b.img"}
            ],
            "vsock": {"guest_cid": 3, "uds_path": "/run/vm/v.sock"},
            "serial": {"serial_out_path": "/logs/serial.out"},
            "logger": {"log_path": "/logs/vmm.log", "level": "Error"},
            "metrics": {"metrics_path": "/logs/metrics.fifo"}
        });
        let mut files = VmmFiles::default();
        files.add_spec(&spec).unwrap();
        assert_eq!(
            files.inputs,
            [
                (PathBuf::from("/k/vmlinux"), true),
                (PathBuf::from("/k/initrd"), true),
                (PathBuf::from("/d/a.img"), true),
                (PathBuf::from("/d/b.img"), false)
            ]
        );
        assert_eq!(files.output_dirs, ["/logs", "/run/vm"].map(PathBuf::from));
        assert_eq!(
            files.outputs,
            ["/logs/vmm.log", "/logs/metrics.fifo"].map(PathBuf::from)
        );
    }

    #[test]
    fn files_placed_in_the_chroot_are_read_there_and_left_there() {
        // Firecracker's way (Kata Containers): the caller puts the spec and the files it names
        // in the chroot and names them by their paths inside.
        let root = std::env::temp_dir().join(format!("jailer-placed-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let host_kernel = std::env::current_exe().unwrap();
        let spec = serde_json::json!({
            "boot-source": {"kernel_image_path": host_kernel},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/placed-rootfs", "is_read_only": true}],
            "logger": {"log_path": "/placed-logs.fifo"}
        });
        std::fs::write(root.join("placed-vm.json"), spec.to_string()).unwrap();
        std::fs::write(root.join("placed-rootfs"), b"").unwrap();
        std::fs::write(root.join("placed-logs.fifo"), b"").unwrap();
        let args: Vec<String> = ["--config-file", "/placed-vm.json"]
            .map(String::from)
            .into();
        let files = VmmFiles::of(&args, &root);
        std::fs::remove_dir_all(&root).unwrap();
        let files = files.unwrap();
        assert_eq!(files.inputs, [(host_kernel, true)]);
        assert!(files.outputs.is_empty(), "{:?}", files.outputs);
        // No --api-sock: the VMM will serve Firecracker's default socket in the jail.
        assert_eq!(files.output_dirs, [PathBuf::from("/run")]);
        assert_eq!(api_sock(&args), Some(DEFAULT_API_SOCK));
        let no_api: Vec<String> = ["--no-api", "--config-file", "/vm.json"]
            .map(String::from)
            .into();
        assert_eq!(api_sock(&no_api), None);
    }

    #[test]
    fn relative_paths_are_refused_by_name() {
        let spec = serde_json::json!({"drives": [{"path_on_host": "disk.img"}]});
        let err = VmmFiles::default().add_spec(&spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "path_on_host \"disk.img\" must be an absolute path: the VMM runs with / as its working directory"
        );
        let args: Vec<String> = ["--api-sock", "api.sock"].map(String::from).into();
        assert!(matches!(
            VmmFiles::of(&args, Path::new("/nonexistent-root")),
            Err(JailError::RelativePath {
                what: "--api-sock",
                ..
            })
        ));
    }

    #[test]
    fn an_unreadable_spec_is_named() {
        let args: Vec<String> = ["--config-file", "/nonexistent/vm.json"]
            .map(String::from)
            .into();
        let err = VmmFiles::of(&args, Path::new("/nonexistent-root")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vm.json"), "{err}");
    }
}
