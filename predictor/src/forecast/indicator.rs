//! A forecaster that reads a leading indicator: a counter that may move before demand does
//! (page faults before resident memory grows, I/O requests before bandwidth, vCPU exits
//! before CPU time).
//!
//! The model regresses the next window's change of demand on this window's change and the
//! indicator, by recursive least squares with exponential forgetting, on scale-free inputs
//! (the change over its running mean absolute size, the indicator over its running mean),
//! so it learns per VM and per phase whether the indicator leads at all. Where it does not,
//! its coefficient goes to zero and the model is a damped momentum forecaster; the ensemble
//! then weighs it like any other expert.

use super::{BandConfig, Banded, ForecastError, Horizon, PointModel};
use crate::persist::Persist;
use crate::sample::Signals;
use serde::{Deserialize, Serialize};

/// Which window counter leads a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeadingIndicator {
    /// Page faults (memory).
    Faults,
    /// I/O requests (block and network).
    IoOps,
    /// vCPU exits (CPU).
    Exits,
}

impl LeadingIndicator {
    fn read(self, s: &Signals) -> f64 {
        match self {
            LeadingIndicator::Faults => s.faults as f64,
            LeadingIndicator::IoOps => s.io_ops as f64,
            LeadingIndicator::Exits => s.exits as f64,
        }
    }
}

/// Features: this window's scaled change, the scaled indicator, a constant.
const K: usize = 3;
/// Forgetting factor: a half-life of ~70 windows.
const FORGET: f64 = 0.99;
/// Damping of the predicted change over further horizons (as the Holt preset's).
const DAMP: f64 = 0.9;

#[derive(Serialize, Deserialize)]
pub struct IndicatorModel {
    indicator: LeadingIndicator,
    /// Coefficients and the inverse-covariance estimate of recursive least squares.
    beta: [f64; K],
    p: [[f64; K]; K],
    last: Option<f64>,
    /// Features of the latest window, awaiting the next window's change as their target.
    x: [f64; K],
    /// Running mean absolute change of demand and mean of the indicator (the scales).
    change_scale: f64,
    indicator_scale: f64,
    /// Predicted scaled change for the next window.
    next: f64,
}

impl IndicatorModel {
    pub fn new(indicator: LeadingIndicator) -> Self {
        let mut p = [[0.0; K]; K];
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = 100.0;
        }
        IndicatorModel {
            indicator,
            beta: [0.0; K],
            p,
            last: None,
            x: [0.0; K],
            change_scale: 0.0,
            indicator_scale: 0.0,
            next: 0.0,
        }
    }

    /// One recursive-least-squares step towards `target` for features `self.x`.
    fn learn(&mut self, target: f64) {
        let x = self.x;
        let mut px = [0.0; K];
        for (i, row) in self.p.iter().enumerate() {
            px[i] = row.iter().zip(&x).map(|(a, b)| a * b).sum();
        }
        let denom = FORGET + x.iter().zip(&px).map(|(a, b)| a * b).sum::<f64>();
        if !denom.is_finite() || denom <= 0.0 {
            return;
        }
        let err = target - self.beta.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>();
        for ((beta, row), &pxi) in self.beta.iter_mut().zip(&mut self.p).zip(&px) {
            let gain = pxi / denom;
            *beta += gain * err;
            for (p, &pxj) in row.iter_mut().zip(&px) {
                *p = (*p - gain * pxj) / FORGET;
            }
        }
    }
}

impl Persist for IndicatorModel {}

impl PointModel for IndicatorModel {
    fn name(&self) -> &'static str {
        match self.indicator {
            LeadingIndicator::Faults => "faults",
            LeadingIndicator::IoOps => "io-ops",
            LeadingIndicator::Exits => "exits",
        }
    }

    fn update(&mut self, value: f64) {
        self.update_window(value, &Signals::default());
    }

    fn update_window(&mut self, value: f64, signals: &Signals) {
        let ind = self.indicator.read(signals);
        let change = self.last.map_or(0.0, |l| value - l);
        self.change_scale += (1.0 - FORGET) * (change.abs() - self.change_scale);
        self.indicator_scale += (1.0 - FORGET) * (ind - self.indicator_scale);
        let cs = self.change_scale.max(1e-9);
        if self.last.is_some() {
            self.learn(change / cs);
        }
        let is = self.indicator_scale.max(1e-9);
        self.x = [change / cs, (ind / is).min(100.0), 1.0];
        // A prediction beyond what this series has ever shown is an extrapolation the
        // regression has no evidence for.
        self.next = self
            .beta
            .iter()
            .zip(&self.x)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            .clamp(-20.0, 20.0);
        self.last = Some(value);
    }

    fn point(&self, h: Horizon) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        // 1 + DAMP + ... + DAMP^(h-1): the sum converges to 10, so one step ahead counts fully
        // and fifty steps ahead about ten.
        let steps = if h == Horizon::ONE {
            1.0
        } else {
            (1.0 - DAMP.powi(h.get() as i32)) / (1.0 - DAMP)
        };
        (last + steps * self.next * self.change_scale).max(0.0)
    }
}

pub type Indicator = Banded<IndicatorModel>;

impl Indicator {
    pub fn with_indicator(
        indicator: LeadingIndicator,
        band: BandConfig,
    ) -> Result<Self, ForecastError> {
        Banded::new(IndicatorModel::new(indicator), band)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(n: u64) -> Signals {
        Signals {
            faults: n,
            ..Signals::default()
        }
    }

    #[test]
    fn learns_that_faults_lead_growth() {
        // Memory grows by 8 in the window after one with a fault burst, else stays flat.
        let mut m = IndicatorModel::new(LeadingIndicator::Faults);
        let mut level = 100.0;
        let mut burst = false;
        for i in 0..2000 {
            if burst {
                level += 8.0;
            }
            burst = i % 10 == 3;
            m.update_window(level, &faults(if burst { 500 } else { 5 }));
        }
        // Just after a burst the model expects the step; otherwise, nearly nothing.
        assert!(
            (m.point(Horizon::ONE) - level).abs() < 1.0,
            "{}",
            m.point(Horizon::ONE)
        );
        m.update_window(level, &faults(500));
        let grow = m.point(Horizon::ONE) - level;
        assert!((6.0..10.0).contains(&grow), "{grow}");
    }

    #[test]
    fn without_the_indicator_it_is_damped_momentum() {
        let mut m = IndicatorModel::new(LeadingIndicator::IoOps);
        for i in 0..500 {
            m.update(i as f64);
        }
        // A steady ramp of +1: the next change is learnt as +1.
        assert!(
            (m.point(Horizon::ONE) - 500.0).abs() < 0.05,
            "{}",
            m.point(Horizon::ONE)
        );
        // Damped: fifty windows ahead is about ten steps of +1 further, not fifty.
        let far = m.point(Horizon::new(50).unwrap());
        assert!((505.0..511.0).contains(&far), "{far}");
    }
}
