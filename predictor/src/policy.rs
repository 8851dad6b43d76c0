//! Turns forecasts into per-resource allocations within a budget, and every window into a
//! [`Decision`] record.

use crate::bucket::Bucket;
use crate::forecast::{Forecast, Forecaster, Horizon};
use crate::math;
use crate::persist::{PersistError, SavedForecaster};
use crate::resource::{PerResource, Resource, Usage};
use crate::sample::Sample;
use crate::score::{
    AnomalyConfig, AnomalyDetector, AnomalyReport, BehaviourConfig, BehaviourScore, ScoreError,
};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt::Write as _;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum PolicyError {
    #[error("{resource:?} budget needs 0 <= min <= initial <= max and step > 0, got {limits:?}")]
    Limits { resource: Resource, limits: Limits },
    #[error("{name} must be in {range}, got {value}")]
    Parameter {
        name: &'static str,
        range: &'static str,
        value: f64,
    },
    #[error("invalid score configuration: {0}")]
    Score(#[from] ScoreError),
    #[error("{resource:?} forecaster: {source}")]
    Forecaster {
        resource: Resource,
        source: PersistError,
    },
}

/// Bounds on one resource's allocation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub min: f64,
    pub max: f64,
    /// Allocation before the forecasters are warm.
    pub initial: f64,
    /// Granularity: memory block size, CPU quota step, bandwidth bucket step.
    pub step: f64,
}

/// The per-VM budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget(pub PerResource<Limits>);

impl Budget {
    /// A budget that may use up to `capacity` and starts there, with steps of 2 MiB
    /// memory blocks (virtio-mem's sub-block size on x86), 1/100 core (1 ms of CFS quota per
    /// 100 ms period) and 1 MiB/s for the bandwidth buckets.
    pub fn from_capacity(capacity: &Usage) -> Budget {
        Budget(capacity.map(|r, &max| {
            let (min, step) = match r {
                Resource::Cpu => (0.05, 0.01),
                Resource::Mem => (64.0_f64.min(max), 2.0),
                Resource::Blk | Resource::Net => (1.0_f64.min(max), 1.0),
            };
            Limits {
                min,
                max,
                initial: max,
                step,
            }
        }))
    }

    pub fn max(&self) -> Usage {
        self.0.map(|_, l| l.max)
    }

    fn validate(&self) -> Result<(), PolicyError> {
        for (resource, l) in self.0.iter() {
            let ok = 0.0 <= l.min && l.min <= l.initial && l.initial <= l.max && l.step > 0.0;
            if !ok {
                return Err(PolicyError::Limits {
                    resource,
                    limits: *l,
                });
            }
        }
        Ok(())
    }
}

fn default_target_under() -> f64 {
    0.01
}

fn default_shortfall_cost() -> PerResource<f64> {
    // A CPU or bandwidth shortfall throttles the guest for a window and is over; a memory
    // shortfall makes it reclaim or swap (or, unplugged, fail an allocation), so it costs more.
    PerResource {
        cpu: 1.0,
        mem: 2.0,
        blk: 1.0,
        net: 1.0,
    }
}

fn default_calibration_step() -> f64 {
    // A miss widens the band by a tenth of its width; a hundred windows without one (at a 1 %
    // target) narrow it back.
    0.1
}

fn default_memory_lead() -> u8 {
    1
}

