//! The CPU actuator: the quota the predictor gives the VM, through the project's cgroup API
//! (`jailer::cgroup`). The group is the VM's cgroup the jailer handed over (`--cgroup-dir`; the
//! whole VMM runs in it), or, without a jailer, one the VMM makes at `prescient/<id>`: on
//! cgroup v1 for the vCPU threads alone, on v2 for the process (v2 splits a process's threads
//! only in threaded subtrees). The quota file is opened once: from the `steady` seccomp stage
//! on, the VMM thread may not open files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use jailer::cgroup::{Cgroup, CgroupError, Mounts, Version};
use predictor::resource::Resource;

use super::{Actuator, ActuatorError, Context, Knob, Target};

/// CFS period the quota is a share of.
pub const PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas under 1 ms.
const MIN_QUOTA_US: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the CPU quota: {0}")]
    Write(std::io::Error),
}

/// Where the quota goes, and how it is written.
pub struct CpuQuota {
    cgroup: Cgroup,
    file: File,
    /// Made by this VMM (removed when dropped), not handed over by the jailer.
    owned: bool,
}

/// The quota file's text for `quota_us`.
fn quota_text(version: Version, quota_us: u64) -> String {
    match version {
        Version::V1 => quota_us.to_string(),
        Version::V2 => format!("{quota_us} {PERIOD_US}"),
    }
}

/// Microseconds per period for `cores`.
pub fn quota_us(cores: f64) -> u64 {
    ((cores * PERIOD_US as f64).round() as u64).max(MIN_QUOTA_US)
}

impl CpuQuota {
    /// Uses `cgroup` (the jailer's) as it is.
    pub fn given(cgroup: Cgroup) -> Result<Self, QuotaError> {
        Self::open(cgroup, false)
    }

    /// Makes `prescient/<id>` under the host's CPU controller and moves the vCPU threads
    /// `tids` (v1) or this process (v2) into it.
    pub fn create(id: &str, tids: &[libc::pid_t]) -> Result<Self, QuotaError> {
        let mounts = Mounts::current()?;
        let relative = Path::new("prescient").join(id);
        let cpu = ["cpu".to_string()];
        let cgroup = match mounts.v1_hierarchy("cpu") {
            Ok(_) => {
                let cg = Cgroup::create_v1(&mounts, &cpu, &relative)?;
                for tid in tids {
                    cg.set("tasks", &tid.to_string())?;
                }
                cg
            }
            Err(no_v1) => {
                let (mount_point, _) = mounts.v2.as_ref().ok_or(no_v1)?;
                let cg = Cgroup::create_v2(mount_point, &cpu, &relative)?;
                cg.add_process(std::process::id())?;
                cg
            }
        };
        Self::open(cgroup, true)
    }

    fn open(cgroup: Cgroup, owned: bool) -> Result<Self, QuotaError> {
        cgroup.set_cpu_quota(None, PERIOD_US)?;
        let name = match cgroup.version() {
            Version::V1 => "cpu.cfs_quota_us",
            Version::V2 => "cpu.max",
        };
        let path = cgroup
            .dirs()
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.exists())
            .ok_or_else(|| QuotaError::Open {
                path: name.to_string(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| QuotaError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            cgroup,
            file,
            owned,
        })
    }

    /// What `GET /predictor` says about it.
    pub fn describe(&self) -> String {
        let dirs: Vec<String> = self
            .cgroup
            .dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        format!(
            "cgroup {:?} {} ({})",
            self.cgroup.version(),
            dirs.join(", "),
            if self.owned {
                "made by the VMM"
            } else {
                "the jailer's"
            }
        )
    }

    /// A reader of how often the group runs out of its quota (`cpu.stat`, opened now: from
    /// the `steady` stage on the VMM thread may not open files). None where the group has no
    /// `cpu.stat`.
    pub fn throttling(&self) -> Option<Throttling> {
        let file = self
            .cgroup
            .dirs()
            .iter()
            .find_map(|d| File::open(d.join("cpu.stat")).ok())?;
        let mut t = Throttling { file, last: None };
        t.last = t.read();
        Some(t)
    }

    /// Limits the group to `cores` CPUs' worth of time per period; returns the quota in us.
    pub fn set_cores(&self, cores: f64) -> Result<u64, QuotaError> {
        let quota = quota_us(cores);
        let text = quota_text(self.cgroup.version(), quota);
        self.file
            .write_at(text.as_bytes(), 0)
            .map_err(QuotaError::Write)?;
        Ok(quota)
    }
}

