//! `prescient report TRACE`: one trace's used vs allocated vs forecast per resource over time,
//! as the policy that recorded it (or, for traces without one, the default policy) saw it.

use crate::eval::{replay_recorded, EvalError};
use crate::plot::{self, PlotError, Series};
use predictor::policy::{Budget, Decision, PolicyConfig};
use predictor::resource::{PerResource, Resource};
use predictor::spec::{ForecasterKind, PolicySpec, SpecError};
use predictor::trace::{self, Trace, TraceError};
use std::io::Write;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReportError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Replay(#[from] EvalError),
    #[error("building the default policy: {0}")]
    Policy(#[from] SpecError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("writing the summary: {0}")]
    Output(#[from] std::io::Error),
}

// Arguments of `prescient report`.
// Not a doc comment: clap would take it as the subcommand's description, over the
// one on `prescient`'s list of tools (whose arguments are defined late, main.rs).
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// A trace (`*.jsonl`), e.g. one the VMM recorded to its predictor `trace_path`.
    pub trace: PathBuf,
    /// Where the SVG goes.
    #[arg(long, default_value = "report.svg")]
    pub out: PathBuf,
}

/// Every window's decision: the recorded policy's, or the default policy's.
fn decisions(t: &Trace) -> Result<(String, Vec<Decision>), ReportError> {
    if let Some(d) = replay_recorded(t)? {
        return Ok(("recorded policy".to_string(), d));
    }
    let spec = PolicySpec {
        forecaster: ForecasterKind::default(),
        model_path: None,
        budget: Budget::from_capacity(&t.header.capacity),
        config: PolicyConfig::default(),
    };
    let mut p = spec.build()?;
    let d = t.samples.iter().map(|s| p.decide(s)).collect();
    Ok(("the default policy (the trace names none)".to_string(), d))
}

pub fn run(args: &ReportArgs, out: &mut dyn Write) -> Result<(), ReportError> {
    let t = trace::read(&args.trace)?;
    let (policy, decisions) = decisions(&t)?;
    let series = |f: &dyn Fn(&Decision, Resource) -> f64| {
        PerResource::from_fn(|r| decisions.iter().map(|d| f(d, r)).collect::<Vec<_>>())
    };
    let used = series(&|d, r| d.inputs.usage[r]);
    let allocated = series(&|d, r| d.allocation[r]);
    let forecast = series(&|d, r| d.forecast[r].upper);
    plot::plot(
        &args.out,
        &t.header.name,
        t.header.window_ms,
        &used,
        &[Series {
            method: "allocated",
            allocated: &allocated,
            forecast: Some(&forecast),
        }],
    )?;
    writeln!(
        out,
        "{}: {} windows of {} ms, {policy}; plot written to {}",
        t.header.name,
        decisions.len(),
        t.header.window_ms,
        args.out.display()
    )?;
    for r in Resource::ALL {
        let n = used[r].len().max(1) as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
        let under = used[r]
            .iter()
            .zip(&allocated[r])
            .filter(|(u, a)| u > a)
            .count();
        writeln!(
            out,
            "{:<4} used {:>9.2} allocated {:>9.2} {} (means), {} windows under-provisioned",
            r.name(),
            mean(&used[r]),
            mean(&allocated[r]),
            r.unit(),
            under
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{generate, Workload};

    #[test]
    fn renders_a_trace_with_and_without_a_recorded_policy() {
        let dir = std::env::temp_dir().join(format!("predictor-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut t = generate(Workload::Ramp, 1, 200);
        let path = dir.join("ramp.jsonl");
        trace::write(&path, &t).unwrap();
        let args = ReportArgs {
            trace: path.clone(),
            out: dir.join("r.svg"),
        };
        let mut out = Vec::new();
        run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("200 windows of 100 ms, the default policy"),
            "{text}"
        );
        assert!(text.contains("mem  used"), "{text}");
        let svg = std::fs::read_to_string(dir.join("r.svg")).unwrap();
        assert!(svg.contains("allocated mem (MiB)"));

        t.header.policy = Some(predictor::spec::PolicySpec {
            forecaster: predictor::spec::ForecasterKind::Last,
            model_path: None,
            budget: Budget::from_capacity(&t.header.capacity),
            config: PolicyConfig::default(),
        });
        trace::write(&path, &t).unwrap();
        let mut out = Vec::new();
        run(&args, &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("recorded policy"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
