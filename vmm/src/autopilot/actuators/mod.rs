//! How decisions become changes to the VM: the memory actuator interface (virtio-mem/balloon
//! implement it), bandwidth buckets for the rate limiters, and the memory target rule.

use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use serde::Serialize;

const MIB: f64 = 1024.0 * 1024.0;
/// Refill period of the buckets the predictor sizes: short, so a resize shows within a window.
const REFILL_MS: u64 = 100;

/// The guest's own view of its memory (balloon statistics or the guest agent).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GuestMemoryStats {
    pub used_mib: u64,
    pub available_mib: u64,
    /// When the guest reported it, in ms of the predictor's clock.
    pub at_ms: u64,
}

/// A memory device's state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryState {
    pub boot_mib: u64,
    pub plugged_mib: u64,
    pub balloon_mib: u64,
    pub guest: Option<GuestMemoryStats>,
}

impl MemoryState {
    /// What the guest has now.
    pub fn total_mib(&self) -> u64 {
        (self.boot_mib + self.plugged_mib).saturating_sub(self.balloon_mib)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("the memory device refused {requested} MiB: {reason}")]
    Refused { requested: u64, reason: String },
}

/// Grows or shrinks the guest's memory (virtio-mem plug/unplug, balloon deflate/inflate).
pub trait MemoryActuator: Send {
    fn state(&self) -> MemoryState;
    /// Asks for `mib` in total; returns the target the device accepted (clamped to what it can).
    fn request_total_mib(&mut self, mib: u64) -> Result<u64, ActuatorError>;
}

/// The memory to ask for: the allocation, never below what the guest uses (its own report, or
/// resident guest memory when it reports nothing).
pub fn memory_target_mib(allocation_mib: f64, state: &MemoryState, resident_mib: f64) -> u64 {
    let used = state
        .guest
        .map_or(resident_mib, |g| g.used_mib as f64)
        .max(0.0);
    allocation_mib.max(used).ceil() as u64
}

/// Applies a memory allocation through `actuator`; the text says what happened.
pub fn apply_memory(
    actuator: &mut dyn MemoryActuator,
    allocation_mib: f64,
    resident_mib: f64,
) -> Result<String, ActuatorError> {
    let state = actuator.state();
    let target = memory_target_mib(allocation_mib, &state, resident_mib);
    if target == state.total_mib() {
        return Ok(format!("memory already {target} MiB"));
    }
    let got = actuator.request_total_mib(target)?;
    Ok(format!(
        "memory {} -> {got} MiB requested (allocation {allocation_mib:.0} MiB)",
        state.total_mib()
    ))
}

