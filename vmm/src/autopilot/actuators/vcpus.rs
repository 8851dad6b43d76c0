//! The CPU actuator of a VM that can plug vCPUs: whole vCPUs by hot-plug, and the cgroup quota
//! (`cpu::CpuQuota`) for the fraction.
//!
//! The CPU allocation the policy hands over is the forecast's calibrated upper band over the
//! policy's horizon: the demand the next window(s) may bring. So plugging as soon as the
//! allocation needs more vCPUs than are online plugs one window before the forecast demand
//! exceeds the online count. Unplugging waits: the allocation must stay at least `hysteresis`
//! cores below one vCPU fewer for `unplug_after_ms` (the policy has already smoothed it: it
//! shrinks only after several windows below, and by at most its shrink limit), and then one
//! vCPU goes at a time, only with the guest's consent (it ejects the vCPU; until then the
//! removal is pending and the actuator waits). Plugs never wait: being short costs more than
//! a spare vCPU. Between the plug threshold (`n` online, allocation above `n`) and the unplug
//! one (allocation at or below `n - 1 - hysteresis`) nothing changes, so an allocation wavering
//! around a whole number does not flap.
//!
//! A plug waits for the guest, though: until it has taken the CPU hot-plug controller into use
//! (read a vCPU's status from it), its OS may still be booting, and a vCPU inserted then may go
//! unnoticed until a later event, or come while the guest cannot handle it. The quota is not
//! held: it needs nothing of the guest.
//!
//! Every change (and every refusal) is logged with the decision that asked for it; an unplug,
//! which needs no decision of its own (the allocation stayed low), comes from
//! [`Actuator::follow_up`], once per window.

use std::time::{Duration, Instant};

use predictor::resource::Resource;

use super::cpu::CpuQuota;
use super::{Actuator, ActuatorError, Context, Knob, Target};
use crate::vcpus::VcpuStatus;
use crate::vmm_config::VcpuPolicy;

/// Whole vCPUs plus a quota.
pub struct VcpuCores {
    quota: Option<CpuQuota>,
    hysteresis: Hysteresis,
    /// The allocation last asked for, in cores.
    cores: Option<f64>,
    /// The latest change of the vCPU count, for `GET /predictor`.
    last_change: Option<String>,
    /// The latest window wanted a plug the guest could not take yet.
    held: bool,
}

/// Why a plug waits, in `GET /predictor` and the decision log.
const HELD: &str = "the guest has not taken the CPU hot-plug controller into use yet";

/// What the decision log says of a CPU event raised again.
const RAISED_AGAIN: &str =
    "raised the CPU hot-plug event again: the guest had not read it for a window";

/// vCPUs needed to hold `cores`.
fn whole(cores: f64) -> u8 {
    (cores - 1e-9).ceil().clamp(1.0, f64::from(u8::MAX)) as u8
}

/// What the vCPU count should do in a window.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Move {
    /// Nothing: the allocation fits the vCPUs online, or has not been low for long enough.
    Hold,
    /// The guest has not ejected this vCPU yet: no change until it has.
    Pending(u8),
    /// `to` vCPUs are wanted, but the guest has not taken the hot-plug controller into use.
    Held {
        to: u8,
    },
    Plug {
        to: u8,
    },
    Unplug {
        to: u8,
    },
}

/// When to plug and unplug: the thresholds and the time the allocation has been low.
struct Hysteresis {
    policy: VcpuPolicy,
    /// Since when the allocation has been low enough to unplug a vCPU.
    low_since: Option<Instant>,
}

impl Hysteresis {
    fn plan(&mut self, cores: f64, status: &VcpuStatus, now: Instant) -> Move {
        if let Some(cpu) = status.vcpus.iter().find(|v| v.state == "removing") {
            self.low_since = None;
            return Move::Pending(cpu.index);
        }
        let online = status.online;
        let wanted = whole(cores).min(status.max_vcpus);
        if wanted > online {
            self.low_since = None;
            if !status.guest_uses_hotplug {
                return Move::Held { to: wanted };
            }
            return Move::Plug { to: wanted };
        }
        let low = online > 1 && cores <= f64::from(online - 1) - self.policy.hysteresis;
        if !low {
            self.low_since = None;
            return Move::Hold;
        }
        let since = *self.low_since.get_or_insert(now);
        if now.duration_since(since) < Duration::from_millis(self.policy.unplug_after_ms) {
            return Move::Hold;
        }
        self.low_since = None;
        Move::Unplug { to: online - 1 }
    }
}

