//! The inline predictor: every window the VMM thread gathers what the vCPU loop, KVM, the host
//! and the devices saw, runs the forecaster and policy, and applies the decision itself (CPU
//! quota, rate limiters, memory, anomaly actions), logging each decision with what it did.

pub mod actuators;
pub mod cgroup;
pub mod decisions;
pub mod elastic;
pub mod exits;
pub mod host;
pub mod kvm_stats;
pub mod window;

use std::fs::File;
use std::io::LineWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::DeviceCounters;
use event_manager::{EventManager, SubscriberOps};
use predictor::forecast::ExpertWeight;
use predictor::policy::{Action, Allocation, Decision, Policy};
use predictor::resource::PerResource;
use predictor::telemetry::{
    Collector, DeviceId, DeviceRecorder, KvmVcpuStats, MemorySample, WindowInputs,
};
use predictor::trace::{Header, TraceWriter};
use serde::Serialize;

use crate::exit::{ExitReason, ExitSignal};
use crate::microvm::MicroVm;
use crate::runtime::Subscriber;
use crate::seccomp::{self, Stage};
use crate::vmm_config::{
    ConfigError, DriveConfig, JsonPath, MachineConfig, NetworkInterfaceConfig, PredictorConfig,
};
use actuators::{apply_memory, bandwidth_limiter, MemoryActuator};
use cgroup::CpuQuota;
use decisions::{Applied, DecisionLog, DecisionPage};
use host::thread_cpu_ns;
use jailer::cgroup::Cgroup;
use kvm_stats::KvmStatsReader;

/// A virtio device's cumulative counters, turned into the predictor's per-window device input.
struct DeviceSource {
    counters: Arc<DeviceCounters>,
    recorder: DeviceRecorder,
    seen: [u64; 3],
}

impl DeviceSource {
    fn sample(&mut self) {
        let now = [
            self.counters.requests.load(Ordering::Relaxed),
            self.counters.bytes_to_guest.load(Ordering::Relaxed),
            self.counters.bytes_from_guest.load(Ordering::Relaxed),
        ];
        let d = |i: usize| now[i].wrapping_sub(self.seen[i]);
        self.recorder.record_many(d(0), d(1), d(2));
        self.seen = now;
    }
}

/// A vCPU thread as the window closer sees it.
struct VcpuSource {
    thread: libc::pthread_t,
    kvm: Option<KvmStatsReader>,
}

/// A rate-limited device the predictor sizes, with the limiter it was configured with.
pub struct Limited<T> {
    pub id: String,
    pub device: Arc<Mutex<T>>,
    pub base: Option<RateLimiterConfig>,
}

/// How each actuator stands, for `GET /predictor`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Actuators {
    pub kvm_stats: String,
    pub cpu_quota: String,
    pub memory: String,
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
    /// Per resource, the ensemble's experts and their weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<PerResource<Vec<ExpertWeight>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actuators: Option<Actuators>,
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
        }
    }
}

