//! Online model choice: every expert forecaster runs side by side and the ensemble follows
//! the ones whose recent quantile loss is lowest.
//!
//! The experts' upper bounds are scored every window with the pinball (quantile) loss at the
//! band's level, the proper score for a quantile forecast: a miss costs `q` per unit of
//! shortfall, slack costs `1 - q` per unit. Each window's losses are divided by their sum,
//! so every expert's share lies in [0, 1] whatever the resource's unit, and discounted with a
//! half-life. Weights are exponential in the discounted loss (Hedge, the exponentially
//! weighted average forecaster) with the learning rate Hedge's regret bound prescribes for
//! losses in [0, 1] over the discount's effective horizon, `sqrt(8 ln N / T)`: over any stretch
//! of about `T` windows the mixture's loss stays within `sqrt(T ln N / 2)` of the best
//! expert's. The forecast is the weight-averaged point and upper bound (quantile averaging),
//! so a change of leader moves the allocation gradually instead of jumping to another model.

use super::{Forecast, ForecastError, Forecaster, Horizon};
use crate::math;
use crate::persist::{self, same_len, PersistError, SavedForecaster, SavedState};
use crate::sample::Signals;
use serde::{Deserialize, Serialize};

/// One expert's share of the ensemble, as `GET /predictor` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertWeight {
    pub expert: String,
    pub weight: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnsembleConfig {
    /// Half-life of the experts' loss memory, in windows: how long an expert's good or bad
    /// record counts.
    pub half_life: f64,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        // Ten seconds at 100 ms windows: long enough that one lucky window does not hand
        // over the allocation, short enough to follow a workload's phase change.
        EnsembleConfig { half_life: 100.0 }
    }
}

pub struct Ensemble {
    experts: Vec<Box<dyn Forecaster>>,
    /// Discounted share of the pinball loss, per expert.
    loss: Vec<f64>,
    weights: Vec<f64>,
    /// Each expert's one-window forecast for the window about to be observed.
    pending: Vec<Forecast>,
    has_pending: bool,
    quantile: f64,
    decay: f64,
    eta: f64,
}

/// The pinball loss of `upper` as the `q` quantile when `value` happened.
pub fn pinball(value: f64, upper: f64, q: f64) -> f64 {
    if value > upper {
        q * (value - upper)
    } else {
        (1.0 - q) * (upper - value)
    }
}

impl Ensemble {
    pub fn new(
        experts: Vec<Box<dyn Forecaster>>,
        cfg: EnsembleConfig,
    ) -> Result<Self, ForecastError> {
        super::check_param(
            "ensemble half-life",
            cfg.half_life,
            1.0,
            f64::INFINITY,
            true,
            "[1, inf)",
        )?;
        if experts.is_empty() {
            return Err(ForecastError::Parameter {
                name: "ensemble experts",
                range: "at least one",
                value: 0.0,
            });
        }
        let n = experts.len();
        let decay = math::exp2(-1.0 / cfg.half_life);
        let horizon = 1.0 / (1.0 - decay);
        Ok(Ensemble {
            loss: vec![0.0; n],
            weights: vec![1.0 / n as f64; n],
            pending: vec![Forecast::default(); n],
            has_pending: false,
            quantile: 0.99,
            decay,
            eta: (8.0 * math::ln(n as f64).max(f64::MIN_POSITIVE) / horizon).sqrt(),
            experts,
        })
    }

    fn reweigh(&mut self, value: f64) {
        let losses: f64 = self
            .pending
            .iter()
            .zip(&self.experts)
            .filter(|(_, e)| e.warm())
            .map(|(f, _)| pinball(value, f.upper, self.quantile))
            .sum();
        for (i, e) in self.experts.iter().enumerate() {
            // An expert that is not warm yet takes the worst share, so it earns its weight.
            let share = if !e.warm() {
                1.0
            } else if losses > 0.0 {
                pinball(value, self.pending[i].upper, self.quantile) / losses
            } else {
                0.0
            };
            self.loss[i] = self.decay * self.loss[i] + share;
        }
        let best = self.loss.iter().copied().fold(f64::INFINITY, f64::min);
        let mut total = 0.0;
        for (w, l) in self.weights.iter_mut().zip(&self.loss) {
            *w = math::exp(-self.eta * (l - best));
            total += *w;
        }
        self.weights.iter_mut().for_each(|w| *w /= total);
    }

