//! Turns a point model into a [`Forecaster`] by measuring its own forecast errors.
//!
//! The upper bound is the point forecast plus a decayed quantile of the model's past
//! errors at the configured horizon (split-conformal style), so every point model gets a
//! band calibrated on the series it is actually forecasting instead of an assumed noise
//! distribution. Errors are normalised by the series' recent volatility (locally weighted
//! conformal): the band is a quantile of past errors in units of the mean absolute error
//! around them, times the mean absolute error now, so it widens within a few windows of a
//! noisy phase and narrows after it, at any level, and an idle series (forecast near zero)
//! does not turn small absolute errors into huge relative ones.

use super::{check_param, DecayHistogram, Forecast, ForecastError, Forecaster, Horizon};
use crate::math;
use crate::persist::Persist;
use crate::sample::Signals;
use serde::{Deserialize, Serialize};

/// A model that only predicts the expected value; plain data, so that a snapshot holds it.
pub trait PointModel: Send + Persist {
    fn name(&self) -> &'static str;
    fn update(&mut self, value: f64);
    /// An update with the window's other signals (leading indicators), for models that use them.
    fn update_window(&mut self, value: f64, _signals: &Signals) {
        self.update(value);
    }
    /// Expected value `h` windows after the latest update.
    fn point(&self, h: Horizon) -> f64;
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BandConfig {
    /// The horizon whose errors calibrate the band.
    pub horizon: Horizon,
    /// Probability that demand stays under `upper`.
    pub quantile: f64,
    /// Half-life of past errors, in windows.
    pub half_life: f64,
    /// Errors to collect before the forecaster reports itself warm.
    pub min_errors: u32,
    /// Half-life, in windows, of the mean absolute error that normalises errors; `None`
    /// measures them in the series' own unit.
    pub volatility_half_life: Option<f64>,
    /// The smallest error unit, in the series' unit: below it errors do not matter (the
    /// preset uses a thousandth of the VM's capacity), and an idle series' first change is
    /// not an infinite surprise.
    pub min_unit: f64,
}

impl Default for BandConfig {
    fn default() -> Self {
        BandConfig {
            horizon: Horizon::ONE,
            quantile: 0.985,
            half_life: 600.0,
            // One second at 100 ms windows; the policy's calibration covers what ten errors
            // cannot tell yet (on the training traces, 20 cost 2-6 points of slack for
            // nothing: both hold the initial allocation meanwhile).
            min_errors: 10,
            // Three seconds at 100 ms windows: a phase's noise is learnt within it.
            volatility_half_life: Some(30.0),
            min_unit: 1e-9,
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
        if let Some(h) = self.volatility_half_life {
            check_param(
                "volatility half-life",
                h,
                0.0,
                f64::INFINITY,
                false,
                "(0, inf]",
            )?;
        }
        Ok(())
    }
}

/// A running mean that forgets with a half-life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Decayed {
    keep: f64,
    mean: f64,
    weight: f64,
}

impl Decayed {
    fn new(half_life: f64) -> Self {
        Decayed {
            keep: math::exp2(-1.0 / half_life),
            mean: 0.0,
            weight: 0.0,
        }
    }

    fn add(&mut self, v: f64) {
        // Weighted by what has been seen, so the first values are not pulled towards 0.
        self.weight = self.keep * self.weight + 1.0;
        self.mean += (v - self.mean) / self.weight;
    }
}

/// The volatility scale errors are measured in: their mean absolute size.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Volatility {
    abs_error: Decayed,
}

