//! Warm pools: a VM class kept as N instances restored from one snapshot and paused, ready to
//! be handed out (`POST /vms {"from_pool": NAME}` resumes one). N follows a forecast of the
//! class's request arrivals, made by the predictor's own forecasters on the arrival series.

use std::collections::VecDeque;
use std::time::Duration;

use predictor::forecast::{Forecaster, Horizon, Preset};
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
}

fn default_max() -> usize {
    8
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
        Ok(spec)
    }
}

/// A warm pool: its snapshot, its warm VMs and the forecast that sizes it.
pub struct WarmPool {
    pub name: String,
    pub spec: PoolSpec,
    /// The checked config (the template's), for instances and cold fallbacks.
    pub launch: LaunchSpec,
    pub snapshot: (std::path::PathBuf, std::path::PathBuf),
    /// Warm VMs' ids, oldest first.
    pub ready: VecDeque<String>,
    /// Warm VMs being made.
    pub pending: usize,
    /// Requests this window.
    arrivals: u64,
    /// Arrivals in each of the last windows, newest last, as long as making a VM takes.
    recent: VecDeque<u64>,
    forecaster: Box<dyn Forecaster>,
    horizon: Horizon,
    /// Warm VMs wanted now.
    pub target: usize,
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
        let horizon = lead(make_ms, window);
        let forecaster = Preset::ensemble(None)
            // The arrival series is a count: "cpu" gives it the bands of a rate.
            .build(Resource::Cpu, horizon, MAX_WARM as f64)
            .map_err(|e| WarmError::Forecaster(e.to_string()))?;
        Ok(WarmPool {
            name,
            target: spec.min,
            spec,
            launch,
            snapshot,
            ready: VecDeque::new(),
            pending: 0,
            arrivals: 0,
            recent: VecDeque::new(),
            forecaster,
            horizon,
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

    /// Closes a window: the forecaster sees the arrivals of the last `lead` windows (what a
    /// warm VM made now could not have served), and the target becomes its upper band for
    /// the `lead` windows ahead, within the pool's bounds.
    pub fn close_window(&mut self) {
        self.windows += 1;
        self.ready_windows += self.ready.len() as u64;
        self.recent.push_back(std::mem::take(&mut self.arrivals));
        while self.recent.len() > self.horizon.get() {
            self.recent.pop_front();
        }
        let sum: u64 = self.recent.iter().sum();
        self.forecaster.observe(sum as f64);
        let upper = self.forecaster.forecast(self.horizon).upper.max(0.0);
        self.target = (upper.ceil() as usize).clamp(self.spec.min, self.spec.max);
    }

    /// A made warm VM's time, into the moving average.
    pub fn made_in(&mut self, ms: f64) {
        self.made += 1;
        self.make_ms = 0.8 * self.make_ms + 0.2 * ms;
    }

    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "class": self.spec.class,
            "min": self.spec.min,
            "max": self.spec.max,
            "target": self.target,
            "ready": self.ready.len(),
            "ready_ids": self.ready,
            "pending": self.pending,
            "lead_windows": self.horizon.get(),
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
        let s = PoolSpec::parse("fn-1", br#"{"config": {}}"#).unwrap();
        assert_eq!((s.min, s.max, s.class), (0, 8, Class::Burstable));
    }
}
