//! How decisions become changes to the VM. Every actuator has one shape ([`Actuator`]): it is
//! asked to reach a [`Target`] and says what took effect, or why not. The autopilot owns a list
//! of them ([`Actuators`]); adding one is a file here and one `add` where the autopilot attaches.
//!
//! | knob | actuator | acts through |
//! |---|---|---|
//! | cpu | [`cpu::CpuQuota`] | the VM's cgroup CPU quota |
//! | cpu (a VM that can plug vCPUs) | [`vcpus::VcpuCores`] | whole vCPUs by hot-plug, the quota for the fraction |
//! | mem | [`memory::ElasticMemory`] | virtio-mem plug/unplug, balloon inflate/deflate |
//! | blk, net | [`bandwidth::Bandwidth`] | the drives' / interfaces' bandwidth buckets |
//! | seccomp | [`seccomp::SeccompStage`] | every thread's seccomp stage |
//!
//! Changes to devices go through [`crate::live::apply`], the function the API's PATCHes use, so
//! the VM's configuration shows them the same way.

pub mod bandwidth;
pub mod cpu;
pub mod memory;
pub mod seccomp;
pub mod vcpus;

use predictor::resource::Resource;

use crate::exit::ExitSignal;
use crate::microvm::MicroVm;
use crate::seccomp::Stage;
use crate::vmm_config::VmConfig;

use super::decisions::Applied;

/// What an actuator is asked to reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// A resource's allocation, in its unit (cores, MiB, MiB/s).
    Allocation(Resource, f64),
    /// The seccomp stage every thread moves to.
    SeccompStage(Stage),
}

/// What an actuator turns: a resource, or the threads' seccomp stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    Resource(Resource),
    Seccomp,
}

impl Knob {
    /// The name decisions log it under (`cpu`, `mem`, `blk`, `net`, `seccomp`).
    pub fn name(self) -> &'static str {
        match self {
            Knob::Resource(r) => r.name(),
            Knob::Seccomp => "seccomp",
        }
    }
}

impl Target {
    pub fn knob(&self) -> Knob {
        match self {
            Target::Allocation(r, _) => Knob::Resource(*r),
            Target::SeccompStage(_) => Knob::Seccomp,
        }
    }
}

/// Why an actuator could not reach its target.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("{0}")]
    Refused(String),
    #[error("{knob} actuator got a {target:?} target")]
    WrongTarget { knob: &'static str, target: Target },
}

/// What actuators act on: the running VM and its configuration, and the VM as the window that
/// decided saw it.
pub struct Context<'a> {
    pub vm: &'a mut MicroVm,
    pub config: &'a mut VmConfig,
    pub exit: &'a ExitSignal,
    /// What the guest uses now, in MiB (its own report, else its resident memory): memory is
    /// never taken below it.
    pub used_mib: f64,
}

/// One way the autopilot changes the VM.
pub trait Actuator: Send {
    fn knob(&self) -> Knob;
    /// Where and how it acts, for `GET /predictor`.
    fn describe(&self) -> String;
    /// Moves the VM to `target`; says what took effect.
    fn apply(&mut self, target: Target, ctx: &mut Context) -> Result<String, ActuatorError>;
    /// Called every window, whether its decision acted or not: what the actuator does when time
    /// alone calls for it (a vCPU unplugged once demand has stayed low). Says what it did, if
    /// anything.
    fn follow_up(&mut self, _ctx: &mut Context) -> Option<Result<String, ActuatorError>> {
        None
    }
}

/// The actuators the autopilot has, and why the knobs without one have none.
#[derive(Default)]
pub struct Actuators {
    list: Vec<Box<dyn Actuator>>,
    missing: Vec<(Knob, String)>,
}

impl Actuators {
    pub fn add(&mut self, actuator: Box<dyn Actuator>) {
        self.list.push(actuator);
    }

    /// Records why `knob` has no actuator (a target for it is then logged as not applied).
    pub fn unavailable(&mut self, knob: Knob, why: String) {
        self.missing.push((knob, why));
    }

    /// What `GET /predictor` says of `knob`: its actuator, or why there is none.
    pub fn describe(&self, knob: Knob) -> String {
        match self.list.iter().find(|a| a.knob() == knob) {
            Some(a) => a.describe(),
            None => self.why_missing(knob),
        }
    }

    fn why_missing(&self, knob: Knob) -> String {
        self.missing.iter().find(|(k, _)| *k == knob).map_or_else(
            || format!("no {} actuator", knob.name()),
            |(_, why)| why.clone(),
        )
    }

    /// Every actuator's follow-up of this window: what they did on their own.
    pub fn follow_up(&mut self, ctx: &mut Context) -> Vec<Applied> {
        self.list
            .iter_mut()
            .filter_map(|a| {
                let (applied, detail) = match a.follow_up(ctx)? {
                    Ok(detail) => (true, detail),
                    Err(e) => (false, e.to_string()),
                };
                Some(Applied {
                    what: a.knob().name().into(),
                    applied,
                    detail,
                })
            })
            .collect()
    }

    /// Asks the actuator of the target's knob to reach it.
    pub fn apply(&mut self, target: Target, ctx: &mut Context) -> Applied {
        let knob = target.knob();
        let (applied, detail) = match self.list.iter_mut().find(|a| a.knob() == knob) {
            Some(a) => match a.apply(target, ctx) {
                Ok(detail) => (true, detail),
                Err(e) => (false, e.to_string()),
            },
            None => (false, format!("not applied: {}", self.why_missing(knob))),
        };
        Applied {
            what: knob.name().into(),
            applied,
            detail,
        }
    }
}