/// Rate limiter changes the predictor made, for the VM's configuration to show.
#[derive(Debug, Default)]
pub struct LimiterChanges {
    pub drives: Vec<(String, RateLimiterConfig)>,
    pub nets: Vec<(String, RateLimiterConfig)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AutopilotError {
    #[error("cannot start the predictor's window timer: {0}")]
    Timer(std::io::Error),
    #[error("predictor: {0}")]
    Collector(#[from] predictor::telemetry::CollectorError),
}

pub struct Autopilot {
    config: PredictorConfig,
    collector: Collector,
    policy: Policy,
    log: DecisionLog,
    last: Option<Decision>,
    windows: u64,
    due: Arc<AtomicBool>,
    vcpus: Vec<VcpuSource>,
    devices: Vec<DeviceSource>,
    blocks: Vec<Limited<devices::virtio::block::Block>>,
    nets: Vec<Limited<devices::virtio::net::Net>>,
    memory: Option<Box<dyn MemoryActuator>>,
    cpu: Option<CpuQuota>,
    throttled: bool,
    trace: Option<TraceWriter<LineWriter<File>>>,
    status: Actuators,
    kvm_buf: Vec<KvmVcpuStats>,
    cpu_buf: Vec<u64>,
}

fn field(name: &'static str) -> JsonPath {
    JsonPath::keys(&["predictor", name])
}

impl Autopilot {
    /// The predictor for a VM about to boot: its policy, window clock and trace file. vCPUs
    /// take their exit recorders from [`Autopilot::collector`] as they are built.
    pub fn new(
        config: &PredictorConfig,
        machine: &MachineConfig,
        id: &str,
        now_ns: u64,
    ) -> Result<Self, ConfigError> {
        let spec = config.policy_spec(machine)?;
        let policy = spec
            .build()
            .map_err(|e| ConfigError::new(JsonPath::keys(&["predictor"]), e.to_string()))?;
        let collector = Collector::new(Duration::from_millis(config.window_ms), now_ns)
            .map_err(|e| ConfigError::new(field("window_ms"), e.to_string()))?;
        let (trace, trace_status) = match &config.trace_path {
            Some(path) => {
                let file = File::create(path).map_err(|e| {
                    ConfigError::new(
                        field("trace_path"),
                        format!("cannot create {}: {e}", path.display()),
                    )
                })?;
                let mut header =
                    Header::new(id, config.window_ms, PredictorConfig::capacity(machine));
                header.policy = Some(spec);
                let w = TraceWriter::new(LineWriter::new(file), &header)
                    .map_err(|e| ConfigError::new(field("trace_path"), e.to_string()))?;
                (Some(w), format!("recording to {}", path.display()))
            }
            None => (None, "not recording (no trace_path)".to_string()),
        };
        Ok(Self {
            config: config.clone(),
            collector,
            policy,
            log: DecisionLog::default(),
            last: None,
            windows: 0,
            due: Arc::new(AtomicBool::new(false)),
            vcpus: Vec::new(),
            devices: Vec::new(),
            blocks: Vec::new(),
            nets: Vec::new(),
            memory: None,
            cpu: None,
            throttled: false,
            trace,
            status: Actuators {
                trace: trace_status,
                model: "cold start".into(),
                memory: "no memory actuator: virtio-mem/balloon not configured".into(),
                seccomp: if seccomp::is_enabled() {
                    "stages boot -> steady -> quarantine; tighten_seccomp requests quarantine"
                        .into()
                } else {
                    "off (--no-seccomp)".into()
                },
                ..Actuators::default()
            },
            kvm_buf: Vec::new(),
            cpu_buf: Vec::new(),
        })
    }

    /// Replays a model store trace through the policy before the first window, so that the
    /// forecasters, band and scores start where that run ended instead of cold. The replayed
    /// decisions are not applied: the device sizes start from the resulting allocation.
    pub fn warm_start(&mut self, warm: &crate::profile::store::WarmStart) {
        for s in &warm.samples {
            self.policy.decide(s);
        }
        self.status.model = format!(
            "warm start from {}: {} windows replayed",
            warm.source,
            warm.samples.len()
        );
    }

    /// Hands out exit recorders, one per vCPU in order.
    pub fn collector(&mut self) -> &mut Collector {
        &mut self.collector
    }

    /// Connects to the booted VM: its vCPU threads, KVM stats, devices and CPU cgroup, and
    /// starts the window clock in `event_manager`.
    pub fn attach(
        &mut self,
        id: &str,
        vm: &mut MicroVm,
        drives: &[DriveConfig],
        interfaces: &[NetworkInterfaceConfig],
        vm_cgroup: Option<Cgroup>,
        event_manager: &mut EventManager<Subscriber>,
    ) -> Result<(), AutopilotError> {
        let mut kvm_errors = Vec::new();
        for (index, thread, stats) in vm.vcpu_telemetry() {
            let kvm = stats
                .map_err(|e| kvm_errors.push(format!("vCPU {index}: {e}")))
                .ok();
            self.vcpus.push(VcpuSource { thread, kvm });
        }
        self.status.kvm_stats = if kvm_errors.is_empty() {
            format!("reading KVM binary stats of {} vCPUs", self.vcpus.len())
        } else {
            tracing::warn!(
                "predictor runs without KVM stats: {}",
                kvm_errors.join("; ")
            );
            format!("unavailable, windows go without: {}", kvm_errors.join("; "))
        };
        let handles = vm.virtio();
        for (slot, (kind, counters)) in handles.telemetry.iter().enumerate() {
            let Some(id) = DeviceId::new(slot as u8) else {
                break;
            };
            let recorder = self.collector.add_device(id, *kind)?;
            let mut source = DeviceSource {
                counters: counters.clone(),
                recorder,
                seen: [0; 3],
            };
            // Start from now: what happened before the predictor is not this window's.
            source.sample();
            self.devices.push(source);
        }
        self.blocks = handles.limited_blocks(drives);
        self.nets = handles.limited_nets(interfaces);

        let quota = match vm_cgroup {
            Some(given) => CpuQuota::given(given),
            None => CpuQuota::create(id, &vm.vcpu_tids()),
        };
        self.status.cpu_quota = match quota {
            Ok(q) => {
                let text = q.describe();
                self.cpu = Some(q);
                text
            }
            Err(e) => {
                tracing::warn!("predictor cannot set CPU quotas: {e}");
                format!("unavailable: {e}")
            }
        };
        let allocation = *self.policy.allocation();
        let _ = self.apply_cpu(allocation.cpu);

        let timer = window::WindowTimer::new(self.collector.period(), self.due.clone())
            .map_err(AutopilotError::Timer)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(timer)));
        Ok(())
    }

