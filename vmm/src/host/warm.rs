//! Warm pools: a VM class kept as N instances restored from one snapshot and paused, ready to
//! be handed out (`POST /vms {"from_pool": NAME}` resumes one). N follows a forecast of the
//! class's request arrivals, made by the predictor's own forecasters on the arrival series,
//! its upper band calibrated online (the policy's [`Calibration`]) so that the share of windows
//! in which a request finds no warm VM holds the pool's `miss_rate`.

use std::collections::VecDeque;
use std::time::Duration;

use predictor::forecast::{Forecaster, Horizon, Preset};
use predictor::policy::Calibration;
use predictor::resource::Resource;
use serde::{Deserialize, Serialize};

use super::spec::{Class, LaunchSpec};

/// Errors of a warm pool's definition.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("the pool definition is not valid: {0}")]
    Body(serde_json::Error),
    #[error("pool name {0:?}: letters, digits and '-', at most 40")]
    Name(String),
    #[error("min {min} must not exceed max {max} (at most {MAX_WARM})")]
    Bounds { min: usize, max: usize },
    #[error("snapshot_after_ms {0}: at most 60000")]
    After(u64),
    #[error("miss_rate {0}: must be above 0 and at most 0.5")]
    MissRate(f64),
    #[error("calibration_step {0}: must be above 0 and at most 1")]
    Step(f64),
    #[error("cannot build the arrival forecaster: {0}")]
    Forecaster(String),
}

/// The most warm VMs one pool keeps.
pub const MAX_WARM: usize = 64;

/// Windows between asking for a warm VM and having it (`make_ms`), plus the window in which
/// the ask is made: how far ahead the forecast looks.
fn lead(make_ms: f64, window: Duration) -> Horizon {
    let windows = (make_ms / window.as_millis().max(1) as f64).ceil() as usize + 1;
    Horizon::new(windows.clamp(1, Horizon::MAX)).expect("clamped to the horizon's range")
}

/// `PUT /pools/NAME` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    pub class: Class,
    /// The VM's Firecracker config: a template VM boots from it and is snapshotted.
    pub config: serde_json::Value,
    /// How long the template runs before its snapshot (its guest's start-up done).
    #[serde(default)]
    pub snapshot_after_ms: u64,
    /// Warm VMs kept whatever the forecast says, and at most.
    #[serde(default)]
    pub min: usize,
    #[serde(default = "default_max")]
    pub max: usize,
    /// The share of windows with requests in which a request may find no warm VM (and boot
    /// cold): what the calibration of the pool's band aims at.
    #[serde(default = "default_miss_rate")]
    pub miss_rate: f64,
    /// How much one miss widens the band, as a share of its width (at least one VM wide).
    #[serde(default = "default_step")]
    pub calibration_step: f64,
}

fn default_max() -> usize {
    8
}

fn default_miss_rate() -> f64 {
    0.01
}

fn default_step() -> f64 {
    // Half a band (at least half a VM) per miss: a pool sees far fewer windows with requests
    // than a VM sees windows, so its band has to find its width in fewer of them than the
    // policy's (0.1), and a miss (a cold boot) costs more than the VM it would have taken.
    0.5
}

impl PoolSpec {
    pub fn parse(name: &str, body: &[u8]) -> Result<Self, WarmError> {
        let spec: PoolSpec = serde_json::from_slice(body).map_err(WarmError::Body)?;
        let name_ok = !name.is_empty()
            && name.len() <= 40
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !name_ok {
            return Err(WarmError::Name(name.into()));
        }
        if spec.min > spec.max || spec.max > MAX_WARM {
            return Err(WarmError::Bounds {
                min: spec.min,
                max: spec.max,
            });
        }
        if spec.snapshot_after_ms > 60_000 {
            return Err(WarmError::After(spec.snapshot_after_ms));
        }
        if !(spec.miss_rate > 0.0 && spec.miss_rate <= 0.5) {
            return Err(WarmError::MissRate(spec.miss_rate));
        }
        if !(spec.calibration_step > 0.0 && spec.calibration_step <= 1.0) {
            return Err(WarmError::Step(spec.calibration_step));
        }
        Ok(spec)
    }
}

