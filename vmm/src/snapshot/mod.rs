//! Snapshots with Firecracker's API and semantics: `PUT /snapshot/create` writes a paused VM's
//! state file and memory file; `PUT /snapshot/load` makes a fresh VMM run that VM again
//! (`builder::restore_microvm`). The state file holds the VM's configuration, every vCPU's and
//! device's state; guest memory has its own file (`memory.rs`).
//!
//! Files are written whole to a temporary name beside the target and renamed into place: a
//! failed create leaves what was there, and a VM whose memory is mapped from a memory file can
//! be snapshotted to that same path without its own memory changing under it. An existing file
//! at a path the request names is replaced, as Firecracker truncates and overwrites it.

pub mod cpu;
pub mod file;
pub mod memory;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use crate::microvm::{MicroVm, RunState};
use crate::vmm_config::VmConfig;
use crate::vstate::vcpu::{VcpuError, VcpuState};
use crate::vstate::vm::{VmError, VmState};
use cpu::{CpuMismatch, HostCpu};
use file::FileError;
use memory::{MemoryFileError, PageBitmap, RegionLayout, ZeroPages};

/// Errors of creating or loading a snapshot; each says what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "the microVM must be paused to create a snapshot (PATCH /vm {{\"state\": \"Paused\"}})"
    )]
    NotPaused,
    #[error("Diff snapshots need dirty page tracking or mincore; {0}")]
    Diff(String),
    #[error("cannot read the snapshot state file {path}: {source}")]
    ReadState {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    State { path: PathBuf, source: FileError },
    #[error("{path}: this snapshot cannot be restored on this host: {source}")]
    Cpu { path: PathBuf, source: CpuMismatch },
    #[error("{path}: the snapshot's configuration is invalid: {message}")]
    Config { path: PathBuf, message: String },
    #[error("cannot open the memory file {path}: {source}")]
    OpenMemory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    #[error(
        "this microVM can plug vCPUs (machine-config.max_vcpus {max} is above vcpu_count {boot}): \
         snapshots of a VM with vCPU hot-plug are not supported; boot it without max_vcpus to \
         snapshot it"
    )]
    Hotplug { boot: u8, max: u8 },
    #[error("cannot save the vCPUs: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("cannot save the VM: {0}")]
    Vm(#[from] VmError),
    #[error(
        "drive {drive} is a vhost-user drive: snapshots of a microVM with vhost-user devices are \
         not supported (as in Firecracker: the queues' state lives in the backend)"
    )]
    VhostUser { drive: String },
    #[error("cannot save device {name}: {message}")]
    Device { name: String, message: String },
    #[error(
        "the seccomp stage is {0}: this VMM may no longer create files, so it cannot write a \
         snapshot (snapshots are taken before PUT /seccomp tightens the filters)"
    )]
    Seccomp(crate::seccomp::Stage),
    #[error("{0}")]
    Unsupported(String),
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create`, Firecracker's `SnapshotCreateParams`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// `mem_backend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendType {
    File,
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: BackendType,
    pub backend_path: PathBuf,
}

