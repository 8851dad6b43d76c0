//! Synthetic workloads for evaluating forecasters and policies without recorded runs.
//!
//! Each workload is a load shape `L(t)` in [0, 1] that drives all four resources of a
//! 4-core, 4 GiB VM with its own dynamics:
//!
//! | resource | model |
//! | --- | --- |
//! | cpu | `4 * L` cores, Gaussian noise of 3 % |
//! | mem | working set `512 + 2800 * L` MiB; the guest takes memory at once (30 % of the gap per window) and gives it back slowly (1 % per window), noise 0.5 % |
//! | blk | `150 * L` MiB/s, noise 5 % |
//! | net | `300 * L^1.2` MiB/s, noise 5 % |
//!
//! | workload | `L(t)` |
//! | --- | --- |
//! | sustained | 0.6 |
//! | periodic | `0.45 + 0.3 sin(2 pi t / 600)`: a one-minute cycle at 100 ms windows |
//! | ramp | 0.1 rising linearly to 0.85 over the first 70 % of the trace, then flat |
//! | phase-change | levels drawn from [0.15, 0.85], each held 300-900 windows, 5-window transitions |
//! | bursty | 0.2 base; bursts start with probability 1/250 per window, add 0.4-0.7, last 20-80 windows, ramp up and down over 8 windows |
//!
//! A second set, [`Workload::UNSEEN`], has shapes unlike those: nothing in the predictor was
//! chosen or tuned on it, and `prescient predictor eval --generate-synthetic --shapes unseen`
//! reports it beside the real-program test split.
//!
//! | workload | `L(t)` |
//! | --- | --- |
//! | sawtooth | climbs linearly from 0.1 to 0.9 over 100-400 windows, then drops to 0.1 at once (a heap filling up and collected, a batch accumulating and flushed) |
//! | random-walk | steps of N(0, 0.02) per window, pulled weakly (0.2 % per window) towards 0.5, kept in [0.05, 0.95] |
//! | heavy-tail | 0.1 base; spikes start with probability 1/50 per window, Pareto (shape 1.5) heights from 0.1 clipped to 0.85, 1-15 windows long, no ramp |
//! | square | 0.15 and 0.75 in turn, each held 50-150 windows, no transition |
//! | diurnal-spikes | `0.4 + 0.3 sin(2 pi t / 1500)` plus 1-3 window spikes of +0.3-0.5 with probability 1/100 per window |
//!
//! Everything is derived from the seed, so a seed reproduces a trace bit for bit.

use predictor::math;
use predictor::resource::Usage;
use predictor::rng::Rng;
use predictor::sample::{Sample, Signals};
use predictor::trace::{self, Header, Trace, TraceError};
use std::f64::consts::TAU;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SyntheticError {
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Trace(#[from] TraceError),
}

pub const WINDOW_MS: u64 = 100;
/// Five minutes of 100 ms windows.
pub const DEFAULT_WINDOWS: usize = 3000;
pub const CAPACITY: Usage = Usage {
    cpu: 4.0,
    mem: 4096.0,
    blk: 200.0,
    net: 400.0,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Bursty,
    Sustained,
    Periodic,
    Ramp,
    PhaseChange,
    Sawtooth,
    RandomWalk,
    HeavyTail,
    Square,
    DiurnalSpikes,
}

/// Which synthetic set to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Shapes {
    /// The generator's standard shapes (the set the classical presets were chosen on).
    #[default]
    Standard,
    /// Shapes nothing was tuned on.
    Unseen,
}

impl Shapes {
    pub fn workloads(self) -> &'static [Workload] {
        match self {
            Shapes::Standard => &Workload::ALL,
            Shapes::Unseen => &Workload::UNSEEN,
        }
    }
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Bursty,
        Workload::Sustained,
        Workload::Periodic,
        Workload::Ramp,
        Workload::PhaseChange,
    ];

    pub const UNSEEN: [Workload; 5] = [
        Workload::Sawtooth,
        Workload::RandomWalk,
        Workload::HeavyTail,
        Workload::Square,
        Workload::DiurnalSpikes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Bursty => "bursty",
            Workload::Sustained => "sustained",
            Workload::Periodic => "periodic",
            Workload::Ramp => "ramp",
            Workload::PhaseChange => "phase-change",
            Workload::Sawtooth => "unseen-sawtooth",
            Workload::RandomWalk => "unseen-random-walk",
            Workload::HeavyTail => "unseen-heavy-tail",
            Workload::Square => "unseen-square",
            Workload::DiurnalSpikes => "unseen-diurnal-spikes",
        }
    }
}