fn default_bucket_windows() -> PerResource<f64> {
    // The block and network actuators' bandwidth buckets hold one refill period (100 ms, the
    // default window) of the allocated rate; a CPU quota or plugged memory saves nothing.
    PerResource {
        cpu: 0.0,
        mem: 0.0,
        blk: 1.0,
        net: 1.0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Allocation covers the upper forecasts of the next `horizon` windows, so grows lead
    /// demand by as long as a resize takes to land.
    pub horizon: Horizon,
    /// Share of windows allowed to be under-provisioned on a resource whose shortfall costs
    /// 1; the band is calibrated online so the realised share holds it on any workload.
    #[serde(default = "default_target_under")]
    pub target_under: f64,
    /// Cost of a unit of shortfall relative to a unit of slack, per resource, on the scale
    /// where `target_under` is the right miss rate for cost 1 (newsvendor: a resource with
    /// cost `c` aims at `t / (t + c (1 - t))`).
    #[serde(default = "default_shortfall_cost")]
    pub shortfall_cost: PerResource<f64>,
    /// Step of the calibration: how much one miss widens the band, as a share of its width.
    #[serde(default = "default_calibration_step")]
    pub calibration_step: f64,
    /// Windows beyond `horizon` that memory's allocation also covers: a CPU quota or a
    /// bandwidth bucket takes effect at once, but the guest's virtio-mem driver plugs memory
    /// during the next window, so demand must be covered until the allocation after lands.
    #[serde(default = "default_memory_lead")]
    pub memory_lead: u8,
    /// Windows of the allocated rate the actuator's token bucket holds, per resource (0: none).
    /// Demand beyond the rate is served from the bucket while it lasts, so a window is
    /// under-provisioned only once the bucket runs dry (`bucket::Bucket`).
    #[serde(default = "default_bucket_windows")]
    pub bucket_windows: PerResource<f64>,
    /// A shrink is considered only when the target is this fraction below the allocation.
    pub shrink_hysteresis: f64,
    /// ... for this many consecutive windows.
    pub shrink_after: u32,
    /// Largest grow per window, as a fraction of the budget maximum.
    pub max_grow: f64,
    /// Largest shrink per window, as a fraction of the budget maximum.
    pub max_shrink: f64,
    /// Extra headroom at behaviour score 1 (scaled linearly below).
    pub behaviour_headroom: f64,
    pub behaviour: BehaviourConfig,
    pub anomaly: AnomalyConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            horizon: Horizon::ONE,
            target_under: default_target_under(),
            shortfall_cost: default_shortfall_cost(),
            calibration_step: default_calibration_step(),
            memory_lead: default_memory_lead(),
            bucket_windows: default_bucket_windows(),
            shrink_hysteresis: 0.03,
            shrink_after: 3,
            max_grow: 0.5,
            max_shrink: 0.1,
            // Off by default: on the synthetic set every 0.1 of headroom cost ~6 points of
            // slack for ~0.5 point less under-provisioning, worse than raising the quantile.
            behaviour_headroom: 0.0,
            behaviour: BehaviourConfig::default(),
            anomaly: AnomalyConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// How many windows ahead resource `r`'s allocation must cover.
    pub fn horizon_for(&self, r: Resource) -> Horizon {
        let lead = if r == Resource::Mem {
            self.memory_lead as usize
        } else {
            0
        };
        Horizon::new((self.horizon.get() + lead).min(Horizon::MAX)).unwrap_or(self.horizon)
    }

    /// The under-provisioning rate resource `r` aims at.
    pub fn target(&self, r: Resource) -> f64 {
        let t = self.target_under;
        t / (t + self.shortfall_cost[r] * (1.0 - t))
    }

    fn validate(&self) -> Result<(), PolicyError> {
        // The first bucket size out of range, if any, so one check covers all four.
        let burst = Resource::ALL
            .into_iter()
            .map(|r| self.bucket_windows[r])
            .find(|b| !(0.0..=100.0).contains(b))
            .unwrap_or(0.0);
        // The cost furthest from 1, so one check covers all four.
        let cost = Resource::ALL
            .into_iter()
            .map(|r| self.shortfall_cost[r])
            .max_by(|a, b| math::ln(*a).abs().total_cmp(&math::ln(*b).abs()))
            .unwrap_or(1.0);
        let fields = [
            (
                "target under-provisioning",
                self.target_under,
                self.target_under > 0.0 && self.target_under < 0.5,
                "(0, 0.5)",
            ),
            (
                "shortfall cost",
                cost,
                (1e-3..=1e3).contains(&cost),
                "[0.001, 1000]",
            ),
            (
                "bucket windows",
                burst,
                (0.0..=100.0).contains(&burst),
                "[0, 100]",
            ),
            (
                "calibration step",
                self.calibration_step,
                self.calibration_step > 0.0 && self.calibration_step <= 1.0,
                "(0, 1]",
            ),
            (
                "shrink hysteresis",
                self.shrink_hysteresis,
                (0.0..1.0).contains(&self.shrink_hysteresis),
                "[0, 1)",
            ),
            (
                "max grow",
                self.max_grow,
                self.max_grow > 0.0 && self.max_grow <= 1.0,
                "(0, 1]",
            ),
            (
                "max shrink",
                self.max_shrink,
                self.max_shrink > 0.0 && self.max_shrink <= 1.0,
                "(0, 1]",
            ),
            (
                "behaviour headroom",
                self.behaviour_headroom,
                (0.0..=10.0).contains(&self.behaviour_headroom),
                "[0, 10]",
            ),
        ];
        match fields.into_iter().find(|f| !f.2) {
            Some((name, value, _, range)) => Err(PolicyError::Parameter { name, range, value }),
            None => Ok(()),
        }
    }
}

/// Allocation of every resource, in the units of [`Resource`].
pub type Allocation = PerResource<f64>;

/// What the VMM should do after a window, most severe last so `max` picks the one to act on.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Hold,
    Resize,
    Log,
    Alert,
    TightenSeccomp,
    Throttle,
    Pause,
    Kill,
}

/// Online calibration of one resource's band: quantile tracking, the "P" part of conformal
/// PID control (Angelopoulos, Candes & Tibshirani, "Conformal PID control for time series
/// prediction", 2023). The forecasters give a band at the target quantile; the policy scales
/// its width by `1 + scale`, and `scale` moves by `step x (missed - target)` after every
/// window, where `missed` means demand exceeded what the allocation actually in force let
/// through (after alignment, hysteresis and change limits; for bandwidth, the rate plus the
/// token bucket's fill), not just the forecast. A widened band is at least one block wide, so
/// at `capacity / block` it reaches the maximum, which demand never exceeds, so
/// `scale` stays below `B = capacity / block + step`, and over any `T` windows of any
/// workload the share missed is at most `target + (B - scale_0) / (step T)`: the guarantee
/// needs no assumption about the demand series, and where the forecasters are good the band
/// narrows on its own (down to the point forecast at `scale = -1`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    target: f64,
    step: f64,
    scale: f64,
}

impl Calibration {
    pub fn new(target: f64, step: f64) -> Self {
        Calibration {
            target,
            step,
            scale: 0.0,
        }
    }

    /// One window's outcome.
    pub fn update(&mut self, missed: bool) {
        let miss = if missed { 1.0 } else { 0.0 };
        // Floored where the band vanishes: the floor only drops decrements, which can only
        // make misses rarer, so the bound still holds.
        self.scale = (self.scale + self.step * (miss - self.target)).max(-1.0);
    }

    /// The calibrated upper bound of `f`. Once misses have widened it, the band is at least
    /// `min_width` wide: a band of width zero could not be widened at all.
    pub fn upper(&self, f: Forecast, min_width: f64) -> f64 {
        let width = f.upper - f.point;
        let width = if self.scale > 0.0 {
            width.max(min_width)
        } else {
            width
        };
        f.point + width * (1.0 + self.scale)
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    /// The factor the forecasters' band width is multiplied by.
    pub fn width(&self) -> f64 {
        1.0 + self.scale
    }
}

/// How one resource's allocation was reached: the expert leading the forecast, the quantile
/// its band aims at and the factor calibration scales the band by.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Band {
    /// A forecaster's name: borrowed, so a decision allocates nothing for it.
    pub expert: Cow<'static, str>,
    pub quantile: f64,
    pub width: f64,
}

