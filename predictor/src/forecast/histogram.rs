//! Exponentially-bucketed histogram whose samples fade with a half-life (the structure
//! behind Kubernetes VPA's recommender).

use super::{check_param, ForecastError};
use crate::math;
use crate::persist::{same_len, Persist};
use serde::{Deserialize, Serialize};

/// Weights grow as `2^(age/half_life)` instead of old buckets being multiplied down each
/// step, so an insert is O(1); everything is rescaled once the weights near overflow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecayHistogram {
    first: f64,
    ratio: f64,
    ln_ratio: f64,
    weights: Vec<f64>,
    total: f64,
    /// The weight of the next insert, and its growth per step (`2^(1/half_life)`).
    weight: f64,
    growth: f64,
    /// The occupied range; buckets whose weight has decayed below `NEGLIGIBLE` of the total
    /// drop out of it, so quantile scans do not walk over long-gone outliers.
    lowest: usize,
    highest: usize,
}

/// Weight, relative to the total, below which a bucket no longer counts.
const NEGLIGIBLE: f64 = 1e-12;

const RESCALE_AT: f64 = 1e100;

impl Persist for DecayHistogram {
    fn fits(&self, fresh: &Self) -> Result<(), String> {
        same_len("histogram buckets", self.weights.len(), fresh.weights.len())?;
        let empty = self.lowest == usize::MAX && self.highest == 0;
        let inside = self.lowest <= self.highest && self.highest < self.weights.len();
        if !(empty || inside) {
            return Err(format!(
                "histogram occupies buckets {}..={} of {}",
                self.lowest,
                self.highest,
                self.weights.len()
            ));
        }
        Ok(())
    }
}

impl DecayHistogram {
    /// Buckets are `[0, first]`, then `(first*ratio^(i-1), first*ratio^i]` up to `max`.
    pub fn new(first: f64, ratio: f64, max: f64, half_life: f64) -> Result<Self, ForecastError> {
        check_param("first bucket", first, 0.0, f64::MAX, false, "(0, inf)")?;
        check_param("bucket ratio", ratio, 1.0, 10.0, false, "(1, 10]")?;
        // An infinite half-life is a plain (non-decaying) histogram.
        check_param(
            "half-life",
            half_life,
            0.0,
            f64::INFINITY,
            false,
            "(0, inf]",
        )?;
        check_param(
            "histogram max",
            max,
            first,
            f64::MAX,
            false,
            "(first bucket, inf)",
        )?;
        let ln_ratio = math::ln(ratio);
        let buckets = 2 + (math::ln(max / first) / ln_ratio).ceil() as usize;
        Ok(DecayHistogram {
            first,
            ratio,
            ln_ratio,
            weights: vec![0.0; buckets],
            total: 0.0,
            weight: 1.0,
            growth: math::exp2(1.0 / half_life),
            lowest: usize::MAX,
            highest: 0,
        })
    }

    fn bucket(&self, value: f64) -> usize {
        if value <= self.first {
            0
        } else {
            let i = (math::ln(value / self.first) / self.ln_ratio).ceil() as usize;
            i.clamp(1, self.weights.len() - 1)
        }
    }

    fn upper_edge(&self, bucket: usize) -> f64 {
        self.first * self.ratio.powi(bucket as i32)
    }

