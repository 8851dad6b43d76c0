//! CPU quota of the vCPU threads through a cgroup the VMM makes: v1 `cpu.cfs_quota_us` or v2
//! `cpu.max`, whichever controls CPU on this host. (The jailer issue will hand the VMM its
//! cgroup; until then the VMM creates one under `prescient/<id>`.)

use std::path::{Path, PathBuf};

/// CFS period the quota is a share of.
const PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup cpu controller under {0} (neither v2 cgroup.controllers with cpu nor v1 cpu/cpu.cfs_quota_us)")]
    NoCpuController(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// The vCPU threads' cgroup.
#[derive(Debug)]
pub struct CpuQuota {
    dir: PathBuf,
    version: Version,
    created: bool,
}

fn write(path: PathBuf, value: &str) -> Result<(), CgroupError> {
    std::fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })
}

/// Which cgroup version controls CPU under `root` (normally /sys/fs/cgroup), and where.
pub fn cpu_hierarchy(root: &Path) -> Result<(Version, PathBuf), CgroupError> {
    let v2 = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if v2.split_whitespace().any(|c| c == "cpu") {
        return Ok((Version::V2, root.to_path_buf()));
    }
    let v1 = root.join("cpu");
    if v1.join("cpu.cfs_quota_us").exists() {
        return Ok((Version::V1, v1));
    }
    Err(CgroupError::NoCpuController(root.to_path_buf()))
}

impl CpuQuota {
    /// Makes (or takes) `dir`, or `<cpu hierarchy>/prescient/<id>` when none is given, and moves
    /// the vCPU threads `tids` into it.
    pub fn create(
        root: &Path,
        dir: Option<&Path>,
        id: &str,
        tids: &[i32],
    ) -> Result<Self, CgroupError> {
        let (version, hierarchy) = cpu_hierarchy(root)?;
        let dir = dir.map_or_else(|| hierarchy.join("prescient").join(id), Path::to_path_buf);
        let created = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
            path: dir.clone(),
            source,
        })?;
        let quota = CpuQuota {
            dir,
            version,
            created,
        };
        let threads_file = match version {
            Version::V1 => "tasks",
            Version::V2 => {
                // Threads of one process can only be split across a threaded subtree.
                write(quota.dir.join("cgroup.type"), "threaded")?;
                "cgroup.threads"
            }
        };
        for tid in tids {
            write(quota.dir.join(threads_file), &tid.to_string())?;
        }
        Ok(quota)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Limits the threads to `cores` CPUs' worth of time per period; returns the quota in us.
    pub fn set_cores(&self, cores: f64) -> Result<u64, CgroupError> {
        // The kernel refuses quotas under 1 ms.
        let quota = ((cores * PERIOD_US as f64).round() as u64).max(1000);
        match self.version {
            Version::V1 => {
                write(self.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(self.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            Version::V2 => write(self.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?,
        }
        Ok(quota)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Empty once the vCPU threads are gone; a cgroup someone else made stays.
        if self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("prescient-cgroup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn v1_writes_period_quota_and_tasks() {
        let root = fake_root("v1");
        std::fs::create_dir_all(root.join("cpu")).unwrap();
        std::fs::write(root.join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        let q = CpuQuota::create(&root, None, "vm1", &[]).unwrap();
        assert_eq!(q.version(), Version::V1);
        assert_eq!(q.dir(), root.join("cpu/prescient/vm1"));
        assert_eq!(q.set_cores(1.5).unwrap(), 150_000);
        let read = |f: &str| std::fs::read_to_string(q.dir().join(f)).unwrap();
        assert_eq!(read("cpu.cfs_quota_us"), "150000");
        assert_eq!(read("cpu.cfs_period_us"), "100000");
        assert_eq!(q.set_cores(0.001).unwrap(), 1000);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_marks_the_group_threaded_and_writes_cpu_max() {
        let root = fake_root("v2");
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory").unwrap();
        let dir = root.join("mine");
        let q = CpuQuota::create(&root, Some(&dir), "ignored", &[]).unwrap();
        assert_eq!(q.version(), Version::V2);
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.type")).unwrap(),
            "threaded"
        );
        q.set_cores(0.25).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_root_without_a_cpu_controller_is_refused() {
        let root = fake_root("none");
        assert!(matches!(
            CpuQuota::create(&root, None, "x", &[]),
            Err(CgroupError::NoCpuController(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