/// `network_overrides` entries: a restored interface on another TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override`: the restored vsock device on another socket path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`, Firecracker's `SnapshotLoadParams`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default)]
    pub clock_realtime: bool,
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl LoadParams {
    /// The memory file, from whichever of Firecracker's two fields holds it.
    pub fn memory_path(&self) -> Result<&Path, SnapshotError> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => Err(SnapshotError::Unsupported(
                "mem_file_path and mem_backend are mutually exclusive; give one".into(),
            )),
            (None, None) => Err(SnapshotError::Unsupported(
                "one of mem_file_path or mem_backend is required".into(),
            )),
            (Some(p), None) => Ok(p),
            (None, Some(b)) if b.backend_type == BackendType::Uffd => {
                Err(SnapshotError::Unsupported(
                    "mem_backend.backend_type Uffd is not supported by prescient; use File".into(),
                ))
            }
            (None, Some(b)) => Ok(&b.backend_path),
        }
    }

    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages || self.enable_diff_snapshots
    }

    /// Refuses what prescient does not do, by name.
    pub fn check_supported(&self) -> Result<(), SnapshotError> {
        self.memory_path()?;
        if self.clock_realtime {
            return Err(SnapshotError::Unsupported(
                "clock_realtime is not supported by prescient: the guest clock resumes where it \
                 stopped"
                    .into(),
            ));
        }
        match self.huge_pages.as_deref() {
            None | Some("Snapshot") | Some("None") | Some("Transparent") => Ok(()),
            Some("2M") => Err(SnapshotError::Unsupported(
                "huge_pages 2M needs the Uffd memory backend, which prescient does not have".into(),
            )),
            Some(other) => Err(SnapshotError::Unsupported(format!(
                "huge_pages {other:?} is not one of Snapshot, None, Transparent, 2M"
            ))),
        }
    }

    /// `config` with the overrides applied.
    pub fn apply_overrides(&self, config: &mut VmConfig) -> Result<(), SnapshotError> {
        for o in &self.network_overrides {
            let iface = config
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| {
                    SnapshotError::Unsupported(format!(
                        "network_overrides: the snapshot has no interface {:?}",
                        o.iface_id
                    ))
                })?;
            iface.host_dev_name = o.host_dev_name.clone();
        }
        if let Some(o) = &self.vsock_override {
            let vsock = config.vsock.as_mut().ok_or_else(|| {
                SnapshotError::Unsupported(
                    "vsock_override: the snapshot has no vsock device".into(),
                )
            })?;
            vsock.uds_path = o.uds_path.clone();
        }
        Ok(())
    }
}

/// One device's saved state, by the name it was registered under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub name: String,
    pub state: Vec<u8>,
}

/// Everything in a snapshot state file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// The prescient version that wrote it (informational: the format version decides).
    pub prescient_version: String,
    pub host_cpu: HostCpu,
    /// The VM's configuration as `GET /vm/config` shows it (JSON: the spec's own format).
    pub config: String,
    /// Guest memory regions in the memory file, in guest address order.
    pub memory: Vec<RegionLayout>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<DeviceState>,
    /// The inline predictor's state (`autopilot::persist`, opaque here), if it ran.
    pub predictor: Option<Vec<u8>>,
}

impl SnapshotState {
    /// The configuration it was taken with.
    pub fn config(&self, path: &Path) -> Result<VmConfig, SnapshotError> {
        let config: VmConfig =
            serde_json::from_str(&self.config).map_err(|e| SnapshotError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        config
            .validate_for_restore()
            .map_err(|e| SnapshotError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(config)
    }
}

/// The format version of the state file at `path` (`--describe-snapshot`), read from its
/// header alone so that a file of another version is described rather than refused.
pub fn describe(path: &Path) -> Result<String, SnapshotError> {
    use std::io::Read;
    let read_error = |source| SnapshotError::ReadState {
        path: path.to_path_buf(),
        source,
    };
    let mut header = Vec::with_capacity(file::HEADER_LEN);
    File::open(path)
        .and_then(|f| f.take(file::HEADER_LEN as u64).read_to_end(&mut header))
        .map_err(read_error)?;
    let version = file::header_version(&header).map_err(|source| SnapshotError::State {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(file::version_name(version))
}

/// Reads and checks a state file: framing, version, checksum, content, host CPU.
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::ReadState {
        path: path.to_path_buf(),
        source,
    })?;
    let state: SnapshotState = file::decode(&bytes).map_err(|source| SnapshotError::State {
        path: path.to_path_buf(),
        source,
    })?;
    state
        .host_cpu
        .runs_on(&HostCpu::this_host())
        .map_err(|source| SnapshotError::Cpu {
            path: path.to_path_buf(),
            source,
        })?;
    if state.vcpus.is_empty() {
        return Err(SnapshotError::Config {
            path: path.to_path_buf(),
            message: "it holds no vCPU".into(),
        });
    }
    Ok(state)
}

/// A file written under a temporary name beside `path` and renamed over it once complete.
struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
}

impl AtomicFile {
    fn create(path: &Path) -> Result<Self, SnapshotError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.prescient-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|source| SnapshotError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            file,
        })
    }

    fn commit(self) -> Result<(), SnapshotError> {
        let err = |source| SnapshotError::Write {
            path: self.path.clone(),
            source,
        };
        self.file.sync_data().map_err(err)?;
        std::fs::rename(&self.tmp, &self.path).map_err(err)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Gone already when committed.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// What a create did, for the log and the benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct CreateReport {
    pub memory_bytes_written: u64,
    pub elapsed: Duration,
}