    fn leader_index(&self) -> usize {
        self.weights
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    }
}

/// What an ensemble has learned: each expert's own state and the experts' record (the decay
/// and learning rate follow from the configuration).
#[derive(Serialize, Deserialize)]
struct EnsembleState {
    experts: Vec<SavedForecaster>,
    loss: Vec<f64>,
    weights: Vec<f64>,
    pending: Vec<Forecast>,
    has_pending: bool,
    quantile: f64,
}

impl SavedState for Ensemble {
    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        let experts = self
            .experts
            .iter()
            .map(|e| SavedForecaster::save(e.name(), e.as_ref()))
            .collect::<Result<_, _>>()?;
        persist::encode(&EnsembleState {
            experts,
            loss: self.loss.clone(),
            weights: self.weights.clone(),
            pending: self.pending.clone(),
            has_pending: self.has_pending,
            quantile: self.quantile,
        })
    }

    /// The experts are checked by name and restored one by one: on an error part of them may
    /// have their saved state (see `Policy::restore_state`).
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let s: EnsembleState = persist::decode(bytes)?;
        let n = self.experts.len();
        for (what, len) in [
            ("ensemble experts", s.experts.len()),
            ("ensemble losses", s.loss.len()),
            ("ensemble weights", s.weights.len()),
            ("ensemble forecasts", s.pending.len()),
        ] {
            same_len(what, len, n).map_err(PersistError::Mismatch)?;
        }
        for (saved, e) in s.experts.iter().zip(&mut self.experts) {
            let name = e.name();
            saved.restore(name, e.as_mut())?;
        }
        self.loss = s.loss;
        self.weights = s.weights;
        self.pending = s.pending;
        self.has_pending = s.has_pending;
        self.quantile = s.quantile.clamp(0.5, 1.0);
        Ok(())
    }
}

