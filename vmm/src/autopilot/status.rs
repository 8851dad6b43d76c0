//! `GET /predictor`: the configuration, where the allocation stands, the latest decision, what
//! each actuator acts on, and the devices the exits are counted by.

use predictor::forecast::ExpertWeight;
use predictor::policy::{Allocation, Decision};
use predictor::resource::PerResource;
use serde::Serialize;

use crate::device_manager::registry::DeviceInfo;
use crate::vmm_config::PredictorConfig;

/// How each actuator and input stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ActuatorStatus {
    pub kvm_stats: String,
    pub cpu_quota: String,
    pub memory: String,
    /// The drives' and interfaces' bandwidth buckets.
    pub blk: String,
    pub net: String,
    pub seccomp: String,
    pub trace: String,
    /// Where the forecasters started: cold, or the model store trace they replayed.
    pub model: String,
}

/// `GET /predictor` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictorStatus {
    pub config: PredictorConfig,
    /// Whether a VM runs with the predictor attached.
    pub running: bool,
    pub windows: u64,
    /// Current allocation per resource (cores, MiB, MiB/s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Allocation>,
    /// The latest window's decision: inputs, forecast, scores, action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Decision>,
    /// Per resource, the ensemble's experts and their weights (empty for one forecaster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<PerResource<Vec<ExpertWeight>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actuators: Option<ActuatorStatus>,
    /// Every device on the VM's buses, by the id its exits and requests are counted under.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceInfo>,
}

impl PredictorStatus {
    /// Before boot: the configuration alone.
    pub fn idle(config: PredictorConfig) -> Self {
        Self {
            config,
            running: false,
            windows: 0,
            allocation: None,
            last: None,
            experts: None,
            actuators: None,
            devices: Vec::new(),
        }
    }
}
