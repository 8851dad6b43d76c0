//! The per-exit hook of the vCPU loop: classifies an exit by its port or MMIO address and bumps
//! the vCPU's own predictor counters. Allocation-free and lock-free: it owns its recorder and
//! reads only constants.

use devices::virtio::mmio::MMIO_WINDOW_SIZE;
use predictor::telemetry::{DeviceId, ExitKind, ExitRecorder, Target, MAX_DEVICES};

use crate::arch::x86_64::layout::MMIO32_START;

/// The device id legacy port devices (serial, i8042, PIT...) share; virtio devices are numbered
/// by their MMIO slot from 0.
pub const LEGACY_PIO: DeviceId = match DeviceId::new(MAX_DEVICES as u8 - 1) {
    Some(d) => d,
    None => panic!("MAX_DEVICES is at least 1"),
};

/// The monotonic clock every predictor timestamp uses (exits and windows alike).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a vCPU thread records its exits with.
pub struct ExitTelemetry {
    recorder: ExitRecorder,
    /// Virtio MMIO windows in use, counted from MMIO32_START.
    virtio_slots: u64,
}

impl ExitTelemetry {
    pub fn new(recorder: ExitRecorder, virtio_slots: usize) -> Self {
        Self {
            recorder,
            virtio_slots: virtio_slots as u64,
        }
    }

    #[inline]
    pub fn pio(&mut self, claimed: bool) {
        let target = if claimed {
            Target::Device(LEGACY_PIO)
        } else {
            Target::Unknown
        };
        self.recorder.record(ExitKind::Io(target), now_ns());
    }

    #[inline]
    pub fn mmio(&mut self, addr: u64, claimed: bool) {
        let slot = addr.wrapping_sub(MMIO32_START) / MMIO_WINDOW_SIZE;
        let target = match DeviceId::new(slot as u8) {
            Some(id) if claimed && addr >= MMIO32_START && slot < self.virtio_slots => {
                Target::Device(id)
            }
            _ => Target::Unknown,
        };
        self.recorder.record(ExitKind::Mmio(target), now_ns());
    }

    #[inline]
    pub fn other(&mut self, kind: ExitKind) {
        self.recorder.record(kind, now_ns());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use predictor::telemetry::{Collector, KvmVcpuStats, MemorySample, WindowInputs};
    use std::time::Duration;

    #[test]
    fn exits_land_on_their_device_or_unknown() {
        let mut c = Collector::new(Duration::from_millis(100), 0).unwrap();
        let mut t = ExitTelemetry::new(c.add_vcpu(), 2);
        t.pio(true);
        t.pio(false);
        t.mmio(MMIO32_START + 0x70, true);
        t.mmio(MMIO32_START + MMIO_WINDOW_SIZE + 4, true);
        // A third window exists on the bus map but no device is there.
        t.mmio(MMIO32_START + 2 * MMIO_WINDOW_SIZE, true);
        t.mmio(MMIO32_START - 4, false);
        t.other(ExitKind::Hlt);
        let w = c
            .close(
                now_ns(),
                &WindowInputs {
                    kvm: &[KvmVcpuStats::default()],
                    cpu_ns: &[0],
                    memory: MemorySample::default(),
                },
            )
            .unwrap();
        let e = &w.vcpus[0].exits;
        assert_eq!(e.device(LEGACY_PIO), 1);
        assert_eq!(e.device(DeviceId::new(0).unwrap()), 1);
        assert_eq!(e.device(DeviceId::new(1).unwrap()), 1);
        assert_eq!(e.unknown(), 3);
        assert_eq!(e.get(ExitKind::Hlt), 1);
        assert!(w.vcpus[0].last_exit_ns > 0);
    }
}