impl Forecaster for Ensemble {
    fn name(&self) -> &'static str {
        "ensemble"
    }

    fn observe(&mut self, value: f64) {
        self.observe_window(value, &Signals::default());
    }

    fn observe_window(&mut self, value: f64, signals: &Signals) {
        if self.has_pending {
            self.reweigh(value);
        }
        for (e, p) in self.experts.iter_mut().zip(self.pending.iter_mut()) {
            e.observe_window(value, signals);
            *p = e.forecast(Horizon::ONE);
        }
        self.has_pending = true;
    }

    fn forecast(&self, h: Horizon) -> Forecast {
        let mut point = 0.0;
        let mut upper = 0.0;
        let mut total = 0.0;
        for ((e, &w), one) in self.experts.iter().zip(&self.weights).zip(&self.pending) {
            if w > 0.0 && e.warm() {
                // One window ahead was computed when the window was observed.
                let f = if h == Horizon::ONE {
                    *one
                } else {
                    e.forecast(h)
                };
                point += w * f.point;
                upper += w * f.upper;
                total += w;
            }
        }
        if total > 0.0 {
            Forecast {
                point: point / total,
                upper: upper / total,
            }
        } else {
            self.experts[self.leader_index()].forecast(h)
        }
    }

    fn warm(&self) -> bool {
        self.experts.iter().any(|e| e.warm())
    }

    fn set_quantile(&mut self, quantile: f64) {
        self.quantile = quantile.clamp(0.5, 1.0);
        for e in &mut self.experts {
            e.set_quantile(quantile);
        }
    }

    fn leader(&self) -> &'static str {
        self.experts[self.leader_index()].name()
    }

    fn weights(&self) -> Vec<ExpertWeight> {
        self.experts
            .iter()
            .zip(&self.weights)
            .map(|(e, &weight)| ExpertWeight {
                expert: e.name().to_string(),
                weight,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::testing::Level as Fixed;

    fn two(a: f64, b: f64) -> Ensemble {
        Ensemble::new(
            vec![Box::new(Fixed("a", a)), Box::new(Fixed("b", b))],
            EnsembleConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_saved_ensemble_comes_back_whole_and_only_into_the_same_experts() {
        let mut e = two(11.0, 20.0);
        e.set_quantile(0.99);
        for _ in 0..50 {
            e.observe(15.0);
        }
        let saved = e.save_state().unwrap();
        let mut back = two(0.0, 0.0);
        back.restore_state(&saved).unwrap();
        assert_eq!(back.weights(), e.weights());
        assert_eq!(back.leader(), e.leader());
        // The experts' own state (their levels) came back too.
        assert_eq!(back.forecast(Horizon::ONE), e.forecast(Horizon::ONE));
        for _ in 0..20 {
            e.observe(12.0);
            back.observe(12.0);
        }
        assert_eq!(back.weights(), e.weights());

        let mut renamed = Ensemble::new(
            vec![Box::new(Fixed("a", 0.0)), Box::new(Fixed("c", 0.0))],
            EnsembleConfig::default(),
        )
        .unwrap();
        let err = renamed.restore_state(&saved).unwrap_err().to_string();
        assert!(err.contains(r#"saved "b""#), "{err}");
        let mut fewer =
            Ensemble::new(vec![Box::new(Fixed("a", 0.0))], EnsembleConfig::default()).unwrap();
        let err = fewer.restore_state(&saved).unwrap_err().to_string();
        assert!(err.contains("ensemble experts"), "{err}");
    }

    #[test]
    fn pinball_is_asymmetric() {
        assert!((pinball(12.0, 10.0, 0.99) - 1.98).abs() < 1e-12);
        assert!((pinball(8.0, 10.0, 0.99) - 0.02).abs() < 1e-12);
    }

    #[test]
    fn follows_the_expert_with_the_lower_quantile_loss() {
        // Demand hovers at 10: "a" (11) covers it with little slack, "b" (20) with a lot,
        // and both never miss, so "a" must win at any high quantile.
        let mut e = two(11.0, 20.0);
        e.set_quantile(0.99);
        assert_eq!(e.weights()[0].weight, 0.5);
        for _ in 0..300 {
            e.observe(10.0);
        }
        let w = e.weights();
        assert!(w[0].weight > 0.99, "{w:?}");
        assert_eq!(e.leader(), "a");
        assert!((e.forecast(Horizon::ONE).upper - 11.0).abs() < 0.1);
    }

    #[test]
    fn an_expert_that_misses_loses_its_weight() {
        // Demand at 15: "a" (11) misses every window, "b" (20) covers it.
        let mut e = two(11.0, 20.0);
        e.set_quantile(0.99);
        for _ in 0..300 {
            e.observe(15.0);
        }
        assert_eq!(e.leader(), "b");
        assert!(e.weights()[1].weight > 0.99);
    }

    #[test]
    fn weights_move_gradually() {
        let mut e = two(11.0, 20.0);
        e.set_quantile(0.99);
        let mut previous = e.weights()[0].weight;
        for i in 0..600 {
            e.observe(if i < 300 { 10.0 } else { 15.0 });
            let w = e.weights()[0].weight;
            // One window's share moves a weight by at most a factor e^eta.
            assert!((w - previous).abs() < 0.2, "window {i}: {previous} -> {w}");
            previous = w;
        }
        assert_eq!(e.leader(), "b");
    }

    #[test]
    fn refuses_no_experts() {
        assert!(Ensemble::new(Vec::new(), EnsembleConfig::default()).is_err());
    }
}
