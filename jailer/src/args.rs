//! `prescient jail` arguments and their validation into a [`JailSpec`].

use std::path::{Component, Path, PathBuf};

/// The longest `--id`: it names a directory and a cgroup.
pub const MAX_ID_LEN: usize = 64;
/// The longest `--chroot-base-dir`, so that the chroot's own paths stay well under PATH_MAX.
pub const MAX_BASE_DIR_LEN: usize = 1024;

/// Errors of the jailer's command line, one per thing that can be wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("--id {0:?} is empty")]
    EmptyId(String),
    #[error("--id is {0} bytes long; at most {MAX_ID_LEN} are allowed")]
    IdTooLong(usize),
    #[error("--id {0:?} may only hold ASCII letters, digits and '-' (no '/', no '..')")]
    IdCharacters(String),
    #[error("--chroot-base-dir {0:?} must be an absolute path")]
    BaseDirRelative(PathBuf),
    #[error("--chroot-base-dir {0:?} must not contain '..' or '.' components")]
    BaseDirDotDot(PathBuf),
    #[error("--chroot-base-dir is {0} bytes long; at most {MAX_BASE_DIR_LEN} are allowed")]
    BaseDirTooLong(usize),
    #[error("--netns {0:?} must be an absolute path without '..' (e.g. /var/run/netns/NAME)")]
    NetnsPath(PathBuf),
    #[error("--cgroup {0:?} is not FILE=VALUE with FILE like cpu.cfs_quota_us")]
    CgroupArg(String),
    #[error("--cgroup-version {0} is neither 1 nor 2")]
    CgroupVersion(u8),
    #[error("--resource-limit {0:?} is not NAME=VALUE with NAME one of fsize, no-file, as, nproc")]
    ResourceLimit(String),
    #[error("--exec-file {0:?} must be an absolute path to a file without '..'")]
    ExecFile(PathBuf),
}

// `prescient jail`: isolate one microVM, then run the VMM with the arguments after `--`.
// Not a doc comment: clap would take it as the subcommand's description, over the
// one on `prescient`'s list of tools (whose arguments are defined late, main.rs).
#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// The microVM's id: names its chroot and cgroup (letters, digits, '-'; at most 64).
    #[arg(long)]
    pub id: String,
    /// The user the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The group the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// The chroot is made at <DIR>/<name of the exec file>/<id>/root (Firecracker's layout;
    /// `prescient` without --exec-file).
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// The binary copied into the chroot and run there (default: this one).
    #[arg(long, value_name = "PATH")]
    pub exec_file: Option<PathBuf>,
    /// Network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Which cgroup interface to use (default: v1 where the host mounts the v1 cpu hierarchy,
    /// else v2, so that a caller that names none, as Kata Containers does, works on either).
    #[arg(long)]
    pub cgroup_version: Option<u8>,
    /// Writes VALUE to the VM cgroup's FILE (e.g. cpu.cfs_quota_us=50000); repeatable.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// Sets a resource limit (fsize, no-file, as, nproc) to VALUE; repeatable.
    #[arg(long = "resource-limit", value_name = "NAME=VALUE")]
    pub resource_limits: Vec<String>,
    /// Detach from the terminal: new session, stdio on /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as pid 1 of a new pid namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Arguments for the VMM.
    #[arg(last = true, value_name = "VMM ARGS")]
    pub vmm_args: Vec<String>,
}

/// A resource limit the VMM starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimit {
    pub resource: libc::__rlimit_resource_t,
    pub value: u64,
}

/// Validated jail arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base_dir: PathBuf,
    pub exec_file: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    /// `None`: whichever the host has (`cgroup::Mounts::default_version`).
    pub cgroup_version: Option<u8>,
    pub cgroups: Vec<(String, String)>,
    pub resource_limits: Vec<ResourceLimit>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub vmm_args: Vec<String>,
}

/// An absolute path with nothing but normal components after the root.
fn is_clean_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
        && !p.to_string_lossy().contains("/./")
        && !p.to_string_lossy().ends_with("/.")
}