/// One window's record: what came in, what was predicted, what was decided and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub t_ms: u64,
    pub inputs: Sample,
    /// Forecasts for the next window.
    pub forecast: PerResource<Forecast>,
    /// Allocation for the next window.
    pub allocation: Allocation,
    pub resized: PerResource<bool>,
    /// The expert and calibrated band behind each resource's allocation.
    #[serde(default)]
    pub band: PerResource<Band>,
    pub behaviour: f64,
    pub anomaly: AnomalyReport,
    pub action: Action,
    pub reason: String,
}

/// What a policy has learned, for a VM snapshot: its forecasters, the allocation in force and
/// what the hysteresis counts, each band's calibration, the forecast the next window is scored
/// against, both scores and the fill of the actuators' buckets. The budget and configuration
/// are not in it: the restored VM's configuration gives them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyState {
    forecasters: PerResource<SavedForecaster>,
    allocation: Allocation,
    /// Each calibration's width (its target and step are configuration).
    calibration_scale: PerResource<f64>,
    calibrating: PerResource<bool>,
    shrink_streak: PerResource<u32>,
    expected: Option<PerResource<Forecast>>,
    behaviour: BehaviourScore,
    anomaly: AnomalyDetector,
    /// The actuators' token buckets. Last: the snapshot's encoding is positional, so a state
    /// saved before the buckets were modelled ends early and fails to decode (the VM restores
    /// with a cold predictor, which says why) instead of misreading the fields after it.
    buckets: PerResource<Bucket>,
}

/// Per-VM policy: owns one forecaster per resource, the scores and the current allocation.
pub struct Policy {
    budget: Budget,
    cfg: PolicyConfig,
    forecasters: PerResource<Box<dyn Forecaster>>,
    allocation: Allocation,
    calibration: PerResource<Calibration>,
    /// Whether the allocation in force was set by a warm forecaster (and so is scored).
    calibrating: PerResource<bool>,
    shrink_streak: PerResource<u32>,
    /// The actuators' token buckets, as the allocations in force filled and drained them.
    buckets: PerResource<Bucket>,
    /// What was forecast for the window now being decided on.
    expected: Option<PerResource<Forecast>>,
    behaviour: BehaviourScore,
    anomaly: AnomalyDetector,
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn align_up(v: f64, step: f64) -> f64 {
    // The epsilon keeps an already aligned value (up to float noise) from rounding up a step.
    ((v / step) - 1e-9).ceil() * step
}

impl Policy {
    pub fn new(
        budget: Budget,
        cfg: PolicyConfig,
        forecasters: PerResource<Box<dyn Forecaster>>,
    ) -> Result<Self, PolicyError> {
        budget.validate()?;
        cfg.validate()?;
        let calibration =
            PerResource::from_fn(|r| Calibration::new(cfg.target(r), cfg.calibration_step));
        let mut forecasters = forecasters;
        for (r, c) in calibration.iter() {
            forecasters[r].set_quantile(1.0 - c.target());
        }
        Ok(Policy {
            allocation: budget.0.map(|_, l| l.initial),
            calibration,
            calibrating: PerResource::default(),
            budget,
            behaviour: BehaviourScore::new(cfg.behaviour)?,
            anomaly: AnomalyDetector::new(cfg.anomaly)?,
            cfg,
            forecasters,
            shrink_streak: PerResource::default(),
            buckets: PerResource::from_fn(|r| {
                Bucket::full(budget.0[r].initial, cfg.bucket_windows[r])
            }),
            expected: None,
        })
    }

    /// Allocation in force for the current window.
    pub fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Each resource's experts and their weights (empty for a single forecaster).
    pub fn expert_weights(&self) -> PerResource<Vec<crate::forecast::ExpertWeight>> {
        self.forecasters.map(|_, f| f.weights())
    }

    /// Each resource's calibration state.
    pub fn calibration(&self) -> &PerResource<Calibration> {
        &self.calibration
    }

    /// A new budget and anomaly ladder while running (the VMM's `PATCH /predictor`): the
    /// forecasters and scores keep their history; allocations move into the new bounds.
    pub fn reconfigure(
        &mut self,
        budget: Budget,
        ladder: crate::score::ActionLadder,
    ) -> Result<(), PolicyError> {
        budget.validate()?;
        self.anomaly.set_ladder(ladder)?;
        self.cfg.anomaly.ladder = ladder;
        self.budget = budget;
        for (r, l) in budget.0.iter() {
            self.allocation[r] = self.allocation[r].clamp(l.min, l.max);
            self.shrink_streak[r] = 0;
        }
        Ok(())
    }

    /// Everything this policy has learned ([`Policy::restore_state`] takes it back).
    pub fn save_state(&self) -> Result<PolicyState, PolicyError> {
        let mut forecasters = PerResource::<SavedForecaster>::default();
        for (resource, f) in self.forecasters.iter() {
            forecasters[resource] = SavedForecaster::save(f.name(), f.as_ref())
                .map_err(|source| PolicyError::Forecaster { resource, source })?;
        }
        Ok(PolicyState {
            forecasters,
            allocation: self.allocation,
            calibration_scale: self.calibration.map(|_, c| c.scale),
            calibrating: self.calibrating,
            shrink_streak: self.shrink_streak,
            buckets: self.buckets,
            expected: self.expected,
            behaviour: self.behaviour.clone(),
            anomaly: self.anomaly.clone(),
        })
    }