    /// Adds one sample as the newest step.
    pub fn add(&mut self, value: f64) {
        if self.weight > RESCALE_AT {
            let w = self.weight;
            self.weights.iter_mut().for_each(|x| *x /= w);
            self.total /= w;
            self.weight = 1.0;
        }
        let b = self.bucket(value.max(0.0));
        self.weights[b] += self.weight;
        self.total += self.weight;
        self.weight *= self.growth;
        self.lowest = self.lowest.min(b);
        self.highest = self.highest.max(b);
        let floor = self.total * NEGLIGIBLE;
        while self.highest > self.lowest && self.weights[self.highest] < floor {
            self.weights[self.highest] = 0.0;
            self.highest -= 1;
        }
        while self.lowest < self.highest && self.weights[self.lowest] < floor {
            self.weights[self.lowest] = 0.0;
            self.lowest += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0.0
    }

    /// Upper edge of the bucket holding the `q` quantile of decayed weight; 0 when empty.
    /// Scans from whichever end of the occupied range is nearer the quantile, which keeps
    /// the cost to the spread of the data rather than the number of buckets.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        let mut acc = 0.0;
        if q <= 0.5 {
            let target = q * self.total;
            for b in self.lowest..=self.highest {
                acc += self.weights[b];
                if acc >= target {
                    return self.upper_edge(b);
                }
            }
        } else {
            let target = (1.0 - q) * self.total;
            for b in (self.lowest..=self.highest).rev() {
                acc += self.weights[b];
                if acc > target {
                    return self.upper_edge(b);
                }
            }
        }
        self.upper_edge(self.highest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(half_life: f64) -> DecayHistogram {
        DecayHistogram::new(1.0, 2.0, 1024.0, half_life).unwrap()
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(DecayHistogram::new(0.0, 2.0, 10.0, 1.0).is_err());
        assert!(DecayHistogram::new(1.0, 1.0, 10.0, 1.0).is_err());
        assert!(DecayHistogram::new(1.0, 2.0, 10.0, 0.0).is_err());
        assert!(DecayHistogram::new(1.0, 2.0, 0.5, 1.0).is_err());
    }

    #[test]
    fn quantiles_are_bucket_upper_edges() {
        let mut h = hist(f64::INFINITY);
        assert_eq!(h.quantile(0.9), 0.0);
        for v in [0.5, 3.0, 3.5, 5.0, 100.0] {
            h.add(v);
        }
        // Buckets: [0,1], (1,2], (2,4], (4,8], ... (64,128].
        assert_eq!(h.quantile(0.19), 1.0);
        assert_eq!(h.quantile(0.5), 4.0);
        assert_eq!(h.quantile(0.7), 8.0);
        assert_eq!(h.quantile(0.9), 128.0);
        assert_eq!(h.quantile(0.99), 128.0);
    }

    #[test]
    fn half_life_halves_old_weight() {
        let mut h = hist(1.0);
        h.add(100.0); // weight 1
        h.add(3.0); // weight 2: 2/3 of the mass
        assert_eq!(h.quantile(0.6), 4.0);
        assert_eq!(h.quantile(0.7), 128.0);
    }

    #[test]
    fn old_peaks_fade_out() {
        let mut h = hist(10.0);
        h.add(500.0);
        for _ in 0..200 {
            h.add(2.0);
        }
        assert_eq!(h.quantile(0.999), 2.0);
    }

    #[test]
    fn survives_rescaling() {
        let mut h = hist(1.0);
        for i in 0..2000 {
            h.add(if i % 2 == 0 { 3.0 } else { 6.0 });
        }
        assert!(h.total.is_finite());
        assert_eq!(h.quantile(0.25), 4.0);
        assert_eq!(h.quantile(0.9), 8.0);
    }

    #[test]
    fn long_gone_outliers_leave_the_scanned_range() {
        let mut h = hist(1.0);
        h.add(1000.0);
        for _ in 0..100 {
            h.add(3.0);
        }
        // 2^-100 of the total: dropped, so the range is the one bucket still in use.
        assert_eq!((h.lowest, h.highest), (h.bucket(3.0), h.bucket(3.0)));
        assert_eq!(h.quantile(1.0), 4.0);
    }

    #[test]
    fn clamps_out_of_range_values() {
        let mut h = hist(1.0);
        h.add(1e9);
        h.add(-5.0);
        assert_eq!(h.quantile(0.1), 1.0);
        assert!(h.quantile(0.99) >= 1024.0);
    }

    #[test]
    fn a_restored_histogram_must_have_the_buckets_it_indexes() {
        use crate::persist::{encode, PersistError, SavedState};
        let mut h = hist(8.0);
        for v in [3.0, 200.0, 9.0] {
            h.add(v);
        }
        let mut fresh = hist(8.0);
        fresh.restore_state(&encode(&h).unwrap()).unwrap();
        assert_eq!(fresh.quantile(0.9), h.quantile(0.9));
        // A crafted state whose occupied range runs past its buckets is refused, not indexed.
        let mut bad = h.clone();
        bad.highest = bad.weights.len();
        let e = fresh.restore_state(&encode(&bad).unwrap()).unwrap_err();
        assert!(
            matches!(&e, PersistError::Mismatch(m) if m.contains("occupies")),
            "{e}"
        );
        bad = h.clone();
        bad.weights.pop();
        let e = fresh.restore_state(&encode(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("histogram buckets"), "{e}");
        assert_eq!(
            fresh.quantile(0.9),
            h.quantile(0.9),
            "a refused state changes nothing"
        );
    }
}