pub fn validate_id(id: &str) -> Result<(), ArgsError> {
    if id.is_empty() {
        return Err(ArgsError::EmptyId(id.to_string()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ArgsError::IdTooLong(id.len()));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ArgsError::IdCharacters(id.to_string()));
    }
    Ok(())
}

fn parse_cgroup(arg: &str) -> Result<(String, String), ArgsError> {
    let bad = || ArgsError::CgroupArg(arg.to_string());
    let (file, value) = arg.split_once('=').ok_or_else(bad)?;
    let (controller, rest) = file.split_once('.').ok_or_else(bad)?;
    let word = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    };
    if !word(controller) || !word(rest) || value.is_empty() || value.contains('\n') {
        return Err(bad());
    }
    Ok((file.to_string(), value.to_string()))
}

fn parse_rlimit(arg: &str) -> Result<ResourceLimit, ArgsError> {
    let bad = || ArgsError::ResourceLimit(arg.to_string());
    let (name, value) = arg.split_once('=').ok_or_else(bad)?;
    let resource = match name {
        "fsize" => libc::RLIMIT_FSIZE,
        "no-file" => libc::RLIMIT_NOFILE,
        "as" => libc::RLIMIT_AS,
        "nproc" => libc::RLIMIT_NPROC,
        _ => return Err(bad()),
    };
    let value = value.parse().map_err(|_| bad())?;
    Ok(ResourceLimit { resource, value })
}

impl JailArgs {
    /// Checks every argument; the first wrong one is the error.
    pub fn validate(&self) -> Result<JailSpec, ArgsError> {
        validate_id(&self.id)?;
        let base = &self.chroot_base_dir;
        if base.as_os_str().len() > MAX_BASE_DIR_LEN {
            return Err(ArgsError::BaseDirTooLong(base.as_os_str().len()));
        }
        if !base.is_absolute() {
            return Err(ArgsError::BaseDirRelative(base.clone()));
        }
        if !is_clean_absolute(base) {
            return Err(ArgsError::BaseDirDotDot(base.clone()));
        }
        if let Some(netns) = self.netns.as_ref().filter(|p| !is_clean_absolute(p)) {
            return Err(ArgsError::NetnsPath(netns.clone()));
        }
        if let Some(exec) = self.exec_file.as_ref().filter(|p| !is_clean_absolute(p)) {
            return Err(ArgsError::ExecFile(exec.clone()));
        }
        if let Some(v) = self.cgroup_version.filter(|v| !matches!(v, 1 | 2)) {
            return Err(ArgsError::CgroupVersion(v));
        }
        Ok(JailSpec {
            id: self.id.clone(),
            uid: self.uid,
            gid: self.gid,
            chroot_base_dir: base.clone(),
            exec_file: self.exec_file.clone(),
            netns: self.netns.clone(),
            cgroup_version: self.cgroup_version,
            cgroups: self
                .cgroups
                .iter()
                .map(|c| parse_cgroup(c))
                .collect::<Result<_, _>>()?,
            resource_limits: self
                .resource_limits
                .iter()
                .map(|r| parse_rlimit(r))
                .collect::<Result<_, _>>()?,
            daemonize: self.daemonize,
            new_pid_ns: self.new_pid_ns,
            vmm_args: self.vmm_args.clone(),
        })
    }
}

impl JailSpec {
    /// The name of the binary the jail runs (`prescient` when it runs itself): it names the
    /// jail's directory and its pid file, as Firecracker's jailer names them after its
    /// `--exec-file`.
    pub fn exec_name(&self) -> String {
        self.exec_file
            .as_deref()
            .and_then(Path::file_name)
            .map_or_else(|| "prescient".into(), |n| n.to_string_lossy().into_owned())
    }

