//! Turns a point model into a [`Forecaster`] by measuring its own forecast errors.
//!
//! The upper bound is the point forecast plus a decayed quantile of the model's past
//! errors at the configured horizon (split-conformal style), so every point model gets a
//! band calibrated on the series it is actually forecasting instead of an assumed noise
//! distribution.

use super::{check_param, DecayHistogram, Forecast, ForecastError, Forecaster, Horizon};
use crate::sample::Signals;

/// A model that only predicts the expected value.
pub trait PointModel: Send {
    fn name(&self) -> &str;
    fn update(&mut self, value: f64);
    /// An update with the window's other signals (leading indicators), for models that use them.
    fn update_window(&mut self, value: f64, _signals: &Signals) {
        self.update(value);
    }
    /// Expected value `h` windows after the latest update.
    fn point(&self, h: Horizon) -> f64;
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BandConfig {
    /// The horizon whose errors calibrate the band.
    pub horizon: Horizon,
    /// Probability that demand stays under `upper`.
    pub quantile: f64,
    /// Half-life of past errors, in windows.
    pub half_life: f64,
    /// Errors to collect before the forecaster reports itself warm.
    pub min_errors: u32,
    /// Measure errors relative to the forecast instead of in the series' unit. Demand
    /// noise usually grows with the level (twice the requests, twice the jitter), and an
    /// absolute band learned at one level is then too wide below it and too narrow above.
    pub relative: bool,
}

impl Default for BandConfig {
    fn default() -> Self {
        BandConfig {
            horizon: Horizon::ONE,
            quantile: 0.985,
            half_life: 600.0,
            min_errors: 20,
            relative: true,
        }
    }
}

impl BandConfig {
    pub fn validate(&self) -> Result<(), ForecastError> {
        check_param("band quantile", self.quantile, 0.5, 1.0, true, "[0.5, 1)")?;
        if self.quantile >= 1.0 {
            return Err(ForecastError::Parameter {
                name: "band quantile",
                range: "[0.5, 1)",
                value: self.quantile,
            });
        }
        check_param(
            "band half-life",
            self.half_life,
            0.0,
            f64::INFINITY,
            false,
            "(0, inf]",
        )?;
        Ok(())
    }
}

/// A [`PointModel`] with an error band. The forecasters exported as type aliases
/// ([`super::Ewma`], [`super::Holt`], ...) are all this wrapper.
pub struct Banded<M> {
    model: M,
    cfg: BandConfig,
    /// Forecasts for `cfg.horizon` windows ahead, oldest at `head` once full.
    pending: [f64; Horizon::MAX],
    head: usize,
    filled: usize,
    errors: DecayHistogram,
    seen_errors: u32,
    spread: f64,
}

impl<M: PointModel> Banded<M> {
    pub fn new(model: M, cfg: BandConfig) -> Result<Self, ForecastError> {
        cfg.validate()?;
        Ok(Banded {
            model,
            cfg,
            pending: [0.0; Horizon::MAX],
            head: 0,
            filled: 0,
            // Errors are in the series' own unit; 1e-4 to 1e7 covers cores through MiB
            // with 10 % resolution on the error (not on the demand), which is plenty.
            errors: DecayHistogram::new(1e-4, 1.1, 1e7, cfg.half_life)?,
            seen_errors: 0,
            spread: 0.0,
        })
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    /// What one relative error unit is worth at `point`; floored so an idle series (zero
    /// forecast) does not divide by zero.
    fn unit(point: f64) -> f64 {
        point.abs().max(1e-6)
    }
}

impl<M: PointModel> Forecaster for Banded<M> {
    fn name(&self) -> &str {
        self.model.name()
    }

    fn observe(&mut self, value: f64) {
        self.observe_window(value, &Signals::default());
    }

    fn observe_window(&mut self, value: f64, signals: &Signals) {
        let h = self.cfg.horizon.get();
        if self.filled == h {
            // Only under-forecasts matter for an upper bound; over-forecasts count as zero
            // error so that they still hold their share of the quantile.
            let predicted = self.pending[self.head];
            let error = (value - predicted).max(0.0);
            self.errors.add(if self.cfg.relative {
                error / Self::unit(predicted)
            } else {
                error
            });
            self.seen_errors = self.seen_errors.saturating_add(1);
        }
        self.spread = self.errors.quantile(self.cfg.quantile);
        self.model.update_window(value, signals);
        self.pending[self.head] = self.model.point(self.cfg.horizon);
        self.head = (self.head + 1) % h;
        self.filled = (self.filled + 1).min(h);
    }