/// A [`PointModel`] with an error band. The forecasters exported as type aliases
/// ([`super::Ewma`], [`super::Holt`], ...) are all this wrapper.
#[derive(Serialize, Deserialize)]
pub struct Banded<M> {
    model: M,
    cfg: BandConfig,
    /// Forecasts for `cfg.horizon` windows ahead, oldest at `head` once full.
    #[serde(with = "crate::persist::array")]
    pending: [f64; Horizon::MAX],
    head: usize,
    filled: usize,
    errors: DecayHistogram,
    volatility: Option<Volatility>,
    seen_errors: u32,
    /// The quantile of past errors, in their unit (see `unit`).
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
            // 1e-4 to 1e7 covers normalised errors and cores through MiB with 10 %
            // resolution on the error (not on the demand), which is plenty.
            errors: DecayHistogram::new(1e-4, 1.1, 1e7, cfg.half_life)?,
            volatility: cfg.volatility_half_life.map(|h| Volatility {
                abs_error: Decayed::new(h),
            }),
            seen_errors: 0,
            spread: 0.0,
        })
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    /// What one unit of error is worth now.
    fn unit(&self) -> f64 {
        self.volatility
            .as_ref()
            .map_or(1.0, |v| v.abs_error.mean.max(self.cfg.min_unit))
    }
}

impl<M: PointModel> Persist for Banded<M> {
    fn fits(&self, fresh: &Self) -> Result<(), String> {
        let h = fresh.cfg.horizon.get();
        if self.cfg.horizon != fresh.cfg.horizon || self.head >= h || self.filled > h {
            return Err(format!(
                "band of horizon {} at {}/{}; this one's horizon is {h}",
                self.cfg.horizon.get(),
                self.head,
                self.filled
            ));
        }
        self.errors.fits(&fresh.errors)?;
        self.model.fits(&fresh.model)
    }
}

impl<M: PointModel> Forecaster for Banded<M> {
    fn name(&self) -> &'static str {
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
            let error = value - predicted;
            // The scale includes this error, so a score is at most the scale's effective
            // sample size: the first surprise after a calm start (a process starting, a
            // burst from idle) is a large error, not an unbounded one that would hold the
            // quantile up for its whole half-life.
            if let Some(v) = &mut self.volatility {
                v.abs_error.add(error.abs());
            }
            self.errors.add(error.max(0.0) / self.unit());
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
        Forecast {
            point,
            upper: point + self.spread * self.unit() * scale,
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
    #[derive(Serialize, Deserialize)]
    struct Constant(f64);
    impl Persist for Constant {}
    impl PointModel for Constant {
        fn name(&self) -> &'static str {
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
            volatility_half_life: None,
            min_unit: 1e-9,
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
    #[derive(Serialize, Deserialize)]
    struct Last(f64);
    impl Persist for Last {}

    impl PointModel for Last {
        fn name(&self) -> &'static str {
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
    fn band_follows_the_recent_volatility_at_any_level() {
        let mut f = Banded::new(
            Last(0.0),
            BandConfig {
                volatility_half_life: Some(10.0),
                min_unit: 1e-3,
                ..cfg(1, 1)
            },
        )
        .unwrap();
        let mut rng = crate::rng::Rng::new(7);
        let mut width = |f: &mut Banded<Last>, level: f64, noise: f64| {
            for _ in 0..300 {
                f.observe(level + noise * rng.normal());
            }
            let fc = f.forecast(Horizon::ONE);
            fc.upper - fc.point
        };
        // Idle at zero, then calm at 1000, then noisy at 1000, then calm at 1: the band
        // tracks the noise (Last's one-step error is sqrt(2) x the noise), not the level, and
        // the idle start does not blow it up.
        let idle = width(&mut f, 0.0, 0.0);
        let calm = width(&mut f, 1000.0, 1.0);
        let noisy = width(&mut f, 1000.0, 50.0);
        let calm_low = width(&mut f, 1.0, 1.0);
        assert!(idle < 1e-2, "{idle}");
        assert!((0.5..8.0).contains(&calm), "{calm}");
        assert!((25.0..400.0).contains(&noisy), "{noisy}");
        assert!((0.5..8.0).contains(&calm_low), "{calm_low}");
    }

    #[test]
    fn errors_are_measured_at_the_configured_horizon() {
        // Last predicts the last value; on a ramp of +1 per step its h-step error is exactly h.
        let mut f = Banded::new(Last(0.0), cfg(3, 1)).unwrap();
        // (in the series' unit: cfg() turns the volatility scale off)
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