/// `L(t)` for the whole trace.
fn load(workload: Workload, windows: usize, rng: &mut Rng) -> Vec<f64> {
    match workload {
        Workload::Sustained => vec![0.6; windows],
        Workload::Periodic => (0..windows)
            .map(|t| 0.45 + 0.3 * math::sin(TAU * t as f64 / 600.0))
            .collect(),
        Workload::Ramp => {
            let end = (windows as f64 * 0.7).max(1.0);
            (0..windows)
                .map(|t| 0.1 + 0.75 * (t as f64 / end).min(1.0))
                .collect()
        }
        Workload::PhaseChange => {
            let mut out = Vec::with_capacity(windows);
            let mut level = rng.range(0.15, 0.85);
            while out.len() < windows {
                let next = rng.range(0.15, 0.85);
                let hold = rng.range(300.0, 900.0) as usize;
                out.extend(std::iter::repeat_n(level, hold));
                out.extend((1..=5).map(|i| level + (next - level) * i as f64 / 5.0));
                level = next;
            }
            out.truncate(windows);
            out
        }
        Workload::Bursty => {
            let mut extra = vec![0.0; windows];
            for t in 0..windows {
                if rng.unit() >= 1.0 / 250.0 {
                    continue;
                }
                let height = rng.range(0.4, 0.7);
                let len = rng.range(20.0, 80.0) as usize;
                for (i, e) in extra.iter_mut().skip(t).take(len).enumerate() {
                    let edge = ((i + 1).min(len - i) as f64 / 8.0).min(1.0);
                    *e = f64::max(*e, height * edge);
                }
            }
            extra.into_iter().map(|e| (0.2 + e).min(1.0)).collect()
        }
        Workload::Sawtooth => {
            let mut out = Vec::with_capacity(windows);
            while out.len() < windows {
                let len = rng.range(100.0, 400.0) as usize;
                out.extend((0..len).map(|i| 0.1 + 0.8 * i as f64 / len as f64));
            }
            out.truncate(windows);
            out
        }
        Workload::RandomWalk => {
            let mut l = 0.5;
            (0..windows)
                .map(|_| {
                    l = (l + 0.02 * rng.normal() + 0.002 * (0.5 - l)).clamp(0.05, 0.95);
                    l
                })
                .collect()
        }
        Workload::HeavyTail => {
            let mut extra = vec![0.0; windows];
            for t in 0..windows {
                if rng.unit() >= 1.0 / 50.0 {
                    continue;
                }
                let height = (0.1 * math::powf(rng.unit().max(1e-12), -1.0 / 1.5)).min(0.85);
                let len = rng.range(1.0, 16.0) as usize;
                for e in extra.iter_mut().skip(t).take(len) {
                    *e = f64::max(*e, height);
                }
            }
            extra.into_iter().map(|e| (0.1 + e).min(1.0)).collect()
        }
        Workload::Square => {
            let mut out = Vec::with_capacity(windows);
            let mut high = false;
            while out.len() < windows {
                let hold = rng.range(50.0, 150.0) as usize;
                out.extend(std::iter::repeat_n(if high { 0.75 } else { 0.15 }, hold));
                high = !high;
            }
            out.truncate(windows);
            out
        }
        Workload::DiurnalSpikes => {
            let mut out: Vec<f64> = (0..windows)
                .map(|t| 0.4 + 0.3 * math::sin(TAU * t as f64 / 1500.0))
                .collect();
            for t in 0..windows {
                if rng.unit() >= 1.0 / 100.0 {
                    continue;
                }
                let height = rng.range(0.3, 0.5);
                let len = rng.range(1.0, 4.0) as usize;
                for v in out.iter_mut().skip(t).take(len) {
                    *v = (*v + height).min(1.0);
                }
            }
            out
        }
    }
}