    /// `<base>/<exec name>/<id>`: the jail's directory; the chroot is its `root`.
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base_dir.join(self.exec_name()).join(&self.id)
    }

    /// Where the VMM's pid is written, inside the chroot: `/<exec name>.pid`.
    pub fn pid_file(&self) -> PathBuf {
        Path::new("/").join(format!("{}.pid", self.exec_name()))
    }

    pub fn chroot_dir(&self) -> PathBuf {
        self.jail_dir().join("root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> JailArgs {
        JailArgs {
            id: "vm-1".into(),
            uid: 1000,
            gid: 1000,
            chroot_base_dir: "/srv/jailer".into(),
            exec_file: None,
            netns: None,
            cgroup_version: None,
            cgroups: vec![],
            resource_limits: vec![],
            daemonize: false,
            new_pid_ns: false,
            vmm_args: vec![],
        }
    }

    fn err(f: impl FnOnce(&mut JailArgs)) -> ArgsError {
        let mut a = args();
        f(&mut a);
        a.validate().unwrap_err()
    }

    #[test]
    fn a_good_command_line_validates() {
        let mut a = args();
        a.cgroups = vec![
            "cpu.cfs_quota_us=50000".into(),
            "memory.limit_in_bytes=1".into(),
        ];
        a.resource_limits = vec!["no-file=1024".into()];
        let spec = a.validate().unwrap();
        assert_eq!(spec.cgroups[0], ("cpu.cfs_quota_us".into(), "50000".into()));
        assert_eq!(spec.resource_limits[0].resource, libc::RLIMIT_NOFILE);
        assert_eq!(
            spec.chroot_dir(),
            Path::new("/srv/jailer/prescient/vm-1/root")
        );
        assert_eq!(spec.pid_file(), Path::new("/prescient.pid"));
    }

    #[test]
    fn the_exec_file_names_the_jail_and_the_pid_file() {
        let mut a = args();
        a.exec_file = Some("/usr/local/bin/firecracker".into());
        let spec = a.validate().unwrap();
        assert_eq!(
            spec.chroot_dir(),
            Path::new("/srv/jailer/firecracker/vm-1/root")
        );
        assert_eq!(spec.pid_file(), Path::new("/firecracker.pid"));
    }

    #[test]
    fn each_bad_argument_has_its_own_error() {
        assert_eq!(
            err(|a| a.id = String::new()),
            ArgsError::EmptyId(String::new())
        );
        assert_eq!(err(|a| a.id = "a".repeat(65)), ArgsError::IdTooLong(65));
        assert_eq!(
            err(|a| a.id = "../x".into()),
            ArgsError::IdCharacters("../x".into())
        );
        assert_eq!(
            err(|a| a.id = "a/b".into()),
            ArgsError::IdCharacters("a/b".into())
        );
        assert_eq!(
            err(|a| a.chroot_base_dir = "srv".into()),
            ArgsError::BaseDirRelative("srv".into())
        );
        assert_eq!(
            err(|a| a.chroot_base_dir = "/srv/../etc".into()),
            ArgsError::BaseDirDotDot("/srv/../etc".into())
        );
        assert_eq!(
            err(|a| a.chroot_base_dir = format!("/{}", "a".repeat(1100)).into()),
            ArgsError::BaseDirTooLong(1101)
        );
        assert_eq!(
            err(|a| a.netns = Some("/var/run/netns/../x".into())),
            ArgsError::NetnsPath("/var/run/netns/../x".into())
        );
        assert_eq!(
            err(|a| a.cgroups = vec!["cpu.cfs_quota_us".into()]),
            ArgsError::CgroupArg("cpu.cfs_quota_us".into())
        );
        assert_eq!(
            err(|a| a.cgroups = vec!["../../tasks=1".into()]),
            ArgsError::CgroupArg("../../tasks=1".into())
        );
        assert_eq!(
            err(|a| a.cgroup_version = Some(3)),
            ArgsError::CgroupVersion(3)
        );
        assert_eq!(
            err(|a| a.resource_limits = vec!["stack=1".into()]),
            ArgsError::ResourceLimit("stack=1".into())
        );
        assert_eq!(
            err(|a| a.resource_limits = vec!["fsize=big".into()]),
            ArgsError::ResourceLimit("fsize=big".into())
        );
        assert_eq!(
            err(|a| a.exec_file = Some("prescient".into())),
            ArgsError::ExecFile("prescient".into())
        );
    }
}
