//! The predictor's decision step over fuzzed telemetry: any capacity, any window sequence (usage
//! as the VMM's counters can produce it: finite, not negative, possibly huge), every classical
//! forecaster. Every decision must stay inside the budget.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use predictor::forecast::{Horizon, Preset};
use predictor::policy::{Budget, Policy, PolicyConfig};
use predictor::resource::Usage;
use predictor::sample::{Sample, Signals};

#[derive(Arbitrary, Debug)]
struct Window {
    dt_ms: u16,
    usage: [u32; 4],
    scale: u8,
    io_ops: u64,
    unknown_exits: u64,
    devices: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    preset: u8,
    horizon: u8,
    capacity: [u16; 4],
    windows: Vec<Window>,
}

fn usage(v: [f64; 4]) -> Usage {
    Usage::from_fn(|r| v[r as usize])
}

fuzz_target!(|input: Input| {
    let capacity = usage(input.capacity.map(|c| f64::from(c.max(1))));
    let preset = &Preset::CLASSICAL[usize::from(input.preset) % Preset::CLASSICAL.len()];
    let horizon = Horizon::new(1 + usize::from(input.horizon) % Horizon::MAX).expect("in range");
    let forecasters = preset
        .build_all(horizon, &capacity)
        .expect("classical presets build");
    let cfg = PolicyConfig {
        horizon,
        ..PolicyConfig::default()
    };
    let budget = Budget::from_capacity(&capacity);
    let mut policy = Policy::new(budget, cfg, forecasters).expect("a valid budget");
    let max = budget.max();
    let mut t_ms = 0u64;
    for w in input.windows.iter().take(512) {
        t_ms += u64::from(w.dt_ms);
        // Counters divided by a window length: from fine fractions up to ~4e9 * 2^31.
        let scale = 2f64.powi(i32::from(w.scale % 64) - 32);
        let sample = Sample {
            t_ms,
            usage: usage(w.usage.map(|u| f64::from(u) * scale)),
            signals: Signals {
                io_ops: w.io_ops,
                unknown_exits: w.unknown_exits,
                devices: w.devices,
            },
        };
        let d = policy.decide(&sample);
        for (r, &a) in d.allocation.iter() {
            assert!(
                a.is_finite() && a >= 0.0 && a <= max[r] + 1e-6,
                "{r:?} allocation {a} outside [0, {}] after {sample:?}",
                max[r]
            );
        }
        assert!(d.behaviour.is_finite(), "behaviour score {}", d.behaviour);
    }
});
