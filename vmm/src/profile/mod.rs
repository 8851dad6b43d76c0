//! Workload profiles: what a workload needs and does, learned before it runs for real
//! (`prescient profile`), and the checks that decide whether a launch may trust one
//! (`prescient --profile`).
//!
//! A profile is JSON with a `version`, the workload's `fingerprint` (SHA-256 over the kernel,
//! initrd and guest executable), each input's path, size and mtime, the probe's measurements
//! and the static analysis. Parsing is strict: unknown or missing fields are errors naming the
//! field.

pub mod elf;
pub mod launch;
pub mod probe;
pub mod scrape;
pub mod sizing;
pub mod store;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vmm_config::VmConfig;
pub use elf::ElfSummary;

/// The profile format this build writes and reads.
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid profile {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(
        "profile {path} has version {found}; this prescient reads version {VERSION} (profile the workload again)"
    )]
    Version { path: PathBuf, found: u64 },
    #[error(
        "profile {path} is for another workload: its fingerprint {profile} (kernel {kernel}) does not match the spec's {spec}"
    )]
    Mismatch {
        path: PathBuf,
        profile: String,
        kernel: String,
        spec: String,
    },
    #[error("the spec names no boot-source.kernel_image_path to profile")]
    NoKernel,
}

/// A p50/p95 pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (zeros when there are none).
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: at(0.5),
            p95: at(0.95),
        }
    }
}

/// Guest memory the workload used, MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFootprint {
    pub peak_mib: f64,
    /// The median over the probe's windows after the first touch of memory.
    pub working_set_mib: f64,
}

/// I/O of one device during the probe, over the periods it transferred anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoIntensity {
    /// `block` (the probe has no network).
    pub kind: String,
    /// The drive's id.
    pub device: String,
    /// `metrics`: the drive's own counters; `trace`: the probe ended before two scrapes, so
    /// the trace's block total split evenly over the drives, and ops of every device.
    pub source: String,
    pub mib_per_s: Percentiles,
    /// Requests per second.
    pub ops_per_s: Percentiles,
}

/// One input file, as it was when profiled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    /// `kernel`, `initrd` or `exec`.
    pub role: String,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u64,
    pub sha256: String,
}

/// Something in the workload that deserves a stricter start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityFlag {
    /// `unknown_port_or_mmio`, `raw_sockets`, `ptrace`, `writable_executable`, `sensitive_syscall`.
    pub flag: String,
    pub detail: String,
}

/// How the probe ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeInfo {
    pub duration_s: f64,
    pub windows: u64,
    pub window_ms: u64,
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    /// How the probe VM ended: `guest exited (code N)` or `stopped after S s`.
    pub ended: String,
}

/// Static analysis of the inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticAnalysis {
    pub kernel: ElfSummary,
    pub exec: Option<ElfSummary>,
}

/// The behaviour profile `prescient profile` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    pub fingerprint: String,
    pub kernel_sha256: String,
    pub inputs: Vec<InputFile>,
    pub probe: ProbeInfo,
    /// vCPU-seconds per second the vCPU threads wanted (on a CPU or runnable on a run queue,
    /// sampled every 100 ms).
    pub cpu_demand: Percentiles,
    /// vCPU-seconds per second they got (the trace's CPU time per window).
    pub cpu_used: Percentiles,
    pub memory_footprint: MemoryFootprint,
    pub io_intensity: Vec<IoIntensity>,
    pub security_flags: Vec<SecurityFlag>,
    pub dependency_list: Vec<String>,
    #[serde(rename = "static")]
    pub static_analysis: StaticAnalysis,
}

/// Whether a launch may use a profile.
#[derive(Debug)]
pub enum Verdict {
    Trusted(Box<Profile>),
    /// The inputs changed since profiling: the reason, for a warning.
    Stale(String),
}

/// The workload's files the fingerprint covers: the spec's kernel and initrd, and the guest
/// executable `exec` if one was named at profiling time.
pub fn input_paths(
    config: &VmConfig,
    exec: Option<&Path>,
) -> Result<Vec<(&'static str, PathBuf)>, ProfileError> {
    let boot = config.boot_source.as_ref().ok_or(ProfileError::NoKernel)?;
    let mut paths = vec![("kernel", boot.kernel_image_path.clone())];
    if let Some(i) = &boot.initrd_path {
        paths.push(("initrd", i.clone()));
    }
    if let Some(e) = exec {
        paths.push(("exec", e.to_path_buf()));
    }
    Ok(paths)
}