/// Writes a snapshot of the paused `vm`, whose configuration is `config`, with the inline
/// predictor's state `predictor`.
pub fn create(
    vm: &mut MicroVm,
    config: &VmConfig,
    predictor: Option<Vec<u8>>,
    params: &CreateParams,
) -> Result<CreateReport, SnapshotError> {
    let start = Instant::now();
    // The hot-plug side (the spawner, vCPUs without threads, the controller's pending events)
    // is not saved; refused before anything is written.
    let machine = &config.machine_config;
    if machine.max_vcpus() > machine.vcpu_count {
        return Err(SnapshotError::Hotplug {
            boot: machine.vcpu_count,
            max: machine.max_vcpus(),
        });
    }
    if let Some(d) = config.drives.iter().find(|d| d.socket.is_some()) {
        return Err(SnapshotError::VhostUser {
            drive: d.drive_id.clone(),
        });
    }
    if vm.state() != RunState::Paused {
        return Err(SnapshotError::NotPaused);
    }
    let stage = crate::seccomp::requested_stage();
    if stage > crate::seccomp::Stage::Boot {
        return Err(SnapshotError::Seccomp(stage));
    }
    // Devices first: one finishing its requests (a drive's io_uring) may raise an interrupt,
    // which must reach the LAPIC before the vCPUs' state is read.
    let devices = vm
        .save_devices()
        .map_err(|(name, message)| SnapshotError::Device { name, message })?
        .into_iter()
        .map(|(name, state)| DeviceState { name, state })
        .collect();
    let vcpus = vm.save_vcpus()?;
    let vm_state = vm.kvm_vm().save_state()?;
    // Read (and clear) the dirty log for either kind: the next Diff holds what changed since.
    let dirty = if vm.kvm_vm().logs_dirty_pages() {
        Some(vm.dirty_pages()?)
    } else {
        None
    };
    let mem = vm.guest_memory();
    let mem_path = params.mem_file_path.display().to_string();
    let bitmaps: Vec<PageBitmap> = match (params.snapshot_type, dirty) {
        (SnapshotType::Full, _) => {
            let swap = memory::host_swaps();
            mem.iter()
                .map(|r| memory::populated_pages(r, swap))
                .collect::<std::io::Result<_>>()
                .map_err(|source| MemoryFileError::Read {
                    path: "guest memory (mincore)".into(),
                    source,
                })?
        }
        (SnapshotType::Diff, Some(dirty)) => dirty,
        // Without dirty page tracking, as Firecracker: the pages in host memory (mincore), and
        // those the idle trim gave back since the last snapshot (zero now, not in host memory,
        // perhaps data in the base).
        (SnapshotType::Diff, None) => {
            let mut bitmaps: Vec<PageBitmap> = mem
                .iter()
                .map(|r| memory::populated_pages(r, false))
                .collect::<std::io::Result<_>>()
                .map_err(|source| MemoryFileError::Read {
                    path: "guest memory (mincore)".into(),
                    source,
                })?;
            for (bitmap, trimmed) in bitmaps.iter_mut().zip(vm.trimmed_pages()) {
                bitmap.iter_mut().zip(trimmed).for_each(|(b, t)| *b |= t);
            }
            bitmaps
        }
    };
    let mem_file = AtomicFile::create(&params.mem_file_path)?;
    let zero = match params.snapshot_type {
        SnapshotType::Full => ZeroPages::Skip,
        SnapshotType::Diff => ZeroPages::Write,
    };
    let written = memory::write_pages(mem, &bitmaps, zero, &mem_file.file, &mem_path)?;

    let state = SnapshotState {
        prescient_version: env!("CARGO_PKG_VERSION").to_string(),
        host_cpu: HostCpu::this_host(),
        config: serde_json::to_string(config).map_err(|e| SnapshotError::Config {
            path: params.snapshot_path.clone(),
            message: e.to_string(),
        })?,
        memory: memory::layout(mem),
        vm: vm_state,
        vcpus,
        devices,
        predictor,
    };
    let bytes = file::encode(&state).map_err(|source| SnapshotError::State {
        path: params.snapshot_path.clone(),
        source,
    })?;
    let mut state_file = AtomicFile::create(&params.snapshot_path)?;
    state_file
        .file
        .write_all(&bytes)
        .map_err(|source| SnapshotError::Write {
            path: params.snapshot_path.clone(),
            source,
        })?;
    mem_file.commit()?;
    state_file.commit()?;
    vm.forget_trimmed();
    let report = CreateReport {
        memory_bytes_written: written,
        elapsed: start.elapsed(),
    };
    tracing::info!(
        "snapshot {:?} created: {} MiB of memory written in {:?}",
        params.snapshot_type,
        written >> 20,
        report.elapsed
    );
    Ok(report)
}

