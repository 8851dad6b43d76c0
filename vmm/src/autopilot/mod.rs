//! The inline predictor. Every window (`window`) the VMM thread gathers what the vCPUs, KVM, the
//! host and the devices saw (`inputs`), runs the forecaster and policy, and carries the decision
//! out itself: resources through its actuators (`actuators`), anomalies through its responder
//! (`responder`). Every decision that acted is logged with what it did (`decisions`); `status`
//! is what `GET /predictor` shows.

pub mod actuators;
pub mod decisions;
pub mod host;
pub mod inputs;
pub mod kvm_stats;
pub mod persist;
pub mod responder;
pub mod status;
pub mod window;

use std::fs::File;
use std::io::LineWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use jailer::cgroup::Cgroup;
use predictor::policy::{Action, Decision, Policy};
use predictor::resource::{PerResource, Resource};
use predictor::telemetry::Collector;
use predictor::trace::{Header, TraceWriter};

use crate::device_manager::registry::DeviceInfo;
use crate::event_loop::Subscriber;
use crate::exit::ExitSignal;
use crate::microvm::{MicroVm, RunState};
use crate::vmm_config::{ConfigError, JsonPath, MachineConfig, PredictorConfig, VmConfig};
use actuators::bandwidth::Bandwidth;
use actuators::cpu::{CpuQuota, Throttling};
use actuators::memory::ElasticMemory;
use actuators::seccomp::SeccompStage;
use actuators::vcpus::VcpuCores;
use actuators::{Actuators, Context, Knob, Target};
use decisions::{Applied, DecisionLog, DecisionPage};
use inputs::Inputs;
use responder::Responder;
pub use status::{ActuatorStatus, PredictorStatus};
pub use window::now_ns;

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
    inputs: Option<Inputs>,
    actuators: Actuators,
    responder: Responder,
    log: DecisionLog,
    last: Option<Decision>,
    /// The guest's used memory at the last window: what a memory resize between windows (a
    /// new budget) must not take from it.
    used_mib: f64,
    windows: u64,
    due: Arc<AtomicBool>,
    trace: Option<TraceWriter<LineWriter<File>>>,
    /// What `GET /predictor` says of the inputs, the trace and the model; the actuators'
    /// entries are filled in when asked.
    notes: ActuatorStatus,
    devices: Vec<DeviceInfo>,
    /// How often the VM's CPU quota ran out: the windows in which CPU use was censored.
    throttling: Option<Throttling>,
    /// The VM ran at the last close: a window with a pause in it stopped the vCPUs without a
    /// halt, which says nothing of their demand.
    was_running: bool,
}

fn field(name: &'static str) -> JsonPath {
    JsonPath::keys(&["predictor", name])
}

