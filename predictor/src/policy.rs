//! Turns forecasts into per-resource allocations within a budget, and every window into a
//! [`Decision`] record.

use crate::forecast::{Forecast, Forecaster, Horizon};
use crate::persist::PersistError;
use crate::resource::{PerResource, Resource, Usage};
use crate::sample::Sample;
use crate::score::{
    AnomalyConfig, AnomalyDetector, AnomalyReport, BehaviourConfig, BehaviourScore, ScoreError,
};
use serde::{Deserialize, Serialize};
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

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Allocation covers the upper forecasts of the next `horizon` windows, so grows lead
    /// demand by as long as a resize takes to land.
    pub horizon: Horizon,
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
    fn validate(&self) -> Result<(), PolicyError> {
        let fields = [
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

/// One window's record: what came in, what was predicted, what was decided and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub t_ms: u64,
    pub inputs: Sample,
    /// Forecasts for the next window.
    pub forecast: PerResource<Forecast>,
    /// Allocation for the next window.
    pub allocation: Allocation,
    pub resized: PerResource<bool>,
    pub behaviour: f64,
    pub anomaly: AnomalyReport,
    pub action: Action,
    pub reason: String,
}

/// One forecaster's state in a [`PolicyState`], under its name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedForecaster {
    pub name: String,
    pub state: Vec<u8>,
}

/// What a policy has learned, for a VM snapshot: its forecasters, the allocation in force and
/// what the hysteresis counts, the forecast the next window is scored against, and both
/// scores. The budget and configuration are not in it: the restored VM's configuration gives
/// them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyState {
    forecasters: PerResource<SavedForecaster>,
    allocation: Allocation,
    shrink_streak: PerResource<u32>,
    expected: Option<PerResource<Forecast>>,
    behaviour: BehaviourScore,
    anomaly: AnomalyDetector,
}

/// Per-VM policy: owns one forecaster per resource, the scores and the current allocation.
pub struct Policy {
    budget: Budget,
    cfg: PolicyConfig,
    forecasters: PerResource<Box<dyn Forecaster>>,
    allocation: Allocation,
    shrink_streak: PerResource<u32>,
    /// What was forecast for the window now being decided on.
    expected: Option<PerResource<Forecast>>,
    behaviour: BehaviourScore,
    anomaly: AnomalyDetector,
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
        Ok(Policy {
            allocation: budget.0.map(|_, l| l.initial),
            budget,
            behaviour: BehaviourScore::new(cfg.behaviour)?,
            anomaly: AnomalyDetector::new(cfg.anomaly)?,
            cfg,
            forecasters,
            shrink_streak: PerResource::default(),
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
            forecasters[resource] = SavedForecaster {
                name: f.name().to_string(),
                state: f
                    .save_state()
                    .map_err(|source| PolicyError::Forecaster { resource, source })?,
            };
        }
        Ok(PolicyState {
            forecasters,
            allocation: self.allocation,
            shrink_streak: self.shrink_streak,
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
            let mismatch = |m: String| PolicyError::Forecaster {
                resource,
                source: PersistError::Mismatch(m),
            };
            if saved.name != f.name() {
                return Err(mismatch(format!(
                    "saved {:?}, this predictor builds {:?}",
                    saved.name,
                    f.name()
                )));
            }
            f.restore_state(&saved.state)
                .map_err(|source| PolicyError::Forecaster { resource, source })?;
        }
        for (r, l) in self.budget.0.iter() {
            self.allocation[r] = state.allocation[r].clamp(l.min, l.max);
        }
        self.shrink_streak = state.shrink_streak;
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
        for r in Resource::ALL {
            let f = &mut self.forecasters[r];
            f.observe(sample.usage[r]);
            forecast[r] = f.forecast(Horizon::ONE);
            if !f.warm() {
                continue;
            }
            let upper = self
                .cfg
                .horizon
                .up_to()
                .map(|h| f.forecast(h).upper)
                .fold(0.0, f64::max);
            let before = self.allocation[r];
            let after = self.resize(r, upper * headroom);
            if after != before {
                resized[r] = true;
                let _ = write!(
                    reason,
                    "{} {} {:.2} -> {:.2} {} (upper forecast {:.2}); ",
                    r.name(),
                    if after > before { "grow" } else { "shrink" },
                    before,
                    after,
                    r.unit(),
                    upper,
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
            behaviour,
            anomaly,
            action,
            reason: reason.trim_end_matches("; ").to_string(),
        }
    }

    /// Moves one resource's allocation towards `target`: clamped to the budget, aligned to
    /// the step, grown at once, shrunk only after `shrink_after` windows of a target
    /// clearly below, and by at most the rate limits.
    fn resize(&mut self, r: Resource, target: f64) -> f64 {
        let lim = self.budget.0[r];
        let cur = self.allocation[r];
        let bounded =
            |v: f64| align_up(v.clamp(lim.min, lim.max), lim.step).clamp(lim.min, lim.max);
        let target = bounded(target);
        let streak = &mut self.shrink_streak[r];
        let next = if target > cur {
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
        fn name(&self) -> &str {
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

    fn mem(t_ms: u64, mem: f64) -> Sample {
        Sample {
            t_ms,
            usage: Usage {
                cpu: 1.0,
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
    }

    #[test]
    fn grows_aligned_and_rate_limited() {
        let mut p = Policy::new(budget(), cfg(), scripted()).unwrap();
        assert_eq!(p.allocation().mem, 512.0);
        let d = p.decide(&mem(0, 530.0));
        assert_eq!(d.allocation.mem, 576.0, "aligned up to a 64 MiB block");
        assert!(d.resized.mem && d.action == Action::Resize, "{d:?}");
        assert!(
            d.reason.contains("mem grow 512.00 -> 576.00 MiB"),
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
        p.decide(&mem(0, 256.0));
        // Usage over the forecast band (256): the score rises and so does the target.
        let d = p.decide(&mem(1, 300.0));
        assert!(d.behaviour > 0.0);
        assert_eq!(
            d.allocation.mem,
            align_up(300.0 * (1.0 + d.behaviour), 64.0).max(512.0)
        );
        assert!(d.allocation.mem > 512.0 || 300.0 * (1.0 + d.behaviour) <= 512.0);
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
        let presets = Preset::CLASSICAL
            .into_iter()
            .chain([Preset::Recurrent(std::sync::Arc::new(gru))]);
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