    /// Sets the memory device the predictor drives (virtio-mem or balloon).
    /// The device starts at the policy's initial allocation (the budget's maximum until the
    /// forecasters have warmed up), so the guest is never short while the predictor learns.
    pub fn set_memory_actuator(&mut self, mut actuator: Box<dyn MemoryActuator>) {
        let initial = self.policy.allocation().mem;
        match apply_memory(actuator.as_mut(), initial, 0.0) {
            Ok(detail) => tracing::info!("predictor: {detail}"),
            Err(e) => tracing::warn!("predictor: initial memory allocation: {e}"),
        }
        self.memory = Some(actuator);
        self.status.memory = "virtio-mem/balloon".into();
    }

    /// Whether the window clock has ticked since the last close.
    pub fn take_due(&self) -> bool {
        self.due.swap(false, Ordering::AcqRel)
    }

    fn memory_sample(&mut self, vm: &mut MicroVm) -> MemorySample {
        let host_rss = vm.memory_accounting().guest_rss_bytes as f64 / (1024.0 * 1024.0);
        let state = self.memory.as_ref().map(|m| m.state());
        let guest = state.and_then(|s| s.guest);
        MemorySample {
            guest_total: guest.map(|g| (g.used_mib + g.available_mib) as f64),
            guest_available: guest.map(|g| g.available_mib as f64),
            host_rss,
            plugged: state.map_or(0.0, |s| s.total_mib() as f64),
        }
    }

    /// Closes the window at `now_ns`: measures, decides, applies, logs.
    pub fn close_window(
        &mut self,
        now_ns: u64,
        vm: &mut MicroVm,
        exit: &ExitSignal,
    ) -> Result<LimiterChanges, AutopilotError> {
        self.kvm_buf.clear();
        self.cpu_buf.clear();
        for v in &mut self.vcpus {
            let kvm = match &mut v.kvm {
                Some(r) => r.read().unwrap_or_default(),
                None => KvmVcpuStats::default(),
            };
            self.kvm_buf.push(kvm);
            self.cpu_buf.push(thread_cpu_ns(v.thread).unwrap_or(0));
        }
        for d in &mut self.devices {
            d.sample();
        }
        let memory = self.memory_sample(vm);
        let window = self.collector.close(
            now_ns,
            &WindowInputs {
                kvm: &self.kvm_buf,
                cpu_ns: &self.cpu_buf,
                memory,
            },
        )?;
        let sample = window.sample();
        if let Some(trace) = &mut self.trace {
            if let Err(e) = trace.write(&sample) {
                tracing::warn!("predictor: trace recording stopped: {e}");
                self.status.trace = format!("stopped: {e}");
                self.trace = None;
            }
        }
        let decision = self.policy.decide(&sample);
        self.windows += 1;
        let mut changes = LimiterChanges::default();
        if decision.action != Action::Hold && self.config.enabled {
            let applied = self.apply(&decision, memory.host_rss, vm, exit, &mut changes);
            self.log.push(decision.clone(), applied);
        }
        self.last = Some(decision);
        Ok(changes)
    }

