//! The anomaly responder: carries out the action the policy's anomaly ladder chose. Tightening
//! seccomp and throttling go through the actuators; pausing and killing act on the VM itself.

use predictor::policy::{Action, Decision};
use predictor::resource::Resource;

use super::actuators::{Actuators, Context, Target};
use super::decisions::Applied;
use crate::exit::ExitReason;
use crate::microvm::RunState;
use crate::seccomp::Stage;

/// What the responder did that outlasts a window.
#[derive(Debug, Default)]
pub struct Responder {
    /// A throttle holds CPU at the budget minimum until the predictor is reconfigured.
    throttled: bool,
}

impl Responder {
    /// Whether an earlier throttle holds the CPU allocation (resizes wait).
    pub fn holds(&self, resource: Resource) -> bool {
        self.throttled && resource == Resource::Cpu
    }

    /// Whether a throttle holds the CPU (saved in a snapshot).
    pub fn throttled(&self) -> bool {
        self.throttled
    }

    /// Holds what a snapshot's responder held.
    pub fn restore(&mut self, throttled: bool) {
        self.throttled = throttled;
    }

    /// Lets go of what earlier responses hold (a new configuration starts afresh).
    pub fn release(&mut self) {
        self.throttled = false;
    }

    /// Carries out `d`'s anomaly action; `cpu_min` is the budget's CPU minimum a throttle goes to.
    pub fn respond(
        &mut self,
        d: &Decision,
        cpu_min: f64,
        actuators: &mut Actuators,
        ctx: &mut Context,
    ) -> Applied {
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
            Action::TightenSeccomp => {
                let a = actuators.apply(Target::SeccompStage(Stage::Quarantine), ctx);
                (a.applied, a.detail)
            }
            Action::Throttle => {
                self.throttled = true;
                let a = actuators.apply(Target::Allocation(Resource::Cpu, cpu_min), ctx);
                (
                    a.applied,
                    format!("throttled to the budget minimum: {}", a.detail),
                )
            }
            Action::Pause => match ctx.vm.state() {
                RunState::Paused => (true, "already paused".to_string()),
                RunState::Running => match ctx.vm.pause() {
                    Ok(()) => {
                        tracing::warn!("predictor paused the VM: {why}");
                        (true, "VM paused; PATCH /vm Resumed to continue".to_string())
                    }
                    Err(e) => (false, e.to_string()),
                },
            },
            Action::Kill => {
                ctx.exit.request(ExitReason::KilledByPredictor(why));
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
}