impl Autopilot {
    /// The predictor for a VM about to boot: its policy, window clock and trace file.
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
            inputs: None,
            actuators: Actuators::default(),
            responder: Responder::default(),
            log: DecisionLog::default(),
            last: None,
            used_mib: 0.0,
            windows: 0,
            was_running: false,
            due: Arc::new(AtomicBool::new(false)),
            trace,
            notes: ActuatorStatus {
                trace: trace_status,
                model: "cold start".into(),
                ..ActuatorStatus::default()
            },
            devices: Vec::new(),
            throttling: None,
        })
    }

    /// Replays a model store trace through the policy before the first window, so that the
    /// forecasters, band and scores start where that run ended instead of cold. The replayed
    /// decisions are not applied: the device sizes start from the resulting allocation.
    pub fn warm_start(&mut self, warm: &crate::profile::store::WarmStart) {
        for s in &warm.samples {
            self.policy.decide(s);
        }
        self.notes.model = format!(
            "warm start from {}: {} windows replayed",
            warm.source,
            warm.samples.len()
        );
    }

    /// Connects to the booted VM: its vCPUs and devices become the window's inputs, its
    /// actuators are chosen and set to the policy's initial allocation, and the window clock
    /// starts in `event_manager`.
    pub fn attach(
        &mut self,
        id: &str,
        vm: &mut MicroVm,
        config: &mut VmConfig,
        exit: &ExitSignal,
        vm_cgroup: Option<Cgroup>,
        event_manager: &mut EventManager<Subscriber>,
    ) -> Result<(), AutopilotError> {
        let (inputs, kvm_stats) =
            Inputs::attach(vm, config.machine_config.mem_size_mib, &mut self.collector)?;
        self.inputs = Some(inputs);
        self.notes.kvm_stats = kvm_stats;
        self.devices = vm.devices().iter().map(|d| d.info.clone()).collect();

        let quota = match vm_cgroup {
            Some(given) => CpuQuota::given(given),
            None => CpuQuota::create(id, &vm.vcpu_tids()),
        };
        if let Err(e) = &quota {
            tracing::warn!("predictor cannot set CPU quotas: {e}");
        }
        match quota {
            quota if vm.can_hotplug_vcpus() && self.config.vcpus.enabled => {
                self.throttling = quota.as_ref().ok().and_then(CpuQuota::throttling);
                self.actuators
                    .add(Box::new(VcpuCores::new(quota.ok(), self.config.vcpus)));
            }
            Ok(q) => {
                self.throttling = q.throttling();
                self.actuators.add(Box::new(q));
            }
            Err(e) => {
                let knob = Knob::Resource(Resource::Cpu);
                self.actuators
                    .unavailable(knob, format!("unavailable: {e}"));
            }
        }
        match ElasticMemory::of(config) {
            Some(m) => self.actuators.add(Box::new(m)),
            None => self.actuators.unavailable(
                Knob::Resource(Resource::Mem),
                "no memory actuator: virtio-mem/balloon not configured".into(),
            ),
        }
        for r in [Resource::Blk, Resource::Net] {
            match Bandwidth::of(r, config) {
                Some(b) => self.actuators.add(Box::new(b)),
                None => self.actuators.unavailable(
                    Knob::Resource(r),
                    format!("no {} device to limit", r.name()),
                ),
            }
        }
        self.actuators.add(Box::new(SeccompStage));

        // The devices start at the policy's initial allocation (the budget's maximum until the
        // forecasters have warmed up), so the guest is never short while the predictor learns;
        // a restored VM at its snapshot's, its CPU at the minimum if a throttle held it.
        let mut initial = *self.policy.allocation();
        if self.responder.holds(Resource::Cpu) {
            initial.cpu = self.policy.budget().0.cpu.min;
        }
        let mut ctx = Context {
            vm,
            config,
            exit,
            used_mib: 0.0,
        };
        for r in [Resource::Cpu, Resource::Mem] {
            let a = self
                .actuators
                .apply(Target::Allocation(r, initial[r]), &mut ctx);
            tracing::info!("predictor: initial {}: {}", a.what, a.detail);
        }

        let timer = window::WindowTimer::new(self.collector.period(), self.due.clone())
            .map_err(AutopilotError::Timer)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(timer)));
        Ok(())
    }

    /// Whether the window clock has ticked since the last close.
    pub fn take_due(&self) -> bool {
        self.due.swap(false, Ordering::AcqRel)
    }

    /// Closes the window at `now_ns`: measures, decides, applies, logs.
    pub fn close_window(
        &mut self,
        now_ns: u64,
        vm: &mut MicroVm,
        config: &mut VmConfig,
        exit: &ExitSignal,
    ) -> Result<(), AutopilotError> {
        let Some(inputs) = self.inputs.as_mut() else {
            return Ok(());
        };
        inputs.sync(vm, &mut self.collector)?;
        let inputs = inputs.read(vm);
        let used_mib = inputs.memory.used();
        self.used_mib = used_mib;
        let mut sample = self.collector.close(now_ns, &inputs)?.sample();
        let running = vm.state() == RunState::Running;
        sample.signals.cpu_saturated &= running && self.was_running;
        self.was_running = running;
        if let Some(t) = &mut self.throttling {
            sample.signals.cpu_throttled = t.since_last();
        }
        if let Some(trace) = &mut self.trace {
            if let Err(e) = trace.write(&sample) {
                tracing::warn!("predictor: trace recording stopped: {e}");
                self.notes.trace = format!("stopped: {e}");
                self.trace = None;
            }
        }
        let decision = self.policy.decide(&sample);
        self.windows += 1;
        if self.config.enabled {
            let mut ctx = Context {
                vm,
                config,
                exit,
                used_mib,
            };
            let mut applied = if decision.action != Action::Hold {
                self.apply(&decision, &mut ctx)
            } else {
                Vec::new()
            };
            // What actuators do on their own time is logged with the window it happened in.
            applied.extend(self.actuators.follow_up(&mut ctx));
            if decision.action != Action::Hold || !applied.is_empty() {
                self.log.push(decision.clone(), applied);
            }
        }
        self.last = Some(decision);
        Ok(())
    }

    fn apply(&mut self, d: &Decision, ctx: &mut Context) -> Vec<Applied> {
        let mut out = Vec::new();
        for r in Resource::ALL.into_iter().filter(|&r| d.resized[r]) {
            out.push(if self.responder.holds(r) {
                Applied {
                    what: r.name().into(),
                    applied: false,
                    detail: "held at the budget minimum by an earlier throttle".into(),
                }
            } else {
                self.actuators
                    .apply(Target::Allocation(r, d.allocation[r]), ctx)
            });
        }
        if d.anomaly.action >= Action::Log {
            let cpu_min = self.policy.budget().0.cpu.min;
            out.push(self.responder.respond(d, cpu_min, &mut self.actuators, ctx));
        }
        out
    }

    pub fn status(&self) -> PredictorStatus {
        let describe = |r| self.actuators.describe(Knob::Resource(r));
        PredictorStatus {
            config: self.config.clone(),
            running: true,
            windows: self.windows,
            allocation: Some(*self.policy.allocation()),
            last: self.last.clone(),
            experts: Some(self.policy.expert_weights()),
            actuators: Some(ActuatorStatus {
                cpu_quota: describe(Resource::Cpu),
                memory: describe(Resource::Mem),
                blk: describe(Resource::Blk),
                net: describe(Resource::Net),
                seccomp: self.actuators.describe(Knob::Seccomp),
                ..self.notes.clone()
            }),
            devices: self.devices.clone(),
        }
    }

    pub fn decisions(&self, since: u64) -> DecisionPage {
        self.log.since(since)
    }

    /// `PATCH /predictor` while running: a validated new configuration. A throttle is let go,
    /// the CPU gets the current allocation again, and every other resource whose allocation
    /// the new budget moved is resized now, not at its next resize: a host pool that lowers a
    /// VM's budget gets the memory back at once.
    pub fn reconfigure(
        &mut self,
        next: &PredictorConfig,
        vm: &mut MicroVm,
        config: &mut VmConfig,
        exit: &ExitSignal,
    ) -> Result<(), ConfigError> {
        let spec = next.policy_spec(&config.machine_config)?;
        let before = *self.policy.allocation();
        self.policy
            .reconfigure(spec.budget, spec.config.anomaly.ladder)
            .map_err(|e| {
                ConfigError::new(JsonPath::keys(&["predictor", "budget"]), e.to_string())
            })?;
        self.config = next.clone();
        self.responder.release();
        if self.config.enabled {
            let after = *self.policy.allocation();
            let mut ctx = Context {
                vm,
                config,
                exit,
                used_mib: self.used_mib,
            };
            let moved = PerResource::from_fn(|r| r == Resource::Cpu || after[r] != before[r]);
            let applied: Vec<Applied> = Resource::ALL
                .into_iter()
                .filter(|&r| moved[r])
                .map(|r| {
                    self.actuators
                        .apply(Target::Allocation(r, after[r]), &mut ctx)
                })
                .collect();
            // Logged with the latest decision's inputs and forecast (if a window has closed
            // yet), restated: what the new budget made of the allocation.
            let mut d = self.last.clone().unwrap_or_default();
            d.allocation = after;
            d.resized = moved;
            d.action = Action::Resize;
            d.reason = "PATCH /predictor: the allocation moved into the new budget".into();
            self.log.push(d, applied);
        }
        Ok(())
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
            ..MachineConfig::default()
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