impl VcpuCores {
    /// `quota`: the cgroup for the fraction, if the VM has one.
    pub fn new(quota: Option<CpuQuota>, policy: VcpuPolicy) -> Self {
        Self {
            quota,
            hysteresis: Hysteresis {
                policy,
                low_since: None,
            },
            cores: None,
            last_change: None,
            held: false,
        }
    }

    /// Moves the vCPU count as `cores` asks now. `None`: nothing to say; `Some((changed, what))`:
    /// `changed` when the count was asked to move.
    fn step(
        &mut self,
        cores: f64,
        ctx: &mut Context,
    ) -> Option<(bool, Result<String, ActuatorError>)> {
        let status = ctx.vm.vcpu_status();
        let online = status.online;
        let refused = |e: crate::vcpus::HotplugError| ActuatorError::Refused(e.to_string());
        let plan = self.hysteresis.plan(cores, &status, Instant::now());
        self.held = matches!(plan, Move::Held { .. });
        let done = match plan {
            Move::Hold => return None,
            Move::Held { to } => {
                return Some((
                    false,
                    Ok(format!(
                        "plug held: {cores:.2} cores need {to} vCPUs, {online} online, but {HELD}"
                    )),
                ))
            }
            Move::Pending(cpu) => {
                return Some((false, Ok(format!("vCPU {cpu} still to be ejected by the guest"))))
            }
            Move::Plug { to } => ctx.vm.set_vcpu_count(to).map_err(refused).map(|c| {
                format!(
                    "plugged vCPU {:?}: {cores:.2} cores need {to}, {online} online",
                    c.plugged
                )
            }),
            Move::Unplug { to } => ctx.vm.set_vcpu_count(to).map_err(refused).map(|c| {
                format!(
                    "asked the guest to unplug vCPU {:?}: {cores:.2} cores for {} ms, {online} online",
                    c.removal_requested, self.hysteresis.policy.unplug_after_ms
                )
            }),
        };
        if let Ok(text) = &done {
            self.last_change = Some(text.clone());
        }
        Some((true, done))
    }
}

impl Actuator for VcpuCores {
    fn knob(&self) -> Knob {
        Knob::Resource(Resource::Cpu)
    }

    fn describe(&self) -> String {
        let quota = match &self.quota {
            Some(q) => format!("quota for the fraction: {}", q.describe()),
            None => "no quota (no cgroup)".to_string(),
        };
        let held = if self.held {
            format!("; plugs held: {HELD}")
        } else {
            String::new()
        };
        format!(
            "whole vCPUs by hot-plug (plug when the allocation needs one more, unplug one after {} ms at least {} cores below; last change: {}{held}); {quota}",
            self.hysteresis.policy.unplug_after_ms,
            self.hysteresis.policy.hysteresis,
            self.last_change.as_deref().unwrap_or("none")
        )
    }

    fn apply(&mut self, target: Target, ctx: &mut Context) -> Result<String, ActuatorError> {
        let Target::Allocation(Resource::Cpu, cores) = target else {
            return Err(ActuatorError::WrongTarget {
                knob: "cpu",
                target,
            });
        };
        self.cores = Some(cores);
        let quota = match &self.quota {
            Some(q) => {
                let us = q
                    .set_cores(cores)
                    .map_err(|e| ActuatorError::Refused(e.to_string()))?;
                format!("cpu quota {us} us per 100 ms ({cores:.2} cores)")
            }
            None => format!("{cores:.2} cores (no quota)"),
        };
        match self.step(cores, ctx) {
            Some((_, Ok(vcpus))) => Ok(format!("{vcpus}; {quota}")),
            Some((_, Err(e))) => Err(ActuatorError::Refused(format!("{e}; {quota}"))),
            None => Ok(format!("{} vCPUs online; {quota}", ctx.vm.vcpus_online())),
        }
    }

