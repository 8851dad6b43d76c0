//! The predictor's decision step over fuzzed telemetry: the raw counters a guest influences (exits
//! of every kind, device traffic, KVM statistics, CPU time, the memory the guest reports) go
//! through the window collector into the policy, with any capacity and every classical
//! forecaster. Counters only grow, as the VMM's do; their increments and the guest's memory
//! reports are arbitrary. Every decision must stay inside the budget.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use predictor::forecast::{Horizon, Preset};
use predictor::policy::{Budget, Policy, PolicyConfig};
use predictor::resource::Usage;
use predictor::telemetry::{
    Access, Collector, DeviceId, DeviceKind, DeviceTotals, ExitKind, ExitRecorder, KvmVcpuStats,
    MemorySample, Target, WindowInputs, MAX_DEVICES,
};

const KINDS: [DeviceKind; 7] = [
    DeviceKind::Block,
    DeviceKind::Net,
    DeviceKind::Vsock,
    DeviceKind::Balloon,
    DeviceKind::Mem,
    DeviceKind::Console,
    DeviceKind::Other,
];

#[derive(Arbitrary, Debug)]
struct Exit {
    vcpu: u8,
    kind: u8,
    device: u8,
    count: u8,
}

#[derive(Arbitrary, Debug)]
struct WindowInput {
    /// Window length in microseconds (0: closed at once).
    dt_us: u32,
    exits: Vec<Exit>,
    /// (device, ops, bytes read, bytes written)
    device_io: Vec<(u8, u8, u32, u32)>,
    /// Per vCPU: increments of exits, halt wait, io exits, mmio exits, page faults, CPU time.
    vcpu_deltas: Vec<[u32; 6]>,
    guest_total: Option<u64>,
    guest_available: Option<u64>,
    host_rss: u32,
    plugged: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    vcpus: u8,
    devices: u8,
    preset: u8,
    horizon: u8,
    capacity: [u16; 4],
    windows: Vec<WindowInput>,
}

fn exit_kind(kind: u8, device: u8, devices: usize) -> ExitKind {
    let target = match (devices > 0).then(|| usize::from(device) % (devices + 1)) {
        Some(i) if i < devices => {
            Target::Device(DeviceId::new(i as u8).expect("below MAX_DEVICES"))
        }
        _ => Target::Unknown,
    };
    let access = if kind & 0x80 == 0 {
        Access::Read
    } else {
        Access::Write
    };
    match kind % 8 {
        0 => ExitKind::Io(access, target),
        1 => ExitKind::Mmio(access, target),
        2 => ExitKind::Hlt,
        3 => ExitKind::Shutdown,
        4 => ExitKind::InternalError,
        5 => ExitKind::FailEntry,
        6 => ExitKind::SystemEvent,
        _ => ExitKind::Other,
    }
}

fuzz_target!(|input: Input| {
    let capacity = Usage::from_fn(|r| f64::from(input.capacity[r as usize].max(1)));
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

    let n_vcpus = 1 + usize::from(input.vcpus) % 4;
    let n_devices = usize::from(input.devices) % (MAX_DEVICES + 1);
    let mut now_ns = 1_000_000_000u64;
    let mut collector =
        Collector::new(std::time::Duration::from_millis(100), now_ns).expect("a 100 ms window");
    let mut vcpus: Vec<_> = (0..n_vcpus)
        .map(|_| {
            let (recorder, totals) = ExitRecorder::new();
            collector.add_vcpu(&totals);
            recorder
        })
        .collect();
    for i in 0..n_devices {
        let id = DeviceId::new(i as u8).expect("below MAX_DEVICES");
        collector
            .add_device(id, KINDS[i % KINDS.len()])
            .expect("a new device");
    }
    let mut devices = vec![DeviceTotals::default(); n_devices];
    let mut kvm = vec![KvmVcpuStats::default(); n_vcpus];
    let mut cpu_ns = vec![0u64; n_vcpus];

    for w in input.windows.iter().take(256) {
        for e in w.exits.iter().take(64) {
            let kind = exit_kind(e.kind, e.device, n_devices);
            for _ in 0..e.count % 16 {
                vcpus[usize::from(e.vcpu) % n_vcpus].record(kind);
            }
        }
        if n_devices > 0 {
            for &(d, ops, read, written) in w.device_io.iter().take(64) {
                let t = &mut devices[usize::from(d) % n_devices];
                for _ in 0..=ops % 4 {
                    t.ops = t.ops.wrapping_add(1);
                    t.read_bytes = t.read_bytes.wrapping_add(u64::from(read));
                    t.written_bytes = t.written_bytes.wrapping_add(u64::from(written));
                }
            }
        }
        for (i, d) in w.vcpu_deltas.iter().take(n_vcpus).enumerate() {
            let k = &mut kvm[i];
            let add = |v: &mut u64, by: u32| *v = v.wrapping_add(u64::from(by));
            add(&mut k.exits, d[0]);
            add(&mut k.halt_wait_ns, d[1]);
            // Halts counted or not (an odd delta: this kernel does not count them).
            let halts = k.halt_exits.unwrap_or(0).wrapping_add(u64::from(d[1] % 4));
            k.halt_exits = (d[1] % 2 == 0).then_some(halts);
            add(&mut k.io_exits, d[2]);
            add(&mut k.mmio_exits, d[3]);
            add(&mut k.page_faults, d[4]);
            add(&mut cpu_ns[i], d[5]);
        }
        now_ns += u64::from(w.dt_us) * 1000;
        let memory = MemorySample {
            guest_total: w.guest_total.map(|v| v as f64),
            guest_available: w.guest_available.map(|v| v as f64),
            host_rss: f64::from(w.host_rss),
            plugged: f64::from(w.plugged),
        };
        let window = collector
            .close(
                now_ns,
                &WindowInputs {
                    kvm: &kvm,
                    cpu_ns: &cpu_ns,
                    devices: &devices,
                    memory,
                },
            )
            .expect("inputs match the registered vCPUs and time only moves forward");
        let sample = window.sample();
        for (r, &u) in sample.usage.iter() {
            assert!(u.is_finite() && u >= 0.0, "{r:?} usage {u} from {window:?}");
        }
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