    /// Takes back a saved state into this policy, built from the same configuration: it then
    /// decides as the saved one would have. Saved allocations are held to this budget; the
    /// scores' settings are this configuration's. On error some forecasters may have taken their
    /// state and others not: restore into a policy built for the purpose, and drop it then.
    pub fn restore_state(&mut self, state: PolicyState) -> Result<(), PolicyError> {
        for (resource, saved) in state.forecasters.iter() {
            let f = &mut self.forecasters[resource];
            let name = f.name();
            saved
                .restore(name, f.as_mut())
                .map_err(|source| PolicyError::Forecaster { resource, source })?;
        }
        for (r, l) in self.budget.0.iter() {
            self.allocation[r] = state.allocation[r].clamp(l.min, l.max);
            self.calibration[r].scale = state.calibration_scale[r].max(-1.0);
        }
        self.calibrating = state.calibrating;
        self.shrink_streak = state.shrink_streak;
        self.buckets = state.buckets;
        self.expected = state.expected;
        self.behaviour.restore(state.behaviour);
        self.anomaly.restore(state.anomaly);
        Ok(())
    }

    /// Feeds a closed window and decides the allocation for the next one.
    pub fn decide(&mut self, sample: &Sample) -> Decision {
        let max = self.budget.max();
        let (behaviour, anomaly) = match &self.expected {
            Some(e) => {
                let upper = e.map(|_, f| f.upper);
                let point = e.map(|_, f| f.point);
                (
                    self.behaviour.update(&sample.usage, &upper, &max),
                    self.anomaly.update(sample, &point, max.cpu),
                )
            }
            None => (self.behaviour.value(), AnomalyReport::default()),
        };
        let headroom = 1.0 + self.cfg.behaviour_headroom * behaviour;

        let mut reason = String::new();
        let mut resized = PerResource::default();
        let mut forecast = PerResource::default();
        let mut band = PerResource::<Band>::default();
        for r in Resource::ALL {
            let used = sample.usage[r];
            let lim = self.budget.0[r];
            let held = self.allocation[r];
            // The quota or the bandwidth bucket capped what the guest got: its demand was at
            // least the allocation, and how much more is unseen (use never exceeds a limit, so
            // without this a limit below demand would never be raised).
            let censored = sample.signals.throttled(r);
            // Demand beyond the rate is served from the bucket while it lasts.
            let burst = self.cfg.bucket_windows[r];
            let short = self.buckets[r].short(used, held, burst);
            self.buckets[r].drain(used, held, burst);
            let cal = &mut self.calibration[r];
            if self.calibrating[r] {
                // Demand above the maximum is missed by any allocation: not the band's fault.
                cal.update((short || censored) && held < lim.max);
            }
            let cal = *cal;
            let f = &mut self.forecasters[r];
            // What a censored window shows is a floor: the demand was at least the limit.
            let demand = if censored { used.max(held) } else { used };
            f.observe_window(demand, &sample.signals);
            let one = f.forecast(Horizon::ONE);
            forecast[r] = Forecast {
                point: one.point,
                upper: cal.upper(one, lim.step),
            };
            band[r] = Band {
                expert: Cow::Borrowed(f.leader()),
                quantile: 1.0 - cal.target(),
                width: cal.width(),
            };
            if !f.warm() {
                continue;
            }
            let first = !std::mem::replace(&mut self.calibrating[r], true);
            let upper = self
                .cfg
                .horizon_for(r)
                .up_to()
                .skip(1)
                .map(|h| cal.upper(f.forecast(h), lim.step))
                .fold(forecast[r].upper, f64::max);
            // Censored demand: double the limit (within the grow limit) until it no longer runs
            // out, which finds any demand in a few windows; the shrink rule brings it back to
            // the band once the guest gets what it asks for.
            let upper = if censored {
                upper.max(2.0 * held)
            } else {
                upper
            };
            let before = self.allocation[r];
            let after = self.resize(r, upper * headroom, first);
            if after != before {
                resized[r] = true;
                // Shortest float formatting ({}) after rounding: fixed-precision formatting
                // was a tenth of the window's cost.
                let _ = write!(
                    reason,
                    "{} {} {} -> {} {} ({} leads, upper {}: q {} band x{}); ",
                    r.name(),
                    if after > before { "grow" } else { "shrink" },
                    round2(before),
                    round2(after),
                    r.unit(),
                    band[r].expert,
                    round2(upper),
                    (band[r].quantile * 1e4).round() / 1e4,
                    round2(band[r].width),
                );
            }
        }
        self.expected = Some(forecast);

        let mut action = if resized.iter().any(|(_, &c)| c) {
            Action::Resize
        } else {
            Action::Hold
        };
        if anomaly.findings.any() || anomaly.action > Action::Hold {
            let _ = write!(
                reason,
                "anomaly {:.2}: {:?}; ",
                anomaly.score, anomaly.findings
            );
            action = action.max(anomaly.action);
        }
        if reason.is_empty() {
            reason.push_str("within band");
        }
        Decision {
            t_ms: sample.t_ms,
            inputs: *sample,
            forecast,
            allocation: self.allocation,
            resized,
            band,
            behaviour,
            anomaly,
            action,
            reason: reason.trim_end_matches("; ").to_string(),
        }
    }

