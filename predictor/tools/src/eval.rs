//! `prescient predictor eval`: replays traces through every forecaster + policy and the
//! two baselines, and reports per-resource provisioning quality.

use crate::plot::{self, PlotError, Series};
use crate::synthetic::{self, SyntheticError};
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
    /// Directory of `*.jsonl` traces (the format of `predictor::trace`).
    #[arg(long)]
    pub traces: PathBuf,
    /// First write the synthetic set (every workload, --seeds seeds from --first-seed) into --traces.
    #[arg(long)]
    pub generate_synthetic: bool,
    /// Seeds per workload for --generate-synthetic.
    #[arg(long, default_value_t = 2)]
    pub seeds: u64,
    /// First seed for --generate-synthetic (the published table uses 1).
    #[arg(long, default_value_t = 1)]
    pub first_seed: u64,
    /// Windows per generated trace.
    #[arg(long, default_value_t = synthetic::DEFAULT_WINDOWS)]
    pub windows: usize,
    /// Windows ahead the policy provisions for (1..=50).
    #[arg(long, default_value_t = 1)]
    pub horizon: usize,
    /// GRU weights (safetensors from `prescient train`); adds the recurrent forecaster.
    #[arg(long)]
    pub model: Option<PathBuf>,
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

/// VPA's recommender applied every window: P90 of a 24 h half-life histogram + 15 %,
/// clamped and aligned like the policy, without hysteresis.
struct Vpa {
    budget: Budget,
    hist: PerResource<DecayingHistogram>,
    allocation: Allocation,
}

impl Vpa {
    fn new(budget: Budget) -> Result<Self, ForecastError> {
        let h = || DecayingHistogram::new(PercentileConfig::vpa());
        Ok(Vpa {
            hist: PerResource {
                cpu: h()?,
                mem: h()?,
                blk: h()?,
                net: h()?,
            },
            allocation: budget.0.map(|_, l| l.initial),
            budget,
        })
    }
}