    fn forecast(&self, h: Horizon) -> Forecast {
        let point = self.model.point(h);
        // Errors were measured at the configured horizon only; other horizons scale them
        // as a random walk would (sqrt of the step count).
        let scale = (h.get() as f64 / self.cfg.horizon.get() as f64).sqrt();
        let spread = if self.cfg.relative {
            self.spread * Self::unit(point)
        } else {
            self.spread
        };
        Forecast {
            point,
            upper: point + spread * scale,
        }
    }

    fn warm(&self) -> bool {
        self.seen_errors >= self.cfg.min_errors
    }

    /// Takes effect from the next observation (which recomputes the band anyway).
    fn set_quantile(&mut self, quantile: f64) {
        self.cfg.quantile = quantile.clamp(0.5, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Always predicts a fixed value, so the band is pure error statistics.
    struct Constant(f64);
    impl PointModel for Constant {
        fn name(&self) -> &str {
            "constant"
        }
        fn update(&mut self, _: f64) {}
        fn point(&self, _: Horizon) -> f64 {
            self.0
        }
    }

    fn cfg(horizon: usize, min_errors: u32) -> BandConfig {
        BandConfig {
            horizon: Horizon::new(horizon).unwrap(),
            quantile: 0.9,
            half_life: f64::INFINITY,
            min_errors,
            relative: false,
        }
    }

    #[test]
    fn rejects_quantile_outside_range() {
        for q in [0.4, 1.0] {
            let c = BandConfig {
                quantile: q,
                ..BandConfig::default()
            };
            assert!(Banded::new(Constant(0.0), c).is_err(), "{q}");
        }
    }

    #[test]
    fn band_is_quantile_of_under_forecasts() {
        let mut f = Banded::new(Constant(10.0), cfg(1, 5)).unwrap();
        f.observe(0.0); // no forecast pending yet: not an error sample
        assert!(!f.warm());
        // Errors: 5 (x9), 0 (over-forecast, x9) and one 50: the 0.9 quantile is the 5s.
        for _ in 0..9 {
            f.observe(15.0);
            f.observe(3.0);
        }
        f.observe(60.0);
        assert!(f.warm());
        let one = f.forecast(Horizon::ONE);
        assert_eq!(one.point, 10.0);
        assert!((one.upper - 10.0 - 5.0).abs() < 0.6, "{one:?}");
        let four = f.forecast(Horizon::new(4).unwrap());
        assert!(
            (four.upper - 10.0 - 2.0 * (one.upper - 10.0)).abs() < 1e-9,
            "{four:?}"
        );
    }

    /// A point model that predicts the last value it saw, at every horizon.
    struct Last(f64);

    impl PointModel for Last {
        fn name(&self) -> &str {
            "last"
        }
        fn update(&mut self, v: f64) {
            self.0 = v;
        }
        fn point(&self, _: Horizon) -> f64 {
            self.0
        }
    }

    #[test]
    fn relative_band_scales_with_the_forecast() {
        // Last predicts the last value, so a series alternating x and 1.1x has a 10 % error.
        let mut f = Banded::new(
            Last(0.0),
            BandConfig {
                relative: true,
                ..cfg(1, 1)
            },
        )
        .unwrap();
        for i in 0..100 {
            let base = if i < 50 { 10.0 } else { 1000.0 };
            f.observe(if i % 2 == 0 { base } else { base * 1.1 });
        }
        // The last value was 1100 (odd step); the band is ~10 % of it, not an absolute
        // mixture of the 1-unit and 100-unit errors seen.
        let fc = f.forecast(Horizon::ONE);
        assert_eq!(fc.point, 1100.0);
        let rel = (fc.upper - fc.point) / fc.point;
        assert!((0.1 - 1e-9..0.111).contains(&rel), "{fc:?}");
    }

    #[test]
    fn errors_are_measured_at_the_configured_horizon() {
        // Last predicts the last value; on a ramp of +1 per step its h-step error is exactly h.
        let mut f = Banded::new(Last(0.0), cfg(3, 1)).unwrap();
        for i in 0..50 {
            f.observe(i as f64);
        }
        let fc = f.forecast(Horizon::new(3).unwrap());
        assert_eq!(fc.point, 49.0);
        // Bucket edges are 1e-4 * 1.1^k; the one just above 3.0 is within 10 %.
        assert!(
            fc.upper - fc.point >= 3.0 && fc.upper - fc.point < 3.3,
            "{fc:?}"
        );
    }
}
