//! The window closer: owns the reader side of every recorder and builds [`Window`]s.

use super::recorder::{
    device_recorder, exit_recorder, DeviceId, DeviceKind, DeviceReader, DeviceRecorder, ExitReader,
    ExitRecorder,
};
use super::window::{DeviceWindow, KvmVcpuStats, MemorySample, VcpuWindow, Window};
use std::time::Duration;
use thiserror::Error;

pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CollectorError {
    #[error("window length must be at least 1 ms, got {0:?}")]
    WindowTooShort(Duration),
    #[error("device {0:?} is already registered")]
    DuplicateDevice(DeviceId),
    #[error("{what} has {got} entries but {expected} vCPUs are registered")]
    VcpuCountMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("window closed at {now_ns} ns, before it started at {start_ns} ns")]
    ClockWentBack { start_ns: u64, now_ns: u64 },
}

/// Cumulative per-vCPU values the VMM reads at window close (KVM stats fd, thread clock).
pub struct WindowInputs<'a> {
    pub kvm: &'a [KvmVcpuStats],
    pub cpu_ns: &'a [u64],
    pub memory: MemorySample,
}

struct VcpuSource {
    exits: ExitReader,
    prev_kvm: KvmVcpuStats,
    prev_cpu_ns: u64,
}

struct DeviceSource {
    id: DeviceId,
    kind: DeviceKind,
    reader: DeviceReader,
}

/// Builds one [`Window`] per period. Lives on the VMM thread; the recorders it hands out
/// go to the vCPU and device threads.
pub struct Collector {
    period_ns: u64,
    start_ns: u64,
    vcpus: Vec<VcpuSource>,
    devices: Vec<DeviceSource>,
    window: Window,
}

