//! `predictor`: the inline resource predictor (window, forecaster, budget, anomaly response,
//! trace recording). The same section is `GET /predictor`'s configuration and what
//! `PATCH /predictor` changes.

use std::path::PathBuf;

use predictor::forecast::Horizon;
use predictor::policy::{Action, Budget, Limits, PolicyConfig};
use predictor::resource::{PerResource, Resource, Usage};
use predictor::score::{ActionLadder, AnomalyConfig};
use predictor::spec::{ForecasterKind, PolicySpec};
use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath, MachineConfig};

/// Window bounds: shorter windows are noise, longer ones react too late to be "ahead".
const WINDOW_MS: std::ops::RangeInclusive<u64> = 10..=10_000;

/// Default bound on block and network bandwidth when the spec gives none, MiB/s.
pub const DEFAULT_IO_MAX_MIBPS: f64 = 1024.0;

/// A resource's allocation range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

/// The predictor's bounds per resource; a missing one defaults from the VM's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Guest memory, MiB (default: 64 to the machine's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<Range>,
    /// CFS quota of the vCPU threads, in cores (default: 0.05 to the vCPU count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<Range>,
    /// Block bandwidth, MiB/s, shared by the drives (default: 1 to 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk_mibps: Option<Range>,
    /// Network bandwidth per direction, MiB/s, shared by the interfaces (default: 1 to 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_mibps: Option<Range>,
}

/// What to do when the anomaly score reaches `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyResponse {
    pub threshold: f64,
    /// log, alert, tighten_seccomp, throttle, pause or kill.
    pub action: Action,
}

impl Default for AnomalyResponse {
    fn default() -> Self {
        Self {
            threshold: ActionLadder::default().alert,
            action: Action::Alert,
        }
    }
}

/// How the predictor plugs and unplugs whole vCPUs on a VM that can (`max_vcpus` above
/// `vcpu_count`): a vCPU is plugged as soon as the allocation (the forecast's upper band for the
/// next window) needs more than the vCPUs online, and one is unplugged once the allocation has
/// stayed at least `hysteresis` cores below one vCPU fewer for `unplug_after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuPolicy {
    /// `false`: the CPU quota alone, the vCPUs stay as they are.
    #[serde(default = "enabled")]
    pub enabled: bool,
    #[serde(default = "unplug_after_ms")]
    pub unplug_after_ms: u64,
    /// Cores between the allocation that plugs the n-th vCPU and the one that unplugs it.
    #[serde(default = "hysteresis")]
    pub hysteresis: f64,
}

fn unplug_after_ms() -> u64 {
    3000
}
fn hysteresis() -> f64 {
    0.2
}

impl Default for VcpuPolicy {
    fn default() -> Self {
        Self {
            enabled: enabled(),
            unplug_after_ms: unplug_after_ms(),
            hysteresis: hysteresis(),
        }
    }
}

/// The `predictor` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictorConfig {
    #[serde(default = "enabled")]
    pub enabled: bool,
    #[serde(default = "window_ms")]
    pub window_ms: u64,
    /// Windows ahead the allocation provisions for (1..=50).
    #[serde(default = "horizon")]
    pub horizon: usize,
    #[serde(default)]
    pub forecaster: ForecasterKind,
    /// GRU weights for `forecaster: "gru"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_path: Option<PathBuf>,
    #[serde(default)]
    pub budget: BudgetConfig,
    #[serde(default)]
    pub anomaly: AnomalyResponse,
    /// Record every window here, in the trace format `prescient predictor eval` replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_path: Option<PathBuf>,
    /// vCPU hot-plug by the CPU actuator (prescient; used on VMs that can plug vCPUs).
    #[serde(default)]
    pub vcpus: VcpuPolicy,
}

fn enabled() -> bool {
    true
}
fn window_ms() -> u64 {
    100
}
/// One window ahead: the horizon the library's forecasters were tuned at (predictor/README.md);
/// raise it where plugging memory takes longer than a window.
fn horizon() -> usize {
    1
}

impl Default for PredictorConfig {
    fn default() -> Self {
        Self {
            enabled: enabled(),
            window_ms: window_ms(),
            horizon: horizon(),
            forecaster: ForecasterKind::default(),
            model_path: None,
            budget: BudgetConfig::default(),
            anomaly: AnomalyResponse::default(),
            trace_path: None,
            vcpus: VcpuPolicy::default(),
        }
    }
}

/// `PATCH /predictor`: what may change while the VM runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictorUpdate {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    #[serde(default)]
    pub anomaly: Option<AnomalyResponse>,
}

impl PredictorUpdate {
    /// `to` with the given fields replaced; a budget replaces the ranges it names.
    pub fn apply(&self, to: &PredictorConfig) -> PredictorConfig {
        let mut c = to.clone();
        if let Some(e) = self.enabled {
            c.enabled = e;
        }
        if let Some(b) = &self.budget {
            let merge = |new: Option<Range>, old: Option<Range>| new.or(old);
            c.budget = BudgetConfig {
                memory_mib: merge(b.memory_mib, c.budget.memory_mib),
                cpu_cores: merge(b.cpu_cores, c.budget.cpu_cores),
                blk_mibps: merge(b.blk_mibps, c.budget.blk_mibps),
                net_mibps: merge(b.net_mibps, c.budget.net_mibps),
            };
        }
        if let Some(a) = self.anomaly {
            c.anomaly = a;
        }
        c
    }
}

