//! How well a VM keeps to its forecast (behaviour score) and how unusual its latest
//! window looks (anomaly score with rules), mapped to policy actions.

use crate::math;
use crate::policy::Action;
use crate::resource::{PerResource, Resource, Usage};
use crate::sample::Sample;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum ScoreError {
    #[error("{name} must be in {range}, got {value}")]
    Parameter {
        name: &'static str,
        range: &'static str,
        value: f64,
    },
    #[error("action thresholds must increase from log to kill, got {0:?}")]
    Ladder(ActionLadder),
    #[error("{0:?} is not an anomaly action (log, alert, tighten_seccomp, throttle, pause, kill)")]
    NotAnAnomalyAction(Action),
}

fn unit_interval(name: &'static str, value: f64) -> Result<(), ScoreError> {
    if value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(ScoreError::Parameter {
            name,
            range: "(0, 1]",
            value,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BehaviourConfig {
    /// Share of the remaining distance to 1 gained per window spent outside.
    pub rise: f64,
    /// Share of the score lost per window spent inside.
    pub fall: f64,
}

impl Default for BehaviourConfig {
    /// Rises in a few windows, takes about a minute (at 100 ms) to fall back: trust is
    /// lost faster than it is earned.
    fn default() -> Self {
        BehaviourConfig {
            rise: 0.3,
            fall: 0.005,
        }
    }
}

/// 0 for a VM that always stays inside its predicted band and budget, towards 1 for one
/// that keeps leaving them.
/// A snapshot holds its value, not its configuration ([`BehaviourScore::restore`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BehaviourScore {
    #[serde(skip)]
    cfg: BehaviourConfig,
    value: f64,
}

impl BehaviourScore {
    pub fn new(cfg: BehaviourConfig) -> Result<Self, ScoreError> {
        unit_interval("behaviour rise", cfg.rise)?;
        unit_interval("behaviour fall", cfg.fall)?;
        Ok(BehaviourScore { cfg, value: 0.0 })
    }

    pub fn value(&self) -> f64 {
        self.value
    }

    /// Takes `saved`'s value, keeping this configuration.
    pub fn restore(&mut self, saved: BehaviourScore) {
        self.value = saved.value;
    }

    /// Leaving the budget counts fully, leaving only the band counts half: the first is a
    /// hard limit being hit, the second may just be a forecast that was too tight.
    pub fn update(&mut self, used: &Usage, band: &Usage, budget_max: &Usage) -> f64 {
        let severity = Resource::ALL
            .into_iter()
            .map(|r| {
                if used[r] > budget_max[r] {
                    1.0
                } else if used[r] > band[r] {
                    0.5
                } else {
                    0.0
                }
            })
            .fold(0.0, f64::max);
        if severity > 0.0 {
            self.value += self.cfg.rise * severity * (1.0 - self.value);
        } else {
            self.value -= self.cfg.fall * self.value;
        }
        self.value
    }
}

/// Anomaly-score levels at which each action starts. The score accumulates with decay,
/// so one odd window logs while the same finding repeated window after window escalates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionLadder {
    pub log: f64,
    pub alert: f64,
    pub tighten_seccomp: f64,
    pub throttle: f64,
    pub pause: f64,
    pub kill: f64,
    /// When set, the one action taken (from its level up); below it, only `log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Action>,
}

impl Default for ActionLadder {
    fn default() -> Self {
        ActionLadder {
            log: 0.2,
            alert: 0.5,
            tighten_seccomp: 1.0,
            throttle: 2.0,
            pause: 4.0,
            kill: 8.0,
            only: None,
        }
    }
}

impl ActionLadder {
    fn steps(&self) -> [(f64, Action); 6] {
        [
            (self.kill, Action::Kill),
            (self.pause, Action::Pause),
            (self.throttle, Action::Throttle),
            (self.tighten_seccomp, Action::TightenSeccomp),
            (self.alert, Action::Alert),
            (self.log, Action::Log),
        ]
    }

    pub fn action(&self, score: f64) -> Action {
        let found = self
            .steps()
            .into_iter()
            .find(|(at, _)| score >= *at)
            .map_or(Action::Hold, |(_, a)| a);
        match self.only {
            Some(only) if found >= only => only,
            Some(_) if found > Action::Hold => Action::Log,
            _ => found,
        }
    }

    /// "At score `threshold`, do `action`": the default ladder scaled so that `action` starts
    /// at `threshold`; below it the score is only logged (from the scaled `log` level), and
    /// nothing else is ever taken.
    pub fn only_at(threshold: f64, action: Action) -> Result<ActionLadder, ScoreError> {
        let d = ActionLadder::default();
        let at = d
            .steps()
            .into_iter()
            .find(|(_, a)| *a == action)
            .map(|(at, _)| at)
            .ok_or(ScoreError::NotAnAnomalyAction(action))?;
        if !(threshold > 0.0 && threshold.is_finite()) {
            return Err(ScoreError::Parameter {
                name: "anomaly threshold",
                range: "(0, inf)",
                value: threshold,
            });
        }
        let k = threshold / at;
        let ladder = ActionLadder {
            log: d.log * k,
            alert: d.alert * k,
            tighten_seccomp: d.tighten_seccomp * k,
            throttle: d.throttle * k,
            pause: d.pause * k,
            kill: d.kill * k,
            only: Some(action),
        };
        ladder.validate()?;
        Ok(ladder)
    }

    fn validate(&self) -> Result<(), ScoreError> {
        let s = self.steps();
        if s.windows(2).all(|w| w[0].0 > w[1].0) && self.log > 0.0 {
            Ok(())
        } else {
            Err(ScoreError::Ladder(*self))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnomalyConfig {
    /// Residual z-score (against the VM's own residual history) where residuals start to count.
    pub z_threshold: f64,
    /// Most a residual adds to a window in which a behaviour rule fired (alone it adds
    /// nothing): demand the forecast missed is never by itself a reason to act against the VM.
    pub residual_weight: f64,
    /// Half-life of the residual statistics, in windows.
    pub history_half_life: f64,
    /// CPU use, as a share of the VM's cores, that counts as pegged.
    pub busy_fraction: f64,
    /// Consecutive pegged windows without any I/O before the rule fires.
    pub busy_windows: u32,
    pub busy_weight: f64,
    pub unknown_exit_weight: f64,
    /// Windows during which devices in use are learned rather than flagged.
    pub learn_windows: u32,
    pub new_device_weight: f64,
    /// Per-window retention of the accumulated score.
    pub decay: f64,
    pub ladder: ActionLadder,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            z_threshold: 6.0,
            residual_weight: 0.3,
            history_half_life: 600.0,
            busy_fraction: 0.98,
            busy_windows: 50,
            busy_weight: 0.6,
            unknown_exit_weight: 0.6,
            learn_windows: 300,
            new_device_weight: 1.0,
            decay: 0.9,
            ladder: ActionLadder::default(),
        }
    }
}

/// What fired in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    /// The resource whose residual was most unusual, when one passed the threshold.
    pub residual: Option<Resource>,
    pub residual_z: f64,
    pub busy_without_io: bool,
    pub unknown_exits: bool,
    /// Devices touched for the first time after the learning period (bit per device).
    pub new_devices: u32,
}

impl Findings {
    pub fn any(&self) -> bool {
        self.residual.is_some()
            || self.busy_without_io
            || self.unknown_exits
            || self.new_devices != 0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnomalyReport {
    /// Accumulated, decayed score the action ladder reads.
    pub score: f64,
    /// This window's contribution.
    pub window_score: f64,
    pub findings: Findings,
    pub action: Action,
}

/// Exponentially weighted mean and variance of one resource's residuals.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Moments {
    mean: f64,
    var: f64,
    n: u32,
}

impl Moments {
    fn z(&self, r: f64, scale: f64) -> f64 {
        // A floor on the deviation keeps a perfectly flat history from turning a rounding
        // error into an infinite z-score.
        let sd = self.var.sqrt().max(1e-3 * scale.abs()).max(1e-9);
        (r - self.mean) / sd
    }

    fn add(&mut self, r: f64, alpha: f64) {
        // Equal weights until the exponential window has filled (1 / alpha samples): an
        // exponential variance started from zero stays a small fraction of the true one for that
        // long, and the z-scores it gives early in a run are several times too large.
        let a = alpha.max(1.0 / (f64::from(self.n) + 1.0));
        let d = r - self.mean;
        self.mean += a * d;
        self.var = (1.0 - a) * (self.var + a * d * d);
        self.n = self.n.saturating_add(1);
    }
}

/// A snapshot holds its history and score, not its configuration
/// ([`AnomalyDetector::restore`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnomalyDetector {
    #[serde(skip)]
    cfg: AnomalyConfig,
    #[serde(skip)]
    alpha: f64,
    residuals: PerResource<Moments>,
    busy_streak: u32,
    seen_devices: u32,
    windows: u32,
    score: f64,
}

impl AnomalyDetector {
    pub fn new(cfg: AnomalyConfig) -> Result<Self, ScoreError> {
        unit_interval("anomaly decay", cfg.decay)?;
        unit_interval("busy fraction", cfg.busy_fraction)?;
        cfg.ladder.validate()?;
        if cfg.history_half_life.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(ScoreError::Parameter {
                name: "history half-life",
                range: "(0, inf)",
                value: cfg.history_half_life,
            });
        }
        Ok(AnomalyDetector {
            alpha: 1.0 - math::powf(0.5, 1.0 / cfg.history_half_life),
            cfg,
            residuals: PerResource::default(),
            busy_streak: 0,
            seen_devices: 0,
            windows: 0,
            score: 0.0,
        })
    }

    /// Scores one window. `expected` is the point forecast that was made for it; `cores`
    /// is how many cores the VM may use (its vCPU count).
    /// Takes `saved`'s history and score, keeping this configuration.
    pub fn restore(&mut self, saved: AnomalyDetector) {
        *self = AnomalyDetector {
            cfg: self.cfg,
            alpha: self.alpha,
            ..saved
        };
    }

    /// Replaces the action ladder, keeping the residual history and the score.
    pub fn set_ladder(&mut self, ladder: ActionLadder) -> Result<(), ScoreError> {
        ladder.validate()?;
        self.cfg.ladder = ladder;
        Ok(())
    }

    pub fn update(&mut self, sample: &Sample, expected: &Usage, cores: f64) -> AnomalyReport {
        let cfg = &self.cfg;
        let mut f = Findings::default();
        let mut window_score = 0.0;

        let mut missed: Option<(Resource, f64)> = None;
        for r in Resource::ALL {
            let residual = sample.usage[r] - expected[r];
            let m = &mut self.residuals[r];
            // Twenty residuals before a z-score means anything.
            if m.n >= 20 {
                let z = m.z(residual, expected[r]);
                if z > cfg.z_threshold && missed.is_none_or(|(_, best)| z > best) {
                    missed = Some((r, z));
                }
            }
            m.add(residual, self.alpha);
        }

        let pegged = sample.usage.cpu >= cfg.busy_fraction * cores;
        self.busy_streak = if pegged && sample.signals.io_ops == 0 {
            self.busy_streak + 1
        } else {
            0
        };
        if self.busy_streak >= cfg.busy_windows {
            f.busy_without_io = true;
            window_score += cfg.busy_weight;
        }

        if sample.signals.unknown_exits > 0 {
            f.unknown_exits = true;
            window_score += cfg.unknown_exit_weight;
        }

        let fresh = sample.signals.devices & !self.seen_devices;
        if self.windows >= cfg.learn_windows && fresh != 0 {
            f.new_devices = fresh;
            window_score += cfg.new_device_weight;
        }
        self.seen_devices |= sample.signals.devices;
        self.windows = self.windows.saturating_add(1);

        // Demand the forecast missed only weighs beside a behaviour rule: alone it is as often a
        // healthy workload's new phase (a ramp's first windows, a host that gave the vCPUs more
        // time) as anything else, so it neither counts as a finding nor adds to the score.
        if let Some((r, z)) = missed.filter(|_| f.any()) {
            f.residual = Some(r);
            f.residual_z = z;
            let excess = (z - cfg.z_threshold) / cfg.z_threshold;
            window_score += cfg.residual_weight * excess.min(1.0);
        }

        self.score = self.score * cfg.decay + window_score;
        AnomalyReport {
            score: self.score,
            window_score,
            findings: f,
            action: cfg.ladder.action(self.score),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Signals;

    fn usage(v: f64) -> Usage {
        Usage {
            cpu: v,
            mem: v,
            blk: v,
            net: v,
        }
    }

    #[test]
    fn behaviour_rises_outside_and_falls_inside() {
        let mut b = BehaviourScore::new(BehaviourConfig {
            rise: 0.5,
            fall: 0.1,
        })
        .unwrap();
        let (band, max) = (usage(10.0), usage(20.0));
        assert_eq!(b.update(&usage(5.0), &band, &max), 0.0);
        // Over the band: +0.5 * 0.5 * (1 - 0)
        assert_eq!(b.update(&usage(12.0), &band, &max), 0.25);
        // Over the budget: +0.5 * 1 * (1 - 0.25)
        assert_eq!(b.update(&usage(25.0), &band, &max), 0.625);
        let back = b.update(&usage(5.0), &band, &max);
        assert!((back - 0.5625).abs() < 1e-12, "{back}");
        for _ in 0..200 {
            b.update(&usage(5.0), &band, &max);
        }
        assert!(b.value() < 1e-6);
        assert!(BehaviourScore::new(BehaviourConfig {
            rise: 0.0,
            fall: 0.1
        })
        .is_err());
    }

    #[test]
    fn one_resource_outside_is_enough() {
        let mut b = BehaviourScore::new(BehaviourConfig {
            rise: 1.0,
            fall: 0.1,
        })
        .unwrap();
        let mut used = usage(1.0);
        used.net = 11.0;
        assert_eq!(b.update(&used, &usage(10.0), &usage(20.0)), 0.5);
    }

    #[test]
    fn ladder_maps_scores_to_actions() {
        let l = ActionLadder::default();
        assert_eq!(l.action(0.1), Action::Hold);
        assert_eq!(l.action(0.2), Action::Log);
        assert_eq!(l.action(0.7), Action::Alert);
        assert_eq!(l.action(1.5), Action::TightenSeccomp);
        assert_eq!(l.action(3.0), Action::Throttle);
        assert_eq!(l.action(5.0), Action::Pause);
        assert_eq!(l.action(9.0), Action::Kill);
        let pause_at_one = ActionLadder::only_at(1.0, Action::Pause).unwrap();
        assert_eq!(pause_at_one.action(0.99), Action::Log);
        assert_eq!(pause_at_one.action(1.0), Action::Pause);
        assert_eq!(pause_at_one.action(100.0), Action::Pause);
        assert_eq!(pause_at_one.action(0.05), Action::Log);
        assert_eq!(pause_at_one.action(0.04), Action::Hold);
        assert_eq!(
            ActionLadder::only_at(1.0, Action::Resize),
            Err(ScoreError::NotAnAnomalyAction(Action::Resize))
        );
        assert!(ActionLadder::only_at(0.0, Action::Kill).is_err());
        let bad = ActionLadder { pause: 10.0, ..l };
        assert!(AnomalyDetector::new(AnomalyConfig {
            ladder: bad,
            ..Default::default()
        })
        .is_err());
    }

    fn sample(cpu: f64, signals: Signals) -> Sample {
        Sample {
            t_ms: 0,
            usage: Usage {
                cpu,
                mem: 100.0,
                blk: 1.0,
                net: 1.0,
            },
            signals,
        }
    }

    fn quiet() -> Signals {
        Signals {
            io_ops: 10,
            devices: 0b1,
            ..Signals::default()
        }
    }

    #[test]
    fn pegged_cpu_without_io_escalates() {
        let mut d = AnomalyDetector::new(AnomalyConfig {
            busy_windows: 5,
            ..Default::default()
        })
        .unwrap();
        let exp = Usage {
            cpu: 4.0,
            mem: 100.0,
            blk: 1.0,
            net: 1.0,
        };
        let no_io = Signals {
            io_ops: 0,
            ..quiet()
        };
        for _ in 0..4 {
            assert!(
                !d.update(&sample(4.0, no_io), &exp, 4.0)
                    .findings
                    .busy_without_io
            );
        }
        // Any I/O resets the streak.
        assert!(
            !d.update(&sample(4.0, quiet()), &exp, 4.0)
                .findings
                .busy_without_io
        );
        let mut last = AnomalyReport::default();
        for _ in 0..60 {
            last = d.update(&sample(4.0, no_io), &exp, 4.0);
        }
        assert!(last.findings.busy_without_io);
        // Steady state 0.6 / (1 - 0.9) = 6: pause, not kill.
        assert_eq!(last.action, Action::Pause);
    }

    #[test]
    fn unknown_exits_fire_at_once_and_fade() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default()).unwrap();
        let exp = usage(1.0);
        let odd = Signals {
            unknown_exits: 3,
            ..quiet()
        };
        let r = d.update(&sample(1.0, odd), &exp, 4.0);
        assert!(r.findings.unknown_exits);
        assert_eq!(r.action, Action::Alert);
        let mut r = r;
        for _ in 0..30 {
            r = d.update(&sample(1.0, quiet()), &exp, 4.0);
        }
        assert_eq!(r.action, Action::Hold);
    }

    #[test]
    fn devices_are_learned_then_flagged_once() {
        let cfg = AnomalyConfig {
            learn_windows: 3,
            ..Default::default()
        };
        let mut d = AnomalyDetector::new(cfg).unwrap();
        let exp = usage(1.0);
        for devices in [0b001, 0b010, 0b001] {
            let r = d.update(&sample(1.0, Signals { devices, ..quiet() }), &exp, 4.0);
            assert_eq!(r.findings.new_devices, 0);
        }
        let r = d.update(
            &sample(
                1.0,
                Signals {
                    devices: 0b111,
                    ..quiet()
                },
            ),
            &exp,
            4.0,
        );
        assert_eq!(r.findings.new_devices, 0b100);
        assert_eq!(r.action, Action::TightenSeccomp);
        let r = d.update(
            &sample(
                1.0,
                Signals {
                    devices: 0b111,
                    ..quiet()
                },
            ),
            &exp,
            4.0,
        );
        assert_eq!(r.findings.new_devices, 0);
    }

    #[test]
    fn a_platform_device_first_used_late_is_no_finding() {
        // The i8042 on a reset, or the CPU hot-plug controller once the predictor plugs a vCPU:
        // first touched long after learning, by a healthy guest.
        let cfg = AnomalyConfig {
            learn_windows: 3,
            ..Default::default()
        };
        let mut d = AnomalyDetector::new(cfg).unwrap();
        let exp = usage(1.0);
        for _ in 0..3 {
            d.update(
                &sample(
                    1.0,
                    Signals {
                        devices: 0b1,
                        ..quiet()
                    },
                ),
                &exp,
                4.0,
            );
        }
        let late = Signals {
            devices: 0b1,
            platform_devices: 0b110,
            ..quiet()
        };
        let r = d.update(&sample(1.0, late), &exp, 4.0);
        assert!(!r.findings.any(), "{:?}", r.findings);
        assert_eq!(r.action, Action::Hold);
    }

    #[test]
    fn early_noise_is_measured_against_its_own_spread() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default()).unwrap();
        let exp = usage(100.0);
        // 20 windows of noise with a spread of 1, then a residual of 3: three deviations out,
        // nowhere near the threshold of 6.
        for i in 0..20 {
            let mut s = sample(1.0, quiet());
            s.usage.mem = 100.0 + if i % 2 == 0 { 1.0 } else { -1.0 };
            d.update(&s, &Usage { cpu: 1.0, ..exp }, 4.0);
        }
        let mut s = sample(1.0, quiet());
        s.usage.mem = 103.0;
        let r = d.update(&s, &Usage { cpu: 1.0, ..exp }, 4.0);
        assert!(r.findings.residual.is_none(), "{r:?}");
        let mut m = Moments::default();
        for r in [1.0, -1.0, 1.0, -1.0] {
            m.add(r, 1e-3);
        }
        assert!((m.var - 1.0).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn residual_outlier_against_own_history() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default()).unwrap();
        let exp = usage(100.0);
        for i in 0..100 {
            let noise = if i % 2 == 0 { 1.0 } else { -1.0 };
            let mut s = sample(1.0, quiet());
            s.usage.mem = 100.0 + noise;
            let r = d.update(&s, &Usage { cpu: 1.0, ..exp }, 4.0);
            assert!(r.findings.residual.is_none(), "window {i}: {r:?}");
        }
        // Alone, a forecast miss is no finding: a healthy workload changes phase too.
        let mut s = sample(1.0, quiet());
        s.usage.mem = 130.0;
        let r = d.update(&s, &Usage { cpu: 1.0, ..exp }, 4.0);
        assert!(!r.findings.any(), "{r:?}");
        assert_eq!(r.window_score, 0.0);
        // Beside a behaviour rule it adds its weight, at most 0.3.
        let mut s = sample(
            1.0,
            Signals {
                unknown_exits: 1,
                ..quiet()
            },
        );
        s.usage.mem = 160.0;
        let r = d.update(&s, &Usage { cpu: 1.0, ..exp }, 4.0);
        assert_eq!(r.findings.residual, Some(Resource::Mem));
        let cfg = AnomalyConfig::default();
        assert!(r.findings.residual_z > 2.0 * cfg.z_threshold, "{r:?}");
        let full = cfg.unknown_exit_weight + cfg.residual_weight;
        assert!((r.window_score - full).abs() < 1e-12, "{r:?}");
    }
}