    fn follow_up(&mut self, ctx: &mut Context) -> Option<Result<String, ActuatorError>> {
        let raised = match ctx.vm.renotify_vcpu_events() {
            Ok(true) => Some(RAISED_AGAIN),
            Ok(false) => None,
            Err(e) => return Some(Err(ActuatorError::Refused(e.to_string()))),
        };
        // Only changes: a window without one has nothing of the vCPUs to log.
        let change = match self.cores.and_then(|cores| self.step(cores, ctx)) {
            Some((true, done)) => Some(done),
            _ => None,
        };
        match (raised, change) {
            (None, change) => change,
            (Some(r), None) => Some(Ok(r.to_string())),
            (Some(r), Some(Ok(c))) => Some(Ok(format!("{r}; {c}"))),
            (Some(_), Some(Err(e))) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpus::VcpuInfo;

    #[test]
    fn whole_vcpus_hold_the_allocation_without_rounding_noise() {
        assert_eq!(whole(0.05), 1);
        assert_eq!(whole(1.0), 1);
        assert_eq!(whole(1.0 + 1e-12), 1);
        assert_eq!(whole(1.01), 2);
        assert_eq!(whole(2.99), 3);
        assert_eq!(whole(3.0), 3);
        assert_eq!(whole(0.0), 1);
    }

    /// `online` of `max` vCPUs, vCPU `removing` (if any) still to be ejected.
    fn status(online: u8, max: u8, removing: Option<u8>) -> VcpuStatus {
        let vcpus = (0..max)
            .map(|index| VcpuInfo {
                index,
                state: match index {
                    i if Some(i) == removing => "removing",
                    i if i < online => "running",
                    _ => "unplugged",
                },
                tid: None,
            })
            .collect();
        VcpuStatus {
            online,
            max_vcpus: max,
            hotplug: true,
            guest_uses_hotplug: true,
            vcpus,
        }
    }

    fn hysteresis(unplug_after_ms: u64) -> Hysteresis {
        Hysteresis {
            policy: VcpuPolicy {
                enabled: true,
                unplug_after_ms,
                hysteresis: 0.2,
            },
            low_since: None,
        }
    }

    #[test]
    fn plugs_at_once_as_many_as_the_allocation_needs_up_to_max_vcpus() {
        let mut h = hysteresis(1000);
        let t = Instant::now();
        assert_eq!(h.plan(1.0, &status(1, 4, None), t), Move::Hold);
        assert_eq!(h.plan(1.01, &status(1, 4, None), t), Move::Plug { to: 2 });
        assert_eq!(h.plan(2.5, &status(1, 4, None), t), Move::Plug { to: 3 });
        assert_eq!(h.plan(9.0, &status(2, 4, None), t), Move::Plug { to: 4 });
        assert_eq!(h.plan(9.0, &status(4, 4, None), t), Move::Hold);
    }

    #[test]
    fn plugs_wait_until_the_guest_has_taken_the_controller_into_use() {
        let mut h = hysteresis(1000);
        let t = Instant::now();
        let booting = VcpuStatus {
            guest_uses_hotplug: false,
            ..status(1, 4, None)
        };
        assert_eq!(h.plan(2.5, &booting, t), Move::Held { to: 3 });
        assert_eq!(h.plan(0.5, &booting, t), Move::Hold, "nothing wanted");
        assert_eq!(h.plan(2.5, &status(1, 4, None), t), Move::Plug { to: 3 });
    }

    #[test]
    fn unplugs_one_only_after_the_allocation_stayed_below_the_hysteresis_for_the_delay() {
        let mut h = hysteresis(1000);
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        // 3 online: 1.85 cores is within the hysteresis of 2 vCPUs, nothing ever happens.
        assert_eq!(h.plan(1.85, &status(3, 4, None), t), Move::Hold);
        assert_eq!(h.plan(1.85, &status(3, 4, None), ms(5000)), Move::Hold);
        // Low from 5 s: not before 6 s.
        assert_eq!(h.plan(1.8, &status(3, 4, None), ms(5000)), Move::Hold);
        assert_eq!(h.plan(1.2, &status(3, 4, None), ms(5999)), Move::Hold);
        assert_eq!(
            h.plan(1.2, &status(3, 4, None), ms(6000)),
            Move::Unplug { to: 2 }
        );
        // While the guest has not ejected it: wait, and the delay starts again after.
        assert_eq!(
            h.plan(0.5, &status(3, 4, Some(2)), ms(7000)),
            Move::Pending(2)
        );
        assert_eq!(h.plan(0.5, &status(2, 4, None), ms(7100)), Move::Hold);
        assert_eq!(h.plan(0.5, &status(2, 4, None), ms(8099)), Move::Hold);
        assert_eq!(
            h.plan(0.5, &status(2, 4, None), ms(8100)),
            Move::Unplug { to: 1 }
        );
        // One vCPU is the least there is.
        assert_eq!(h.plan(0.05, &status(1, 4, None), ms(20000)), Move::Hold);
    }

    /// The default predictor of a VM booted with 1 of at most 4 vCPUs and these thresholds,
    /// fed a CPU demand (with a little noise) that idles, ramps up to 3.6 cores, holds, and falls
    /// back: every window's demand finds the vCPUs it needs already online (plugged after an
    /// earlier window, from the calibrated upper band), each vCPU is plugged once and unplugged
    /// once, and only after the demand has stayed low for the delay.
    #[test]
    fn the_default_predictor_plugs_each_vcpu_before_a_ramping_demand_needs_it() {
        use crate::vmm_config::{MachineConfig, PredictorConfig};
        use predictor::sample::Sample;

        let machine = MachineConfig {
            vcpu_count: 1,
            max_vcpus: Some(4),
            ..MachineConfig::default()
        };
        let mut policy = PredictorConfig::default()
            .policy_spec(&machine)
            .unwrap()
            .build()
            .unwrap();
        let mut h = hysteresis(3000);
        let start = Instant::now();
        let mut online = 1u8;
        let (mut plugs, mut unplugs) = (Vec::new(), Vec::new());
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for w in 0..260u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let noise = (seed % 1000) as f64 / 1000.0 * 0.06 - 0.03;
            let demand = match w {
                0..40 => 0.4,
                40..104 => 0.4 + 0.05 * (w - 40) as f64,
                104..140 => 3.6,
                _ => 0.4,
            } + noise;
            if w < 140 {
                assert!(
                    demand <= f64::from(online),
                    "window {w}: demand {demand:.2} cores with {online} vCPUs online"
                );
            }
            let d = policy.decide(&Sample {
                t_ms: w * 100,
                usage: predictor::resource::Usage {
                    cpu: demand.min(f64::from(online)),
                    mem: 64.0,
                    blk: 0.0,
                    net: 0.0,
                },
                signals: Default::default(),
            });
            let now = start + Duration::from_millis(w * 100);
            match h.plan(d.allocation.cpu, &status(online, 4, None), now) {
                Move::Plug { to } => {
                    plugs.push((w, to));
                    online = to;
                }
                Move::Unplug { to } => {
                    unplugs.push((w, to));
                    online = to;
                }
                Move::Hold | Move::Pending(_) | Move::Held { .. } => {}
            }
        }
        assert_eq!(online, 1, "plugs {plugs:?}, unplugs {unplugs:?}");
        let steps = |v: &[(u64, u8)]| v.iter().map(|&(_, to)| to).collect::<Vec<_>>();
        // Whole steps of one: never more than one at a time in either direction, no flapping.
        assert_eq!(steps(&plugs), [2, 3, 4], "{plugs:?}");
        assert_eq!(steps(&unplugs), [3, 2, 1], "{unplugs:?}");
        // The first unplug waits for the delay (30 windows) after the demand fell.
        assert!(unplugs[0].0 >= 140 + 30, "{unplugs:?}");
    }

    #[test]
    fn an_allocation_back_up_restarts_the_delay_and_never_flaps() {
        let mut h = hysteresis(1000);
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        assert_eq!(h.plan(0.7, &status(2, 2, None), t), Move::Hold);
        // Back above the hysteresis for a window: the low time starts again.
        assert_eq!(h.plan(0.9, &status(2, 2, None), ms(900)), Move::Hold);
        assert_eq!(h.plan(0.7, &status(2, 2, None), ms(1000)), Move::Hold);
        assert_eq!(h.plan(0.7, &status(2, 2, None), ms(1999)), Move::Hold);
        // An allocation wavering around a whole number changes nothing either way.
        let mut h = hysteresis(0);
        for (i, cores) in [1.95, 2.0, 1.9, 1.99, 1.85].into_iter().enumerate() {
            assert_eq!(
                h.plan(cores, &status(2, 4, None), ms(i as u64 * 100)),
                Move::Hold
            );
        }
    }
}