fn field(keys: &[&'static str]) -> JsonPath {
    let mut all = vec!["predictor"];
    all.extend_from_slice(keys);
    JsonPath::keys(&all)
}

impl PredictorConfig {
    /// The VM's size per resource: what a static allocation gives, and the budget's default
    /// maximum (for CPU, the vCPUs it can have plugged: `max_vcpus`).
    pub fn capacity(machine: &MachineConfig) -> Usage {
        Usage {
            cpu: f64::from(machine.max_vcpus()),
            mem: machine.mem_size_mib as f64,
            blk: DEFAULT_IO_MAX_MIBPS,
            net: DEFAULT_IO_MAX_MIBPS,
        }
    }

    /// The budget the policy enforces: the spec's ranges, the rest from the VM's size; every
    /// resource starts at its maximum, except CPU on a VM that can plug vCPUs, which starts
    /// with the vCPUs it booted with.
    pub fn budget(&self, machine: &MachineConfig) -> Budget {
        let mut budget = Budget::from_capacity(&Self::capacity(machine));
        let cpu = &mut budget.0.cpu;
        cpu.initial = cpu.initial.min(f64::from(machine.vcpu_count));
        let given = PerResource {
            cpu: self.budget.cpu_cores,
            mem: self.budget.memory_mib,
            blk: self.budget.blk_mibps,
            net: self.budget.net_mibps,
        };
        for r in Resource::ALL {
            if let Some(range) = given[r] {
                let step = budget.0[r].step;
                let initial = match r {
                    Resource::Cpu => range.max.min(f64::from(machine.vcpu_count)).max(range.min),
                    _ => range.max,
                };
                budget.0[r] = Limits {
                    min: range.min,
                    max: range.max,
                    initial,
                    step,
                };
            }
        }
        budget
    }

    /// The recipe of the live policy (also written into recorded traces).
    pub fn policy_spec(&self, machine: &MachineConfig) -> Result<PolicySpec, ConfigError> {
        let horizon = Horizon::new(self.horizon)
            .map_err(|e| ConfigError::new(field(&["horizon"]), e.to_string()))?;
        let ladder = ActionLadder::only_at(self.anomaly.threshold, self.anomaly.action)
            .map_err(|e| ConfigError::new(field(&["anomaly"]), e.to_string()))?;
        Ok(PolicySpec {
            forecaster: self.forecaster,
            model_path: self.model_path.clone(),
            budget: self.budget(machine),
            config: PolicyConfig {
                horizon,
                anomaly: AnomalyConfig {
                    ladder,
                    ..AnomalyConfig::default()
                },
                // The bandwidth actuators' buckets hold one refill period of the rate.
                bucket_windows: PolicyConfig::default().bucket_windows.map(|_, &w| {
                    w * super::drives::BANDWIDTH_REFILL_MS as f64 / self.window_ms.max(1) as f64
                }),
                ..PolicyConfig::default()
            },
        })
    }

    pub fn validate(&self, machine: &MachineConfig) -> Result<(), ConfigError> {
        if !WINDOW_MS.contains(&self.window_ms) {
            return Err(ConfigError::new(
                field(&["window_ms"]),
                format!(
                    "must be between {} and {}, got {}",
                    WINDOW_MS.start(),
                    WINDOW_MS.end(),
                    self.window_ms
                ),
            ));
        }
        let ranges = [
            ("memory_mib", self.budget.memory_mib, f64::INFINITY),
            (
                "cpu_cores",
                self.budget.cpu_cores,
                f64::from(machine.max_vcpus()),
            ),
            ("blk_mibps", self.budget.blk_mibps, f64::INFINITY),
            ("net_mibps", self.budget.net_mibps, f64::INFINITY),
        ];
        for (name, range, cap) in ranges {
            let Some(Range { min, max }) = range else {
                continue;
            };
            if !(min > 0.0 && min <= max && max <= cap && max.is_finite()) {
                let bound = if cap.is_finite() {
                    format!(" <= {cap} (max_vcpus, else the vCPU count)")
                } else {
                    String::new()
                };
                return Err(ConfigError::new(
                    field(&["budget", name]),
                    format!("needs 0 < min <= max{bound}, got min {min} max {max}"),
                ));
            }
        }
        let v = &self.vcpus;
        if !(0.0..1.0).contains(&v.hysteresis) || v.unplug_after_ms > 3_600_000 {
            return Err(ConfigError::new(
                field(&["vcpus"]),
                format!(
                    "needs 0 <= hysteresis < 1 core and unplug_after_ms <= 1 hour, got {} and {}",
                    v.hysteresis, v.unplug_after_ms
                ),
            ));
        }
        if self.forecaster == ForecasterKind::Gru && self.model_path.is_none() {
            return Err(ConfigError::new(
                field(&["model_path"]),
                "missing: the gru forecaster needs its weights (safetensors from `prescient train`)",
            ));
        }
        if let Some(p) = &self.model_path {
            super::check_file(field(&["model_path"]), p)?;
        }
        if let Some(p) = &self.trace_path {
            match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) if !dir.is_dir() => {
                    return Err(ConfigError::new(
                        field(&["trace_path"]),
                        format!("directory {} does not exist", dir.display()),
                    ))
                }
                _ => {}
            }
        }
        self.policy_spec(machine)?
            .build()
            .map(|_| ())
            .map_err(|e| ConfigError::new(field(&[]), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineConfig {
        MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            ..MachineConfig::default()
        }
    }

    fn parse(json: &str) -> PredictorConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_fill_an_empty_section() {
        let c = parse("{}");
        assert_eq!(c, PredictorConfig::default());
        c.validate(&machine()).unwrap();
        let b = c.budget(&machine());
        assert_eq!(
            (b.0.cpu.max, b.0.mem.max, b.0.blk.max),
            (2.0, 256.0, 1024.0)
        );
        let spec = c.policy_spec(&machine()).unwrap();
        assert_eq!(spec.config.horizon.get(), 1);
        assert_eq!(spec.config.anomaly.ladder.only, Some(Action::Alert));
        // The bandwidth buckets hold one 100 ms refill: one default window, two of 50 ms.
        let w = spec.config.bucket_windows;
        assert_eq!((w.cpu, w.mem, w.blk, w.net), (0.0, 0.0, 1.0, 1.0));
        let fast = parse(r#"{"window_ms": 50}"#)
            .policy_spec(&machine())
            .unwrap();
        assert_eq!(fast.config.bucket_windows.blk, 2.0);
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = |json: &str| parse(json).validate(&machine()).unwrap_err().to_string();
        assert!(err(r#"{"window_ms": 5}"#).starts_with("predictor.window_ms: must be between 10"));
        let e = err(r#"{"budget": {"cpu_cores": {"min": 0.5, "max": 3}}}"#);
        assert!(
            e.starts_with("predictor.budget.cpu_cores: needs 0 < min <= max <= 2"),
            "{e}"
        );
        let e = err(r#"{"budget": {"memory_mib": {"min": 300, "max": 200}}}"#);
        assert!(e.starts_with("predictor.budget.memory_mib"), "{e}");
        let e = err(r#"{"horizon": 0}"#);
        assert!(
            e.starts_with("predictor.horizon: horizon must be 1..=50"),
            "{e}"
        );
        let e = err(r#"{"anomaly": {"threshold": 1, "action": "resize"}}"#);
        assert!(
            e.starts_with("predictor.anomaly: Resize is not an anomaly action"),
            "{e}"
        );
        let e = err(r#"{"forecaster": "gru"}"#);
        assert!(e.starts_with("predictor.model_path: missing"), "{e}");
        let e = err(r#"{"trace_path": "/nonexistent/dir/t.jsonl"}"#);
        assert!(
            e.contains("directory /nonexistent/dir does not exist"),
            "{e}"
        );
        assert!(
            serde_json::from_str::<PredictorConfig>(r#"{"window": 100}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field `window`")
        );
        assert!(serde_json::from_str::<PredictorConfig>(r#"{"forecaster": "arima"}"#).is_err());
        let e = err(r#"{"vcpus": {"hysteresis": 1.5}}"#);
        assert!(
            e.starts_with("predictor.vcpus: needs 0 <= hysteresis < 1"),
            "{e}"
        );
        let e = err(r#"{"vcpus": {"unplug_after_ms": 3600001}}"#);
        assert!(e.contains("unplug_after_ms <= 1 hour"), "{e}");
        assert!(
            serde_json::from_str::<PredictorConfig>(r#"{"vcpus": {"delay_ms": 1}}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field `delay_ms`")
        );
        let v = parse(r#"{"vcpus": {"enabled": false}}"#).vcpus;
        assert_eq!(
            (v.enabled, v.unplug_after_ms, v.hysteresis),
            (false, 3000, 0.2)
        );
    }

    #[test]
    fn budget_ranges_replace_defaults_and_updates_merge() {
        let c = parse(r#"{"budget": {"memory_mib": {"min": 96, "max": 200}}}"#);
        c.validate(&machine()).unwrap();
        let b = c.budget(&machine());
        assert_eq!(
            (b.0.mem.min, b.0.mem.max, b.0.mem.initial),
            (96.0, 200.0, 200.0)
        );
        assert_eq!(b.0.mem.step, 2.0);
        let u: PredictorUpdate = serde_json::from_str(
            r#"{"budget": {"cpu_cores": {"min": 0.1, "max": 1}}, "anomaly": {"threshold": 2, "action": "kill"}}"#,
        )
        .unwrap();
        let after = u.apply(&c);
        assert_eq!(after.budget.memory_mib, c.budget.memory_mib);
        assert_eq!(after.budget.cpu_cores, Some(Range { min: 0.1, max: 1.0 }));
        assert_eq!(after.anomaly.action, Action::Kill);
        assert!(serde_json::from_str::<PredictorUpdate>(r#"{"horizon": 3}"#).is_err());
    }
}
