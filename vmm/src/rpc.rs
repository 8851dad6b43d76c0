//! What can be asked of the VMM thread (by the API, later by the predictor), and its answers.

use serde::{Deserialize, Serialize};

use crate::autopilot::decisions::DecisionPage;
use crate::autopilot::PredictorStatus;
use crate::builder::BuildError;
use crate::live::LiveError;
use crate::logger::{LoggerConfig, LoggerError};
use crate::metrics::{MetricsConfig, MetricsError};
use crate::snapshot::{CreateParams, LoadParams};
use crate::vmm_config::{
    BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig, ConfigError, DriveConfig,
    DriveUpdate, EntropyConfig, HintingStart, MachineConfig, MemoryHotplugConfig,
    MemoryHotplugSizeUpdate, MemoryHotplugStatus, NetworkInterfaceConfig, NetworkInterfaceUpdate,
    PredictorUpdate, SerialConfig, VmConfig, VsockConfig,
};
use crate::vstate::vcpu::VcpuError;
use devices::virtio::balloon::{BalloonError, BalloonStats, HintingStatus};

/// One request to the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVmConfig,
    GetMachineConfig,
    PutBootSource(BootSourceConfig),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutSerial(SerialConfig),
    PutDrive(DriveConfig),
    PatchDrive(DriveUpdate),
    PutEntropy(EntropyConfig),
    PutNetworkInterface(NetworkInterfaceConfig),
    PatchNetworkInterface(NetworkInterfaceUpdate),
    PutVsock(VsockConfig),
    PutBalloon(BalloonConfig),
    PatchBalloon(BalloonUpdate),
    GetBalloon,
    GetBalloonStats,
    PatchBalloonStats(BalloonStatsUpdate),
    PutMemoryHotplug(MemoryHotplugConfig),
    PatchMemoryHotplug(MemoryHotplugSizeUpdate),
    GetMemoryHotplug,
    /// `GET /hotplug/vcpus`: each vCPU's state.
    GetVcpus,
    StartInstance,
    Pause,
    Resume,
    SendCtrlAltDel,
    PutMetrics(MetricsConfig),
    FlushMetrics,
    PutLogger(LoggerConfig),
    GetPredictor,
    /// Logged decisions from this sequence number on.
    GetPredictorDecisions {
        since: u64,
    },
    PatchPredictor(PredictorUpdate),
    /// Tighten every thread's seccomp filter to this stage.
    SetSeccompStage(crate::seccomp::Stage),
    CreateSnapshot(CreateParams),
    LoadSnapshot(LoadParams),
    /// `PUT /mmds`: replace the metadata document.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: merge into it.
    PatchMmds(serde_json::Value),
    GetMmds,
    PutMmdsConfig(crate::vmm_config::MmdsConfig),
    PutCpuConfig(crate::vmm_config::CpuConfig),
    PutPmem(crate::vmm_config::PmemConfig),
    PatchPmem(crate::vmm_config::PmemUpdate),
    /// `PATCH /balloon/hinting/start`: a free page hinting run.
    StartBalloonHinting(HintingStart),
    GetBalloonHinting,
    StopBalloonHinting,
}

/// A partial `machine-config` (PATCH): only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<crate::vmm_config::CpuTemplate>,
    pub max_vcpus: Option<u8>,
    pub acpi: Option<bool>,
    pub acpi_only: Option<bool>,
    pub huge_pages: Option<crate::vmm_config::HugePages>,
}

impl MachineConfigUpdate {
    pub fn apply(&self, to: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(to.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(to.mem_size_mib),
            smt: self.smt.unwrap_or(to.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(to.track_dirty_pages),
            cpu_template: self.cpu_template.or(to.cpu_template),
            max_vcpus: self.max_vcpus.or(to.max_vcpus),
            acpi: self.acpi.unwrap_or(to.acpi),
            acpi_only: self.acpi_only.unwrap_or(to.acpi_only),
            huge_pages: self.huge_pages.unwrap_or(to.huge_pages),
        }
    }

    /// Whether it asks for nothing but a vCPU count: the one change a running VM takes
    /// (vCPU hot-plug).
    pub fn only_vcpu_count(&self) -> Option<u8> {
        match self {
            Self {
                vcpu_count: Some(n),
                mem_size_mib: None,
                smt: None,
                track_dirty_pages: None,
                max_vcpus: None,
                acpi: None,
                acpi_only: None,
                huge_pages: None,
                cpu_template: None,
            } => Some(*n),
            _ => None,
        }
    }
}

/// The VM's lifecycle state, as Firecracker names it in `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /`: Firecracker's instance description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    MachineConfig(MachineConfig),
    VmConfig(Box<VmConfig>),
    Balloon(BalloonConfig),
    BalloonStats(Box<BalloonStats>),
    MemoryHotplug(MemoryHotplugStatus),
    Predictor(Box<PredictorStatus>),
    PredictorDecisions(DecisionPage),
    Mmds(serde_json::Value),
    BalloonHinting(HintingStatus),
    Vcpus(crate::vcpus::VcpuStatus),
}