/// How many warm VMs a pool wants: the calibrated upper band of its arrivals over the lead
/// time, within its bounds.
///
/// The forecasters see, each window, the arrivals of the last `lead` windows (what a warm VM
/// asked for now could not have served) and forecast that sum `lead` windows ahead. A window
/// with requests is scored: missed if a request found no warm VM while the pool was below its
/// max (a miss at the max is the max's, and no band can fix it). A window without requests is
/// not scored: it could not have missed, and counting it would narrow the band on idle time.
/// The band is scaled as the policy's are (see [`Calibration`]): once widened it is at least
/// one VM wide, so at `scale >= max` the target is the max, where no miss is counted; hence
/// `scale < max + step` and over any `T` scored windows of any arrival series the share
/// missed is at most `miss_rate + (max + step) / (step T)`.
pub struct Sizing {
    forecaster: Box<dyn Forecaster>,
    horizon: Horizon,
    /// Arrivals in each of the last windows, newest last, as long as the lead.
    recent: VecDeque<u64>,
    calibration: Calibration,
    min: usize,
    max: usize,
    /// Warm VMs wanted now.
    target: usize,
}

impl Sizing {
    pub fn new(spec: &PoolSpec, horizon: Horizon) -> Result<Self, WarmError> {
        let forecaster = Preset::ensemble(None)
            // The arrival series is a count: "cpu" gives it the bands of a rate.
            .build(Resource::Cpu, horizon, MAX_WARM as f64)
            .map_err(|e| WarmError::Forecaster(e.to_string()))?;
        Ok(Sizing {
            forecaster,
            horizon,
            recent: VecDeque::new(),
            calibration: Calibration::new(spec.miss_rate, spec.calibration_step),
            min: spec.min,
            max: spec.max,
            target: spec.min,
        })
    }

    /// Closes a window in which `arrivals` requests came and (`missed`) at least one found no
    /// warm VM; returns the new target.
    pub fn close(&mut self, arrivals: u64, missed: bool) -> usize {
        if arrivals > 0 {
            self.calibration.update(missed && self.target < self.max);
        }
        self.recent.push_back(arrivals);
        while self.recent.len() > self.horizon.get() {
            self.recent.pop_front();
        }
        let sum: u64 = self.recent.iter().sum();
        self.forecaster.observe(sum as f64);
        let mut f = self.forecaster.forecast(self.horizon);
        f.point = f.point.max(0.0);
        f.upper = f.upper.max(f.point);
        let upper = self.calibration.upper(f, 1.0);
        self.target = (upper.ceil() as usize).clamp(self.min, self.max);
        self.target
    }

    pub fn target(&self) -> usize {
        self.target
    }

    pub fn lead_windows(&self) -> usize {
        self.horizon.get()
    }

    /// The factor the forecasters' band is scaled by.
    pub fn width(&self) -> f64 {
        self.calibration.width()
    }
}

/// A warm pool: its snapshot, its warm VMs and the forecast that sizes it.
pub struct WarmPool {
    pub name: String,
    pub spec: PoolSpec,
    /// The checked config (the template's), for instances and cold fallbacks.
    pub launch: LaunchSpec,
    pub snapshot: (std::path::PathBuf, std::path::PathBuf),
    /// Warm VMs being made.
    pub pending: usize,
    /// Requests this window.
    arrivals: u64,
    /// Whether a request this window found no warm VM.
    missed: bool,
    sizing: Sizing,
    /// Windows with requests, and those of them in which a request found no warm VM.
    pub scored: u64,
    pub missed_windows: u64,
    /// How long making a warm VM took (milliseconds; moving average).
    pub make_ms: f64,
    pub made: u64,
    pub handed_out: u64,
    /// Requests that found no warm VM and were booted cold.
    pub cold: u64,
    pub released: u64,
    /// Sum over windows of the warm VMs ready, for the mean.
    pub ready_windows: u64,
    pub windows: u64,
}

