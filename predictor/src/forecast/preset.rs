//! Named forecaster configurations, so the VMM and the evaluation build the same ones.

use super::{
    BandConfig, DecayingHistogram, Ewma, Forecaster, GruWeights, Holt, Horizon, LastValue,
    PercentileConfig, Recurrent, RecurrentError,
};
use crate::resource::{PerResource, Usage};
use std::sync::Arc;

/// Half-life of memory's forecast errors, in windows. Resident memory moves in 2 MiB pages, so a
/// low level's misses are large relative errors; remembered as long as other resources' (600
/// windows), they keep the band at a large share of every later, higher level.
const MEM_HALF_LIFE: f64 = 50.0;

#[derive(Clone, Debug)]
pub enum Preset {
    Last,
    Ewma,
    Holt,
    Histogram,
    Recurrent(Arc<GruWeights>),
}

impl Preset {
    /// The presets that need no weights file.
    pub const CLASSICAL: [Preset; 4] =
        [Preset::Last, Preset::Ewma, Preset::Holt, Preset::Histogram];

    pub fn name(&self) -> &'static str {
        match self {
            Preset::Last => "last",
            Preset::Ewma => "ewma",
            Preset::Holt => "holt",
            Preset::Histogram => "histogram",
            Preset::Recurrent(_) => "gru",
        }
    }

    /// One forecaster; `capacity` only matters to the recurrent model (its input scale).
    pub fn build(
        &self,
        horizon: Horizon,
        capacity: f64,
    ) -> Result<Box<dyn Forecaster>, RecurrentError> {
        self.build_with(horizon, capacity, BandConfig::default().half_life)
    }

    fn build_with(
        &self,
        horizon: Horizon,
        capacity: f64,
        half_life: f64,
    ) -> Result<Box<dyn Forecaster>, RecurrentError> {
        let band = BandConfig {
            horizon,
            half_life,
            ..BandConfig::default()
        };
        Ok(match self {
            Preset::Last => Box::new(LastValue::with_band(band)?),
            // Weights chosen on the synthetic set's bursty and phase-change traces: a fast
            // level, and a trend that adapts slowly and is damped so noise does not extrapolate.
            Preset::Ewma => Box::new(Ewma::with_alpha(0.5, band)?),
            Preset::Holt => Box::new(Holt::with_params(0.5, 0.1, 0.9, band)?),
            Preset::Histogram => Box::new(DecayingHistogram::new(PercentileConfig::default())?),
            Preset::Recurrent(w) => {
                Box::new(Recurrent::with_weights(Arc::clone(w), capacity, band)?)
            }
        })
    }

    /// One forecaster per resource.
    pub fn build_all(
        &self,
        horizon: Horizon,
        capacity: &Usage,
    ) -> Result<PerResource<Box<dyn Forecaster>>, RecurrentError> {
        Ok(PerResource {
            cpu: self.build(horizon, capacity.cpu)?,
            mem: self.build_with(horizon, capacity.mem, MEM_HALF_LIFE)?,
            blk: self.build(horizon, capacity.blk)?,
            net: self.build(horizon, capacity.net)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_builds_and_names_itself() {
        let cap = Usage {
            cpu: 2.0,
            mem: 1024.0,
            blk: 10.0,
            net: 10.0,
        };
        for p in Preset::CLASSICAL {
            let mut all = p.build_all(Horizon::new(5).unwrap(), &cap).unwrap();
            assert_eq!(all.mem.name(), p.name());
            for _ in 0..30 {
                all.cpu.observe(1.0);
            }
            assert!(all.cpu.warm(), "{}", p.name());
            let f = all.cpu.forecast(Horizon::ONE);
            assert!(
                f.upper >= f.point && (f.point - 1.0).abs() < 0.02,
                "{}: {f:?}",
                p.name()
            );
        }
    }
}