/// Why an action was refused; the API answers 400 with this text as `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("The requested operation is not supported after starting the microVM.")]
    NotAllowedAfterBoot,
    #[error("The requested operation is not supported before starting the microVM.")]
    NotAllowedBeforeBoot,
    #[error("{0}")]
    InvalidConfig(#[from] ConfigError),
    #[error("cannot start the microVM: {0}")]
    Start(BuildError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("{0}")]
    Keyboard(#[from] devices::legacy::I8042Error),
    #[error("no drive {0:?}")]
    NoSuchDrive(String),
    #[error("{0}")]
    VhostUser(#[from] devices::virtio::vhost_user_block::VhostUserBlockError),
    #[error("no network interface {0:?}")]
    NoSuchInterface(String),
    #[error("no pmem device {0:?}")]
    NoSuchPmem(String),
    /// A running VM's device refused a change.
    #[error("{0}")]
    Live(#[from] LiveError),
    #[error("No balloon device configured.")]
    NoBalloon,
    #[error("{0}")]
    Balloon(#[from] BalloonError),
    #[error("Balloon statistics are not enabled (stats_polling_interval_s was 0 at start).")]
    BalloonStatsDisabled,
    #[error("No memory hotplug device configured.")]
    NoMemoryHotplug,
    #[error("{0}")]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    Logger(#[from] LoggerError),
    #[error("the VM has no predictor section; add one to the spec (or PUT nothing: it is fixed at boot)")]
    NoPredictor,
    #[error("the predictor is not running (not booted yet, or not enabled at boot)")]
    PredictorNotStarted,
    #[error("cannot start the predictor: {0}")]
    Predictor(String),
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Create snapshot error: {0}")]
    CreateSnapshot(String),
    #[error("Load snapshot error: {0}")]
    LoadSnapshot(String),
    #[error("Loading a microVM snapshot not allowed after configuring boot-specific resources.")]
    LoadAfterConfiguration,
    #[error("MMDS: {0}")]
    Mmds(String),
    /// Firecracker's words for a data store request it refuses.
    #[error("{0}")]
    MmdsStore(#[from] mmds::StoreError),
    #[error(
        "a running VM's machine-config takes only vcpu_count (vCPU hot-plug); {0} is fixed at boot"
    )]
    MachineFieldFixedAfterBoot(String),
}

impl ActionError {
    /// Refused because of what the VM is doing now (HTTP 409), not because the request is bad.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ActionError::Live(e) if e.is_conflict())
    }
}

impl From<BuildError> for ActionError {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::Config(c) => ActionError::InvalidConfig(c),
            other => ActionError::Start(other),
        }
    }
}

/// An action with the channel its answer goes back on.
pub struct ActionRequest {
    pub action: VmmAction,
    pub reply: std::sync::mpsc::Sender<Result<VmmData, ActionError>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_changes_only_given_fields() {
        let base = MachineConfig::default();
        let patch: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib": 512}"#).unwrap();
        let after = patch.apply(&base);
        assert_eq!(after.mem_size_mib, 512);
        assert_eq!(after.vcpu_count, base.vcpu_count);
        assert!(serde_json::from_str::<MachineConfigUpdate>(r#"{"vcpus": 2}"#).is_err());
    }

    #[test]
    fn instance_state_uses_firecracker_names() {
        assert_eq!(
            serde_json::to_string(&InstanceState::NotStarted).unwrap(),
            "\"Not started\""
        );
    }
}