    /// Moves one resource's allocation towards `target`: clamped to the budget, aligned to
    /// the step, grown at once, shrunk only after `shrink_after` windows of a target
    /// clearly below, and by at most the rate limits. The `first` forecast-based allocation
    /// replaces the configured initial one outright: that was a placeholder, not a measured
    /// need, and walking down from it at the shrink limit would keep a short-lived VM at its
    /// initial size for most of its life.
    fn resize(&mut self, r: Resource, target: f64, first: bool) -> f64 {
        let lim = self.budget.0[r];
        let cur = self.allocation[r];
        let bounded =
            |v: f64| align_up(v.clamp(lim.min, lim.max), lim.step).clamp(lim.min, lim.max);
        let target = bounded(target);
        let streak = &mut self.shrink_streak[r];
        let next = if first {
            target
        } else if target > cur {
            *streak = 0;
            target.min(cur + self.cfg.max_grow * lim.max)
        } else if target < cur * (1.0 - self.cfg.shrink_hysteresis) {
            *streak += 1;
            if *streak >= self.cfg.shrink_after {
                target.max(cur - self.cfg.max_shrink * lim.max)
            } else {
                cur
            }
        } else {
            *streak = 0;
            cur
        };
        self.allocation[r] = bounded(next);
        self.allocation[r]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::{BandConfig, LastValue};
    use crate::sample::Signals;

    /// A forecaster whose upper bound the test sets directly.
    #[derive(Serialize, Deserialize)]
    struct Scripted {
        upper: f64,
        warm: bool,
    }
    impl crate::persist::Persist for Scripted {}
    impl Forecaster for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn observe(&mut self, v: f64) {
            self.upper = v;
        }
        fn forecast(&self, _: Horizon) -> Forecast {
            Forecast {
                point: self.upper,
                upper: self.upper,
            }
        }
        fn warm(&self) -> bool {
            self.warm
        }
        fn set_quantile(&mut self, _: f64) {}
    }

    fn scripted() -> PerResource<Box<dyn Forecaster>> {
        PerResource::from_fn(|_| {
            Box::new(Scripted {
                upper: 0.0,
                warm: true,
            }) as Box<dyn Forecaster>
        })
    }

    fn budget() -> Budget {
        let mut b = Budget::from_capacity(&Usage {
            cpu: 4.0,
            mem: 1024.0,
            blk: 100.0,
            net: 100.0,
        });
        b.0.mem = Limits {
            min: 128.0,
            max: 1024.0,
            initial: 512.0,
            step: 64.0,
        };
        b
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            shrink_hysteresis: 0.1,
            shrink_after: 3,
            max_grow: 0.25,
            max_shrink: 0.0625,
            behaviour_headroom: 0.0,
            ..PolicyConfig::default()
        }
    }

    fn sample(t_ms: u64, cpu: f64, mem: f64) -> Sample {
        Sample {
            t_ms,
            usage: Usage {
                cpu,
                mem,
                blk: 1.0,
                net: 1.0,
            },
            signals: Signals {
                io_ops: 1,
                ..Default::default()
            },
        }
    }

    fn mem(t_ms: u64, mem: f64) -> Sample {
        sample(t_ms, 1.0, mem)
    }

    #[test]
    fn reconfigure_clamps_allocations_and_keeps_forecasters() {
        let mut p = Policy::new(budget(), cfg(), scripted()).unwrap();
        p.decide(&mem(0, 500.0));
        let mut b = budget();
        b.0.mem.max = 256.0;
        b.0.mem.initial = 256.0;
        let ladder = crate::score::ActionLadder::only_at(1.0, Action::Kill).unwrap();
        p.reconfigure(b, ladder).unwrap();
        assert_eq!(p.allocation().mem, 256.0);
        assert_eq!(p.budget().0.mem.max, 256.0);
        b.0.mem.min = 512.0;
        assert!(p.reconfigure(b, ladder).is_err());
    }

    #[test]
    fn rejects_inconsistent_budget() {
        let mut b = budget();
        b.0.mem.initial = 2048.0;
        assert!(matches!(
            Policy::new(b, cfg(), scripted()),
            Err(PolicyError::Limits { .. })
        ));
        let bad = PolicyConfig {
            max_shrink: 0.0,
            ..cfg()
        };
        assert!(matches!(
            Policy::new(budget(), bad, scripted()),
            Err(PolicyError::Parameter { .. })
        ));
        for w in [-1.0, 101.0, f64::NAN] {
            let bad = PolicyConfig {
                bucket_windows: PerResource {
                    net: w,
                    ..PerResource::default()
                },
                ..cfg()
            };
            let err = Policy::new(budget(), bad, scripted()).err().unwrap();
            assert!(
                err.to_string()
                    .starts_with("bucket windows must be in [0, 100]"),
                "{err}"
            );
        }
    }

    #[test]
    fn grows_aligned_and_rate_limited() {
        let mut p = Policy::new(budget(), cfg(), scripted()).unwrap();
        assert_eq!(p.allocation().mem, 512.0);
        let d = p.decide(&mem(0, 530.0));
        assert_eq!(d.allocation.mem, 576.0, "aligned up to a 64 MiB block");
        assert!(d.resized.mem && d.action == Action::Resize, "{d:?}");
        assert!(
            d.reason
                .contains("mem grow 512 -> 576 MiB (scripted leads, upper 530: q 0.995 band x1)"),
            "{}",
            d.reason
        );
        // Demand far above: at most 0.25 * 1024 per window, never above max.
        assert_eq!(p.decide(&mem(100, 5000.0)).allocation.mem, 832.0);
        assert_eq!(p.decide(&mem(200, 5000.0)).allocation.mem, 1024.0);
    }

    #[test]
    fn shrinks_only_after_sustained_drop_and_never_below_min() {
        let mut p = Policy::new(budget(), cfg(), scripted()).unwrap();
        // Within the hysteresis band: hold.
        for t in 0..10 {
            assert_eq!(p.decide(&mem(t, 470.0)).allocation.mem, 512.0);
        }
        // Clearly below, but for fewer than `shrink_after` windows: hold.
        p.decide(&mem(10, 100.0));
        p.decide(&mem(11, 100.0));
        let d = p.decide(&mem(12, 500.0));
        assert_eq!(d.allocation.mem, 512.0);
        assert!(!d.resized.mem);
        // Sustained: shrink by at most 64 MiB per window down to min.
        let seen: Vec<f64> = (20..30)
            .map(|t| p.decide(&mem(t, 10.0)).allocation.mem)
            .collect();
        assert_eq!(
            seen,
            [512.0, 512.0, 448.0, 384.0, 320.0, 256.0, 192.0, 128.0, 128.0, 128.0]
        );
    }

