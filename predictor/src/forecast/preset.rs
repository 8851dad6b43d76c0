//! Named forecaster configurations, so the VMM and the evaluation build the same ones.

use super::{
    BandConfig, DecayingHistogram, Ensemble, EnsembleConfig, Ewma, Forecaster, GruWeights, Holt,
    Horizon, Indicator, LastValue, LeadingIndicator, Peak, PercentileConfig, Recurrent,
    RecurrentError,
};
use crate::resource::{PerResource, Resource, Usage};
use std::sync::Arc;

/// Half-life of memory's forecast errors, in windows. Resident memory moves in steps (pages,
/// a heap's growth), and a step's error remembered as long as other resources' (600 windows)
/// keeps the band wide long after the step (training split: mem slack 18.9 % against 19.1 %
/// with 600; synthetic set: 3.6 % against 4.0 %).
const MEM_HALF_LIFE: f64 = 50.0;

/// Windows the peak expert looks back over: one second at 100 ms windows, as long as the
/// bands take to warm up. On the training split's CPU, 10 and 20 do the same (fewer windows
/// under than without the expert at the same slack); 3 follows the dips it is there to ignore.
const PEAK_WINDOWS: usize = 10;

#[derive(Clone, Debug)]
pub enum Preset {
    Last,
    Ewma,
    Holt,
    Histogram,
    /// The largest demand of the last second (`forecast::Peak`).
    Peak,
    /// Regression on the resource's leading indicator (faults for memory, I/O requests for
    /// block and network, exits for CPU).
    Indicator,
    Recurrent(Arc<GruWeights>),
    /// Every preset listed, side by side, weighted by their recent quantile loss.
    Ensemble(Vec<Preset>),
    /// An ensemble's expert for one resource only (the others leave it out).
    OnlyFor(Resource, Box<Preset>),
}

impl Preset {
    /// The presets that need no weights file.
    pub const CLASSICAL: [Preset; 6] = [
        Preset::Last,
        Preset::Ewma,
        Preset::Holt,
        Preset::Histogram,
        Preset::Peak,
        Preset::Indicator,
    ];

    /// An ensemble of the smoothing and percentile experts, the recent peak and the
    /// leading-indicator expert where each earned its place on the training split (CPU: the
    /// peak; memory: page faults; exits and I/O requests did not lower CPU, block or network
    /// slack, nor the peak memory, block or network slack, see README.md), and `gru` on every
    /// resource.
    pub fn ensemble(gru: Option<Arc<GruWeights>>) -> Preset {
        let mut experts = vec![Preset::Last, Preset::Ewma, Preset::Holt, Preset::Histogram];
        experts.push(Preset::OnlyFor(Resource::Cpu, Box::new(Preset::Peak)));
        experts.push(Preset::OnlyFor(Resource::Mem, Box::new(Preset::Indicator)));
        experts.extend(gru.map(Preset::Recurrent));
        Preset::Ensemble(experts)
    }

    /// The default policy's ensemble: [`Preset::ensemble`] with the shipped recurrent model
    /// for memory only, the one resource where it beat the other forecasters on the real
    /// corpus's test split (README.md).
    pub fn default_ensemble() -> Result<Preset, RecurrentError> {
        let Preset::Ensemble(mut experts) = Preset::ensemble(None) else {
            unreachable!("Preset::ensemble builds an ensemble")
        };
        let gru = Preset::Recurrent(Arc::new(GruWeights::shipped()?));
        experts.push(Preset::OnlyFor(Resource::Mem, Box::new(gru)));
        Ok(Preset::Ensemble(experts))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Preset::Last => "last",
            Preset::Ewma => "ewma",
            Preset::Holt => "holt",
            Preset::Histogram => "histogram",
            Preset::Peak => "peak",
            Preset::Indicator => "indicator",
            Preset::Recurrent(_) => "gru",
            Preset::Ensemble(_) => "ensemble",
            Preset::OnlyFor(_, p) => p.name(),
        }
    }

    /// One forecaster for resource `r` of a VM with `capacity` of it (the recurrent model's
    /// input scale, and the smallest error the bands resolve).
    pub fn build(
        &self,
        r: Resource,
        horizon: Horizon,
        capacity: f64,
    ) -> Result<Box<dyn Forecaster>, RecurrentError> {
        let band = BandConfig {
            horizon,
            half_life: if r == Resource::Mem {
                MEM_HALF_LIFE
            } else {
                BandConfig::default().half_life
            },
            min_unit: 1e-3 * capacity,
            ..BandConfig::default()
        };
        Ok(match self {
            Preset::Last => Box::new(LastValue::with_band(band)?),
            // Weights chosen on the synthetic set's bursty and phase-change traces: a fast
            // level, and a trend that adapts slowly and is damped so noise does not extrapolate.
            Preset::Ewma => Box::new(Ewma::with_alpha(0.5, band)?),
            Preset::Holt => Box::new(Holt::with_params(0.5, 0.1, 0.9, band)?),
            Preset::Histogram => Box::new(DecayingHistogram::new(PercentileConfig::default())?),
            Preset::Peak => Box::new(Peak::with_windows(PEAK_WINDOWS, band)?),
            Preset::Indicator => {
                let indicator = match r {
                    Resource::Cpu => LeadingIndicator::Exits,
                    Resource::Mem => LeadingIndicator::Faults,
                    Resource::Blk | Resource::Net => LeadingIndicator::IoOps,
                };
                Box::new(Indicator::with_indicator(indicator, band)?)
            }
            Preset::Recurrent(w) => {
                Box::new(Recurrent::with_weights(Arc::clone(w), capacity, band)?)
            }
            Preset::Ensemble(experts) => {
                let experts = experts
                    .iter()
                    .filter(|p| !matches!(p, Preset::OnlyFor(only, _) if *only != r))
                    .map(|p| p.build(r, horizon, capacity))
                    .collect::<Result<Vec<_>, _>>()?;
                Box::new(Ensemble::new(experts, EnsembleConfig::default())?)
            }
            Preset::OnlyFor(_, p) => p.build(r, horizon, capacity)?,
        })
    }

    /// One forecaster per resource.
    pub fn build_all(
        &self,
        horizon: Horizon,
        capacity: &Usage,
    ) -> Result<PerResource<Box<dyn Forecaster>>, RecurrentError> {
        Ok(PerResource {
            cpu: self.build(Resource::Cpu, horizon, capacity.cpu)?,
            mem: self.build(Resource::Mem, horizon, capacity.mem)?,
            blk: self.build(Resource::Blk, horizon, capacity.blk)?,
            net: self.build(Resource::Net, horizon, capacity.net)?,
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
        for p in Preset::CLASSICAL
            .into_iter()
            .chain([Preset::default_ensemble().unwrap()])
        {
            let mut all = p.build_all(Horizon::new(5).unwrap(), &cap).unwrap();
            assert!(all.mem.name() == p.name() || p.name() == "indicator");
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