/// Hashes and stats each input.
pub fn describe_inputs(paths: &[(&'static str, PathBuf)]) -> Result<Vec<InputFile>, ProfileError> {
    paths
        .iter()
        .map(|(role, path)| {
            let read = |source| ProfileError::Read {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::File::open(path).map_err(read)?;
            let meta = file.metadata().map_err(read)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file.read(&mut buf).map_err(read)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            Ok(InputFile {
                role: role.to_string(),
                path: path.clone(),
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
                sha256: hex(&hasher.finalize()),
            })
        })
        .collect()
}

fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The workload's fingerprint: SHA-256 over each input's role and content hash, so that the
/// same files under other paths fingerprint the same.
pub fn fingerprint(inputs: &[InputFile]) -> String {
    let mut h = Sha256::new();
    for i in inputs {
        h.update(i.role.as_bytes());
        h.update(b"\0");
        h.update(i.sha256.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

impl Profile {
    /// Parses a profile strictly: the error names the field that is missing, unknown or wrong.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ProfileError> {
        let invalid = |field: String, message: String| ProfileError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        // The version first, so that another version's layout is reported as such.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid("(document)".into(), e.to_string()))?;
        match value.get("version").map(|v| v.as_u64()) {
            None => return Err(invalid("version".into(), "missing field".into())),
            Some(None) => return Err(invalid("version".into(), "must be an integer".into())),
            Some(Some(v)) if v != u64::from(VERSION) => {
                return Err(ProfileError::Version {
                    path: path.to_path_buf(),
                    found: v,
                })
            }
            Some(Some(_)) => {}
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            invalid(field, e.into_inner().to_string())
        })
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The executable named at profiling time, if any.
    pub fn exec_path(&self) -> Option<&Path> {
        self.inputs
            .iter()
            .find(|i| i.role == "exec")
            .map(|i| i.path.as_path())
    }

    /// Checks the profile against the workload `config` will boot: the same content is trusted
    /// (even moved); changed files under the profiled paths make it stale; other files are
    /// another workload, refused.
    pub fn check(self, path: &Path, config: &VmConfig) -> Result<Verdict, ProfileError> {
        let paths = input_paths(config, self.exec_path())?;
        let now = describe_inputs(&paths)?;
        if fingerprint(&now) == self.fingerprint {
            return Ok(Verdict::Trusted(Box::new(self)));
        }
        let same_paths = now.len() == self.inputs.len()
            && now
                .iter()
                .zip(&self.inputs)
                .all(|(a, b)| a.role == b.role && a.path == b.path);
        if !same_paths {
            return Err(ProfileError::Mismatch {
                path: path.to_path_buf(),
                profile: self.fingerprint,
                kernel: self.kernel_sha256,
                spec: fingerprint(&now),
            });
        }
        let changed: Vec<String> = now
            .iter()
            .zip(&self.inputs)
            .filter(|(a, b)| a.sha256 != b.sha256)
            .map(|(a, b)| {
                format!(
                    "{} {} changed (size {} -> {}, mtime {} -> {})",
                    a.role,
                    a.path.display(),
                    b.size,
                    a.size,
                    b.mtime_ns,
                    a.mtime_ns
                )
            })
            .collect();
        Ok(Verdict::Stale(format!(
            "profile {} is stale, ignored: {}",
            path.display(),
            changed.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            Percentiles::of(&v),
            Percentiles {
                p50: 50.0,
                p95: 95.0
            }
        );
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
        assert_eq!(Percentiles::of(&[3.0]).p95, 3.0);
    }

    #[test]
    fn fingerprint_follows_content_not_paths() {
        let dir = std::env::temp_dir().join(format!("prescient-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        std::fs::write(&a, b"kernel").unwrap();
        std::fs::write(&b, b"kernel").unwrap();
        std::fs::write(&c, b"other").unwrap();
        let fp = |p: &PathBuf| fingerprint(&describe_inputs(&[("kernel", p.clone())]).unwrap());
        assert_eq!(fp(&a), fp(&b));
        assert_ne!(fp(&a), fp(&c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parse_names_the_bad_field_and_the_version() {
        let p = Path::new("p.json");
        let e = Profile::parse(p, r#"{"fingerprint":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("version: missing field"), "{e}");
        let e = Profile::parse(p, r#"{"version":7}"#).unwrap_err();
        assert!(e.to_string().contains("has version 7"), "{e}");
        let e = Profile::parse(p, r#"{"version":1,"fingerprint":"x"}"#).unwrap_err();
        assert!(
            e.to_string().contains("missing field `kernel_sha256`"),
            "{e}"
        );
    }
}