    fn apply_cpu(&mut self, cores: f64) -> Applied {
        let (applied, detail) = match &self.cpu {
            Some(q) => match q.set_cores(cores) {
                Ok(us) => (
                    true,
                    format!("cpu quota {us} us per 100 ms ({cores:.2} cores)"),
                ),
                Err(e) => (false, e.to_string()),
            },
            None => (false, self.status.cpu_quota.clone()),
        };
        Applied {
            what: "cpu".into(),
            applied,
            detail,
        }
    }

    fn apply(
        &mut self,
        d: &Decision,
        resident_mib: f64,
        vm: &mut MicroVm,
        exit: &ExitSignal,
        changes: &mut LimiterChanges,
    ) -> Vec<Applied> {
        let mut out = Vec::new();
        let alloc = d.allocation;
        if d.resized.cpu {
            out.push(if self.throttled {
                Applied {
                    what: "cpu".into(),
                    applied: false,
                    detail: "held at the budget minimum by an earlier throttle".into(),
                }
            } else {
                self.apply_cpu(alloc.cpu)
            });
        }
        if d.resized.mem {
            let (applied, detail) = match self.memory.as_deref_mut() {
                Some(m) => match apply_memory(m, alloc.mem, resident_mib) {
                    Ok(text) => (true, text),
                    Err(e) => (false, e.to_string()),
                },
                None => (false, format!("not applied: {}", self.status.memory)),
            };
            out.push(Applied {
                what: "mem".into(),
                applied,
                detail,
            });
        }
        if d.resized.blk {
            out.push(resize_all(
                &self.blocks,
                "blk",
                alloc.blk,
                &mut changes.drives,
                |b, l| b.update_rate_limiter(l).map_err(|e| e.to_string()),
            ));
        }
        if d.resized.net {
            out.push(resize_all(
                &self.nets,
                "net",
                alloc.net,
                &mut changes.nets,
                |n, l| {
                    n.update_rate_limiters(Some(l), Some(l))
                        .map_err(|e| e.to_string())
                },
            ));
        }
        if d.anomaly.action >= Action::Log {
            out.push(self.respond(d, vm, exit));
        }
        out
    }

