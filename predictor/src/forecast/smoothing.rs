//! Exponential-smoothing point models: last value, EWMA level, Holt level + trend.

use super::{check_param, BandConfig, Banded, ForecastError, Horizon, PointModel};
use crate::persist::Persist;
use serde::{Deserialize, Serialize};

/// Tomorrow equals today.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct LastValueModel(f64);

impl Persist for LastValueModel {}

impl PointModel for LastValueModel {
    fn name(&self) -> &'static str {
        "last"
    }
    fn update(&mut self, value: f64) {
        self.0 = value;
    }
    fn point(&self, _: Horizon) -> f64 {
        self.0
    }
}

/// Exponentially weighted moving average: a level with no trend.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EwmaLevel {
    alpha: f64,
    level: Option<f64>,
}

impl EwmaLevel {
    /// `alpha` in (0, 1]: the weight of the newest observation.
    pub fn new(alpha: f64) -> Result<Self, ForecastError> {
        check_param("ewma alpha", alpha, 0.0, 1.0, false, "(0, 1]")?;
        Ok(EwmaLevel { alpha, level: None })
    }
}

impl Persist for EwmaLevel {}

impl PointModel for EwmaLevel {
    fn name(&self) -> &'static str {
        "ewma"
    }
    fn update(&mut self, value: f64) {
        self.level = Some(match self.level {
            None => value,
            Some(l) => l + self.alpha * (value - l),
        });
    }
    fn point(&self, _: Horizon) -> f64 {
        self.level.unwrap_or(0.0)
    }
}

/// Holt's linear method with optional damping of the trend.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct HoltTrend {
    alpha: f64,
    beta: f64,
    phi: f64,
    state: Option<(f64, f64)>,
    /// `phi + phi^2 + ... + phi^h` for h = 1..=50 (h itself when undamped), computed once:
    /// the policy asks for several horizons every window.
    #[serde(with = "crate::persist::array")]
    damp: [f64; Horizon::MAX],
}

impl HoltTrend {
    /// `alpha`: level smoothing, `beta`: trend smoothing (both (0, 1]); `phi` in (0, 1]
    /// damps the trend over the horizon (1 is plain Holt).
    pub fn new(alpha: f64, beta: f64, phi: f64) -> Result<Self, ForecastError> {
        check_param("holt alpha", alpha, 0.0, 1.0, false, "(0, 1]")?;
        check_param("holt beta", beta, 0.0, 1.0, false, "(0, 1]")?;
        check_param("holt phi", phi, 0.0, 1.0, false, "(0, 1]")?;
        let mut damp = [0.0; Horizon::MAX];
        let mut power = 1.0;
        let mut sum = 0.0;
        for d in &mut damp {
            power *= phi;
            sum += power;
            *d = sum;
        }
        Ok(HoltTrend {
            alpha,
            beta,
            phi,
            state: None,
            damp,
        })
    }

    pub fn level_trend(&self) -> Option<(f64, f64)> {
        self.state
    }
}

impl Persist for HoltTrend {}

impl PointModel for HoltTrend {
    fn name(&self) -> &'static str {
        "holt"
    }
    fn update(&mut self, value: f64) {
        self.state = Some(match self.state {
            None => (value, 0.0),
            Some((l, b)) => {
                let level = self.alpha * value + (1.0 - self.alpha) * (l + self.phi * b);
                let trend = self.beta * (level - l) + (1.0 - self.beta) * self.phi * b;
                (level, trend)
            }
        });
    }
    fn point(&self, h: Horizon) -> f64 {
        let Some((l, b)) = self.state else { return 0.0 };
        l + self.damp[h.get() - 1] * b
    }
}

pub type LastValue = Banded<LastValueModel>;
pub type Ewma = Banded<EwmaLevel>;
pub type Holt = Banded<HoltTrend>;

impl LastValue {
    pub fn with_band(band: BandConfig) -> Result<Self, ForecastError> {
        Banded::new(LastValueModel::default(), band)
    }
}

impl Ewma {
    pub fn with_alpha(alpha: f64, band: BandConfig) -> Result<Self, ForecastError> {
        Banded::new(EwmaLevel::new(alpha)?, band)
    }
}

impl Holt {
    pub fn with_params(
        alpha: f64,
        beta: f64,
        phi: f64,
        band: BandConfig,
    ) -> Result<Self, ForecastError> {
        Banded::new(HoltTrend::new(alpha, beta, phi)?, band)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::Forecaster;

    fn h(n: usize) -> Horizon {
        Horizon::new(n).unwrap()
    }

    #[test]
    fn last_value_repeats_latest() {
        let mut f = LastValue::with_band(BandConfig::default()).unwrap();
        for v in [3.0, 8.0, 5.0] {
            f.observe(v);
        }
        assert_eq!(f.forecast(h(1)).point, 5.0);
        assert_eq!(f.forecast(h(50)).point, 5.0);
    }

    #[test]
    fn ewma_known_values() {
        let mut m = EwmaLevel::new(0.5).unwrap();
        m.update(10.0);
        assert_eq!(m.point(h(1)), 10.0);
        m.update(20.0);
        assert_eq!(m.point(h(1)), 15.0);
        m.update(0.0);
        assert_eq!(m.point(h(7)), 7.5);
        assert!(EwmaLevel::new(0.0).is_err());
        assert!(EwmaLevel::new(1.5).is_err());
    }

    #[test]
    fn holt_known_values() {
        let mut m = HoltTrend::new(0.5, 0.5, 1.0).unwrap();
        m.update(10.0);
        assert_eq!(m.level_trend(), Some((10.0, 0.0)));
        m.update(14.0);
        // level = .5*14 + .5*(10+0) = 12; trend = .5*(12-10) + .5*0 = 1
        assert_eq!(m.level_trend(), Some((12.0, 1.0)));
        assert_eq!(m.point(h(3)), 15.0);
        m.update(16.0);
        // level = .5*16 + .5*13 = 14.5; trend = .5*2.5 + .5*1 = 1.75
        assert_eq!(m.level_trend(), Some((14.5, 1.75)));
        assert_eq!(m.point(h(2)), 18.0);
    }

    #[test]
    fn holt_tracks_a_line_exactly() {
        let mut m = HoltTrend::new(0.8, 0.8, 1.0).unwrap();
        for i in 0..200 {
            m.update(5.0 + 2.0 * i as f64);
        }
        let next = 5.0 + 2.0 * 204.0;
        assert!((m.point(h(5)) - next).abs() < 1e-6, "{}", m.point(h(5)));
    }

    #[test]
    fn damped_holt_flattens() {
        let mut m = HoltTrend::new(0.5, 0.5, 0.5).unwrap();
        m.update(0.0);
        m.update(4.0);
        // level = .5*4 + .5*(0 + .5*0) = 2; trend = .5*2 + .5*.5*0 = 1
        assert_eq!(m.level_trend(), Some((2.0, 1.0)));
        // 2 + (0.5 + 0.25) * 1
        assert_eq!(m.point(h(2)), 2.75);
        assert!(m.point(h(50)) < 3.0 + 1e-9);
    }
}
