//! The seccomp actuator: moves every thread to a stricter seccomp stage. Each thread installs the
//! stage itself at its next safe point; the VMM thread kicks the vCPUs once it has.

use super::{Actuator, ActuatorError, Context, Knob, Target};
use crate::seccomp;

pub struct SeccompStage;

impl Actuator for SeccompStage {
    fn knob(&self) -> Knob {
        Knob::Seccomp
    }

    fn describe(&self) -> String {
        if seccomp::is_enabled() {
            "stages boot -> steady -> quarantine; tighten_seccomp requests quarantine".into()
        } else {
            "off (--no-seccomp)".into()
        }
    }

    fn apply(&mut self, target: Target, _ctx: &mut Context) -> Result<String, ActuatorError> {
        let Target::SeccompStage(stage) = target else {
            return Err(ActuatorError::WrongTarget {
                knob: "seccomp",
                target,
            });
        };
        seccomp::request_stage(stage).map_err(|e| ActuatorError::Refused(e.to_string()))?;
        Ok(format!("seccomp stage {stage} requested"))
    }
}