impl WarmPool {
    pub fn new(
        name: String,
        spec: PoolSpec,
        launch: LaunchSpec,
        snapshot: (std::path::PathBuf, std::path::PathBuf),
        make_ms: f64,
        window: Duration,
    ) -> Result<Self, WarmError> {
        let sizing = Sizing::new(&spec, lead(make_ms, window))?;
        Ok(WarmPool {
            name,
            spec,
            launch,
            snapshot,
            pending: 0,
            arrivals: 0,
            missed: false,
            sizing,
            scored: 0,
            missed_windows: 0,
            make_ms,
            made: 0,
            handed_out: 0,
            cold: 0,
            released: 0,
            ready_windows: 0,
            windows: 0,
        })
    }

    /// One request for a warm VM.
    pub fn arrival(&mut self) {
        self.arrivals += 1;
    }

    /// A request that found no warm VM (it boots cold).
    pub fn cold_start(&mut self) {
        self.cold += 1;
        self.missed = true;
    }

    /// Closes a window with `ready` warm VMs: its arrivals and whether one missed go to the
    /// sizing (see [`Sizing`]).
    pub fn close_window(&mut self, ready: usize) {
        self.windows += 1;
        self.ready_windows += ready as u64;
        let (arrivals, missed) = (
            std::mem::take(&mut self.arrivals),
            std::mem::take(&mut self.missed),
        );
        if arrivals > 0 {
            self.scored += 1;
            self.missed_windows += u64::from(missed);
        }
        self.sizing.close(arrivals, missed);
    }

    /// Warm VMs wanted now.
    pub fn target(&self) -> usize {
        self.sizing.target()
    }

    /// A made warm VM's time, into the moving average.
    pub fn made_in(&mut self, ms: f64) {
        self.made += 1;
        self.make_ms = 0.8 * self.make_ms + 0.2 * ms;
    }

