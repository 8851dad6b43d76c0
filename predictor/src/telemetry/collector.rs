//! The window closer: owns the reader side of every recorder and builds [`Window`]s.

use super::recorder::{DeviceId, DeviceKind, DeviceTotals, ExitReader, ExitTotals};
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
    #[error("device totals have {got} entries but {expected} devices are registered")]
    DeviceCountMismatch { got: usize, expected: usize },
    #[error("no vCPU at position {position}: {registered} are registered")]
    NoSuchVcpu { position: usize, registered: usize },
    #[error("window closed at {now_ns} ns, before it started at {start_ns} ns")]
    ClockWentBack { start_ns: u64, now_ns: u64 },
}

/// Cumulative values the VMM reads at window close: per vCPU (KVM stats fd, thread clock) and
/// per device (its request counters, in registration order).
pub struct WindowInputs<'a> {
    pub kvm: &'a [KvmVcpuStats],
    pub cpu_ns: &'a [u64],
    pub devices: &'a [DeviceTotals],
    pub memory: MemorySample,
}

struct VcpuSource {
    exits: ExitReader,
    prev_kvm: KvmVcpuStats,
    prev_cpu_ns: u64,
    /// When the latest window in which the vCPU exited at all ended.
    last_exit_ns: u64,
}

struct DeviceSource {
    id: DeviceId,
    kind: DeviceKind,
    prev: Option<DeviceTotals>,
}

