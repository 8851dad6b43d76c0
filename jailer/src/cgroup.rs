//! A microVM's control group, under cgroup v1 (one directory per controller hierarchy) or v2 (one
//! unified directory).
//!
//! The jailer creates it and hands it to the VMM; the VMM's predictor writes the CPU quota and
//! reads the CPU usage through the same type, whichever version the host runs.

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of creating, reading, writing or removing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot create cgroup directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove cgroup directory {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot hand {path} to uid {uid} gid {gid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
    #[error("no cgroup v1 hierarchy is mounted with the {0:?} controller")]
    NoHierarchy(String),
    #[error("no cgroup2 file system is mounted")]
    NoUnifiedMount,
    #[error("cgroup v2 controller {controller:?} cannot be enabled in {path} (it may be bound to a v1 hierarchy): {source}")]
    ControllerUnavailable {
        controller: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no directory of this cgroup ({dirs}) has the file {file:?}")]
    NoSuchFile { file: String, dirs: String },
    #[error("a cgroup needs at least one directory")]
    NoDirectories,
    #[error("cgroup directory {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot find this process's cgroup in /proc/self/cgroup and /proc/self/mountinfo")]
    NotFound,
    #[error("{path} holds {text:?}, not a number")]
    NotANumber { path: PathBuf, text: String },
    #[error("a CPU period of {0} us is outside the kernel's 1000..=1000000 us")]
    Period(u64),
}

type Result<T> = std::result::Result<T, CgroupError>;

/// Which cgroup interface a [`Cgroup`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One control group: its directory in each v1 hierarchy it spans, or its one v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    version: Version,
    dirs: Vec<PathBuf>,
}

/// The cgroup file systems of a mount table, by mount point.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mounts {
    /// v1 hierarchies: mount point, the cgroup path mounted there, and the controllers bound to it.
    pub v1: Vec<V1Mount>,
    /// The cgroup2 mount point and the cgroup path mounted there.
    pub v2: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Mount {
    pub mount_point: PathBuf,
    pub root: PathBuf,
    pub controllers: Vec<String>,
}

impl Mounts {
    /// The cgroup mounts listed in `/proc/<pid>/mountinfo` text.
    pub fn parse(mountinfo: &str) -> Self {
        let mut mounts = Mounts::default();
        for line in mountinfo.lines() {
            // id parent major:minor root mount-point options [optional...] - fstype source super
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(root), Some(mount_point), Some(fstype)) =
                (left.get(3), left.get(4), right.first())
            else {
                continue;
            };
            let (root, mount_point) = (PathBuf::from(root), PathBuf::from(mount_point));
            match *fstype {
                "cgroup2" => mounts.v2 = mounts.v2.or(Some((mount_point, root))),
                "cgroup" => {
                    let controllers = right
                        .get(2)
                        .unwrap_or(&"")
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(str::to_string)
                        .collect::<Vec<_>>();
                    if !controllers.is_empty() {
                        mounts.v1.push(V1Mount {
                            mount_point,
                            root,
                            controllers,
                        });
                    }
                }
                _ => {}
            }
        }
        mounts
    }

    /// This process's mount table.
    pub fn current() -> Result<Self> {
        Ok(Self::parse(&read("/proc/self/mountinfo")?))
    }

    /// The cgroup version a jail uses when it is not told: v1 where the v1 cpu hierarchy is
    /// mounted (the predictor's CPU quota lives there), else v2 where the unified hierarchy is.
    pub fn default_version(&self) -> u8 {
        if self.v1_hierarchy("cpu").is_err() && self.v2.is_some() {
            2
        } else {
            1
        }
    }

    /// The v1 hierarchy that `controller` is bound to.
    pub fn v1_hierarchy(&self, controller: &str) -> Result<&V1Mount> {
        self.v1
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == controller))
            .ok_or_else(|| CgroupError::NoHierarchy(controller.to_string()))
    }
}

fn read(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| CgroupError::NotANumber {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
    })
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// `dir/relative`, with `relative` taken as relative even if it starts with `/`.
fn under(dir: &Path, relative: &Path) -> PathBuf {
    dir.join(relative.strip_prefix("/").unwrap_or(relative))
}