    #[test]
    fn holds_initial_until_warm() {
        let cold = PerResource::from_fn(|_| {
            Box::new(Scripted {
                upper: 0.0,
                warm: false,
            }) as Box<dyn Forecaster>
        });
        let mut p = Policy::new(budget(), cfg(), cold).unwrap();
        let d = p.decide(&mem(0, 1000.0));
        assert_eq!(d.allocation, p.budget().0.map(|_, l| l.initial));
        assert_eq!(d.action, Action::Hold);
    }

    #[test]
    fn behaviour_adds_headroom_after_misses() {
        let c = PolicyConfig {
            behaviour_headroom: 1.0,
            ..cfg()
        };
        let mut p = Policy::new(budget(), c, scripted()).unwrap();
        // The first forecast replaces the initial 512 MiB outright.
        assert_eq!(p.decide(&mem(0, 256.0)).allocation.mem, 256.0);
        // Usage over the forecast band (256): the score rises and so does the target.
        let d = p.decide(&mem(1, 300.0));
        assert!(d.behaviour > 0.0);
        assert_eq!(
            d.allocation.mem,
            align_up(d.forecast.mem.upper * (1.0 + d.behaviour), 64.0)
        );
        // The miss also widened the band (to at least a block, times the calibration).
        assert!(d.forecast.mem.upper > 300.0 + 64.0 && d.band.mem.width > 1.0);
        assert!(d.allocation.mem > 384.0);
    }