/// Builds one [`Window`] per period. Lives on the VMM thread; it reads the vCPU threads' exit
/// counters through their [`ExitTotals`].
pub struct Collector {
    period_ns: u64,
    start_ns: u64,
    /// The window clock less the host's (wrapping): 0 for a VM that booted here, where the
    /// snapshot's clock stood less the host's time at the restore for a restored one.
    clock_offset_ns: u64,
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
            clock_offset_ns: 0,
            vcpus: Vec::new(),
            devices: Vec::new(),
            window: Window::default(),
        })
    }

    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns)
    }

    /// Registers the next vCPU (index = call order): its exits count from now on, its KVM
    /// statistics and thread CPU time from zero.
    pub fn add_vcpu(&mut self, exits: &ExitTotals) {
        self.add_vcpu_from(exits, KvmVcpuStats::default());
    }

    /// Registers the next vCPU whose KVM statistics were `kvm` when its new thread started (a
    /// vCPU plugged back in keeps its counts from before); its thread CPU time counts from zero.
    pub fn add_vcpu_from(&mut self, exits: &ExitTotals, kvm: KvmVcpuStats) {
        self.vcpus.push(VcpuSource {
            exits: exits.reader(),
            prev_kvm: kvm,
            prev_cpu_ns: 0,
            last_exit_ns: 0,
        });
        self.window.vcpus.push(VcpuWindow::default());
    }

    /// Drops the vCPU at `position` (registration order, shifted by earlier removals): an
    /// unplugged vCPU's thread has ended. Whatever it did since the last close is not counted.
    pub fn remove_vcpu(&mut self, position: usize) -> Result<(), CollectorError> {
        if position >= self.vcpus.len() {
            return Err(CollectorError::NoSuchVcpu {
                position,
                registered: self.vcpus.len(),
            });
        }
        self.vcpus.remove(position);
        self.window.vcpus.remove(position);
        Ok(())
    }

    /// Registers a device; its totals come in [`WindowInputs::devices`] at this position, and
    /// its first window counts from the first totals seen.
    pub fn add_device(&mut self, id: DeviceId, kind: DeviceKind) -> Result<(), CollectorError> {
        if self.devices.iter().any(|d| d.id == id) {
            return Err(CollectorError::DuplicateDevice(id));
        }
        self.devices.push(DeviceSource {
            id,
            kind,
            prev: None,
        });
        self.window.devices.push(DeviceWindow {
            id,
            kind,
            ops: 0,
            read_bytes: 0,
            written_bytes: 0,
            throttled: 0,
        });
        Ok(())
    }

    /// The window clock at host time `now_ns`: windows are stamped with it (`t_ms`).
    pub fn clock_ns(&self, now_ns: u64) -> u64 {
        now_ns.wrapping_add(self.clock_offset_ns)
    }

    /// Goes on from a snapshot taken when the window clock read `clock_ns`: the window open
    /// now starts there, so the time the VM spent saved is in no window.
    pub fn resume_clock(&mut self, clock_ns: u64, now_ns: u64) {
        self.clock_offset_ns = clock_ns.wrapping_sub(now_ns);
        self.start_ns = now_ns;
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
        if inputs.devices.len() != self.devices.len() {
            return Err(CollectorError::DeviceCountMismatch {
                got: inputs.devices.len(),
                expected: self.devices.len(),
            });
        }
        if now_ns < self.start_ns {
            return Err(CollectorError::ClockWentBack {
                start_ns: self.start_ns,
                now_ns,
            });
        }
        let sources = self.vcpus.iter_mut().zip(inputs.kvm).zip(inputs.cpu_ns);
        for (out, ((src, kvm), &cpu)) in self.window.vcpus.iter_mut().zip(sources) {
            src.exits.take_into(&mut out.exits);
            if out.exits.any() {
                src.last_exit_ns = now_ns;
            }
            out.kvm = kvm.since(&src.prev_kvm);
            out.cpu_ns = cpu.saturating_sub(src.prev_cpu_ns);
            out.last_exit_ns = src.last_exit_ns;
            src.prev_kvm = *kvm;
            src.prev_cpu_ns = cpu;
        }
        let sources = self.devices.iter_mut().zip(inputs.devices);
        for (out, (src, totals)) in self.window.devices.iter_mut().zip(sources) {
            let d = totals.since(src.prev.as_ref().unwrap_or(totals));
            src.prev = Some(*totals);
            *out = DeviceWindow {
                id: src.id,
                kind: src.kind,
                ops: d.ops,
                read_bytes: d.read_bytes,
                written_bytes: d.written_bytes,
                throttled: d.throttled,
            };
        }
        self.window.start_ns = self.clock_ns(self.start_ns);
        self.window.duration_ns = now_ns - self.start_ns;
        self.window.memory = inputs.memory;
        self.start_ns = now_ns;
        Ok(&self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Access, ExitKind, ExitRecorder, Target};

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
    fn a_resumed_clock_goes_on_from_the_snapshot_whatever_the_host_time() {
        let none = WindowInputs {
            kvm: &[],
            cpu_ns: &[],
            devices: &[],
            memory: MemorySample::default(),
        };
        let mut c = Collector::new(DEFAULT_WINDOW, 5_000_000_000).unwrap();
        assert_eq!(c.close(5_100_000_000, &none).unwrap().sample().t_ms, 5_000);
        let saved = c.clock_ns(5_150_000_000);
        // Restored on a host whose clock is behind: windows go on from 5150 ms.
        let mut r = Collector::new(DEFAULT_WINDOW, 2_000_000_000).unwrap();
        r.resume_clock(saved, 2_000_000_000);
        let w = r.close(2_100_000_000, &none).unwrap();
        assert_eq!((w.sample().t_ms, w.duration_ns), (5_150, 100_000_000));
        assert_eq!(r.close(2_200_000_000, &none).unwrap().sample().t_ms, 5_250);
        assert_eq!(r.clock_ns(2_200_000_000), 5_350_000_000);
    }

    #[test]
    fn window_turns_into_usage_and_signals() {
        let mut c = Collector::new(DEFAULT_WINDOW, 1_000_000_000).unwrap();
        let (mut v0, t0) = ExitRecorder::new();
        let (mut v1, t1) = ExitRecorder::new();
        // Exits before the collector took the vCPU on are not its windows'.
        v0.record(ExitKind::Hlt);
        c.add_vcpu(&t0);
        c.add_vcpu(&t1);
        c.add_device(dev(0), DeviceKind::Block).unwrap();
        c.add_device(dev(1), DeviceKind::Net).unwrap();
        c.add_device(dev(2), DeviceKind::Other).unwrap();
        c.add_device(dev(3), DeviceKind::Absent).unwrap();
        c.add_device(dev(4), DeviceKind::Platform).unwrap();
        assert_eq!(
            c.add_device(dev(0), DeviceKind::Net).err(),
            Some(CollectorError::DuplicateDevice(dev(0)))
        );
        // Cumulative device totals; the first ones seen are the baseline.
        let mut devices = [DeviceTotals::default(); 5];
        devices[0].ops = 7;
        let kvm = [KvmVcpuStats::default(); 2];
        fn inputs<'a>(
            devices: &'a [DeviceTotals],
            kvm: &'a [KvmVcpuStats],
            cpu_ns: &'a [u64],
        ) -> WindowInputs<'a> {
            let memory = MemorySample {
                host_rss: 256.0,
                plugged: 512.0,
                ..Default::default()
            };
            WindowInputs {
                kvm,
                cpu_ns,
                devices,
                memory,
            }
        }
        c.close(1_000_000_000, &inputs(&devices, &kvm, &[0, 0]))
            .unwrap();
        v0.record(ExitKind::Mmio(Access::Write, Target::Device(dev(0))));
        v1.record(ExitKind::Io(Access::Write, Target::Unknown));
        v1.record(ExitKind::Mmio(Access::Read, Target::Device(dev(2))));
        // A probe of absent hardware is known, but neither I/O nor a device in use.
        v1.record(ExitKind::Io(Access::Read, Target::Device(dev(3))));
        // A platform device's I/O is I/O, but kept apart from the devices whose first use counts.
        v1.record(ExitKind::Io(Access::Write, Target::Device(dev(4))));
        devices[0].ops += 1;
        devices[0].read_bytes += 1024 * 1024;
        let now = 1_100_000_000;
        assert!(c.due(now));
        let kvm = [KvmVcpuStats {
            exits: 4,
            ..Default::default()
        }; 2];
        let w = c
            .close(now, &inputs(&devices, &kvm, &[50_000_000, 100_000_000]))
            .unwrap();
        assert_eq!(w.duration_ns, 100_000_000);
        assert_eq!(w.vcpus[0].exits.total(), 1);
        assert_eq!(w.vcpus[1].exits.total(), 4);
        assert_eq!(w.vcpus[1].last_exit_ns, now);
        assert_eq!(w.devices[0].ops, 1);
        let s = w.sample();
        assert_eq!(s.t_ms, 1000);
        assert!((s.usage.cpu - 1.5).abs() < 1e-9, "{}", s.usage.cpu);
        assert!((s.usage.blk - 10.0).abs() < 1e-9, "{}", s.usage.blk);
        assert_eq!(s.usage.net, 0.0);
        assert_eq!(s.usage.mem, 256.0);
        assert_eq!(s.signals.unknown_exits, 1);
        assert_eq!(s.signals.io_ops, 4);
        assert_eq!(s.signals.devices, 0b101);
        assert_eq!(s.signals.platform_devices, 0b1_0000);
        // Cumulative inputs become deltas in the next window.
        let kvm2 = [KvmVcpuStats {
            exits: 6,
            ..Default::default()
        }; 2];
        let w = c
            .close(
                now + 100_000_000,
                &inputs(&devices, &kvm2, &[50_000_000, 150_000_000]),
            )
            .unwrap();
        assert_eq!(w.vcpus[0].kvm.exits, 2);
        assert_eq!(w.vcpus[0].cpu_ns, 0);
        assert_eq!(w.vcpus[1].cpu_ns, 50_000_000);
        assert_eq!(w.vcpus[0].exits.total(), 0);
        // A vCPU that stopped exiting keeps the end of its last window with exits.
        assert_eq!(w.vcpus[1].last_exit_ns, now);
        assert_eq!(w.devices[0].ops, 0);
        assert!(matches!(
            c.close(now + 200_000_000, &inputs(&devices[..2], &kvm2, &[0, 0])),
            Err(CollectorError::DeviceCountMismatch {
                got: 2,
                expected: 5
            })
        ));
    }

    #[test]
    fn vcpus_come_and_go_between_windows() {
        let mut c = Collector::new(DEFAULT_WINDOW, 0).unwrap();
        let (mut boot, boot_totals) = ExitRecorder::new();
        let (mut plugged, plugged_totals) = ExitRecorder::new();
        c.add_vcpu(&boot_totals);
        let close = |c: &mut Collector, now, kvm: &[KvmVcpuStats], cpu: &[u64]| {
            c.close(
                now,
                &WindowInputs {
                    kvm,
                    cpu_ns: cpu,
                    devices: &[],
                    memory: MemorySample::default(),
                },
            )
            .map(|w| {
                w.vcpus
                    .iter()
                    .map(|v| (v.cpu_ns, v.kvm.exits, v.exits.total()))
                    .collect::<Vec<_>>()
            })
        };
        let kvm = |exits| KvmVcpuStats {
            exits,
            ..Default::default()
        };
        // Exits recorded before the vCPU was taken on are not counted; its KVM statistics
        // count from the baseline it came with (it ran before it was unplugged).
        plugged.record(ExitKind::Hlt);
        c.add_vcpu_from(&plugged_totals, kvm(40));
        boot.record(ExitKind::Hlt);
        plugged.record(ExitKind::Hlt);
        plugged.record(ExitKind::Hlt);
        let w = close(&mut c, 100, &[kvm(5), kvm(47)], &[10, 20]).unwrap();
        assert_eq!(w, vec![(10, 5, 1), (20, 7, 2)]);
        // The boot vCPU stays; the plugged one goes.
        c.remove_vcpu(1).unwrap();
        assert_eq!(
            c.remove_vcpu(1),
            Err(CollectorError::NoSuchVcpu {
                position: 1,
                registered: 1
            })
        );
        let w = close(&mut c, 200, &[kvm(6)], &[30]).unwrap();
        assert_eq!(w, vec![(20, 1, 0)]);
        assert!(close(&mut c, 300, &[kvm(6), kvm(47)], &[30, 20]).is_err());
    }

    #[test]
    fn input_length_must_match_vcpus() {
        let mut c = Collector::new(DEFAULT_WINDOW, 0).unwrap();
        c.add_vcpu(&ExitRecorder::new().1);
        let err = c
            .close(
                1,
                &WindowInputs {
                    kvm: &[],
                    cpu_ns: &[0],
                    devices: &[],
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