    /// Carries out the anomaly action the policy chose.
    fn respond(&mut self, d: &Decision, vm: &mut MicroVm, exit: &ExitSignal) -> Applied {
        let action = d.anomaly.action;
        let why = format!("anomaly score {:.2} ({})", d.anomaly.score, d.reason);
        let (applied, detail) = match action {
            Action::Log => {
                tracing::info!("predictor: {why}");
                (true, "logged".to_string())
            }
            Action::Alert => {
                tracing::warn!("predictor alert: {why}");
                (true, "alert raised (warning logged)".to_string())
            }
            // Every thread installs the stage itself at its next safe point; the VMM thread
            // kicks the vCPUs once it has.
            Action::TightenSeccomp => match seccomp::request_stage(Stage::Quarantine) {
                Ok(()) => (
                    true,
                    format!("seccomp stage {} requested", Stage::Quarantine),
                ),
                Err(e) => (false, e.to_string()),
            },
            Action::Throttle => {
                self.throttled = true;
                let min = self.policy.budget().0.cpu.min;
                let a = self.apply_cpu(min);
                (
                    a.applied,
                    format!("throttled to the budget minimum: {}", a.detail),
                )
            }
            Action::Pause => match vm.state() {
                crate::microvm::RunState::Paused => (true, "already paused".to_string()),
                crate::microvm::RunState::Running => match vm.pause() {
                    Ok(()) => {
                        tracing::warn!("predictor paused the VM: {why}");
                        (true, "VM paused; PATCH /vm Resumed to continue".to_string())
                    }
                    Err(e) => (false, e.to_string()),
                },
            },
            Action::Kill => {
                exit.request(ExitReason::KilledByPredictor(why));
                (true, "VM killed".to_string())
            }
            Action::Hold | Action::Resize => (true, "nothing to do".to_string()),
        };
        Applied {
            what: serde_json::to_value(action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            applied,
            detail,
        }
    }

    pub fn status(&self) -> PredictorStatus {
        PredictorStatus {
            config: self.config.clone(),
            running: true,
            windows: self.windows,
            allocation: Some(*self.policy.allocation()),
            last: self.last.clone(),
            experts: Some(self.policy.expert_weights()),
            actuators: Some(self.status.clone()),
        }
    }

    pub fn decisions(&self, since: u64) -> DecisionPage {
        self.log.since(since)
    }

    /// `PATCH /predictor` while running: a validated new configuration.
    pub fn reconfigure(
        &mut self,
        config: &PredictorConfig,
        machine: &MachineConfig,
    ) -> Result<(), ConfigError> {
        let spec = config.policy_spec(machine)?;
        self.policy
            .reconfigure(spec.budget, spec.config.anomaly.ladder)
            .map_err(|e| {
                ConfigError::new(JsonPath::keys(&["predictor", "budget"]), e.to_string())
            })?;
        self.config = config.clone();
        self.throttled = false;
        if self.config.enabled {
            let cores = self.policy.allocation().cpu;
            let _ = self.apply_cpu(cores);
        }
        Ok(())
    }
}

/// Splits `total` MiB/s evenly over `devices` and installs the buckets.
fn resize_all<T>(
    devices: &[Limited<T>],
    what: &str,
    total: f64,
    changes: &mut Vec<(String, RateLimiterConfig)>,
    update: impl Fn(&mut T, RateLimiterConfig) -> Result<(), String>,
) -> Applied {
    if devices.is_empty() {
        return Applied {
            what: what.into(),
            applied: false,
            detail: format!("no {what} device to limit"),
        };
    }
    let each = total / devices.len() as f64;
    let mut errors = Vec::new();
    for d in devices {
        let limiter = bandwidth_limiter(each, d.base);
        let mut dev = d.device.lock().unwrap_or_else(|p| p.into_inner());
        match update(&mut dev, limiter) {
            Ok(()) => changes.push((d.id.clone(), limiter)),
            Err(e) => errors.push(format!("{}: {e}", d.id)),
        }
    }
    Applied {
        what: what.into(),
        applied: errors.is_empty(),
        detail: if errors.is_empty() {
            format!("{total:.0} MiB/s over {} device(s)", devices.len())
        } else {
            errors.join("; ")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::store::WarmStart;
    use predictor::resource::Usage;
    use predictor::sample::Sample;

    #[test]
    fn a_warm_start_begins_from_the_replayed_allocation_not_the_budget_maximum() {
        let machine = MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 1024,
            smt: false,
        };
        let config = PredictorConfig::default();
        let cold = Autopilot::new(&config, &machine, "t", 0).unwrap();
        let mut warm = Autopilot::new(&config, &machine, "t", 0).unwrap();
        let samples: Vec<Sample> = (0..100)
            .map(|i| Sample {
                t_ms: i * 100,
                usage: Usage {
                    cpu: 0.2,
                    mem: 100.0,
                    blk: 0.0,
                    net: 0.0,
                },
                ..Sample::default()
            })
            .collect();
        warm.warm_start(&WarmStart {
            source: "store/x/trace-1.jsonl (same fingerprint)".into(),
            samples,
        });
        let (c, w) = (cold.policy.allocation().mem, warm.policy.allocation().mem);
        assert_eq!(c, 1024.0, "a cold predictor holds the budget maximum");
        assert!(w < 512.0, "warm allocation {w} MiB");
        assert!(warm.status().actuators.unwrap().model.starts_with(
            "warm start from store/x/trace-1.jsonl (same fingerprint): 100 windows replayed"
        ));
        assert_eq!(cold.status().actuators.unwrap().model, "cold start");
    }
}