impl Collector {
    pub fn new(period: Duration, start_ns: u64) -> Result<Self, CollectorError> {
        if period < Duration::from_millis(1) {
            return Err(CollectorError::WindowTooShort(period));
        }
        Ok(Collector {
            period_ns: period.as_nanos() as u64,
            start_ns,
            vcpus: Vec::new(),
            devices: Vec::new(),
            window: Window::default(),
        })
    }

    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns)
    }

    /// Registers the next vCPU (index = call order) and returns its recorder.
    pub fn add_vcpu(&mut self) -> ExitRecorder {
        let (rec, exits) = exit_recorder();
        self.vcpus.push(VcpuSource {
            exits,
            prev_kvm: KvmVcpuStats::default(),
            prev_cpu_ns: 0,
        });
        self.window.vcpus.push(VcpuWindow::default());
        rec
    }

    pub fn add_device(
        &mut self,
        id: DeviceId,
        kind: DeviceKind,
    ) -> Result<DeviceRecorder, CollectorError> {
        if self.devices.iter().any(|d| d.id == id) {
            return Err(CollectorError::DuplicateDevice(id));
        }
        let (rec, reader) = device_recorder();
        self.devices.push(DeviceSource { id, kind, reader });
        self.window.devices.push(DeviceWindow {
            id,
            kind,
            ops: 0,
            read_bytes: 0,
            written_bytes: 0,
        });
        Ok(rec)
    }

    /// Whether the current window has run its full period.
    pub fn due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.start_ns) >= self.period_ns
    }

    /// Closes the window that started at the previous close and opens the next one.
    /// Reuses its buffers, so a steady-state close allocates nothing.
    pub fn close(&mut self, now_ns: u64, inputs: &WindowInputs) -> Result<&Window, CollectorError> {
        let expected = self.vcpus.len();
        for (what, got) in [
            ("kvm stats", inputs.kvm.len()),
            ("cpu time", inputs.cpu_ns.len()),
        ] {
            if got != expected {
                return Err(CollectorError::VcpuCountMismatch {
                    what,
                    got,
                    expected,
                });
            }
        }
        if now_ns < self.start_ns {
            return Err(CollectorError::ClockWentBack {
                start_ns: self.start_ns,
                now_ns,
            });
        }
        let sources = self.vcpus.iter_mut().zip(inputs.kvm).zip(inputs.cpu_ns);
        for (out, ((src, kvm), &cpu)) in self.window.vcpus.iter_mut().zip(sources) {
            let (exits, last_exit_ns) = src.exits.take();
            *out = VcpuWindow {
                exits,
                kvm: kvm.since(&src.prev_kvm),
                cpu_ns: cpu.saturating_sub(src.prev_cpu_ns),
                last_exit_ns,
            };
            src.prev_kvm = *kvm;
            src.prev_cpu_ns = cpu;
        }
        for (out, src) in self.window.devices.iter_mut().zip(self.devices.iter_mut()) {
            let (ops, read_bytes, written_bytes) = src.reader.take();
            *out = DeviceWindow {
                id: src.id,
                kind: src.kind,
                ops,
                read_bytes,
                written_bytes,
            };
        }
        self.window.start_ns = self.start_ns;
        self.window.duration_ns = now_ns - self.start_ns;
        self.window.memory = inputs.memory;
        self.start_ns = now_ns;
        Ok(&self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{ExitKind, Target};

    fn dev(i: u8) -> DeviceId {
        DeviceId::new(i).unwrap()
    }

    #[test]
    fn rejects_tiny_period() {
        assert!(matches!(
            Collector::new(Duration::from_micros(10), 0),
            Err(CollectorError::WindowTooShort(_))
        ));
    }

    #[test]
    fn window_turns_into_usage_and_signals() {
        let mut c = Collector::new(DEFAULT_WINDOW, 1_000_000_000).unwrap();
        let mut v0 = c.add_vcpu();
        let mut v1 = c.add_vcpu();
        let mut blk = c.add_device(dev(0), DeviceKind::Block).unwrap();
        let _net = c.add_device(dev(1), DeviceKind::Net).unwrap();
        let _rng = c.add_device(dev(2), DeviceKind::Other).unwrap();
        assert_eq!(
            c.add_device(dev(0), DeviceKind::Net).err(),
            Some(CollectorError::DuplicateDevice(dev(0)))
        );
        v0.record(ExitKind::Mmio(Target::Device(dev(0))), 1);
        v1.record(ExitKind::Io(Target::Unknown), 2);
        v1.record(ExitKind::Mmio(Target::Device(dev(2))), 3);
        blk.record(1024 * 1024, 0);
        let now = 1_100_000_000;
        assert!(c.due(now));
        let kvm = [KvmVcpuStats {
            exits: 4,
            ..Default::default()
        }; 2];
        let memory = MemorySample {
            host_rss: 256.0,
            plugged: 512.0,
            ..Default::default()
        };
        let w = c
            .close(
                now,
                &WindowInputs {
                    kvm: &kvm,
                    cpu_ns: &[50_000_000, 100_000_000],
                    memory,
                },
            )
            .unwrap();
        assert_eq!(w.duration_ns, 100_000_000);
        assert_eq!(w.vcpus[1].last_exit_ns, 3);
        let s = w.sample();
        assert_eq!(s.t_ms, 1000);
        assert!((s.usage.cpu - 1.5).abs() < 1e-9, "{}", s.usage.cpu);
        assert!((s.usage.blk - 10.0).abs() < 1e-9, "{}", s.usage.blk);
        assert_eq!(s.usage.net, 0.0);
        assert_eq!(s.usage.mem, 256.0);
        assert_eq!(s.signals.unknown_exits, 1);
        assert_eq!(s.signals.io_ops, 3);
        assert_eq!(s.signals.devices, 0b101);
        // Cumulative inputs become deltas in the next window.
        let kvm2 = [KvmVcpuStats {
            exits: 6,
            ..Default::default()
        }; 2];
        let w = c
            .close(
                now + 100_000_000,
                &WindowInputs {
                    kvm: &kvm2,
                    cpu_ns: &[50_000_000, 150_000_000],
                    memory,
                },
            )
            .unwrap();
        assert_eq!(w.vcpus[0].kvm.exits, 2);
        assert_eq!(w.vcpus[0].cpu_ns, 0);
        assert_eq!(w.vcpus[1].cpu_ns, 50_000_000);
        assert_eq!(w.vcpus[0].exits.total(), 0);
    }

    #[test]
    fn input_length_must_match_vcpus() {
        let mut c = Collector::new(DEFAULT_WINDOW, 0).unwrap();
        let _v = c.add_vcpu();
        let err = c
            .close(
                1,
                &WindowInputs {
                    kvm: &[],
                    cpu_ns: &[0],
                    memory: MemorySample::default(),
                },
            )
            .unwrap_err();
        assert_eq!(
            err,
            CollectorError::VcpuCountMismatch {
                what: "kvm stats",
                got: 0,
                expected: 1
            }
        );
    }
}
