//! Decaying-histogram percentile forecaster in the style of Kubernetes VPA and Google
//! Autopilot: recommend a high percentile of recent usage plus a safety margin.

use super::{check_param, DecayHistogram, Forecast, ForecastError, Forecaster, Horizon};
use crate::persist::Persist;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PercentileConfig {
    /// Half-life of samples, in windows.
    pub half_life: f64,
    /// Percentile (as a fraction) that the upper bound starts from.
    pub percentile: f64,
    /// Fraction added on top of the percentile.
    pub margin: f64,
    /// Growth factor between bucket edges; VPA uses 1.05.
    pub bucket_ratio: f64,
    /// Samples before the forecaster reports itself warm.
    pub min_samples: u32,
}

impl PercentileConfig {
    /// VPA's recommender: 24 h half-life (at 100 ms windows), P90, +15 %, 5 % buckets.
    pub fn vpa() -> Self {
        PercentileConfig {
            half_life: 24.0 * 3600.0 * 10.0,
            percentile: 0.90,
            margin: 0.15,
            bucket_ratio: 1.05,
            min_samples: 20,
        }
    }
}

impl Default for PercentileConfig {
    /// For 100 ms windows: a one-minute half-life follows phase changes within seconds, and
    /// finer buckets cost less slack than VPA's. No margin: the policy's calibration moves the
    /// percentile until the miss rate holds its target.
    fn default() -> Self {
        PercentileConfig {
            half_life: 600.0,
            percentile: 0.99,
            margin: 0.0,
            bucket_ratio: 1.01,
            min_samples: 10,
        }
    }
}

/// The forecast does not depend on the horizon: a percentile of the recent past is the
/// prediction for any future window.
#[derive(Serialize, Deserialize)]
pub struct DecayingHistogram {
    cfg: PercentileConfig,
    hist: DecayHistogram,
    samples: u32,
    median: f64,
    high: f64,
}

impl DecayingHistogram {
    pub fn new(cfg: PercentileConfig) -> Result<Self, ForecastError> {
        check_param("percentile", cfg.percentile, 0.0, 1.0, false, "(0, 1]")?;
        check_param("margin", cfg.margin, 0.0, 10.0, true, "[0, 10]")?;
        Ok(DecayingHistogram {
            hist: DecayHistogram::new(1e-3, cfg.bucket_ratio, 1e7, cfg.half_life)?,
            cfg,
            samples: 0,
            median: 0.0,
            high: 0.0,
        })
    }
}

impl Persist for DecayingHistogram {
    fn fits(&self, fresh: &Self) -> Result<(), String> {
        self.hist.fits(&fresh.hist)
    }
}

impl Forecaster for DecayingHistogram {
    fn name(&self) -> &'static str {
        "histogram"
    }

    fn observe(&mut self, value: f64) {
        self.hist.add(value);
        self.samples = self.samples.saturating_add(1);
        self.median = self.hist.quantile(0.5);
        self.high = self.hist.quantile(self.cfg.percentile);
    }

    fn forecast(&self, _: Horizon) -> Forecast {
        Forecast {
            point: self.median,
            upper: self.high * (1.0 + self.cfg.margin),
        }
    }

    fn warm(&self) -> bool {
        self.samples >= self.cfg.min_samples
    }

    /// Takes effect from the next observation (which recomputes the percentile anyway).
    fn set_quantile(&mut self, quantile: f64) {
        self.cfg.percentile = quantile.clamp(0.5, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(percentile: f64, margin: f64, half_life: f64) -> PercentileConfig {
        PercentileConfig {
            half_life,
            percentile,
            margin,
            bucket_ratio: 1.01,
            min_samples: 10,
        }
    }

    #[test]
    fn p90_plus_margin_of_uniform_steps() {
        let mut f = DecayingHistogram::new(cfg(0.9, 0.15, f64::INFINITY)).unwrap();
        for v in 1..=100 {
            f.observe(v as f64);
        }
        let fc = f.forecast(Horizon::ONE);
        // P90 of 1..=100 is 90 (91 once 1 - 0.9 rounds below 0.1), read as the upper edge
        // of its 1 % bucket, then +15 %.
        let p90 = fc.upper / 1.15;
        assert!((90.0..=91.0 * 1.01).contains(&p90), "{fc:?}");
        assert!(fc.point >= 50.0 && fc.point <= 50.0 * 1.01 + 1e-9, "{fc:?}");
        assert!(f.warm());
    }

    #[test]
    fn short_half_life_forgets_a_phase() {
        let mut f = DecayingHistogram::new(cfg(0.99, 0.0, 20.0)).unwrap();
        for _ in 0..300 {
            f.observe(1000.0);
        }
        for _ in 0..300 {
            f.observe(100.0);
        }
        let fc = f.forecast(Horizon::new(10).unwrap());
        assert!(fc.upper < 102.0, "{fc:?}");
    }

    #[test]
    fn vpa_preset_is_p90_plus_15() {
        let v = PercentileConfig::vpa();
        assert_eq!((v.percentile, v.margin), (0.90, 0.15));
        assert!(DecayingHistogram::new(cfg(0.0, 0.1, 1.0)).is_err());
        assert!(DecayingHistogram::new(cfg(0.9, -0.1, 1.0)).is_err());
    }
}