/// A limiter with a bandwidth bucket of `mibps` and the `ops` bucket of `base` kept.
pub fn bandwidth_limiter(mibps: f64, base: Option<RateLimiterConfig>) -> RateLimiterConfig {
    let size = (mibps * MIB * REFILL_MS as f64 / 1000.0).round().max(1.0) as u64;
    RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: REFILL_MS,
        }),
        ops: base.and_then(|b| b.ops),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// virtio-mem-like: plugs in 128 MiB blocks up to a region size.
    struct FakeMem {
        state: MemoryState,
        region_mib: u64,
        requests: Vec<u64>,
    }

    impl MemoryActuator for FakeMem {
        fn state(&self) -> MemoryState {
            self.state
        }
        fn request_total_mib(&mut self, mib: u64) -> Result<u64, ActuatorError> {
            self.requests.push(mib);
            let plugged = mib.saturating_sub(self.state.boot_mib).div_ceil(128) * 128;
            if plugged > self.region_mib {
                return Err(ActuatorError::Refused {
                    requested: mib,
                    reason: "beyond the hotplug region".into(),
                });
            }
            self.state.plugged_mib = plugged;
            Ok(self.state.total_mib())
        }
    }

    fn fake(guest_used: Option<u64>) -> FakeMem {
        FakeMem {
            state: MemoryState {
                boot_mib: 256,
                plugged_mib: 0,
                balloon_mib: 0,
                guest: guest_used.map(|u| GuestMemoryStats {
                    used_mib: u,
                    available_mib: 256 - u.min(256),
                    at_ms: 0,
                }),
            },
            region_mib: 1024,
            requests: Vec::new(),
        }
    }

    #[test]
    fn grows_with_the_allocation_and_never_below_guest_use() {
        let mut m = fake(Some(200));
        let text = apply_memory(&mut m, 600.0, 0.0).unwrap();
        assert_eq!(m.requests, vec![600]);
        assert_eq!(m.state.plugged_mib, 384);
        assert!(text.contains("256 -> 640 MiB"), "{text}");
        // The forecast drops below what the guest uses: the request stops at its use.
        m.state.guest.as_mut().unwrap().used_mib = 500;
        apply_memory(&mut m, 300.0, 0.0).unwrap();
        assert_eq!(m.requests.last(), Some(&500));
        assert_eq!(m.state.total_mib(), 512);
    }

    #[test]
    fn without_guest_stats_resident_memory_is_the_floor() {
        let mut m = fake(None);
        m.state.plugged_mib = 256;
        apply_memory(&mut m, 100.0, 300.4).unwrap();
        assert_eq!(m.requests, vec![301]);
        let text = apply_memory(&mut m, 100.0, 384.0).unwrap();
        assert!(text.contains("already 384"), "{text}");
        assert!(apply_memory(&mut m, 5000.0, 0.0).is_err());
    }

    /// The policy and the actuator together over a guest-reported ramp: every window's demand
    /// fits in what was plugged by the end of the window before, and the memory goes back once
    /// the demand drops.
    #[test]
    fn a_ramp_is_plugged_ahead_of_demand_and_returned_after() {
        use predictor::policy::{Budget, Limits, PolicyConfig};
        use predictor::resource::Usage;
        use predictor::sample::Sample;
        use predictor::spec::{ForecasterKind, PolicySpec};

        let mut budget = Budget::from_capacity(&Usage {
            cpu: 1.0,
            mem: 1280.0,
            blk: 10.0,
            net: 10.0,
        });
        budget.0.mem = Limits {
            min: 256.0,
            max: 1280.0,
            initial: 256.0,
            step: 2.0,
        };
        let mut policy = PolicySpec {
            forecaster: ForecasterKind::Holt,
            model_path: None,
            budget,
            config: PolicyConfig {
                horizon: predictor::forecast::Horizon::new(5).unwrap(),
                ..PolicyConfig::default()
            },
        }
        .build()
        .unwrap();
        let mut mem = fake(Some(200));
        mem.region_mib = 1024;
        // Flat, a ramp of 8 MiB a window to 1000 MiB, a plateau, then back down.
        let demand: Vec<u64> = (0..60)
            .map(|_| 200)
            .chain((1..=100).map(|i| 200 + 8 * i))
            .chain((0..30).map(|_| 1000))
            .chain((0..150).map(|_| 200))
            .collect();
        let mut peak_plugged = 0;
        for (t, &d) in demand.iter().enumerate() {
            let plugged_before = mem.state.total_mib();
            assert!(
                d <= plugged_before,
                "window {t}: demand {d} MiB above the {plugged_before} MiB plugged"
            );
            mem.state.guest.as_mut().unwrap().used_mib = d;
            let decision = policy.decide(&Sample {
                t_ms: t as u64 * 100,
                usage: Usage {
                    cpu: 0.5,
                    mem: d as f64,
                    blk: 0.0,
                    net: 0.0,
                },
                signals: Default::default(),
            });
            if decision.resized.mem {
                apply_memory(&mut mem, decision.allocation.mem, 0.0).unwrap();
            }
            peak_plugged = peak_plugged.max(mem.state.total_mib());
        }
        assert!(peak_plugged >= 1000, "{peak_plugged}");
        // Returned, though not all the way to the floor: after the drop Holt's trend forecasts
        // near zero for a while, the band measures errors relative to the forecast, and those
        // huge relative errors stay in its quantile for hundreds of windows.
        assert!(
            mem.state.total_mib() <= peak_plugged * 6 / 10,
            "still {} of {peak_plugged} MiB plugged after the demand dropped to 200",
            mem.state.total_mib()
        );
    }

    #[test]
    fn bandwidth_buckets_keep_the_ops_bucket() {
        let ops = TokenBucketConfig {
            size: 100,
            one_time_burst: None,
            refill_time: 1000,
        };
        let base = RateLimiterConfig {
            bandwidth: None,
            ops: Some(ops),
        };
        let l = bandwidth_limiter(10.0, Some(base));
        assert_eq!(l.bandwidth.unwrap().size, 1024 * 1024);
        assert_eq!(l.bandwidth.unwrap().refill_time, 100);
        assert_eq!(l.ops, Some(ops));
        assert_eq!(bandwidth_limiter(0.0, None).bandwidth.unwrap().size, 1);
    }
}