/// Opens a snapshot's memory file.
pub fn open_memory(path: &Path) -> Result<File, SnapshotError> {
    File::open(path).map_err(|source| SnapshotError::OpenMemory {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_params_take_either_memory_field_and_refuse_both_or_uffd() {
        let p: LoadParams = serde_json::from_str(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}, "resume_vm": true}"#,
        )
        .unwrap();
        assert_eq!(p.memory_path().unwrap(), Path::new("m"));
        assert!(p.resume_vm);
        let p: LoadParams = serde_json::from_str(
            r#"{"snapshot_path": "s", "mem_file_path": "m2", "enable_diff_snapshots": true}"#,
        )
        .unwrap();
        assert_eq!(p.memory_path().unwrap(), Path::new("m2"));
        assert!(p.tracks_dirty_pages());
        let both: LoadParams = serde_json::from_str(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
        )
        .unwrap();
        assert!(both
            .check_supported()
            .unwrap_err()
            .to_string()
            .contains("mutually exclusive"));
        let uffd: LoadParams = serde_json::from_str(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "sock"}}"#,
        )
        .unwrap();
        assert!(uffd
            .check_supported()
            .unwrap_err()
            .to_string()
            .contains("Uffd"));
        let neither: LoadParams = serde_json::from_str(r#"{"snapshot_path": "s"}"#).unwrap();
        assert!(neither.check_supported().is_err());
        assert!(
            serde_json::from_str::<LoadParams>(r#"{"snapshot_path": "s", "bogus": 1}"#).is_err()
        );
        let c: CreateParams =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Full);
        let c: CreateParams = serde_json::from_str(
            r#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Diff"}"#,
        )
        .unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Diff);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("prescient-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        std::fs::write(&path, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.file.write_all(b"half").unwrap();
            // dropped without commit
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let mut f = AtomicFile::create(&path).unwrap();
        f.file.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn describe_names_the_version_of_any_state_file_and_refuses_others() {
        let dir = std::env::temp_dir().join(format!("prescient-describe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let mut bytes = file::encode(&(1u8, 2u8)).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(describe(&path).unwrap(), "v1.0.0");
        // A newer format is described, not refused.
        bytes[8..10].copy_from_slice(&7u16.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(describe(&path).unwrap(), "v7.0.0");
        std::fs::write(&path, b"{\"not\": \"a snapshot\"}").unwrap();
        let e = describe(&path).unwrap_err();
        assert!(e.to_string().contains("not a prescient snapshot"), "{e}");
        let e = describe(&dir.join("missing")).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read the snapshot state file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
