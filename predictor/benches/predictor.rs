//! `cargo bench -p predictor`: cost of the per-exit recorder and of one decision window
//! (collect every vCPU's counters, reduce to a sample, run the policy).

use predictor::forecast::{GruWeights, Horizon, Preset};
use predictor::policy::{Budget, Policy, PolicyConfig};
use predictor::resource::Usage;
use predictor::telemetry::{
    Access, Collector, DeviceId, DeviceKind, DeviceTotals, ExitKind, ExitRecorder, KvmVcpuStats,
    MemorySample, Target, WindowInputs, DEFAULT_WINDOW,
};
use std::hint::black_box;
use std::time::Instant;

fn per_exit_ns() -> f64 {
    let (mut rec, totals) = ExitRecorder::new();
    let dev = Target::Device(DeviceId::new(1).expect("device id"));
    let kinds = [
        ExitKind::Mmio(Access::Write, dev),
        ExitKind::Io(Access::Read, dev),
        ExitKind::Hlt,
        ExitKind::Io(Access::Write, Target::Unknown),
    ];
    let n = 50_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        rec.record(black_box(kinds[(i & 3) as usize]));
    }
    assert_eq!(totals.counts().total(), n);
    start.elapsed().as_nanos() as f64 / n as f64
}

fn per_window_us(vcpus: usize, preset: &Preset) -> f64 {
    let capacity = Usage {
        cpu: vcpus as f64,
        mem: 4096.0,
        blk: 200.0,
        net: 400.0,
    };
    let mut c = Collector::new(DEFAULT_WINDOW, 0).expect("collector");
    let mut recs: Vec<_> = (0..vcpus)
        .map(|_| {
            let (rec, totals) = ExitRecorder::new();
            c.add_vcpu(&totals);
            rec
        })
        .collect();
    let kinds = [
        (0, DeviceKind::Block),
        (1, DeviceKind::Net),
        (2, DeviceKind::Vsock),
    ];
    for &(i, k) in &kinds {
        c.add_device(DeviceId::new(i).expect("device id"), k)
            .expect("device");
    }
    let mut devs = [DeviceTotals::default(); 3];
    let forecasters = preset
        .build_all(Horizon::new(5).expect("horizon"), &capacity)
        .expect("forecasters");
    let mut policy = Policy::new(
        Budget::from_capacity(&capacity),
        PolicyConfig::default(),
        forecasters,
    )
    .expect("policy");
    let mut kvm = vec![KvmVcpuStats::default(); vcpus];
    let mut cpu_ns = vec![0u64; vcpus];
    let windows = 20_000u64;
    let mut spent = std::time::Duration::ZERO;
    for w in 1..=windows {
        // Traffic between windows is the vCPU threads' cost, not the window's: untimed.
        for (i, r) in recs.iter_mut().enumerate() {
            r.record(ExitKind::Hlt);
            r.record(ExitKind::Mmio(
                Access::Write,
                Target::Device(DeviceId::new((i % 3) as u8).expect("id")),
            ));
        }
        for d in &mut devs {
            d.ops += 1;
            d.read_bytes += 4096 * (w % 7);
            d.written_bytes += 512;
        }
        for (k, t) in kvm.iter_mut().zip(cpu_ns.iter_mut()) {
            k.exits += 2;
            *t += 30_000_000 + (w % 13) * 1_000_000;
        }
        let memory = MemorySample {
            host_rss: 1000.0 + (w % 50) as f64,
            plugged: 2048.0,
            ..Default::default()
        };
        let now = w * 100_000_000;
        let start = Instant::now();
        let window = c
            .close(
                now,
                &WindowInputs {
                    kvm: &kvm,
                    cpu_ns: &cpu_ns,
                    devices: &devs,
                    memory,
                },
            )
            .expect("close");
        let sample = window.sample();
        black_box(policy.decide(&sample));
        spent += start.elapsed();
    }
    spent.as_nanos() as f64 / windows as f64 / 1000.0
}

fn main() {
    // `cargo test --all-targets` also runs this binary, without `--bench`: skip the timing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!("| measurement | value | target |");
    println!("| --- | --- | --- |");
    println!("| recorder, per exit | {:.2} ns | < 20 ns |", per_exit_ns());
    let gru = std::sync::Arc::new(GruWeights::shipped().expect("shipped model"));
    let mut presets: Vec<(String, Preset)> = Preset::CLASSICAL
        .into_iter()
        .map(|p| (p.name().to_string(), p))
        .collect();
    presets.push(("gru".into(), Preset::Recurrent(gru.clone())));
    presets.push((
        "ensemble (default)".into(),
        Preset::default_ensemble().expect("shipped model"),
    ));
    presets.push((
        "ensemble, gru everywhere".into(),
        Preset::ensemble(Some(gru)),
    ));
    // The single-forecaster holt policy (the previous default) is the reference every row is
    // compared with, measured in the same process.
    let mut reference = [0.0; 2];
    for (name, preset) in presets {
        for (i, vcpus) in [1, 32].into_iter().enumerate() {
            let us = per_window_us(vcpus, &preset);
            if name == "holt" {
                reference[i] = us;
            }
            let ratio = if reference[i] > 0.0 {
                format!(" ({:.2} x holt)", us / reference[i])
            } else {
                String::new()
            };
            println!("| window, {vcpus} vCPU, {name} policy | {us:.2} us{ratio} | < 10 us |");
        }
    }
}