/// The CFS periods in which a group ran out of its quota (`nr_throttled` in `cpu.stat`, the
/// same line on cgroup v1 and v2).
pub struct Throttling {
    file: File,
    last: Option<u64>,
}

impl Throttling {
    /// Periods the group was throttled in since the previous call (0 when unreadable).
    pub fn since_last(&mut self) -> u64 {
        let now = self.read();
        let delta = match (self.last, now) {
            (Some(before), Some(now)) => now.saturating_sub(before),
            _ => 0,
        };
        self.last = now.or(self.last);
        delta
    }

    fn read(&self) -> Option<u64> {
        // cpu.stat is a few hundred bytes; read into the stack, once per window.
        let mut buf = [0u8; 1024];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        nr_throttled(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

/// `nr_throttled` of a `cpu.stat` text.
fn nr_throttled(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))?
        .trim()
        .parse()
        .ok()
}

impl Actuator for CpuQuota {
    fn knob(&self) -> Knob {
        Knob::Resource(Resource::Cpu)
    }

    fn describe(&self) -> String {
        CpuQuota::describe(self)
    }

    fn apply(&mut self, target: Target, _ctx: &mut Context) -> Result<String, ActuatorError> {
        let Target::Allocation(Resource::Cpu, cores) = target else {
            return Err(ActuatorError::WrongTarget {
                knob: "cpu",
                target,
            });
        };
        let us = self
            .set_cores(cores)
            .map_err(|e| ActuatorError::Refused(e.to_string()))?;
        Ok(format!("cpu quota {us} us per 100 ms ({cores:.2} cores)"))
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Empty once the vCPU threads are gone (v1); a v2 group still holds this process and
        // stays, like the jailer's, for the caller to remove.
        if self.owned {
            if let Err(e) = self.cgroup.remove() {
                tracing::info!("the predictor's cgroup stays: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("prescient-quota-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn throttled_periods_are_counted_per_window_from_the_open_file() {
        let d = dir("stat");
        std::fs::write(d.join("cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(d.join("cpu.cfs_period_us"), "100000").unwrap();
        let stat = |n: u64| format!("nr_periods 900\nnr_throttled {n}\nthrottled_time 12345\n");
        std::fs::write(d.join("cpu.stat"), stat(40)).unwrap();
        let q = CpuQuota::given(Cgroup::open(vec![d.clone()]).unwrap()).unwrap();
        let mut t = q.throttling().expect("cpu.stat");
        assert_eq!(t.since_last(), 0);
        std::fs::write(d.join("cpu.stat"), stat(43)).unwrap();
        assert_eq!(t.since_last(), 3);
        assert_eq!(t.since_last(), 0);
        // v2's layout, and a file that stops making sense, which counts nothing.
        assert_eq!(
            nr_throttled("usage_usec 10\nnr_periods 5\nnr_throttled 2\nthrottled_usec 9\n"),
            Some(2)
        );
        std::fs::write(d.join("cpu.stat"), "garbage").unwrap();
        assert_eq!(t.since_last(), 0);
        std::fs::write(d.join("cpu.stat"), stat(50)).unwrap();
        assert_eq!(t.since_last(), 7);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn v1_quota_goes_through_the_open_file() {
        let d = dir("v1");
        std::fs::write(d.join("cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(d.join("cpu.cfs_period_us"), "100000").unwrap();
        let q = CpuQuota::given(Cgroup::open(vec![d.clone()]).unwrap()).unwrap();
        assert_eq!(q.set_cores(1.5).unwrap(), 150_000);
        // A regular file keeps longer earlier text; cgroupfs takes each write whole.
        assert!(std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
            .unwrap()
            .starts_with("150000"));
        assert_eq!(q.set_cores(0.0001).unwrap(), MIN_QUOTA_US);
        assert!(q.describe().contains("the jailer's"));
        drop(q);
        assert!(d.exists(), "a handed-over group is not removed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn v2_writes_quota_and_period() {
        let d = dir("v2");
        std::fs::write(d.join("cgroup.controllers"), "cpu").unwrap();
        std::fs::write(d.join("cpu.max"), "max 100000").unwrap();
        let q = CpuQuota::given(Cgroup::open(vec![d.clone()]).unwrap()).unwrap();
        q.set_cores(0.25).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_group_without_quota_files_is_refused() {
        let d = dir("none");
        assert!(CpuQuota::given(Cgroup::open(vec![d.clone()]).unwrap()).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
