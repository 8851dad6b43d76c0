//! A small GRU forecaster whose inference is plain Rust over weights from a safetensors
//! file (written by `prescient train`, see the `train` module behind the `torch` feature).
//!
//! Tensor names and layouts are PyTorch's `nn.GRU` (gate order r, z, n) plus a linear
//! head, so weights exported from tch load unchanged.

use super::{BandConfig, Banded, ForecastError, Horizon, PointModel};
use crate::math;
use crate::persist::{same_len, Persist};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// Inputs per step: level and change, both divided by the resource's capacity.
pub const INPUTS: usize = 2;
/// Recorded in the file so weights trained on other features are refused, not misused.
pub const FEATURES: &str = "level/capacity,delta/capacity;out=delta_k/capacity";
const FEATURES_KEY: &str = "prescient.features";

pub const W_IH: &str = "gru.weight_ih";
pub const W_HH: &str = "gru.weight_hh";
pub const B_IH: &str = "gru.bias_ih";
pub const B_HH: &str = "gru.bias_hh";
pub const HEAD_W: &str = "head.weight";
pub const HEAD_B: &str = "head.bias";

#[derive(Debug, Error)]
pub enum RecurrentError {
    #[error("reading weights from {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("safetensors: {0}")]
    Format(#[from] SafeTensorError),
    #[error("tensor {name} is {got:?}, expected F32")]
    Dtype { name: &'static str, got: Dtype },
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    Shape {
        name: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("weights were trained on features {got:?}, this build computes {FEATURES:?}")]
    Features { got: String },
    #[error("the head predicts {0} horizons; 1..={max} are supported", max = Horizon::MAX)]
    Outputs(usize),
    #[error(transparent)]
    Band(#[from] ForecastError),
}

/// Features for one step; shared with the trainer so both sides agree.
pub fn features(value: f64, previous: f64, capacity: f64) -> [f32; INPUTS] {
    [
        (value / capacity) as f32,
        ((value - previous) / capacity) as f32,
    ]
}

/// Serialises named f32 tensors with the feature tag in the metadata.
pub fn write_tensors(tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<Vec<u8>, RecurrentError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), data)| Ok((*n, TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, SafeTensorError>>()?;
    let meta = HashMap::from([(FEATURES_KEY.to_string(), FEATURES.to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// GRU cell plus linear head, row-major like PyTorch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GruWeights {
    pub hidden: usize,
    pub outputs: usize,
    pub w_ih: Vec<f32>,
    pub w_hh: Vec<f32>,
    pub b_ih: Vec<f32>,
    pub b_hh: Vec<f32>,
    pub head_w: Vec<f32>,
    pub head_b: Vec<f32>,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + math::expf(-x))
}

/// `out = m * v + b` for a row-major `m` of `out.len()` rows.
fn affine(m: &[f32], v: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, row), bias) in out.iter_mut().zip(m.chunks_exact(v.len())).zip(b) {
        *o = bias + dot(row, v);
    }
}

/// Eight independent partial sums: a single running f32 sum is a serial dependency chain
/// the compiler may not reorder, which made the GRU step several times slower.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl GruWeights {
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, RecurrentError> {
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        if let Some(got) = meta.metadata().as_ref().and_then(|m| m.get(FEATURES_KEY)) {
            if got != FEATURES {
                return Err(RecurrentError::Features { got: got.clone() });
            }
        }
        let st = SafeTensors::deserialize(bytes)?;
        let read = |name: &'static str, expected: &[Option<usize>]| {
            let t = st.tensor(name)?;
            if t.dtype() != Dtype::F32 {
                return Err(RecurrentError::Dtype {
                    name,
                    got: t.dtype(),
                });
            }
            let fits = t.shape().len() == expected.len()
                && t.shape()
                    .iter()
                    .zip(expected)
                    .all(|(g, e)| e.is_none_or(|e| e == *g));
            if !fits {
                return Err(RecurrentError::Shape {
                    name,
                    got: t.shape().to_vec(),
                    expected: expected.iter().map(|e| e.unwrap_or(0)).collect(),
                });
            }
            let data: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((t.shape().to_vec(), data))
        };
        // The hidden size is whatever the recurrent weight says; every other shape
        // follows from it and the fixed input count.
        let hidden = st.tensor(W_HH)?.shape().get(1).copied().unwrap_or(0);
        let gates = Some(3 * hidden);
        let (head_shape, head_w) = read(HEAD_W, &[None, Some(hidden)])?;
        let outputs = head_shape[0];
        if !(1..=Horizon::MAX).contains(&outputs) {
            return Err(RecurrentError::Outputs(outputs));
        }
        let w = GruWeights {
            hidden,
            outputs,
            w_ih: read(W_IH, &[gates, Some(INPUTS)])?.1,
            w_hh: read(W_HH, &[gates, Some(hidden)])?.1,
            b_ih: read(B_IH, &[gates])?.1,
            b_hh: read(B_HH, &[gates])?.1,
            head_w,
            head_b: read(HEAD_B, &[Some(outputs)])?.1,
        };
        Ok(w)
    }

    /// The model shipped in the binary (`models/gru-real.safetensors`, 4.7 KB): trained with
    /// `prescient train` on the real corpus's training split and synthetic seeds 101-104.
    pub fn shipped() -> Result<Self, RecurrentError> {
        Self::from_safetensors(include_bytes!("../../models/gru-real.safetensors"))
    }

    pub fn load(path: &Path) -> Result<Self, RecurrentError> {
        let bytes = std::fs::read(path).map_err(|source| RecurrentError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors(&bytes)
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>, RecurrentError> {
        let g = 3 * self.hidden;
        write_tensors(&[
            (W_IH, vec![g, INPUTS], &self.w_ih),
            (W_HH, vec![g, self.hidden], &self.w_hh),
            (B_IH, vec![g], &self.b_ih),
            (B_HH, vec![g], &self.b_hh),
            (HEAD_W, vec![self.outputs, self.hidden], &self.head_w),
            (HEAD_B, vec![self.outputs], &self.head_b),
        ])
    }

    /// One GRU step in place. `scratch` must hold `6 * hidden` values.
    pub fn step(&self, x: &[f32; INPUTS], h: &mut [f32], scratch: &mut [f32]) {
        let n = self.hidden;
        let (gi, gh) = scratch.split_at_mut(3 * n);
        affine(&self.w_ih, x, &self.b_ih, gi);
        affine(&self.w_hh, h, &self.b_hh, &mut gh[..3 * n]);
        for j in 0..n {
            let r = sigmoid(gi[j] + gh[j]);
            let z = sigmoid(gi[n + j] + gh[n + j]);
            let c = math::tanhf(gi[2 * n + j] + r * gh[2 * n + j]);
            h[j] = (1.0 - z) * c + z * h[j];
        }
    }

    pub fn head(&self, h: &[f32], out: &mut [f32]) {
        affine(&self.head_w, h, &self.head_b, out);
    }
}

/// The GRU as a [`PointModel`]; the hidden state persists across windows. A snapshot holds
/// its weights too (a few KiB): the hidden state means something only with them.
#[derive(Serialize, Deserialize)]
pub struct RecurrentModel {
    weights: Arc<GruWeights>,
    capacity: f64,
    h: Vec<f32>,
    scratch: Vec<f32>,
    out: Vec<f32>,
    last: Option<f64>,
}

impl RecurrentModel {
    /// `capacity` normalises the series the same way the trainer did (the trace header's
    /// capacity for that resource).
    pub fn new(weights: Arc<GruWeights>, capacity: f64) -> Self {
        RecurrentModel {
            h: vec![0.0; weights.hidden],
            scratch: vec![0.0; 6 * weights.hidden],
            out: vec![0.0; weights.outputs],
            weights,
            capacity: capacity.max(f64::MIN_POSITIVE),
            last: None,
        }
    }
}

impl Persist for RecurrentModel {
    fn fits(&self, _fresh: &Self) -> Result<(), String> {
        let w = &self.weights;
        let (n, g) = (w.hidden, 3 * w.hidden);
        for (what, saved, need) in [
            ("GRU input weights", w.w_ih.len(), g * INPUTS),
            ("GRU recurrent weights", w.w_hh.len(), g * n),
            ("GRU input biases", w.b_ih.len(), g),
            ("GRU recurrent biases", w.b_hh.len(), g),
            ("GRU head weights", w.head_w.len(), w.outputs * n),
            ("GRU head biases", w.head_b.len(), w.outputs),
            ("GRU hidden state", self.h.len(), n),
            ("GRU scratch", self.scratch.len(), 6 * n),
            ("GRU outputs", self.out.len(), w.outputs),
        ] {
            same_len(what, saved, need)?;
        }
        if !(1..=Horizon::MAX).contains(&w.outputs) {
            return Err(format!("GRU with {} outputs", w.outputs));
        }
        Ok(())
    }
}

impl PointModel for RecurrentModel {
    fn name(&self) -> &'static str {
        "gru"
    }

    fn update(&mut self, value: f64) {
        let x = features(value, self.last.unwrap_or(value), self.capacity);
        self.weights.step(&x, &mut self.h, &mut self.scratch);
        self.weights.head(&self.h, &mut self.out);
        self.last = Some(value);
    }

    fn point(&self, h: Horizon) -> f64 {
        let k = h.get().min(self.out.len()) - 1;
        self.last.unwrap_or(0.0) + f64::from(self.out[k]) * self.capacity
    }
}

pub type Recurrent = Banded<RecurrentModel>;

impl Recurrent {
    pub fn with_weights(
        weights: Arc<GruWeights>,
        capacity: f64,
        band: BandConfig,
    ) -> Result<Self, RecurrentError> {
        Ok(Banded::new(RecurrentModel::new(weights, capacity), band)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::Forecaster;

    /// One hidden unit; the expected values were computed by hand from PyTorch's GRU
    /// equations (see the module docs).
    fn tiny() -> GruWeights {
        GruWeights {
            hidden: 1,
            outputs: 1,
            w_ih: vec![0.3, 0.0, 0.0, 0.0, 1.0, 0.0],
            w_hh: vec![1.0, 1.0, 1.0],
            b_ih: vec![0.0; 3],
            b_hh: vec![0.0, 0.0, 0.5],
            head_w: vec![-2.0],
            head_b: vec![0.25],
        }
    }

    #[test]
    fn cell_matches_reference_equations() {
        let w = tiny();
        let (mut h, mut s, mut out) = ([0.0f32], [0.0f32; 6], [0.0f32]);
        w.step(&[1.0, 0.0], &mut h, &mut s);
        assert!((h[0] - 0.429_198_5).abs() < 1e-6, "{}", h[0]);
        w.step(&[0.0, 0.0], &mut h, &mut s);
        assert!((h[0] - 0.461_080_2).abs() < 1e-6, "{}", h[0]);
        w.head(&h, &mut out);
        assert!((out[0] + 0.672_160_4).abs() < 1e-6, "{}", out[0]);
    }

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (1..=19).map(|x| x as f32).collect();
        let b = vec![2.0f32; 19];
        assert_eq!(dot(&a, &b), 380.0);
        assert_eq!(dot(&a[..3], &b[..3]), 12.0);
    }

    #[test]
    fn safetensors_round_trip() {
        let w = tiny();
        let bytes = w.to_safetensors().unwrap();
        assert_eq!(GruWeights::from_safetensors(&bytes).unwrap(), w);
    }

    #[test]
    fn wrong_shape_is_refused() {
        let w = tiny();
        let bad_head = [0.0f32, 1.0];
        let bytes = write_tensors(&[
            (W_IH, vec![3, INPUTS], &w.w_ih),
            (W_HH, vec![3, 1], &w.w_hh),
            (B_IH, vec![3], &w.b_ih),
            (B_HH, vec![3], &w.b_hh),
            (HEAD_W, vec![1, 1], &w.head_w),
            (HEAD_B, vec![2], &bad_head),
        ])
        .unwrap();
        let err = GruWeights::from_safetensors(&bytes).unwrap_err();
        assert!(
            matches!(err, RecurrentError::Shape { name: HEAD_B, .. }),
            "{err}"
        );
    }

    #[test]
    fn other_features_are_refused() {
        let mut bytes = tiny().to_safetensors().unwrap();
        let at = bytes
            .windows(FEATURES.len())
            .position(|w| w == FEATURES.as_bytes())
            .unwrap();
        bytes[at] = b'X';
        let err = GruWeights::from_safetensors(&bytes).unwrap_err();
        assert!(matches!(err, RecurrentError::Features { .. }), "{err}");
    }

    /// The model trained on the real corpus's training split and synthetic seeds, shipped in
    /// the binary for the default ensemble's memory expert.
    #[test]
    fn shipped_model_loads_and_follows_a_level() {
        let w = Arc::new(GruWeights::shipped().unwrap());
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gru-real.safetensors");
        assert_eq!(*w, GruWeights::load(&path).unwrap());
        assert_eq!((w.hidden, w.outputs), (16, 5));
        let mut f = Recurrent::with_weights(w, 4.0, BandConfig::default()).unwrap();
        for _ in 0..200 {
            f.observe(2.0);
        }
        // A flat series should be forecast as (nearly) flat.
        let fc = f.forecast(Horizon::new(5).unwrap());
        assert!((fc.point - 2.0).abs() < 0.1, "{fc:?}");
        assert!(f.warm());
    }

    #[test]
    fn forecasts_delta_scaled_by_capacity() {
        let w = Arc::new(tiny());
        let mut f = Recurrent::with_weights(Arc::clone(&w), 10.0, BandConfig::default()).unwrap();
        f.observe(10.0);
        // Features (1, 0) give h = 0.4292 and a predicted change of (0.25 - 2h) * 10.
        let expected = 10.0 + f64::from(0.25f32 - 2.0 * 0.429_198_5) * 10.0;
        let fc = f.forecast(Horizon::new(5).unwrap());
        assert!((fc.point - expected).abs() < 1e-4, "{fc:?}");
    }
}
