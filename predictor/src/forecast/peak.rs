//! The recent peak: the largest demand of the last few windows.
//!
//! A busy program's CPU use is a level it cannot exceed (its runnable threads) with short
//! dips below it (I/O waits, a pipeline stage starving), and after a dip it returns to that
//! level. Models that follow the last values (last, ewma, holt) forecast the dip's depth for
//! the window after it, and the return is a large under-forecast that their bands then carry
//! for their whole half-life; the decayed histogram ignores dips but remembers an old, higher
//! phase for a minute. The recent peak does neither: a dip shorter than its window leaves it
//! at the level, so its errors are only the noise above the level, and a phase that drops
//! lasts a window later.

use super::{check_param, BandConfig, Banded, ForecastError, Horizon, PointModel};
use crate::persist::Persist;
use serde::{Deserialize, Serialize};

/// The most windows a peak can look back over.
pub const MAX_PEAK_WINDOWS: usize = 64;

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PeakModel {
    windows: usize,
    #[serde(with = "crate::persist::array")]
    recent: [f64; MAX_PEAK_WINDOWS],
    head: usize,
    filled: usize,
    /// The largest of `recent[..filled]`, kept so forecasts (several horizons per window)
    /// do not scan.
    peak: f64,
}

impl PeakModel {
    /// The peak of the last `windows` (1..=[`MAX_PEAK_WINDOWS`]) observations.
    pub fn new(windows: usize) -> Result<Self, ForecastError> {
        check_param(
            "peak windows",
            windows as f64,
            1.0,
            MAX_PEAK_WINDOWS as f64,
            true,
            "1..=64",
        )?;
        Ok(PeakModel {
            windows,
            recent: [0.0; MAX_PEAK_WINDOWS],
            head: 0,
            filled: 0,
            peak: 0.0,
        })
    }
}

impl Persist for PeakModel {
    fn fits(&self, fresh: &Self) -> Result<(), String> {
        if self.windows != fresh.windows || self.head >= self.windows || self.filled > self.windows
        {
            return Err(format!(
                "peak of {} windows at {}/{}; this one looks back {}",
                self.windows, self.head, self.filled, fresh.windows
            ));
        }
        Ok(())
    }
}

impl PointModel for PeakModel {
    fn name(&self) -> &'static str {
        "peak"
    }

    fn update(&mut self, value: f64) {
        self.recent[self.head] = value;
        self.head = (self.head + 1) % self.windows;
        self.filled = (self.filled + 1).min(self.windows);
        self.peak = self.recent[..self.filled]
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
    }

    /// The same at every horizon: the peak says where demand returns to, not when.
    fn point(&self, _: Horizon) -> f64 {
        self.peak
    }
}

/// The recent peak with an error band.
pub type Peak = Banded<PeakModel>;

impl Peak {
    pub fn with_windows(windows: usize, band: BandConfig) -> Result<Self, ForecastError> {
        Banded::new(PeakModel::new(windows)?, band)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::Forecaster;

    #[test]
    fn rejects_a_window_it_cannot_hold() {
        assert!(PeakModel::new(0).is_err());
        assert!(PeakModel::new(MAX_PEAK_WINDOWS + 1).is_err());
        assert!(PeakModel::new(MAX_PEAK_WINDOWS).is_ok());
    }

    #[test]
    fn a_dip_shorter_than_the_window_keeps_the_level_and_a_lower_phase_takes_over() {
        let mut m = PeakModel::new(4).unwrap();
        for v in [1.0, 0.9, 1.0, 0.2, 0.1, 0.3] {
            m.update(v);
            assert_eq!(m.point(Horizon::ONE), 1.0, "after {v}");
        }
        // Four windows at 0.5 push the last 1.0 out.
        for _ in 0..4 {
            m.update(0.5);
        }
        assert_eq!(m.point(Horizon::ONE), 0.5);
        assert_eq!(m.point(Horizon::new(7).unwrap()), 0.5);
    }

    #[test]
    fn its_band_covers_a_busy_level_with_dips_more_tightly_than_last_value() {
        // One busy thread: ~1 core of noise, and every 10th window a dip to 0.3.
        let band = BandConfig {
            quantile: 0.99,
            ..BandConfig::default()
        };
        let mut peak = Peak::with_windows(10, band).unwrap();
        let mut last = crate::forecast::LastValue::with_band(band).unwrap();
        let mut rng = crate::rng::Rng::new(3);
        let (mut misses, mut width_peak, mut width_last, mut n) = (0, 0.0, 0.0, 0);
        for i in 0..4000 {
            let v = if i % 10 == 9 {
                0.3
            } else {
                1.0 + 0.02 * rng.normal()
            };
            if i >= 1000 {
                let (p, l) = (peak.forecast(Horizon::ONE), last.forecast(Horizon::ONE));
                misses += usize::from(v > p.upper);
                width_peak += p.upper;
                width_last += l.upper;
                n += 1;
            }
            peak.observe(v);
            last.observe(v);
        }
        let miss_rate = misses as f64 / n as f64;
        assert!(miss_rate <= 0.015, "{miss_rate}");
        // Last's band must cover the return from every dip (0.7 above its forecast).
        assert!(
            width_peak / (n as f64) < 1.15 && width_peak < width_last,
            "{} {}",
            width_peak / n as f64,
            width_last / n as f64
        );
    }
}
