//! Demand forecasters behind one trait, each giving a point forecast and an upper quantile
//! `h` windows ahead.

mod band;
mod ensemble;
mod histogram;
mod indicator;
mod peak;
mod percentile;
mod preset;
pub mod recurrent;
mod smoothing;

pub use band::{BandConfig, Banded, PointModel};
pub use ensemble::{Ensemble, EnsembleConfig, ExpertWeight};
pub use histogram::DecayHistogram;
pub use indicator::{Indicator, IndicatorModel, LeadingIndicator};
pub use peak::{Peak, PeakModel, MAX_PEAK_WINDOWS};
pub use percentile::{DecayingHistogram, PercentileConfig};
pub use preset::Preset;
pub use recurrent::{GruWeights, Recurrent, RecurrentError, RecurrentModel};
pub use smoothing::{Ewma, EwmaLevel, Holt, HoltTrend, LastValue, LastValueModel};

use crate::persist::SavedState;
use crate::sample::Signals;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum ForecastError {
    #[error("horizon must be 1..={max} windows, got {0}", max = Horizon::MAX)]
    Horizon(usize),
    #[error("{name} must be in {range}, got {value}")]
    Parameter {
        name: &'static str,
        range: &'static str,
        value: f64,
    },
}

/// Checks `lo < value <= hi` (or `lo <= value` with `closed_low`), naming the parameter in
/// the error so configuration mistakes point at the field.
pub(crate) fn check_param(
    name: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    closed_low: bool,
    range: &'static str,
) -> Result<f64, ForecastError> {
    let above = if closed_low { value >= lo } else { value > lo };
    if above && value <= hi {
        Ok(value)
    } else {
        Err(ForecastError::Parameter { name, range, value })
    }
}

/// How many windows ahead a forecast looks: 1..=50.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "usize", into = "usize")]
pub struct Horizon(u8);

impl Horizon {
    pub const MAX: usize = 50;
    pub const ONE: Horizon = Horizon(1);

    pub fn new(h: usize) -> Result<Self, ForecastError> {
        if (1..=Self::MAX).contains(&h) {
            Ok(Horizon(h as u8))
        } else {
            Err(ForecastError::Horizon(h))
        }
    }

    pub fn get(self) -> usize {
        self.0 as usize
    }

    /// Every horizon from 1 up to and including this one.
    pub fn up_to(self) -> impl Iterator<Item = Horizon> {
        (1..=self.0).map(Horizon)
    }
}

impl TryFrom<usize> for Horizon {
    type Error = ForecastError;
    fn try_from(h: usize) -> Result<Self, ForecastError> {
        Horizon::new(h)
    }
}

impl From<Horizon> for usize {
    fn from(h: Horizon) -> usize {
        h.get()
    }
}

/// Predicted demand for one future window: the expected value and a level that demand
/// should stay under with the forecaster's configured probability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub point: f64,
    pub upper: f64,
}

/// A per-resource demand predictor fed one observation per window. Its state goes into VM
/// snapshots through [`SavedState`] (derive serde and implement [`crate::persist::Persist`]).
pub trait Forecaster: Send + SavedState {
    fn name(&self) -> &'static str;
    fn observe(&mut self, value: f64);
    /// One window's value with the window's other signals, for forecasters that use leading
    /// indicators; the others see only the value.
    fn observe_window(&mut self, value: f64, _signals: &Signals) {
        self.observe(value);
    }
    fn forecast(&self, h: Horizon) -> Forecast;
    /// False until the forecaster has seen enough to be trusted; the policy holds its
    /// initial allocation until then.
    fn warm(&self) -> bool;
    /// The probability that demand stays under `upper` from now on (0.5..=1). The policy's
    /// calibration moves it every window so the realised miss rate holds its target.
    fn set_quantile(&mut self, quantile: f64);
    /// The forecaster whose view counts most right now: itself, or an ensemble's leading
    /// expert.
    fn leader(&self) -> &'static str {
        self.name()
    }
    /// Weights of an ensemble's experts (empty for a single forecaster).
    fn weights(&self) -> Vec<ExpertWeight> {
        Vec::new()
    }
}

/// Forecasters the tests script.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Forecast, Forecaster, Horizon};

    /// Always forecasts `level` (point and upper), warm from the start.
    pub struct Level(pub &'static str, pub f64);

    /// Its level is its state (its name is `'static`, so it cannot derive serde).
    impl crate::persist::SavedState for Level {
        fn save_state(&self) -> Result<Vec<u8>, crate::persist::PersistError> {
            crate::persist::encode(&self.1)
        }
        fn restore_state(&mut self, bytes: &[u8]) -> Result<(), crate::persist::PersistError> {
            self.1 = crate::persist::decode(bytes)?;
            Ok(())
        }
    }

    impl Forecaster for Level {
        fn name(&self) -> &'static str {
            self.0
        }
        fn observe(&mut self, _: f64) {}
        fn forecast(&self, _: Horizon) -> Forecast {
            Forecast {
                point: self.1,
                upper: self.1,
            }
        }
        fn warm(&self) -> bool {
            true
        }
        fn set_quantile(&mut self, _: f64) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_bounds() {
        assert_eq!(Horizon::new(0), Err(ForecastError::Horizon(0)));
        assert_eq!(Horizon::new(51), Err(ForecastError::Horizon(51)));
        assert_eq!(Horizon::new(50).unwrap().get(), 50);
        assert_eq!(
            Horizon::new(3)
                .unwrap()
                .up_to()
                .map(Horizon::get)
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(serde_json::from_str::<Horizon>("0").is_err());
        assert_eq!(serde_json::from_str::<Horizon>("7").unwrap().get(), 7);
    }

    #[test]
    fn check_param_names_the_field() {
        assert_eq!(
            check_param("alpha", 0.5, 0.0, 1.0, false, "(0, 1]"),
            Ok(0.5)
        );
        assert_eq!(
            check_param("alpha", 0.0, 0.0, 1.0, false, "(0, 1]"),
            Err(ForecastError::Parameter {
                name: "alpha",
                range: "(0, 1]",
                value: 0.0
            })
        );
        assert_eq!(check_param("beta", 0.0, 0.0, 1.0, true, "[0, 1]"), Ok(0.0));
    }
}