    /// The pool for `GET /pools`, with the ids of its warm VMs ready.
    pub fn describe(&self, ready: Vec<String>) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "class": self.spec.class,
            "min": self.spec.min,
            "max": self.spec.max,
            "miss_rate": self.spec.miss_rate,
            "target": self.target(),
            "ready": ready.len(),
            "ready_ids": ready,
            "pending": self.pending,
            "lead_windows": self.sizing.lead_windows(),
            "band_width": self.sizing.width(),
            "scored_windows": self.scored,
            "missed_windows": self.missed_windows,
            "make_ms": self.make_ms,
            "made": self.made,
            "handed_out": self.handed_out,
            "cold": self.cold,
            "released": self.released,
            "mean_ready": self.ready_windows as f64 / self.windows.max(1) as f64,
            "windows": self.windows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_definitions_are_refused_by_name() {
        let err = |name: &str, body: &str| {
            PoolSpec::parse(name, body.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(err("a", "{}").contains("missing field `config`"));
        assert!(err("a b", r#"{"config": {}}"#).contains("pool name"));
        assert!(err("a", r#"{"config": {}, "min": 3, "max": 2}"#).contains("min 3"));
        assert!(err("a", r#"{"config": {}, "max": 65}"#).contains("at most 64"));
        assert!(err("a", r#"{"config": {}, "snapshot_after_ms": 60001}"#).contains("60000"));
        assert!(err("a", r#"{"config": {}, "size": 1}"#).contains("unknown field `size`"));
        assert!(err("a", r#"{"config": {}, "miss_rate": 0}"#).contains("miss_rate 0"));
        assert!(err("a", r#"{"config": {}, "miss_rate": 0.6}"#).contains("miss_rate 0.6"));
        assert!(err("a", r#"{"config": {}, "calibration_step": 2}"#).contains("step 2"));
        let s = PoolSpec::parse("fn-1", br#"{"config": {}}"#).unwrap();
        assert_eq!((s.min, s.max, s.class), (0, 8, Class::Burstable));
        assert_eq!((s.miss_rate, s.calibration_step), (0.01, 0.5));
    }

    /// Requests per 100 ms window: bursts of 1-4 arriving as a Poisson process, its rate
    /// steady (1.5 bursts/s) or in phases of 30 s (quiet 0.5 bursts/s, busy 3 bursts/s).
    fn poisson_bursts(windows: usize, seed: u64, phases: bool) -> Vec<u64> {
        let mut rng = predictor::rng::Rng::new(seed);
        (0..windows)
            .map(|w| {
                let rate = match (phases, (w / 300) % 2) {
                    (false, _) => 0.15,
                    (true, 1) => 0.3,
                    (true, _) => 0.05,
                };
                // Poisson by inversion: the bursts in this window.
                let u = rng.unit();
                let (mut k, mut p) = (0, predictor::math::exp(-rate));
                let mut cdf = p;
                while u > cdf {
                    k += 1;
                    p *= rate / k as f64;
                    cdf += p;
                }
                (0..k).map(|_| 1 + (rng.unit() * 4.0) as u64).sum()
            })
            .collect()
    }

    /// The host's loop around a pool, reduced to counts: a window's requests take the warm
    /// VMs ready at its start, and at its close the host makes or lets go up to 4 towards the
    /// target, the made ones ready by the next window (making one takes ~21 ms of a 100 ms
    /// window, so the lead is 2).
    /// Returns the share of windows with requests that missed, the most VMs kept and their
    /// mean.
    fn simulate(spec: &PoolSpec, arrivals: &[u64]) -> (f64, usize, f64) {
        let mut sizing = Sizing::new(spec, lead(21.0, Duration::from_millis(100))).unwrap();
        assert_eq!(sizing.lead_windows(), 2);
        let (mut ready, mut scored, mut missed, mut most) = (0usize, 0u64, 0u64, 0usize);
        let mut kept = 0;
        for &a in arrivals {
            let miss = a as usize > ready;
            ready = ready.saturating_sub(a as usize);
            if a > 0 {
                scored += 1;
                missed += u64::from(miss && sizing.target() < spec.max);
            }
            let target = sizing.close(a, miss);
            assert!(target <= spec.max, "target {target} above max {}", spec.max);
            ready = if target > ready {
                ready + (target - ready).min(4)
            } else {
                ready - (ready - target).min(4)
            };
            most = most.max(ready);
            kept += ready;
        }
        let mean = kept as f64 / arrivals.len() as f64;
        (missed as f64 / scored as f64, most, mean)
    }

    fn spec(miss_rate: f64, max: usize) -> PoolSpec {
        let body = format!(r#"{{"config": {{}}, "max": {max}, "miss_rate": {miss_rate}}}"#);
        PoolSpec::parse("fn", body.as_bytes()).unwrap()
    }

    #[test]
    fn the_calibrated_pool_misses_at_its_target_rate() {
        for (seed, phases) in [(23, true), (29, false)] {
            let arrivals = poisson_bursts(60_000, seed, phases);
            let scored = arrivals.iter().filter(|&&a| a > 0).count();
            assert!(scored > 5_000, "{scored} windows with requests");
            let mut means = Vec::new();
            for target in [0.01, 0.05] {
                let (rate, most, mean) = simulate(&spec(target, 16), &arrivals);
                eprintln!("phases {phases}, target {target}: missed {rate:.4}, mean {mean:.2}");
                assert!(
                    (rate - target).abs() <= 0.005,
                    "miss rate {rate:.4} against a target of {target} (phases {phases})"
                );
                assert!(most <= 16);
                means.push(mean);
            }
            // The target, not the forecasters' own band, set the size: fewer misses cost VMs.
            assert!(means[0] > means[1], "{means:?}");
        }
    }

    #[test]
    fn sizing_never_exceeds_the_max() {
        // A max far below the bursts: every window with requests misses, none is counted, and
        // the target stays at the max.
        let arrivals = poisson_bursts(6_000, 5, true);
        let (_, most, _) = simulate(&spec(0.01, 2), &arrivals);
        assert_eq!(most, 2);
        let s = spec(0.01, 3);
        let mut sizing = Sizing::new(&s, lead(21.0, Duration::from_millis(100))).unwrap();
        for _ in 0..1_000 {
            assert!(sizing.close(40, true) <= 3);
        }
        // Misses at the max are the max's: they do not widen the band without bound.
        assert!(sizing.width() < 3.0 + 0.5 + 1.0, "width {}", sizing.width());
    }
}