/// Files a delegated owner writes: membership on both versions, the CPU quota the predictor sets,
/// and (v2) the subtree it may divide further.
const DELEGATED_FILES: [&str; 7] = [
    "cgroup.procs",
    "tasks",
    "cgroup.threads",
    "cgroup.subtree_control",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
    "cpu.max",
];

impl Cgroup {
    /// The cgroup made of `dirs`: one v2 directory (it has `cgroup.controllers`), or v1
    /// directories, one per hierarchy.
    pub fn open(dirs: Vec<PathBuf>) -> Result<Self> {
        if dirs.is_empty() {
            return Err(CgroupError::NoDirectories);
        }
        if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
            return Err(CgroupError::Missing(missing.clone()));
        }
        let version = if dirs.len() == 1 && dirs[0].join("cgroup.controllers").exists() {
            Version::V2
        } else {
            Version::V1
        };
        Ok(Self { version, dirs })
    }

    /// The cgroup this process is in: its v1 cpu, cpuacct, memory and pids groups where v1
    /// hierarchies carry them, else its v2 group.
    pub fn current() -> Result<Self> {
        Self::current_from(&read("/proc/self/cgroup")?, &Mounts::current()?)
    }

    /// The cgroup that `/proc/<pid>/cgroup` text `membership` names, found in `mounts`.
    pub fn current_from(membership: &str, mounts: &Mounts) -> Result<Self> {
        let mut v1_dirs = Vec::new();
        let mut v2_path = None;
        for line in membership.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if controllers.is_empty() {
                v2_path = Some(PathBuf::from(path));
                continue;
            }
            let wanted = controllers
                .split(',')
                .any(|c| ["cpu", "cpuacct", "memory", "pids"].contains(&c));
            let mount = mounts.v1.iter().find(|m| {
                m.controllers.join(",") == controllers
                    || controllers
                        .split(',')
                        .all(|c| m.controllers.iter().any(|m| m == c))
            });
            if let (true, Some(mount)) = (wanted, mount) {
                let inside = Path::new(path)
                    .strip_prefix(&mount.root)
                    .unwrap_or(Path::new(path));
                let dir = under(&mount.mount_point, inside);
                if !v1_dirs.contains(&dir) {
                    v1_dirs.push(dir);
                }
            }
        }
        if !v1_dirs.is_empty() {
            return Ok(Self {
                version: Version::V1,
                dirs: v1_dirs,
            });
        }
        match (v2_path, &mounts.v2) {
            (Some(path), Some((mount_point, root))) => {
                let inside = path.strip_prefix(root).unwrap_or(&path);
                Ok(Self {
                    version: Version::V2,
                    dirs: vec![under(mount_point, inside)],
                })
            }
            _ => Err(CgroupError::NotFound),
        }
    }

    /// Creates `relative` in the v1 hierarchy of each of `controllers` (a hierarchy shared by
    /// several controllers gets one directory).
    pub fn create_v1(mounts: &Mounts, controllers: &[String], relative: &Path) -> Result<Self> {
        let mut dirs = Vec::new();
        for controller in controllers {
            let hierarchy = mounts.v1_hierarchy(controller)?;
            let dir = under(&hierarchy.mount_point, relative);
            if dirs.contains(&dir) {
                continue;
            }
            mkdir(&dir)?;
            if hierarchy.controllers.iter().any(|c| c == "cpuset") {
                inherit_cpuset(&hierarchy.mount_point, &dir)?;
            }
            dirs.push(dir);
        }
        if dirs.is_empty() {
            return Err(CgroupError::NoDirectories);
        }
        Ok(Self {
            version: Version::V1,
            dirs,
        })
    }

    /// Creates `relative` under the cgroup2 mount `mount_point`, with `controllers` enabled for
    /// it in each ancestor's `cgroup.subtree_control`.
    pub fn create_v2(mount_point: &Path, controllers: &[String], relative: &Path) -> Result<Self> {
        let leaf = under(mount_point, relative);
        let mut parent = mount_point.to_path_buf();
        for component in relative.strip_prefix("/").unwrap_or(relative).components() {
            for controller in controllers {
                let control = parent.join("cgroup.subtree_control");
                fs::write(&control, format!("+{controller}")).map_err(|source| {
                    CgroupError::ControllerUnavailable {
                        controller: controller.clone(),
                        path: control.clone(),
                        source,
                    }
                })?;
            }
            parent.push(component);
            mkdir(&parent)?;
        }
        debug_assert_eq!(parent, leaf);
        Ok(Self {
            version: Version::V2,
            dirs: vec![leaf],
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Its directories: one per v1 hierarchy, or the one v2 directory.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The path of interface file `file` in whichever directory has it.
    fn file(&self, file: &str) -> Result<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .ok_or_else(|| CgroupError::NoSuchFile {
                file: file.to_string(),
                dirs: self
                    .dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Writes `value` to interface file `file` (e.g. `memory.limit_in_bytes`, `pids.max`).
    pub fn set(&self, file: &str, value: &str) -> Result<()> {
        write(&self.file(file)?, value)
    }

    /// Reads interface file `file`.
    pub fn get(&self, file: &str) -> Result<String> {
        read(self.file(file)?)
    }

    /// Limits the group to `quota_us` of CPU time per `period_us` (no limit for `None`).
    pub fn set_cpu_quota(&self, quota_us: Option<u64>, period_us: u64) -> Result<()> {
        if !(1000..=1_000_000).contains(&period_us) {
            return Err(CgroupError::Period(period_us));
        }
        match self.version {
            Version::V1 => {
                // Unlimited first: a new period with the old quota could exceed the parent's
                // ratio and be refused.
                let quota = self.file("cpu.cfs_quota_us")?;
                write(&quota, "-1")?;
                self.set("cpu.cfs_period_us", &period_us.to_string())?;
                if let Some(q) = quota_us {
                    write(&quota, &q.to_string())?;
                }
                Ok(())
            }
            Version::V2 => {
                let quota = quota_us.map_or_else(|| "max".to_string(), |q| q.to_string());
                self.set("cpu.max", &format!("{quota} {period_us}"))
            }
        }
    }

    /// The CPU time the group's tasks have used.
    pub fn cpu_usage(&self) -> Result<Duration> {
        match self.version {
            Version::V1 => Ok(Duration::from_nanos(read_u64(
                &self.file("cpuacct.usage")?,
            )?)),
            Version::V2 => {
                let path = self.file("cpu.stat")?;
                let text = read(&path)?;
                let usec = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or(CgroupError::NotANumber { path, text })?;
                Ok(Duration::from_micros(usec))
            }
        }
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Hands the group to `uid`/`gid`: its directory, membership files and CPU quota files, so
    /// that a VMM running as them can set its own quota and manage its threads.
    pub fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        let own = |path: &Path| {
            chown(path, Some(uid), Some(gid)).map_err(|source| CgroupError::Chown {
                path: path.to_path_buf(),
                uid,
                gid,
                source,
            })
        };
        for dir in &self.dirs {
            own(dir)?;
            for file in DELEGATED_FILES {
                let path = dir.join(file);
                if path.exists() {
                    own(&path)?;
                }
            }
        }
        Ok(())
    }

    /// Removes the group's directories; the kernel refuses (EBUSY) while a task is in one.
    pub fn remove(&self) -> Result<()> {
        for dir in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// A new v1 cpuset group has no CPUs or memory nodes, and refuses tasks until it has; it starts
/// with the nearest ancestor's.
fn inherit_cpuset(mount_point: &Path, dir: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mut chain = Vec::new();
        let mut at = dir.to_path_buf();
        while at.starts_with(mount_point) && read(at.join(file))?.trim().is_empty() {
            chain.push(at.clone());
            if !at.pop() {
                break;
            }
        }
        let value = read(at.join(file))?;
        for path in chain.iter().rev() {
            write(&path.join(file), value.trim())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop.
    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("jailer-cgroup-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /ctr /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_gives_v1_hierarchies_and_the_unified_mount() {
        let m = Mounts::parse(MOUNTINFO);
        assert_eq!(
            m.v1.len(),
            2,
            "named hierarchies carry no controller: {m:?}"
        );
        assert_eq!(
            m.v1_hierarchy("cpuacct").unwrap().mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(matches!(
            m.v1_hierarchy("pids"),
            Err(CgroupError::NoHierarchy(c)) if c == "pids"
        ));
        assert_eq!(
            m.v2,
            Some((PathBuf::from("/sys/fs/cgroup/unified"), PathBuf::from("/")))
        );
    }

    #[test]
    fn a_jail_not_told_uses_v1_beside_it_and_v2_alone() {
        // A hybrid host (v1 controllers, cgroup2 for systemd) and a cgroup2-only one, as most
        // hosts are: Kata Containers names no version.
        assert_eq!(Mounts::parse(MOUNTINFO).default_version(), 1);
        let v2_only = "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(Mounts::parse(v2_only).default_version(), 2);
    }

    #[test]
    fn membership_maps_to_directories_of_either_version() {
        let m = Mounts::parse(MOUNTINFO);
        let v1 = Cgroup::current_from(
            "9:name=systemd:/x\n4:memory:/ctr/vm\n1:cpu,cpuacct:/vm\n0::/\n",
            &m,
        )
        .unwrap();
        assert_eq!(v1.version(), Version::V1);
        assert_eq!(
            v1.dirs(),
            [
                PathBuf::from("/sys/fs/cgroup/memory/vm"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/vm")
            ]
        );
        let v2_only = Mounts::parse("41 23 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let v2 = Cgroup::current_from("0::/user.slice/vm\n", &v2_only).unwrap();
        assert_eq!(v2.version(), Version::V2);
        assert_eq!(v2.dirs(), [PathBuf::from("/sys/fs/cgroup/user.slice/vm")]);
        assert!(matches!(
            Cgroup::current_from("0::/vm\n", &Mounts::default()),
            Err(CgroupError::NotFound)
        ));
    }

    /// A directory laid out like a v1 cpu,cpuacct group.
    fn fake_v1(t: &Temp) -> Cgroup {
        let dir = t.0.join("cpu,cpuacct/vm");
        fs::create_dir_all(&dir).unwrap();
        for (f, v) in [
            ("cpu.cfs_quota_us", "-1"),
            ("cpu.cfs_period_us", "100000"),
            ("cpuacct.usage", "2500000000\n"),
            ("cgroup.procs", ""),
        ] {
            fs::write(dir.join(f), v).unwrap();
        }
        Cgroup::open(vec![dir]).unwrap()
    }

    #[test]
    fn v1_quota_usage_and_files_by_name() {
        let t = Temp::new("v1");
        let cg = fake_v1(&t);
        assert_eq!(cg.version(), Version::V1);
        cg.set_cpu_quota(Some(50_000), 200_000).unwrap();
        assert_eq!(cg.get("cpu.cfs_quota_us").unwrap(), "50000");
        assert_eq!(cg.get("cpu.cfs_period_us").unwrap(), "200000");
        cg.set_cpu_quota(None, 100_000).unwrap();
        assert_eq!(cg.get("cpu.cfs_quota_us").unwrap(), "-1");
        assert_eq!(cg.cpu_usage().unwrap(), Duration::from_millis(2500));
        assert!(matches!(
            cg.set("memory.limit_in_bytes", "1"),
            Err(CgroupError::NoSuchFile { file, .. }) if file == "memory.limit_in_bytes"
        ));
        assert!(matches!(
            cg.set_cpu_quota(Some(1), 10),
            Err(CgroupError::Period(10))
        ));
    }

    #[test]
    fn v2_quota_and_usage_use_the_unified_files() {
        let t = Temp::new("v2");
        let dir = t.0.join("vm");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.controllers"), "cpu memory").unwrap();
        fs::write(dir.join("cpu.max"), "max 100000").unwrap();
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
        )
        .unwrap();
        let cg = Cgroup::open(vec![dir.clone()]).unwrap();
        assert_eq!(cg.version(), Version::V2);
        cg.set_cpu_quota(Some(25_000), 50_000).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "25000 50000"
        );
        cg.set_cpu_quota(None, 100_000).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert_eq!(cg.cpu_usage().unwrap(), Duration::from_micros(1234));
        fs::write(dir.join("cpu.stat"), "user_usec 1\n").unwrap();
        assert!(matches!(
            cg.cpu_usage(),
            Err(CgroupError::NotANumber { .. })
        ));
    }

    #[test]
    fn open_checks_its_directories() {
        assert!(matches!(
            Cgroup::open(vec![]),
            Err(CgroupError::NoDirectories)
        ));
        assert!(matches!(
            Cgroup::open(vec![PathBuf::from("/nonexistent/cg")]),
            Err(CgroupError::Missing(_))
        ));
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Moves a waiting child into `cg` and checks it is listed there; the child ends when its
    /// stdin closes.
    fn holds_a_process(cg: &Cgroup) -> std::process::Child {
        let child = std::process::Command::new("sh")
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        cg.add_process(child.id()).unwrap();
        assert!(cg
            .get("cgroup.procs")
            .unwrap()
            .contains(&child.id().to_string()));
        child
    }

    /// The real v1 hierarchies of this host: a group with a quota, this thread's usage and
    /// removal once empty.
    #[test]
    fn real_v1_group_limits_and_accounts_a_process() {
        assert!(is_root(), "cgroup tests need root (CI runs as root)");
        let mounts = Mounts::current().unwrap();
        // cpuset too: a new cpuset group refuses tasks until it has CPUs and memory nodes.
        let controllers: Vec<String> = ["cpu", "cpuacct", "pids", "cpuset"]
            .map(String::from)
            .into();
        let rel = PathBuf::from(format!("prescient-test/v1-{}", std::process::id()));
        let cg = Cgroup::create_v1(&mounts, &controllers, &rel).unwrap();
        cg.set_cpu_quota(Some(20_000), 100_000).unwrap();
        assert_eq!(cg.get("cpu.cfs_quota_us").unwrap().trim(), "20000");
        cg.set("pids.max", "64").unwrap();
        assert_eq!(cg.get("pids.max").unwrap().trim(), "64");
        assert!(!cg.get("cpuset.cpus").unwrap().trim().is_empty());
        let mut child = holds_a_process(&cg);
        assert!(
            matches!(cg.remove(), Err(CgroupError::Remove { source, .. }) if source.raw_os_error() == Some(libc::EBUSY)),
            "a group with a task cannot go"
        );
        drop(child.stdin.take());
        child.wait().unwrap();
        cg.remove().unwrap();
        assert!(cg.dirs().iter().all(|d| !d.exists()));
        for h in &controllers {
            let _ = fs::remove_dir(under(
                &mounts.v1_hierarchy(h).unwrap().mount_point,
                Path::new("prescient-test"),
            ));
        }
    }

    /// The v2 path against a cgroup2 mount of our own. On this host every controller but
    /// hugetlb (and the v1-only net_cls/net_prio/perf_event) is bound to a v1 hierarchy, so v2
    /// cannot enable cpu or memory: the test enables what v2 can have here (hugetlb), checks
    /// that asking for cpu fails with a clear error, and uses the files every v2 group has
    /// (cgroup.procs, cpu.stat).
    #[test]
    fn real_v2_group_on_a_cgroup2_mount_of_our_own() {
        assert!(is_root(), "cgroup tests need root (CI runs as root)");
        let t = Temp::new("v2-mount");
        let mnt = t.0.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t cgroup2 failed");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        let available = fs::read_to_string(mnt.join("cgroup.controllers")).unwrap();
        let rel = PathBuf::from(format!("prescient-test-{}/vm", std::process::id()));
        let wanted: Vec<String> = available.split_whitespace().map(String::from).collect();
        let cg = Cgroup::create_v2(&mnt, &wanted, &rel).unwrap();
        assert_eq!(cg.version(), Version::V2);
        let enabled = fs::read_to_string(cg.dirs()[0].join("cgroup.controllers")).unwrap();
        for c in &wanted {
            assert!(enabled.contains(c.as_str()), "{c} not enabled: {enabled}");
        }
        if !available.split_whitespace().any(|c| c == "cpu") {
            let err = Cgroup::create_v2(&mnt, &["cpu".to_string()], &rel).unwrap_err();
            assert!(
                matches!(&err, CgroupError::ControllerUnavailable { controller, .. } if controller == "cpu"),
                "{err}"
            );
            assert!(matches!(
                cg.set_cpu_quota(Some(10_000), 100_000),
                Err(CgroupError::NoSuchFile { .. })
            ));
        }
        let mut child = holds_a_process(&cg);
        let reopened = Cgroup::open(cg.dirs().to_vec()).unwrap();
        assert_eq!(reopened.version(), Version::V2);
        reopened.cpu_usage().unwrap();
        drop(child.stdin.take());
        child.wait().unwrap();
        cg.remove().unwrap();
        fs::remove_dir(mnt.join(format!("prescient-test-{}", std::process::id()))).unwrap();
    }
}
