//! `prescient predictor eval`: replays traces through every policy, the baselines and an
//! oracle, and reports per-resource provisioning quality, pooled and per trace.
//!
//! The yardstick, per resource, over the windows of the traces where that resource's demand
//! ever exceeds the budget minimum (elsewhere every method allocates the minimum and there
//! is nothing to forecast):
//!
//! * slack: mean over windows of `max(0, allocated - used) / allocated`, never negative;
//! * shortfall: mean over under-provisioned windows of `(used - allocated) / used`, in [0, 1],
//!   so one window where demand is 700x the allocation counts as one bad window, not as
//!   hundreds of good ones undone;
//! * under: share of windows with `used > allocated`;
//! * lead: mean windows (shown in ms) between a grow and the first demand above the old
//!   allocation it served (negative: the grow came after the shortfall);
//! * resizes per minute of trace.
//!
//! Methods: `static` (the capacity), `vpa-p90+15%` (VPA's recommender every window),
//! `oracle` (knows the next windows' demand exactly, under the same block sizes, change
//! limits and actuation delay as the policies: the limit any forecaster could reach), each
//! forecaster alone behind the calibrated policy, and the ensembles; `ensemble` is the
//! policy that ships as the default.

use crate::plot::{self, PlotError, Series};
use crate::synthetic::{self, Shapes, SyntheticError};
use predictor::bucket::Bucket;
use predictor::forecast::ForecastError;
use predictor::forecast::{
    DecayingHistogram, Forecaster, GruWeights, Horizon, PercentileConfig, Preset, RecurrentError,
};
use predictor::policy::{Action, Allocation, Budget, Decision, Policy, PolicyConfig, PolicyError};
use predictor::resource::{PerResource, Resource};
use predictor::sample::Sample;
use predictor::spec::SpecError;
use predictor::trace::{self, Trace, TraceError};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("no *.jsonl traces in {0}")]
    NoTraces(PathBuf),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Synthetic(#[from] SyntheticError),
    #[error("loading the recurrent model: {0}")]
    Model(#[from] RecurrentError),
    #[error(transparent)]
    Forecast(#[from] ForecastError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("rebuilding a trace's recorded policy: {0}")]
    Spec(#[from] SpecError),
    #[error("--decisions-out: no trace in {0} names the policy that recorded it")]
    NoRecordedPolicy(PathBuf),
}

/// Arguments of `prescient predictor eval`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    /// Directory of `*.jsonl` traces (the format of `predictor::trace`), e.g.
    /// predictor/traces/test.
    #[arg(long)]
    pub traces: PathBuf,
    /// First write a synthetic set (--shapes, --seeds seeds from --first-seed) into --traces.
    #[arg(long)]
    pub generate_synthetic: bool,
    /// Which synthetic shapes --generate-synthetic writes.
    #[arg(long, value_enum, default_value_t = Shapes::Standard)]
    pub shapes: Shapes,
    /// Seeds per workload for --generate-synthetic.
    #[arg(long, default_value_t = 2)]
    pub seeds: u64,
    /// First seed for --generate-synthetic (the published table uses 1).
    #[arg(long, default_value_t = 1)]
    pub first_seed: u64,
    /// Windows per generated trace.
    #[arg(long, default_value_t = synthetic::DEFAULT_WINDOWS)]
    pub windows: usize,
    /// Windows ahead the policy provisions for (1..=50): its actuation delay.
    #[arg(long, default_value_t = 1)]
    pub horizon: usize,
    /// GRU weights (safetensors from `prescient train`) for the recurrent rows (the shipped
    /// model, predictor/models/gru-real.safetensors, by default).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Only the pooled tables, not one row per trace.
    #[arg(long)]
    pub totals_only: bool,
    /// Write an SVG of used vs allocated per method for one trace.
    #[arg(long)]
    pub svg_out: Option<PathBuf>,
    /// Trace to plot (its header name); the first trace by default.
    #[arg(long)]
    pub plot_trace: Option<String>,
    /// For traces the VMM recorded (their header holds the live policy): write the decisions
    /// that policy makes on them, one JSON line per window whose action is not `hold`, as
    /// `GET /predictor/decisions` lists them.
    #[arg(long)]
    pub decisions_out: Option<PathBuf>,
}

/// The decisions, window by window, of the policy a trace's header recorded; None for a
/// trace without one.
pub fn replay_recorded(trace: &Trace) -> Result<Option<Vec<Decision>>, EvalError> {
    let Some(spec) = &trace.header.policy else {
        return Ok(None);
    };
    let mut policy = spec.build()?;
    Ok(Some(
        trace.samples.iter().map(|s| policy.decide(s)).collect(),
    ))
}

fn write_recorded_decisions(
    traces: &[Trace],
    dir: &std::path::Path,
    path: &std::path::Path,
    out: &mut dyn Write,
) -> Result<(), EvalError> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut replayed = 0;
    for t in traces {
        let Some(decisions) = replay_recorded(t)? else {
            continue;
        };
        replayed += 1;
        let acted: Vec<&Decision> = decisions
            .iter()
            .filter(|d| d.action != Action::Hold)
            .collect();
        for d in &acted {
            serde_json::to_writer(&mut file, d).map_err(std::io::Error::from)?;
            file.write_all(b"\n")?;
        }
        writeln!(
            out,
            "{}: {} windows replayed through its recorded policy, {} decisions acted",
            t.header.name,
            decisions.len(),
            acted.len()
        )?;
    }
    file.flush()?;
    if replayed == 0 {
        return Err(EvalError::NoRecordedPolicy(dir.to_path_buf()));
    }
    Ok(())
}

/// How a method allocates, window by window.
trait Allocator {
    fn allocation(&self) -> Allocation;
    fn observe(&mut self, sample: &Sample);
}

/// Provision the whole capacity, always.
struct Static(Allocation);

impl Allocator for Static {
    fn allocation(&self) -> Allocation {
        self.0
    }
    fn observe(&mut self, _: &Sample) {}
}

/// Rounds `v` up to the step and into the budget, as the policy does.
fn bounded(l: &predictor::policy::Limits, v: f64) -> f64 {
    let aligned = ((v.clamp(l.min, l.max) / l.step) - 1e-9).ceil() * l.step;
    aligned.clamp(l.min, l.max)
}

/// VPA's safety margin: its recommendation is the P90 times this.
const VPA_FACTOR: f64 = 1.15;

/// VPA's recommender applied every window: P90 of a 24 h half-life histogram times a safety
/// factor (1.15: VPA's +15 %), clamped and aligned like the policy, without hysteresis.
struct Vpa;

impl Vpa {
    /// VPA's P90 after each window (None while its histogram is not warm): what its
    /// allocation is made of, whatever the factor.
    fn recommendations(trace: &Trace) -> Result<PerResource<Vec<Option<f64>>>, ForecastError> {
        let mut out = PerResource::from_fn(|_| Vec::with_capacity(trace.samples.len()));
        for r in Resource::ALL {
            let mut h = DecayingHistogram::new(PercentileConfig {
                margin: 0.0,
                ..PercentileConfig::vpa()
            })?;
            for s in &trace.samples {
                h.observe(s.usage[r]);
                out[r].push(h.warm().then(|| h.forecast(Horizon::ONE).upper));
            }
        }
        Ok(out)
    }

    /// The allocation series VPA with safety `factor` gives from its `recommendations`
    /// (what is in force during each window: the initial one until the first).
    fn series(l: &predictor::policy::Limits, rec: &[Option<f64>], factor: f64) -> Vec<f64> {
        let mut a = l.initial;
        rec.iter()
            .map(|p| {
                let now = a;
                if let Some(p) = p {
                    a = bounded(l, p * factor);
                }
                now
            })
            .collect()
    }
}

/// One trace's resource as VPA sees it: its limits, the demand and VPA's recommendations.
type VpaCurve<'a> = (predictor::policy::Limits, &'a [f64], &'a [Option<f64>]);

/// The smallest VPA safety factor (to 0.1 %) whose under-provisioning, pooled over the
/// traces, is at most `rate`: VPA at the policy's own under-provisioning rate.
fn matched_factor(recs: &[VpaCurve], burst: f64, rate: f64) -> f64 {
    let under = |k: f64| {
        let mut m = Metrics::default();
        for (l, used, rec) in recs {
            m.add(used, &Vpa::series(l, rec, k), 0, burst);
        }
        m.under_fraction()
    };
    // Under-provisioning only falls as the factor grows; bisect on its logarithm.
    let (mut lo, mut hi) = (0.01_f64, 100.0_f64);
    if under(lo) <= rate {
        return lo;
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if under(mid) <= rate {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Knows the demand of the windows its allocation will be in force for (the next
/// `horizon`), and allocates exactly that, under the policy's budget, block sizes and change
/// limits (no hysteresis: it never needs to guard against noise).
struct Oracle {
    budget: Budget,
    cfg: PolicyConfig,
    used: PerResource<Vec<f64>>,
    next: usize,
    allocation: Allocation,
}

impl Allocator for Oracle {
    fn allocation(&self) -> Allocation {
        self.allocation
    }
    fn observe(&mut self, _: &Sample) {
        self.next += 1;
        for r in Resource::ALL {
            let h = self.cfg.horizon_for(r).get();
            let series = &self.used[r];
            if self.next >= series.len() {
                continue;
            }
            let end = (self.next + h).min(series.len());
            let need = series[self.next..end].iter().copied().fold(0.0, f64::max);
            let l = self.budget.0[r];
            let cur = self.allocation[r];
            let target = bounded(&l, need);
            // Its first move, like the policy's, replaces the initial allocation outright.
            let next = if self.next == 1 {
                target
            } else if target > cur {
                target.min(cur + self.cfg.max_grow * l.max)
            } else {
                target.max(cur - self.cfg.max_shrink * l.max)
            };
            self.allocation[r] = bounded(&l, next);
        }
    }
}

impl Allocator for Policy {
    fn allocation(&self) -> Allocation {
        *Policy::allocation(self)
    }
    fn observe(&mut self, s: &Sample) {
        self.decide(s);
    }
}

/// Quality of one method on one resource, pooled over windows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    pub windows: u64,
    slack_sum: f64,
    pub under: u64,
    shortfall_sum: f64,
    pub resizes: u64,
    lead_sum: f64,
    pub leads: u64,
    minutes: f64,
}

/// Grows more than this many windows before the demand they served are not counted as
/// leading it: by then they were for something else.
const LEAD_LOOKAHEAD: usize = 50;

impl Metrics {
    /// Adds one trace's series; `allocated[t]` is what was in force during window `t`,
    /// enforced with a token bucket of `burst` windows of it (0: none), so demand above the
    /// allocation is short only by what the bucket could not give.
    pub fn add(&mut self, used: &[f64], allocated: &[f64], window_ms: u64, burst: f64) {
        let mut bucket = Bucket::full(allocated.first().copied().unwrap_or(0.0), burst);
        for (&u, &a) in used.iter().zip(allocated) {
            self.windows += 1;
            let a = a.max(f64::MIN_POSITIVE);
            self.slack_sum += (a - u).max(0.0) / a;
            if bucket.short(u, a, burst) {
                self.under += 1;
                self.shortfall_sum += (u - bucket.capacity(a, burst)) / u;
            }
            bucket.drain(u, a, burst);
        }
        self.minutes += used.len() as f64 * window_ms as f64 / 60_000.0;
        for g in 1..allocated.len() {
            let before = allocated[g - 1];
            if allocated[g] <= before {
                continue;
            }
            self.resizes += 1;
            let lead = if used[g - 1] > before {
                // Reactive: the grow came after demand had already exceeded the allocation.
                let late = used[..g]
                    .iter()
                    .zip(&allocated[..g])
                    .rev()
                    .take_while(|(u, a)| u > a);
                Some(-(late.count() as f64))
            } else {
                used[g..]
                    .iter()
                    .take(LEAD_LOOKAHEAD)
                    .position(|&u| u > before)
                    .map(|d| d as f64)
            };
            if let Some(l) = lead {
                self.lead_sum += l;
                self.leads += 1;
            }
        }
        self.resizes += allocated.windows(2).filter(|w| w[1] < w[0]).count() as u64;
    }

    pub fn merge(&mut self, o: &Metrics) {
        self.windows += o.windows;
        self.slack_sum += o.slack_sum;
        self.under += o.under;
        self.shortfall_sum += o.shortfall_sum;
        self.resizes += o.resizes;
        self.lead_sum += o.lead_sum;
        self.leads += o.leads;
        self.minutes += o.minutes;
    }

    /// Mean of `max(0, allocated - used) / allocated`.
    pub fn slack(&self) -> f64 {
        self.slack_sum / self.windows.max(1) as f64
    }

    /// Mean of `(used - allocated) / used` over under-provisioned windows (0 if none).
    pub fn shortfall(&self) -> f64 {
        self.shortfall_sum / self.under.max(1) as f64
    }

    pub fn under_fraction(&self) -> f64 {
        self.under as f64 / self.windows.max(1) as f64
    }

    /// Mean windows by which grows preceded the demand they served (negative: late).
    pub fn mean_lead(&self) -> Option<f64> {
        (self.leads > 0).then(|| self.lead_sum / self.leads as f64)
    }

    pub fn resizes_per_minute(&self) -> f64 {
        if self.minutes > 0.0 {
            self.resizes as f64 / self.minutes
        } else {
            0.0
        }
    }
}

pub const STATIC: &str = "static";
pub const VPA: &str = "vpa-p90+15%";
pub const ORACLE: &str = "oracle";
/// VPA with the safety factor at which it under-provisions as often as the default policy.
pub const VPA_MATCHED: &str = "vpa-matched";
/// Each trace's own P99, fixed for the whole run.
pub const HINDSIGHT: &str = "hindsight-p99";
const HINDSIGHT_QUANTILE: f64 = 0.99;
/// The rows that are no policy: references to measure the policies against.
const BASELINES: [&str; 5] = [STATIC, VPA, VPA_MATCHED, HINDSIGHT, ORACLE];
/// The policy `prescient` runs unless a VM spec names another.
pub const DEFAULT: &str = "ensemble";

/// The targets the default policy is held to, per resource, against VPA.
fn slack_target(r: Resource) -> f64 {
    match r {
        Resource::Cpu | Resource::Mem => 0.6,
        Resource::Blk | Resource::Net => 0.7,
    }
}

/// One trace's metrics: per method, per resource, and which resources were scored.
#[derive(Clone, Debug)]
pub struct TraceReport {
    pub name: String,
    pub scored: PerResource<bool>,
    pub methods: Vec<PerResource<Metrics>>,
    /// The safety factor of the `vpa-matched` row (the same for every trace of a set).
    pub vpa_factor: PerResource<f64>,
}

/// Result of one evaluation.
#[derive(Clone, Debug)]
pub struct EvalReport {
    pub window_ms: u64,
    pub methods: Vec<String>,
    pub traces: Vec<TraceReport>,
}

impl EvalReport {
    fn index(&self, name: &str) -> Option<usize> {
        self.methods.iter().position(|n| n == name)
    }

    /// Method `name`'s metrics on `r`, pooled over the traces where `r` is scored.
    pub fn total(&self, name: &str, r: Resource) -> Option<Metrics> {
        let i = self.index(name)?;
        let mut m = Metrics::default();
        for t in self.traces.iter().filter(|t| t.scored[r]) {
            m.merge(&t.methods[i][r]);
        }
        Some(m)
    }

    fn scored(&self, r: Resource) -> usize {
        self.traces.iter().filter(|t| t.scored[r]).count()
    }

    /// The policy (not a baseline or the oracle) with the least slack among those
    /// under-provisioning fewer than 1 % of windows on `r`.
    pub fn best(&self, r: Resource) -> Option<(&str, Metrics)> {
        self.methods
            .iter()
            .filter(|n| !BASELINES.contains(&n.as_str()))
            .filter_map(|n| Some((n.as_str(), self.total(n, r)?)))
            .filter(|(_, m)| m.under_fraction() < 0.01)
            .min_by(|a, b| a.1.slack().total_cmp(&b.1.slack()))
    }

    pub fn write_totals(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let windows: usize = self
            .traces
            .iter()
            .map(|t| t.methods.first().map_or(0, |m| m.cpu.windows as usize))
            .sum();
        writeln!(
            out,
            "{} traces, {} windows of {} ms. A resource is scored on the traces where its demand \
             ever exceeds the budget minimum.\nslack = mean max(0, alloc - used) / alloc; \
             shortfall = mean (used - alloc) / used over under-provisioned windows",
            self.traces.len(),
            windows,
            self.window_ms
        )?;
        for r in Resource::ALL {
            let m0 = self.total(STATIC, r).unwrap_or_default();
            writeln!(
                out,
                "\n{} ({}): {} traces, {} windows",
                r.name(),
                r.unit(),
                self.scored(r),
                m0.windows
            )?;
            writeln!(
                out,
                "| {:<16} | {:>7} | {:>11} | {:>7} | {:>8} | {:>11} |",
                "method", "slack %", "shortfall %", "under %", "lead ms", "resizes/min"
            )?;
            writeln!(
                out,
                "|{:-<18}|{:->9}|{:->13}|{:->9}|{:->10}|{:->13}|",
                "", "", "", "", "", ""
            )?;
            for name in &self.methods {
                let m = self.total(name, r).unwrap_or_default();
                let lead = m.mean_lead().map_or("-".to_string(), |l| {
                    format!("{:.0}", l * self.window_ms as f64)
                });
                writeln!(
                    out,
                    "| {:<16} | {:>7.1} | {:>11.1} | {:>7.2} | {:>8} | {:>11.1} |",
                    name,
                    100.0 * m.slack(),
                    100.0 * m.shortfall(),
                    100.0 * m.under_fraction(),
                    lead,
                    m.resizes_per_minute()
                )?;
            }
        }
        Ok(())
    }

    /// Per resource, one row per scored trace: the default policy, VPA, the best fixed size
    /// in hindsight and the oracle.
    pub fn write_per_trace(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let (Some(d), Some(v), Some(h), Some(o)) = (
            self.index(DEFAULT),
            self.index(VPA),
            self.index(HINDSIGHT),
            self.index(ORACLE),
        ) else {
            return Ok(());
        };
        let width = self
            .traces
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        for r in Resource::ALL {
            writeln!(
                out,
                "\nper trace, {}: slack % / under % / shortfall %",
                r.name()
            )?;
            writeln!(
                out,
                "| {:<width$} | {:>22} | {:>22} | {:>13} | {:>6} |",
                "trace", DEFAULT, VPA, HINDSIGHT, ORACLE
            )?;
            writeln!(
                out,
                "|{:-<w2$}|{:->24}|{:->24}|{:->15}|{:->8}|",
                "",
                "",
                "",
                "",
                "",
                w2 = width + 2
            )?;
            for t in self.traces.iter().filter(|t| t.scored[r]) {
                let cell = |m: &Metrics| {
                    format!(
                        "{:5.1} / {:5.2} / {:5.1}",
                        100.0 * m.slack(),
                        100.0 * m.under_fraction(),
                        100.0 * m.shortfall()
                    )
                };
                writeln!(
                    out,
                    "| {:<width$} | {:>22} | {:>22} | {:>13.1} | {:>6.1} |",
                    t.name,
                    cell(&t.methods[d][r]),
                    cell(&t.methods[v][r]),
                    100.0 * t.methods[h][r].slack(),
                    100.0 * t.methods[o][r].slack()
                )?;
            }
        }
        Ok(())
    }

    /// The default policy against VPA (as configured, and at the policy's own
    /// under-provisioning rate), the best fixed size in hindsight and the oracle, with the
    /// targets it is held to.
    pub fn write_summary(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "\n{DEFAULT} (the default policy) vs {VPA}, {VPA_MATCHED} ({VPA}'s recommender with \
             the safety factor at which it under-provisions no more often than {DEFAULT}), \
             {HINDSIGHT} and the {ORACLE}; target: under < 1 %, slack <= 0.6 x VPA's (cpu, \
             mem) or 0.7 x (blk, net) at matched under-provisioning, shortfall <= VPA's"
        )?;
        writeln!(
            out,
            "| res  | {:>22} | {:>22} | {:>28} | {:>9} | {:>6} | {:>9} | {:>9} | {:<6} |",
            "default slack/under/sh",
            "vpa slack/under/sh",
            "vpa-matched slack/under/sh",
            "hindsight",
            "oracle",
            "slack/vpa",
            "/matched",
            "target"
        )?;
        for r in Resource::ALL {
            let (Some(d), Some(v), Some(o), Some(h)) = (
                self.total(DEFAULT, r),
                self.total(VPA, r),
                self.total(ORACLE, r),
                self.total(HINDSIGHT, r),
            ) else {
                continue;
            };
            if d.windows == 0 {
                writeln!(out, "| {:<4} | no trace uses it", r.name())?;
                continue;
            }
            // Without a matched row (no default policy evaluated) VPA as configured stands in.
            let m = self.total(VPA_MATCHED, r).unwrap_or(v);
            let factor = self.traces.first().map_or(0.0, |t| t.vpa_factor[r]);
            let cell = |m: &Metrics| {
                format!(
                    "{:4.1} / {:4.2} / {:4.1}",
                    100.0 * m.slack(),
                    100.0 * m.under_fraction(),
                    100.0 * m.shortfall()
                )
            };
            let ratio = |v: &Metrics| d.slack() / v.slack().max(f64::MIN_POSITIVE);
            let met = d.under_fraction() < 0.01
                && ratio(&m) <= slack_target(r)
                && d.shortfall() <= m.shortfall() + 1e-12;
            writeln!(
                out,
                "| {:<4} | {:>22} | {:>22} | {:>28} | {:>9.1} | {:>6.1} | {:>9.2} | {:>9.2} | {:<6} |",
                r.name(),
                cell(&d),
                cell(&v),
                format!("{} (x{:.2})", cell(&m), factor),
                100.0 * h.slack(),
                100.0 * o.slack(),
                ratio(&v),
                ratio(&m),
                if met { "met" } else { "missed" }
            )?;
        }
        writeln!(
            out,
            "\nbest policy per resource (least slack with < 1 % under-provisioned)"
        )?;
        for r in Resource::ALL {
            match self.best(r) {
                Some((name, m)) => writeln!(
                    out,
                    "{:<4} {:<16} slack {:>5.1} % under {:>5.2} % shortfall {:>5.1} %",
                    r.name(),
                    name,
                    100.0 * m.slack(),
                    100.0 * m.under_fraction(),
                    100.0 * m.shortfall()
                )?,
                None => writeln!(out, "{:<4} no policy stayed under 1 %", r.name())?,
            }
        }
        Ok(())
    }
}

/// Allocation series of every resource for one method over one trace.
fn replay(alloc: &mut dyn Allocator, trace: &Trace) -> PerResource<Vec<f64>> {
    let mut out = PerResource::from_fn(|_| Vec::with_capacity(trace.samples.len()));
    for s in &trace.samples {
        let a = alloc.allocation();
        for r in Resource::ALL {
            out[r].push(a[r]);
        }
        alloc.observe(s);
    }
    out
}

fn used(trace: &Trace) -> PerResource<Vec<f64>> {
    PerResource::from_fn(|r| trace.samples.iter().map(|s| s.usage[r]).collect())
}

/// A policy method: a name and the preset its forecasters come from.
pub type Method = (String, Preset);

/// The policy methods evaluated besides the baselines and the oracle: every forecaster alone
/// (the recurrent one with `gru`'s weights, or the shipped ones), the default ensemble without
/// its leading-indicator expert, with one on every resource, the same for its recurrent expert
/// and for its peak expert (what each earns), and the default ensemble.
pub fn methods(gru: Option<Arc<GruWeights>>) -> Result<Vec<Method>, RecurrentError> {
    let gru = match gru {
        Some(w) => w,
        None => Arc::new(GruWeights::shipped()?),
    };
    let mut m: Vec<Method> = Preset::CLASSICAL
        .into_iter()
        .chain([Preset::Recurrent(Arc::clone(&gru))])
        .map(|p| (p.name().to_string(), p))
        .collect();
    let default = Preset::default_ensemble()?;
    let Preset::Ensemble(experts) = &default else {
        unreachable!("Preset::default_ensemble builds an ensemble")
    };
    // The default's experts but those `drop` names (its one-resource experts).
    let without = |drop: fn(&Preset) -> bool| -> Vec<Preset> {
        experts
            .iter()
            .filter(|p| !matches!(p, Preset::OnlyFor(_, only) if drop(only)))
            .cloned()
            .collect()
    };
    let indicator = |p: &Preset| matches!(p, Preset::Indicator);
    let recurrent = |p: &Preset| matches!(p, Preset::Recurrent(_));
    let peak = |p: &Preset| matches!(p, Preset::Peak);
    let mut all_indicators = without(indicator);
    all_indicators.push(Preset::Indicator);
    let mut all_gru = without(recurrent);
    all_gru.push(Preset::Recurrent(gru));
    let mut all_peak = without(peak);
    all_peak.push(Preset::Peak);
    m.push((
        "ens-no-indicator".into(),
        Preset::Ensemble(without(indicator)),
    ));
    m.push(("ens-indicators".into(), Preset::Ensemble(all_indicators)));
    m.push(("ens-no-gru".into(), Preset::Ensemble(without(recurrent))));
    m.push(("ens-gru-all".into(), Preset::Ensemble(all_gru)));
    m.push(("ens-no-peak".into(), Preset::Ensemble(without(peak))));
    m.push(("ens-peak-all".into(), Preset::Ensemble(all_peak)));
    m.push((DEFAULT.into(), default));
    Ok(m)
}

/// What to evaluate besides the traces themselves.
pub struct EvalOptions {
    pub horizon: Horizon,
    pub methods: Vec<Method>,
    /// Trace whose series `evaluate` hands back (for plotting).
    pub keep: Option<String>,
}

/// Series of the kept trace: used, then each method's allocation.
pub type KeptSeries = (
    String,
    PerResource<Vec<f64>>,
    Vec<(String, PerResource<Vec<f64>>)>,
);

pub fn evaluate(
    traces: &[Trace],
    opts: &EvalOptions,
) -> Result<(EvalReport, Option<KeptSeries>), EvalError> {
    let matched = opts.methods.iter().any(|(n, _)| n == DEFAULT);
    let mut names = vec![STATIC.to_string(), VPA.to_string()];
    if matched {
        names.push(VPA_MATCHED.to_string());
    }
    names.extend([HINDSIGHT.to_string(), ORACLE.to_string()]);
    names.extend(opts.methods.iter().map(|(n, _)| n.clone()));
    let cfg = PolicyConfig {
        horizon: opts.horizon,
        ..PolicyConfig::default()
    };
    let mut reports = Vec::with_capacity(traces.len());
    let mut all_series = Vec::with_capacity(traces.len());
    let mut recs = Vec::with_capacity(traces.len());
    for t in traces {
        let budget = Budget::from_capacity(&t.header.capacity);
        let used = used(t);
        let mut allocators: Vec<Box<dyn Allocator>> = vec![
            Box::new(Static(budget.max())),
            // The best size fixed for the whole run, knowing the run: the trace's own P99.
            Box::new(Static(PerResource::from_fn(|r| {
                let mut u = used[r].clone();
                u.sort_by(f64::total_cmp);
                let i = ((HINDSIGHT_QUANTILE * u.len() as f64).ceil() as usize).saturating_sub(1);
                bounded(&budget.0[r], u.get(i).copied().unwrap_or(0.0))
            }))),
            Box::new(Oracle {
                budget,
                cfg,
                used: used.clone(),
                next: 0,
                allocation: budget.0.map(|_, l| l.initial),
            }),
        ];
        for (_, p) in &opts.methods {
            let f = p.build_all(opts.horizon, &t.header.capacity)?;
            allocators.push(Box::new(Policy::new(budget, cfg, f)?));
        }
        let mut series: Vec<_> = allocators
            .iter_mut()
            .map(|a| replay(a.as_mut(), t))
            .collect();
        let rec = Vpa::recommendations(t)?;
        series.insert(
            1,
            PerResource::from_fn(|r| Vpa::series(&budget.0[r], &rec[r], VPA_FACTOR)),
        );
        if matched {
            // Filled in once the factor is known, from the whole set.
            series.insert(2, PerResource::default());
            recs.push((budget, rec));
        }
        let scored =
            PerResource::from_fn(|r| used[r].iter().copied().fold(0.0, f64::max) > budget.0[r].min);
        reports.push(TraceReport {
            name: t.header.name.clone(),
            scored,
            methods: Vec::new(),
            vpa_factor: PerResource::default(),
        });
        all_series.push((used, series));
    }
    if matched {
        let d = names.iter().position(|n| n == DEFAULT).unwrap_or_default();
        for r in Resource::ALL {
            let scored: Vec<_> = reports
                .iter()
                .zip(&all_series)
                .zip(&recs)
                .filter(|((t, _), _)| t.scored[r])
                .map(|((_, (used, series)), (budget, rec))| {
                    (
                        budget.0[r],
                        used[r].as_slice(),
                        series[d][r].as_slice(),
                        rec[r].as_slice(),
                    )
                })
                .collect();
            let burst = cfg.bucket_windows[r];
            let mut policy = Metrics::default();
            for (_, used, alloc, _) in &scored {
                policy.add(used, alloc, 0, burst);
            }
            let curves: Vec<_> = scored.iter().map(|(l, u, _, rec)| (*l, *u, *rec)).collect();
            let k = matched_factor(&curves, burst, policy.under_fraction());
            for ((report, (_, series)), (budget, rec)) in
                reports.iter_mut().zip(&mut all_series).zip(&recs)
            {
                series[2][r] = Vpa::series(&budget.0[r], &rec[r], k);
                report.vpa_factor[r] = k;
            }
        }
    }
    let mut kept = None;
    for ((report, (used, series)), t) in reports.iter_mut().zip(all_series).zip(traces) {
        report.methods = series
            .iter()
            .map(|s| {
                PerResource::from_fn(|r| {
                    let mut m = Metrics::default();
                    m.add(&used[r], &s[r], t.header.window_ms, cfg.bucket_windows[r]);
                    m
                })
            })
            .collect();
        if kept.is_none() && opts.keep.as_ref().is_none_or(|k| *k == t.header.name) {
            kept = Some((
                t.header.name.clone(),
                used,
                names.iter().cloned().zip(series).collect(),
            ));
        }
    }
    let report = EvalReport {
        window_ms: traces.first().map_or(0, |t| t.header.window_ms),
        methods: names,
        traces: reports,
    };
    Ok((report, kept))
}

/// Entry point for the `prescient predictor eval` subcommand.
pub fn run(args: &EvalArgs, out: &mut dyn Write) -> Result<EvalReport, EvalError> {
    if args.generate_synthetic {
        let written = synthetic::write_set(
            &args.traces,
            args.shapes,
            args.first_seed,
            args.seeds,
            args.windows,
        )?;
        writeln!(
            out,
            "wrote {} synthetic traces to {}",
            written.len(),
            args.traces.display()
        )?;
    }
    let paths = trace::list(&args.traces)?;
    if paths.is_empty() {
        return Err(EvalError::NoTraces(args.traces.clone()));
    }
    let traces = paths
        .iter()
        .map(|p| trace::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(path) = &args.decisions_out {
        write_recorded_decisions(&traces, &args.traces, path, out)?;
    }
    let gru = match &args.model {
        Some(m) => Some(Arc::new(GruWeights::load(m)?)),
        None => None,
    };
    let opts = EvalOptions {
        horizon: Horizon::new(args.horizon)?,
        methods: methods(gru)?,
        keep: args.svg_out.as_ref().and(args.plot_trace.clone()),
    };
    let (report, kept) = evaluate(&traces, &opts)?;
    report.write_totals(out)?;
    if !args.totals_only {
        report.write_per_trace(out)?;
    }
    report.write_summary(out)?;
    if let (Some(path), Some((name, used, series))) = (&args.svg_out, kept) {
        let methods: Vec<Series> = series
            .iter()
            .map(|(m, a)| Series {
                method: m,
                allocated: a,
                forecast: None,
            })
            .collect();
        plot::plot(path, &name, report.window_ms, &used, &methods)?;
        writeln!(out, "\nplot of {name} written to {}", path.display())?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Workload;

    #[test]
    fn metrics_of_a_known_series_are_clamped() {
        let mut m = Metrics::default();
        //             t:   0     1     2     3      4     5
        let used = [5.0, 5.0, 9.0, 12.0, 12.0, 6.0];
        let alloc = [10.0, 10.0, 10.0, 10.0, 15.0, 10.0];
        m.add(&used, &alloc, 100, 0.0);
        assert_eq!(m.windows, 6);
        assert_eq!(m.under, 1);
        // The under-provisioned window adds no negative slack.
        let slack = (0.5 + 0.5 + 0.1 + 0.0 + 0.2 + 0.4) / 6.0;
        assert!((m.slack() - slack).abs() < 1e-12);
        // Shortfall is relative to demand: 2 of 12.
        assert!((m.shortfall() - 2.0 / 12.0).abs() < 1e-12);
        // One grow (t=4, one window late) and one shrink in 0.6 s.
        assert_eq!(m.resizes, 2);
        assert!((m.resizes_per_minute() - 200.0).abs() < 1e-9);
        assert_eq!(m.mean_lead(), Some(-1.0));
    }

    #[test]
    fn one_huge_miss_is_one_bad_window_not_negative_slack() {
        // The trace that made the old yardstick go negative: one window at 700x the allocation.
        let mut used = vec![1.0; 100];
        used[50] = 700.0;
        let alloc = vec![2.0; 100];
        let mut m = Metrics::default();
        m.add(&used, &alloc, 100, 0.0);
        assert!((m.slack() - 0.5 * 99.0 / 100.0).abs() < 1e-12);
        assert!((m.shortfall() - 698.0 / 700.0).abs() < 1e-12);
        assert_eq!(m.under, 1);
        let mut pooled = Metrics::default();
        pooled.merge(&m);
        pooled.merge(&m);
        assert_eq!(pooled.windows, 200);
        assert_eq!(pooled.slack(), m.slack());
        assert_eq!(pooled.shortfall(), m.shortfall());
    }

    #[test]
    fn a_bucket_serves_bursts_until_it_runs_dry() {
        // Rate 10 with one window of bucket: an idle window fills it, a burst to 18 spends 8 of
        // its 10, the next burst finds 2 and is short by 6; after an idle window a burst to 25
        // is short by 5.
        let used = [0.0, 18.0, 18.0, 0.0, 25.0];
        let alloc = [10.0; 5];
        let mut m = Metrics::default();
        m.add(&used, &alloc, 100, 1.0);
        assert_eq!(m.under, 2);
        assert!((m.shortfall() - (6.0 / 18.0 + 5.0 / 25.0) / 2.0).abs() < 1e-12);
        // Without a bucket every window above the rate is short.
        let mut plain = Metrics::default();
        plain.add(&used, &alloc, 100, 0.0);
        assert_eq!(plain.under, 3);
        assert_eq!(plain.slack(), m.slack());
    }

    #[test]
    fn matched_factor_is_the_smallest_with_no_more_misses() {
        let l = predictor::policy::Limits {
            min: 0.0,
            max: 1000.0,
            initial: 1000.0,
            step: 0.01,
        };
        // VPA recommends 10 throughout; demand is 10.5 once in 100 windows and 12 once.
        let rec = vec![Some(10.0); 100];
        let mut used = vec![5.0; 100];
        used[40] = 10.5;
        used[60] = 12.0;
        let recs = [(l, used.as_slice(), rec.as_slice())];
        // The first window runs at the initial allocation; after it, factor k allocates 10 k
        // rounded up to the step: 10.5 needs k > 1.049, 12 needs k > 1.199.
        let k1 = matched_factor(&recs, 0.0, 0.01);
        assert!((1.049..1.051).contains(&k1), "{k1}");
        let k0 = matched_factor(&recs, 0.0, 0.0);
        assert!((1.199..1.201).contains(&k0), "{k0}");
    }

    #[test]
    fn lead_counts_windows_before_demand() {
        let mut m = Metrics::default();
        let used = [5.0, 5.0, 5.0, 5.0, 11.0];
        let alloc = [10.0, 10.0, 12.0, 12.0, 12.0];
        m.add(&used, &alloc, 100, 0.0);
        assert_eq!(m.under, 0);
        assert_eq!(m.shortfall(), 0.0);
        assert_eq!(m.mean_lead(), Some(2.0));
    }

    #[test]
    fn oracle_meets_demand_under_the_same_limits() {
        let mut t = synthetic::generate(Workload::Sustained, 1, 600);
        // A jump larger than the grow limit (half the capacity) even the oracle misses once.
        for s in &mut t.samples[300..350] {
            s.usage.cpu = 0.05;
        }
        t.samples[350].usage.cpu = 3.9;
        let opts = EvalOptions {
            horizon: Horizon::ONE,
            methods: Vec::new(),
            keep: None,
        };
        let (report, _) = evaluate(&[t], &opts).unwrap();
        let o = report.total(ORACLE, Resource::Cpu).unwrap();
        assert_eq!(o.under, 1, "only the jump beyond the change limit");
        // Its slack is what the 0.01-core quota step leaves (and the first window's capacity).
        assert!(o.slack() < 0.02, "{}", o.slack());
        let mem = report.total(ORACLE, Resource::Mem).unwrap();
        assert_eq!(mem.under, 0);
    }

    fn quick(workloads: &[Workload]) -> (EvalReport, Option<KeptSeries>) {
        let traces: Vec<Trace> = workloads
            .iter()
            .map(|&w| synthetic::generate(w, 1, 600))
            .collect();
        let opts = EvalOptions {
            horizon: Horizon::ONE,
            methods: methods(None).unwrap(),
            keep: Some("periodic-1".into()),
        };
        evaluate(&traces, &opts).unwrap()
    }

    #[test]
    fn baselines_oracle_and_policies_behave() {
        let (report, kept) = quick(&[Workload::Sustained, Workload::Periodic]);
        assert_eq!(
            report.methods,
            [
                STATIC,
                VPA,
                VPA_MATCHED,
                HINDSIGHT,
                ORACLE,
                "last",
                "ewma",
                "holt",
                "histogram",
                "peak",
                "indicator",
                "gru",
                "ens-no-indicator",
                "ens-indicators",
                "ens-no-gru",
                "ens-gru-all",
                "ens-no-peak",
                "ens-peak-all",
                DEFAULT
            ]
        );
        let stat = report.total(STATIC, Resource::Cpu).unwrap();
        assert_eq!(stat.under, 0);
        assert_eq!(stat.resizes, 0);
        for r in Resource::ALL {
            let oracle = report.total(ORACLE, r).unwrap();
            let default = report.total(DEFAULT, r).unwrap();
            let stat = report.total(STATIC, r).unwrap();
            assert!(oracle.slack() <= default.slack(), "{r:?}");
            assert!(default.slack() < stat.slack(), "{r:?}");
            // VPA at the default's under-provisioning rate: no more windows under.
            let matched = report.total(VPA_MATCHED, r).unwrap();
            assert!(matched.under <= default.under, "{r:?}");
            // The best fixed size leaves at most 1 % of each trace's windows short.
            for t in &report.traces {
                let h = t.methods[report.index(HINDSIGHT).unwrap()][r];
                assert!(h.under * 100 <= h.windows, "{r:?} {}", t.name);
            }
        }
        assert_eq!(report.total(STATIC, Resource::Mem).unwrap().windows, 1200);
        let (name, used, series) = kept.unwrap();
        assert_eq!(name, "periodic-1");
        assert_eq!(used.cpu.len(), 600);
        assert_eq!(series.len(), report.methods.len());
        let mut text = Vec::new();
        report.write_totals(&mut text).unwrap();
        report.write_per_trace(&mut text).unwrap();
        report.write_summary(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("| vpa-p90+15%      |")
                && text.contains("mem (MiB)")
                && text.contains("| periodic-1 ")
                && text.contains("slack/vpa")
                && text.contains("hindsight-p99")
                && text.contains("/matched"),
            "{text}"
        );
    }

    #[test]
    fn idle_resources_are_not_scored() {
        let mut t = synthetic::generate(Workload::Sustained, 1, 200);
        for s in &mut t.samples {
            s.usage.net = 0.5; // below the 1 MiB/s minimum bucket: nothing to forecast
        }
        let opts = EvalOptions {
            horizon: Horizon::ONE,
            methods: Vec::new(),
            keep: None,
        };
        let (report, _) = evaluate(&[t], &opts).unwrap();
        assert!(report.traces[0].scored.cpu && !report.traces[0].scored.net);
        assert_eq!(report.total(VPA, Resource::Net).unwrap().windows, 0);
    }

    #[test]
    fn run_generates_and_plots() {
        let dir = std::env::temp_dir().join(format!("predictor-eval-{}", std::process::id()));
        let svg = dir.join("plot.svg");
        let args = EvalArgs {
            traces: dir.clone(),
            generate_synthetic: true,
            shapes: Shapes::Unseen,
            seeds: 1,
            first_seed: 1,
            windows: 300,
            horizon: 2,
            model: None,
            totals_only: false,
            svg_out: Some(svg.clone()),
            plot_trace: Some("unseen-square-1".into()),
            decisions_out: None,
        };
        let mut out = Vec::new();
        let report = run(&args, &mut out).unwrap();
        assert_eq!(report.traces.len(), 5);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("plot of unseen-square-1 written"), "{text}");
        assert!(std::fs::read_to_string(&svg)
            .unwrap()
            .contains("ensemble mem"));
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = EvalArgs {
            generate_synthetic: false,
            ..args
        };
        assert!(matches!(
            run(&missing, &mut Vec::new()),
            Err(EvalError::Trace(_))
        ));
    }

    #[test]
    fn recorded_policy_replays_to_the_same_decisions() {
        use predictor::spec::{ForecasterKind, PolicySpec};
        let dir = std::env::temp_dir().join(format!("predictor-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut t = synthetic::generate(synthetic::Workload::Bursty, 3, 400);
        let spec = PolicySpec {
            forecaster: ForecasterKind::Ensemble,
            model_path: None,
            budget: Budget::from_capacity(&t.header.capacity),
            config: PolicyConfig::default(),
        };
        let mut live = spec.build().unwrap();
        let expected: Vec<String> = t
            .samples
            .iter()
            .map(|s| live.decide(s))
            .filter(|d| d.action != Action::Hold)
            .map(|d| serde_json::to_string(&d).unwrap())
            .collect();
        assert!(!expected.is_empty());
        let args = EvalArgs {
            traces: dir.clone(),
            generate_synthetic: false,
            shapes: Shapes::Standard,
            seeds: 1,
            first_seed: 1,
            windows: 300,
            horizon: 1,
            model: None,
            totals_only: true,
            svg_out: None,
            plot_trace: None,
            decisions_out: Some(dir.join("decisions.json")),
        };
        trace::write(&dir.join("plain.jsonl"), &t).unwrap();
        assert!(matches!(
            run(&args, &mut Vec::new()),
            Err(EvalError::NoRecordedPolicy(_))
        ));
        t.header.policy = Some(spec);
        trace::write(&dir.join("plain.jsonl"), &t).unwrap();
        let mut out = Vec::new();
        run(&args, &mut out).unwrap();
        let written = std::fs::read_to_string(dir.join("decisions.json")).unwrap();
        assert_eq!(written.lines().collect::<Vec<_>>(), expected);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("400 windows replayed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