/// One synthetic trace of `windows` windows.
pub fn generate(workload: Workload, seed: u64, windows: usize) -> Trace {
    let mut rng = Rng::new(seed ^ (workload as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    let shape = load(workload, windows, &mut rng);
    let mut mem = 512.0 + 2800.0 * shape.first().copied().unwrap_or(0.0);
    let samples = shape
        .iter()
        .enumerate()
        .map(|(t, &l)| {
            let mut noisy =
                |v: f64, sd: f64, cap: f64| (v * (1.0 + sd * rng.normal())).clamp(0.0, cap);
            let target = 512.0 + 2800.0 * l;
            let rate = if target > mem { 0.3 } else { 0.01 };
            mem += rate * (target - mem);
            let usage = Usage {
                cpu: noisy(CAPACITY.cpu * l, 0.03, CAPACITY.cpu),
                mem: noisy(mem, 0.005, CAPACITY.mem),
                blk: noisy(150.0 * l, 0.05, CAPACITY.blk),
                net: noisy(300.0 * math::powf(l, 1.2), 0.05, CAPACITY.net),
            };
            Sample {
                t_ms: t as u64 * WINDOW_MS,
                usage,
                signals: Signals {
                    io_ops: ((usage.blk + usage.net) * 10.0) as u64,
                    unknown_exits: 0,
                    devices: 0b11,
                    ..Signals::default()
                },
            }
        })
        .collect();
    Trace {
        header: Header::new(format!("{}-{seed}", workload.name()), WINDOW_MS, CAPACITY),
        samples,
    }
}

/// Writes every workload for `seeds` consecutive seeds starting at `first_seed` into `dir`
/// as `<workload>-<seed>.jsonl` (different seeds give a held-out set, e.g. for training).
pub fn write_set(
    dir: &Path,
    shapes: Shapes,
    first_seed: u64,
    seeds: u64,
    windows: usize,
) -> Result<Vec<PathBuf>, SyntheticError> {
    std::fs::create_dir_all(dir).map_err(|source| SyntheticError::Dir {
        path: dir.into(),
        source,
    })?;
    let mut paths = Vec::new();
    for seed in first_seed..first_seed + seeds {
        for &w in shapes.workloads() {
            let t = generate(w, seed, windows);
            let path = dir.join(format!("{}.{}", t.header.name, trace::EXTENSION));
            trace::write(&path, &t)?;
            paths.push(path);
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use predictor::resource::Resource;

    fn mean(t: &Trace, r: Resource, range: std::ops::Range<usize>) -> f64 {
        let n = range.len() as f64;
        t.samples[range].iter().map(|s| s.usage[r]).sum::<f64>() / n
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        for w in Workload::ALL.into_iter().chain(Workload::UNSEEN) {
            assert_eq!(generate(w, 3, 500), generate(w, 3, 500), "{w:?}");
            assert_ne!(generate(w, 3, 500), generate(w, 4, 500), "{w:?}");
        }
    }

    #[test]
    fn values_stay_within_capacity() {
        for w in Workload::ALL.into_iter().chain(Workload::UNSEEN) {
            let t = generate(w, 1, 2000);
            assert_eq!(t.samples.len(), 2000);
            for s in &t.samples {
                for (r, v) in s.usage.iter() {
                    assert!(*v >= 0.0 && *v <= CAPACITY[r], "{w:?} {r:?} {v}");
                }
            }
        }
    }

    #[test]
    fn shapes_have_their_character() {
        let sustained = generate(Workload::Sustained, 1, 1000);
        assert!((mean(&sustained, Resource::Cpu, 0..1000) - 2.4).abs() < 0.05);
        let ramp = generate(Workload::Ramp, 1, 1000);
        assert!(mean(&ramp, Resource::Cpu, 600..700) > 2.0 * mean(&ramp, Resource::Cpu, 0..100));
        let periodic = generate(Workload::Periodic, 1, 1200);
        // Peak (t = 150) against trough (t = 450) of the one-minute cycle.
        assert!(
            mean(&periodic, Resource::Cpu, 140..160)
                > 2.5 * mean(&periodic, Resource::Cpu, 440..460)
        );
        let bursty = generate(Workload::Bursty, 1, 3000);
        let above = bursty.samples.iter().filter(|s| s.usage.cpu > 1.6).count();
        assert!(above > 30 && above < 1500, "{above} burst windows");
        let phases = generate(Workload::PhaseChange, 1, 3000);
        let jumps = phases
            .samples
            .windows(50)
            .filter(|w| (w[49].usage.cpu - w[0].usage.cpu).abs() > 0.4)
            .count();
        assert!(jumps > 0);
    }

    #[test]
    fn memory_is_released_slower_than_taken() {
        let t = generate(Workload::PhaseChange, 2, 3000);
        let (mut up, mut down) = (0.0f64, 0.0f64);
        for w in t.samples.windows(2) {
            let d = w[1].usage.mem - w[0].usage.mem;
            up = up.max(d);
            down = down.max(-d);
        }
        assert!(up > 2.0 * down, "largest rise {up}, largest fall {down}");
    }

    #[test]
    fn write_set_names_files_by_workload_and_seed() {
        let dir = std::env::temp_dir().join(format!("predictor-synth-{}", std::process::id()));
        let paths = write_set(&dir, Shapes::Standard, 1, 1, 50).unwrap();
        assert_eq!(paths.len(), Workload::ALL.len());
        assert!(paths[0].ends_with("bursty-1.jsonl"));
        assert_eq!(
            trace::read(&paths[2]).unwrap(),
            generate(Workload::Periodic, 1, 50)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
