//! `prescient train`: fits the GRU forecaster with libtorch (through `tch`) and writes
//! its weights as safetensors for the plain-Rust inference in
//! [`predictor::forecast::recurrent`]. Only built with the `torch` feature.

use predictor::forecast::recurrent::{features, GruWeights, RecurrentError, INPUTS};
use predictor::forecast::Horizon;
use predictor::resource::Resource;
use predictor::trace::{self, Trace, TraceError};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::nn::{self, Module, OptimizerConfig, RNN};
use tch::{Device, Kind, Reduction, Tensor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("no *.jsonl traces in {0}")]
    NoTraces(PathBuf),
    #[error("no trace is longer than {needed} windows (sequence length + horizons)")]
    TooShort { needed: usize },
    #[error("--horizons must be 1..={max}, got {0}", max = Horizon::MAX)]
    Horizons(usize),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("trained model has no variable {0}")]
    MissingVariable(&'static str),
    #[error(transparent)]
    Weights(#[from] RecurrentError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Arguments of `prescient train`.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    /// Directory of `*.jsonl` traces to learn from.
    #[arg(long)]
    pub traces: PathBuf,
    /// Where to write the safetensors weights.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub hidden: usize,
    /// Horizons the head predicts (1..=50); forecasts further out reuse the last.
    #[arg(long, default_value_t = 5)]
    pub horizons: usize,
    /// Windows per training sequence.
    #[arg(long, default_value_t = 100)]
    pub seq_len: usize,
    /// Optimiser steps (mini-batches of 64 sequences).
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

/// GRU and head laid out so that the variable names are `gru.*_l0` and `head.*`.
struct Net {
    gru: nn::GRU,
    head: nn::Linear,
}

impl Net {
    fn new(root: &nn::Path, hidden: usize, outputs: usize) -> Net {
        Net {
            gru: nn::gru(
                root / "gru",
                INPUTS as i64,
                hidden as i64,
                Default::default(),
            ),
            head: nn::linear(
                root / "head",
                hidden as i64,
                outputs as i64,
                Default::default(),
            ),
        }
    }

    /// `x`: [batch, time, INPUTS] -> [batch, time, outputs].
    fn forward(&self, x: &Tensor) -> Tensor {
        let (out, _) = self.gru.seq(x);
        self.head.forward(&out)
    }
}

fn export(vs: &nn::VarStore, hidden: usize, outputs: usize) -> Result<GruWeights, TrainError> {
    let vars = vs.variables();
    let get = |name: &'static str| -> Result<Vec<f32>, TrainError> {
        let t = vars.get(name).ok_or(TrainError::MissingVariable(name))?;
        Ok(Vec::<f32>::try_from(
            &t.flatten(0, -1).to_kind(Kind::Float),
        )?)
    };
    Ok(GruWeights {
        hidden,
        outputs,
        w_ih: get("gru.weight_ih_l0")?,
        w_hh: get("gru.weight_hh_l0")?,
        b_ih: get("gru.bias_ih_l0")?,
        b_hh: get("gru.bias_hh_l0")?,
        head_w: get("head.weight")?,
        head_b: get("head.bias")?,
    })
}

/// Cuts every resource of every trace into sequences of `seq_len` windows with the
/// features the inference computes and the normalised changes `k` windows ahead.
fn dataset(traces: &[Trace], seq_len: usize, k: usize) -> Result<(Tensor, Tensor), TrainError> {
    let (mut xs, mut ys, mut n) = (Vec::new(), Vec::new(), 0i64);
    for t in traces {
        for r in Resource::ALL {
            let cap = t.header.capacity[r].max(f64::MIN_POSITIVE);
            let v: Vec<f64> = t.samples.iter().map(|s| s.usage[r]).collect();
            let mut start = 0;
            while start + seq_len + k <= v.len() {
                for i in start..start + seq_len {
                    xs.extend(features(v[i], v[i.saturating_sub(1)], cap));
                    ys.extend((1..=k).map(|j| ((v[i + j] - v[i]) / cap) as f32));
                }
                n += 1;
                start += seq_len;
            }
        }
    }
    if n == 0 {
        return Err(TrainError::TooShort {
            needed: seq_len + k,
        });
    }
    let (t, k) = (seq_len as i64, k as i64);
    Ok((
        Tensor::from_slice(&xs).reshape([n, t, INPUTS as i64]),
        Tensor::from_slice(&ys).reshape([n, t, k]),
    ))
}

/// Entry point for `prescient train`.
pub fn run(args: &TrainArgs, out: &mut dyn Write) -> Result<GruWeights, TrainError> {
    if !(1..=Horizon::MAX).contains(&args.horizons) {
        return Err(TrainError::Horizons(args.horizons));
    }
    let paths = trace::list(&args.traces)?;
    if paths.is_empty() {
        return Err(TrainError::NoTraces(args.traces.clone()));
    }
    let traces = paths
        .iter()
        .map(|p| trace::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (xs, ys) = dataset(&traces, args.seq_len, args.horizons)?;
    tch::manual_seed(args.seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root(), args.hidden, args.horizons);
    let mut opt = nn::adam(0.9, 0.999, 0.0).build(&vs, args.lr)?;
    let n = xs.size()[0];
    let started = Instant::now();
    let loss_of = |x: &Tensor, y: &Tensor| net.forward(x).mse_loss(y, Reduction::Mean);
    let first = f64::try_from(tch::no_grad(|| loss_of(&xs, &ys)))?;
    for _ in 0..args.steps {
        let idx = Tensor::randint(n, [64.min(n)], (Kind::Int64, Device::Cpu));
        let loss = loss_of(&xs.index_select(0, &idx), &ys.index_select(0, &idx));
        opt.backward_step(&loss);
    }
    let last = f64::try_from(tch::no_grad(|| loss_of(&xs, &ys)))?;
    let weights = export(&vs, args.hidden, args.horizons)?;
    std::fs::write(&args.out, weights.to_safetensors()?).map_err(|source| TrainError::Write {
        path: args.out.clone(),
        source,
    })?;
    writeln!(
        out,
        "{n} sequences from {} traces; mse {first:.3e} -> {last:.3e} in {} steps ({:.1} s); wrote {}",
        traces.len(),
        args.steps,
        started.elapsed().as_secs_f64(),
        args.out.display()
    )?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    #[test]
    fn plain_rust_cell_matches_tch() {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), 8, 3);
        // tch starts biases at zero; randomise them so they are compared too.
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if name.contains("bias") {
                    t.copy_(&Tensor::randn_like(&t));
                }
            }
        });
        let x = Tensor::randn([1, 25, INPUTS as i64], (Kind::Float, Device::Cpu));
        let expected = Vec::<f32>::try_from(&net.forward(&x).flatten(0, -1)).unwrap();
        let xs = Vec::<f32>::try_from(&x.flatten(0, -1)).unwrap();

        let w = export(&vs, 8, 3).unwrap();
        let w = GruWeights::from_safetensors(&w.to_safetensors().unwrap()).unwrap();
        let (mut h, mut scratch, mut out) = (vec![0.0; 8], vec![0.0; 48], vec![0.0; 3]);
        for (t, step) in xs.chunks_exact(INPUTS).enumerate() {
            w.step(&[step[0], step[1]], &mut h, &mut scratch);
            w.head(&h, &mut out);
            for (j, o) in out.iter().enumerate() {
                let e = expected[t * 3 + j];
                assert!((o - e).abs() < 1e-5, "t={t} j={j}: rust {o} tch {e}");
            }
        }
    }

    #[test]
    fn training_lowers_loss_and_writes_loadable_weights() {
        let dir = std::env::temp_dir().join(format!("predictor-train-{}", std::process::id()));
        synthetic::write_set(&dir, synthetic::Shapes::Standard, 1, 1, 300).unwrap();
        let model = dir.join("model.safetensors");
        let args = TrainArgs {
            traces: dir.clone(),
            out: model.clone(),
            hidden: 8,
            horizons: 2,
            seq_len: 50,
            steps: 30,
            lr: 0.01,
            seed: 1,
        };
        let mut report = Vec::new();
        let w = run(&args, &mut report).unwrap();
        assert_eq!(GruWeights::load(&model).unwrap(), w);
        let text = String::from_utf8(report).unwrap();
        let mse: Vec<f64> = text
            .split("mse ")
            .nth(1)
            .unwrap()
            .split(" in ")
            .next()
            .unwrap()
            .split(" -> ")
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(mse[1] < mse[0], "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