    #[test]
    fn decisions_serialise_for_the_api() {
        let band = BandConfig {
            min_errors: 2,
            ..BandConfig::default()
        };
        let f = PerResource::from_fn(|_| {
            Box::new(LastValue::with_band(band).unwrap()) as Box<dyn Forecaster>
        });
        let mut p = Policy::new(budget(), cfg(), f).unwrap();
        let mut d = p.decide(&mem(0, 300.0));
        for t in 1..5 {
            d = p.decide(&mem(t, 300.0));
        }
        let json = serde_json::to_string(&d).unwrap();
        assert!(
            json.contains(r#""action":"resize""#) || json.contains(r#""action":"hold""#),
            "{json}"
        );
        let back: Decision = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
    }

    fn cpu(t_ms: u64, cpu: f64) -> Sample {
        sample(t_ms, cpu, 100.0)
    }

    #[test]
    fn calibrated_miss_rate_holds_its_target_on_stationary_noise() {
        use crate::forecast::Preset;
        let capacity = Usage {
            cpu: 8.0,
            mem: 1024.0,
            blk: 100.0,
            net: 100.0,
        };
        for (preset, seed) in [
            (Preset::default_ensemble().unwrap(), 1),
            (Preset::Ewma, 2),
            (Preset::Peak, 3),
        ] {
            let cfg = PolicyConfig::default();
            let f = preset.build_all(cfg.horizon, &capacity).unwrap();
            let mut p = Policy::new(Budget::from_capacity(&capacity), cfg, f).unwrap();
            let mut rng = crate::rng::Rng::new(seed);
            let (mut scored, mut missed) = (0u32, 0u32);
            for t in 0..40_000u64 {
                let used = (2.0 + 0.3 * rng.normal()).max(0.0);
                let held = p.allocation().cpu;
                p.decide(&cpu(t * 100, used));
                // Windows before the first forecast-based allocation are not the band's.
                if t > 100 {
                    scored += 1;
                    missed += u32::from(used > held);
                }
            }
            let rate = f64::from(missed) / f64::from(scored);
            let target = cfg.target(Resource::Cpu);
            assert!(
                (rate - target).abs() <= 0.005,
                "{}: miss rate {rate}, target {target}",
                preset.name()
            );
        }
    }

    /// The default policy of a 4-core VM with 200 MiB/s of block bandwidth for 400 windows on
    /// resource `r`, whose limit holds use back:
    /// `limit(allocation, demand)` says what the guest got and whether it was held back, which
    /// the window's throttle signal reports when `report` is set. Each window's allocation and
    /// whether it held the guest back.
    fn limited(
        r: Resource,
        demand: impl Fn(u64) -> f64,
        mut limit: impl FnMut(f64, f64) -> (f64, bool),
        report: bool,
    ) -> Vec<(f64, bool)> {
        use crate::forecast::Preset;
        let capacity = Usage {
            cpu: 4.0,
            mem: 1024.0,
            blk: 200.0,
            net: 100.0,
        };
        let cfg = PolicyConfig::default();
        let f = Preset::default_ensemble()
            .unwrap()
            .build_all(cfg.horizon, &capacity)
            .unwrap();
        let mut p = Policy::new(Budget::from_capacity(&capacity), cfg, f).unwrap();
        (0..400u64)
            .map(|t| {
                let held = p.allocation()[r];
                let (got, throttled) = limit(held, demand(t));
                let mut s = sample(t * 100, 1.0, 100.0);
                s.usage[r] = got;
                if report && throttled {
                    match r {
                        Resource::Cpu => s.signals.cpu_throttled = 1,
                        Resource::Blk => s.signals.blk_throttled = 1,
                        Resource::Net => s.signals.net_throttled = 1,
                        Resource::Mem => {}
                    }
                }
                p.decide(&s);
                (held, throttled)
            })
            .collect()
    }

    /// A guest booting at a fifth of a core, then asking for three: the quota caps what it
    /// gets, so its use stays below the allocation. The throttled periods say so, and the
    /// quota follows demand up (and back down once the demand is gone).
    #[test]
    fn a_quota_the_vcpus_run_out_of_grows_though_their_use_stays_below_it() {
        let run = |report| {
            let demand = |t| match t {
                0..100 => 0.2,
                100..300 => 3.0,
                _ => 0.5,
            };
            // The vCPUs get a little less than the quota: the group's other threads (the
            // whole VMM on cgroup v2 or in the jailer's group) use some of it.
            let quota = |quota: f64, demand: f64| (demand.min(0.9 * quota), demand > 0.9 * quota);
            limited(Resource::Cpu, demand, quota, report)
        };
        // Without the signal the booting guest's small quota only ever shrinks.
        let blind = run(false);
        assert!(blind[100..300].iter().all(|&(q, _)| q < 1.0), "{blind:?}");
        let seen = run(true);
        assert!(seen[99].0 < 1.0, "the boot's quota: {:?}", seen[99]);
        let enough = seen[100..300].iter().position(|&(_, throttled)| !throttled);
        assert!(
            enough.is_some_and(|w| w <= 10),
            "3 cores of demand met after {enough:?} windows: {:?}",
            &seen[100..140]
        );
        let short = seen[150..300].iter().filter(|&&(_, t)| t).count();
        assert!(short <= 15, "throttled in {short} of 150 windows: {seen:?}");
        assert!(
            seen[399].0 < 1.5,
            "back down after the demand: {:?}",
            seen[399]
        );
    }

    fn blk(t_ms: u64, blk: f64) -> Sample {
        let mut s = sample(t_ms, 1.0, 100.0);
        s.usage.blk = blk;
        s
    }

    /// Block demand bursting to 1.8 x the allocation after every idle window: the bandwidth
    /// bucket (one window of the rate) serves each burst, so the calibration counts no miss and
    /// narrows the band; without a bucket each burst is a miss and the band widens.
    #[test]
    fn a_burst_the_bucket_serves_is_no_miss() {
        use crate::forecast::testing::Level;
        let width = |bucket: f64| {
            let f = PerResource::from_fn(|_| Box::new(Level("level", 10.0)) as Box<dyn Forecaster>);
            let cfg = PolicyConfig {
                bucket_windows: PerResource {
                    blk: bucket,
                    ..PerResource::default()
                },
                ..cfg()
            };
            let mut p = Policy::new(budget(), cfg, f).unwrap();
            for t in 0..200u64 {
                p.decide(&blk(t * 100, if t % 2 == 1 { 18.0 } else { 0.0 }));
            }
            (p.calibration().blk.width(), p.allocation().blk)
        };
        assert_eq!(width(1.0).1, 10.0);
        assert!(width(1.0).0 < 1.0, "{:?}", width(1.0));
        assert!(width(0.0).0 > 5.0, "{:?}", width(0.0));
    }

    /// The bandwidth twin of the throttled CPU quota: the device's limiter holds block use at
    /// the allocation (plus the bucket), and the limiter's waits tell the policy that demand was
    /// above it, so the allocation follows demand up though the use it sees stays below.
    #[test]
    fn a_bandwidth_the_limiter_holds_back_grows_though_use_stays_at_it() {
        use crate::bucket::Bucket;
        let run = |report| {
            let demand = |t| match t {
                0..100 => 2.0,
                100..300 => 120.0,
                _ => 5.0,
            };
            let burst = PolicyConfig::default().bucket_windows.blk;
            let mut bucket: Option<Bucket> = None;
            let limiter = move |rate: f64, demand: f64| {
                let b = bucket.get_or_insert(Bucket::full(rate, burst));
                let got = demand.min(b.capacity(rate, burst));
                let throttled = b.short(demand, rate, burst);
                b.drain(demand, rate, burst);
                (got, throttled)
            };
            limited(Resource::Blk, demand, limiter, report)
        };
        let blind = run(false);
        let seen = run(true);
        assert!(
            seen[99].0 < 20.0,
            "the idle start's bandwidth: {:?}",
            seen[99]
        );
        let met = |run: &[(f64, bool)]| run[100..300].iter().position(|&(_, t)| !t);
        assert!(
            met(&seen).is_some_and(|w| w <= 6),
            "120 MiB/s of demand met after {:?} windows: {:?}",
            met(&seen),
            &seen[100..140]
        );
        // Blind, the policy sees only what the bucket let through and finds the demand later.
        assert!(
            met(&seen) < met(&blind),
            "{:?} vs {:?}",
            met(&seen),
            met(&blind)
        );
        let short = seen[150..300].iter().filter(|&&(_, t)| t).count();
        assert!(short <= 15, "throttled in {short} of 150 windows: {seen:?}");
        assert!(
            seen[399].0 < 30.0,
            "back down after the demand: {:?}",
            seen[399]
        );
    }

    /// Snapshots encode the state field by field with no names: one saved before the buckets
    /// were modelled is this encoding without its last field (four f64s, 8 bytes each), and
    /// must fail to decode (the VM then restores with a cold predictor) rather than be misread.
    #[test]
    fn a_state_saved_before_the_buckets_is_refused_not_misread() {
        let mut p = Policy::new(budget(), cfg(), scripted()).unwrap();
        for t in 0..20 {
            p.decide(&blk(t * 100, 3.0));
        }
        let now = crate::persist::encode(&p.save_state().unwrap()).unwrap();
        let back: PolicyState = crate::persist::decode(&now).unwrap();
        assert_eq!(back.buckets, p.buckets);
        let before = &now[..now.len() - 32];
        assert!(crate::persist::decode::<PolicyState>(before).is_err());
    }

    #[test]
    fn switching_experts_never_moves_an_allocation_beyond_the_change_limit() {
        use crate::forecast::testing::Level;
        use crate::forecast::{Ensemble, EnsembleConfig};
        let experts = || {
            Box::new(
                Ensemble::new(
                    vec![Box::new(Level("low", 0.6)), Box::new(Level("high", 3.8))],
                    EnsembleConfig::default(),
                )
                .unwrap(),
            ) as Box<dyn Forecaster>
        };
        let f = PerResource::from_fn(|_| experts());
        let b = Budget::from_capacity(&Usage {
            cpu: 4.0,
            mem: 1024.0,
            blk: 100.0,
            net: 100.0,
        });
        let c = PolicyConfig {
            max_grow: 0.2,
            max_shrink: 0.05,
            ..PolicyConfig::default()
        };
        let mut p = Policy::new(b, c, f).unwrap();
        let mut leaders = std::collections::BTreeSet::new();
        let mut previous = p.allocation().cpu;
        // Demand that "low" covers, then demand only "high" covers, in turn: the ensemble
        // hands the allocation from one to the other and back.
        for t in 0..2000u64 {
            let used = if (t / 400) % 2 == 0 { 0.5 } else { 3.0 };
            let d = p.decide(&cpu(t * 100, used));
            leaders.insert(d.band.cpu.expert.clone());
            let now = d.allocation.cpu;
            if t > 0 {
                assert!(
                    now - previous <= c.max_grow * 4.0 + 1e-9
                        && previous - now <= c.max_shrink * 4.0 + 1e-9,
                    "window {t}: {previous} -> {now}"
                );
            }
            previous = now;
        }
        assert!(
            leaders.contains("low") && leaders.contains("high"),
            "{leaders:?}"
        );
    }

    #[test]
    fn anomaly_action_outranks_resize() {
        let mut p = Policy::new(budget(), cfg(), scripted()).unwrap();
        p.decide(&mem(0, 512.0));
        let mut s = mem(1, 900.0);
        s.signals.unknown_exits = 5;
        let d = p.decide(&s);
        assert_eq!(d.action, Action::Alert);
        assert!(d.resized.mem);
        assert!(d.reason.contains("unknown_exits: true"), "{}", d.reason);
    }

    /// A series with a phase change and noise, so that every forecaster's band, level and
    /// trend, and both scores, hold something.
    fn series(t: u64) -> Sample {
        let noise = ((t * 7919) % 13) as f64;
        let mut s = mem(t, if t < 60 { 300.0 } else { 700.0 } + 10.0 * noise);
        s.usage.cpu = 0.5 + 0.05 * noise;
        s
    }

    #[test]
    fn a_restored_policy_decides_as_the_saved_one_would_have() {
        use crate::forecast::{GruWeights, Preset};
        let capacity = budget().max();
        let gru = GruWeights {
            hidden: 2,
            outputs: 1,
            w_ih: vec![0.1; 12],
            w_hh: vec![0.2; 12],
            b_ih: vec![0.0; 6],
            b_hh: vec![0.1; 6],
            head_w: vec![0.3, -0.2],
            head_b: vec![0.01],
        };
        let presets = Preset::CLASSICAL.into_iter().chain([
            Preset::Recurrent(std::sync::Arc::new(gru)),
            Preset::default_ensemble().unwrap(),
        ]);
        for preset in presets {
            let build = || {
                let f = preset.build_all(Horizon::ONE, &capacity).unwrap();
                Policy::new(budget(), cfg(), f).unwrap()
            };
            let mut original = build();
            for t in 0..90 {
                original.decide(&series(t));
            }
            // Through bytes, as a snapshot file holds it.
            let saved = crate::persist::encode(&original.save_state().unwrap()).unwrap();
            let mut restored = build();
            restored
                .restore_state(crate::persist::decode(&saved).unwrap())
                .unwrap();
            // The calibration and an ensemble's weights are learned state too, and by now they
            // have moved from where a fresh policy starts.
            assert_eq!(restored.calibration(), original.calibration());
            assert_eq!(restored.expert_weights(), original.expert_weights());
            assert_ne!(
                build().calibration(),
                original.calibration(),
                "{}: the calibration never moved",
                preset.name()
            );
            if let Preset::Ensemble(_) = preset {
                assert_ne!(build().expert_weights(), original.expert_weights());
            }
            let mut cold = build();
            let mut differs_from_cold = false;
            for t in 90..150 {
                let d = original.decide(&series(t));
                assert_eq!(restored.decide(&series(t)), d, "{} t={t}", preset.name());
                differs_from_cold |= cold.decide(&series(t)) != d;
            }
            assert!(
                differs_from_cold,
                "{}: a cold policy decides the same",
                preset.name()
            );
        }
    }

    #[test]
    fn a_saved_state_is_refused_by_another_forecaster_or_when_it_does_not_decode() {
        use crate::forecast::Preset;
        let capacity = budget().max();
        let build = |p: Preset| {
            let f = p.build_all(Horizon::ONE, &capacity).unwrap();
            Policy::new(budget(), cfg(), f).unwrap()
        };
        let mut holt = build(Preset::Holt);
        holt.decide(&series(0));
        let state = holt.save_state().unwrap();
        let e = build(Preset::Ewma)
            .restore_state(state.clone())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(r#"saved "holt", this predictor builds "ewma""#),
            "{e}"
        );
        let mut garbled = holt.save_state().unwrap();
        garbled.forecasters.cpu.state.truncate(3);
        let e = build(Preset::Holt).restore_state(garbled).unwrap_err();
        assert!(matches!(
            e,
            PolicyError::Forecaster {
                resource: Resource::Cpu,
                source: PersistError::Decode(_)
            }
        ));
    }
}