impl Allocator for Vpa {
    fn allocation(&self) -> Allocation {
        self.allocation
    }
    fn observe(&mut self, s: &Sample) {
        for r in Resource::ALL {
            let h = &mut self.hist[r];
            h.observe(s.usage[r]);
            if h.warm() {
                let l = self.budget.0[r];
                let rec = h.forecast(Horizon::ONE).upper.clamp(l.min, l.max);
                self.allocation[r] = ((rec / l.step).ceil() * l.step).min(l.max);
            }
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

/// Quality of one method on one resource, pooled over windows of every trace.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    pub windows: u64,
    slack_sum: f64,
    pub under: u64,
    /// Largest `(used - allocated) / allocated`.
    pub worst_shortfall: f64,
    pub resizes: u64,
    lead_sum: f64,
    pub leads: u64,
}

/// Grows more than this many windows before the demand they served are not counted as
/// leading it: by then they were for something else.
const LEAD_LOOKAHEAD: usize = 50;

impl Metrics {
    /// Adds one trace's series; `allocated[t]` is what was in force during window `t`.
    pub fn add(&mut self, used: &[f64], allocated: &[f64]) {
        for (&u, &a) in used.iter().zip(allocated) {
            self.windows += 1;
            let a = a.max(f64::MIN_POSITIVE);
            self.slack_sum += (a - u) / a;
            if u > a * (1.0 + 1e-9) {
                self.under += 1;
                self.worst_shortfall = self.worst_shortfall.max((u - a) / a);
            }
        }
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

    pub fn mean_slack(&self) -> f64 {
        self.slack_sum / self.windows.max(1) as f64
    }

    pub fn under_fraction(&self) -> f64 {
        self.under as f64 / self.windows.max(1) as f64
    }

    /// Mean windows by which grows preceded the demand they served (negative: late).
    pub fn mean_lead(&self) -> Option<f64> {
        (self.leads > 0).then(|| self.lead_sum / self.leads as f64)
    }
}

pub const STATIC: &str = "static";
pub const VPA: &str = "vpa-p90+15%";

/// Result of one evaluation: methods in table order, with metrics per resource.
#[derive(Clone, Debug)]
pub struct EvalReport {
    pub window_ms: u64,
    pub traces: usize,
    pub methods: Vec<(String, PerResource<Metrics>)>,
}

impl EvalReport {
    fn get(&self, name: &str) -> Option<&PerResource<Metrics>> {
        self.methods.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    /// The policy (not a baseline) with the least slack among those under-provisioning
    /// fewer than 1 % of windows on `r`.
    pub fn best(&self, r: Resource) -> Option<(&str, &Metrics)> {
        self.methods
            .iter()
            .filter(|(n, m)| n != STATIC && n != VPA && m[r].under_fraction() < 0.01)
            .min_by(|a, b| a.1[r].mean_slack().total_cmp(&b.1[r].mean_slack()))
            .map(|(n, m)| (n.as_str(), &m[r]))
    }

    pub fn write_table(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{} traces, {} ms windows; slack = mean (allocated - used) / allocated",
            self.traces, self.window_ms
        )?;
        for r in Resource::ALL {
            writeln!(out, "\n{} ({})", r.name(), r.unit())?;
            writeln!(
                out,
                "| {:<12} | {:>7} | {:>7} | {:>9} | {:>7} | {:>9} |",
                "method", "slack %", "under %", "worst %", "resizes", "lead ms"
            )?;
            writeln!(
                out,
                "|{:-<14}|{:->9}|{:->9}|{:->11}|{:->9}|{:->11}|",
                "", "", "", "", "", ""
            )?;
            for (name, m) in &self.methods {
                let m = &m[r];
                let lead = m.mean_lead().map_or("-".to_string(), |l| {
                    format!("{:.0}", l * self.window_ms as f64)
                });
                writeln!(
                    out,
                    "| {:<12} | {:>7.1} | {:>7.2} | {:>9.1} | {:>7} | {:>9} |",
                    name,
                    100.0 * m.mean_slack(),
                    100.0 * m.under_fraction(),
                    100.0 * m.worst_shortfall,
                    m.resizes,
                    lead
                )?;
            }
        }
        writeln!(
            out,
            "\nbest policy per resource (least slack with < 1 % under-provisioned) vs {VPA}"
        )?;
        for r in Resource::ALL {
            let vpa = self.get(VPA).map(|m| m[r]).unwrap_or_default();
            match self.best(r) {
                Some((name, m)) => writeln!(
                    out,
                    "{:<4} {:<10} slack {:>5.1} % under {:>5.2} %   vpa slack {:>5.1} % under {:>5.2} %",
                    r.name(),
                    name,
                    100.0 * m.mean_slack(),
                    100.0 * m.under_fraction(),
                    100.0 * vpa.mean_slack(),
                    100.0 * vpa.under_fraction()
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

/// What to evaluate besides the traces themselves.
pub struct EvalOptions {
    pub horizon: Horizon,
    pub presets: Vec<Preset>,
    /// Trace whose series `evaluate` hands to `on_series` (for plotting).
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
    let mut names = vec![STATIC.to_string(), VPA.to_string()];
    names.extend(opts.presets.iter().map(|p| p.name().to_string()));
    let mut metrics = vec![PerResource::<Metrics>::default(); names.len()];
    let mut kept = None;
    let cfg = PolicyConfig {
        horizon: opts.horizon,
        ..PolicyConfig::default()
    };
    for t in traces {
        let budget = Budget::from_capacity(&t.header.capacity);
        let mut allocators: Vec<Box<dyn Allocator>> =
            vec![Box::new(Static(budget.max())), Box::new(Vpa::new(budget)?)];
        for p in &opts.presets {
            let f = p.build_all(opts.horizon, &t.header.capacity)?;
            allocators.push(Box::new(Policy::new(budget, cfg, f)?));
        }
        let used = used(t);
        let series: Vec<_> = allocators
            .iter_mut()
            .map(|a| replay(a.as_mut(), t))
            .collect();
        for (m, s) in metrics.iter_mut().zip(&series) {
            for r in Resource::ALL {
                m[r].add(&used[r], &s[r]);
            }
        }
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
        traces: traces.len(),
        methods: names.into_iter().zip(metrics).collect(),
    };
    Ok((report, kept))
}

/// Entry point for the `prescient predictor eval` subcommand.
pub fn run(args: &EvalArgs, out: &mut dyn Write) -> Result<EvalReport, EvalError> {
    if args.generate_synthetic {
        let written =
            synthetic::write_set(&args.traces, args.first_seed, args.seeds, args.windows)?;
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
    let mut presets = Preset::CLASSICAL.to_vec();
    if let Some(m) = &args.model {
        presets.push(Preset::Recurrent(Arc::new(GruWeights::load(m)?)));
    }
    let opts = EvalOptions {
        horizon: Horizon::new(args.horizon)?,
        presets,
        keep: args.svg_out.as_ref().and(args.plot_trace.clone()),
    };
    let (report, kept) = evaluate(&traces, &opts)?;
    report.write_table(out)?;
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
    fn metrics_of_a_known_series() {
        let mut m = Metrics::default();
        //             t:   0     1     2     3     4     5
        let used = [5.0, 5.0, 9.0, 12.0, 12.0, 6.0];
        let alloc = [10.0, 10.0, 10.0, 10.0, 15.0, 10.0];
        m.add(&used, &alloc);
        assert_eq!(m.windows, 6);
        assert_eq!(m.under, 1);
        assert!((m.worst_shortfall - 0.2).abs() < 1e-12);
        let slack = (0.5 + 0.5 + 0.1 - 0.2 + 0.2 + 0.4) / 6.0;
        assert!((m.mean_slack() - slack).abs() < 1e-12);
        // One grow (t=4, one window late) and one shrink.
        assert_eq!(m.resizes, 2);
        assert_eq!(m.mean_lead(), Some(-1.0));
    }

    #[test]
    fn lead_counts_windows_before_demand() {
        let mut m = Metrics::default();
        let used = [5.0, 5.0, 5.0, 5.0, 11.0];
        let alloc = [10.0, 10.0, 12.0, 12.0, 12.0];
        m.add(&used, &alloc);
        assert_eq!(m.under, 0);
        assert_eq!(m.mean_lead(), Some(2.0));
    }

    fn quick(workloads: &[Workload]) -> (EvalReport, Option<KeptSeries>) {
        let traces: Vec<Trace> = workloads
            .iter()
            .map(|&w| synthetic::generate(w, 1, 600))
            .collect();
        let opts = EvalOptions {
            horizon: Horizon::ONE,
            presets: Preset::CLASSICAL.to_vec(),
            keep: Some("periodic-1".into()),
        };
        evaluate(&traces, &opts).unwrap()
    }

    #[test]
    fn baselines_and_policies_behave() {
        let (report, kept) = quick(&[Workload::Sustained, Workload::Periodic]);
        let names: Vec<&str> = report.methods.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [STATIC, VPA, "last", "ewma", "holt", "histogram"]);
        let stat = report.get(STATIC).unwrap();
        assert_eq!(stat.cpu.under, 0);
        assert_eq!(stat.cpu.resizes, 0);
        let holt = report.get("holt").unwrap();
        for r in Resource::ALL {
            assert!(holt[r].mean_slack() < stat[r].mean_slack(), "{r:?}");
        }
        assert_eq!(stat.mem.windows, 1200);
        let (name, used, series) = kept.unwrap();
        assert_eq!(name, "periodic-1");
        assert_eq!(used.cpu.len(), 600);
        assert_eq!(series.len(), 6);
        let mut text = Vec::new();
        report.write_table(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("| vpa-p90+15%  |") && text.contains("mem (MiB)"),
            "{text}"
        );
    }

    #[test]
    fn run_generates_and_plots() {
        let dir = std::env::temp_dir().join(format!("predictor-eval-{}", std::process::id()));
        let svg = dir.join("plot.svg");
        let args = EvalArgs {
            traces: dir.clone(),
            generate_synthetic: true,
            seeds: 1,
            first_seed: 1,
            windows: 300,
            horizon: 2,
            model: None,
            svg_out: Some(svg.clone()),
            plot_trace: Some("ramp-1".into()),
            decisions_out: None,
        };
        let mut out = Vec::new();
        let report = run(&args, &mut out).unwrap();
        assert_eq!(report.traces, 5);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("plot of ramp-1 written"), "{text}");
        assert!(std::fs::read_to_string(&svg).unwrap().contains("holt mem"));
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
            forecaster: ForecasterKind::Ewma,
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
            seeds: 1,
            first_seed: 1,
            windows: 300,
            horizon: 1,
            model: None,
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
