//! One window's aggregated signals and their reduction to a [`Sample`].

use super::recorder::{DeviceId, DeviceKind, ExitCounts};
use crate::resource::Usage;
use crate::sample::{Sample, Signals};
use serde::{Deserialize, Serialize};

const MIB: f64 = 1024.0 * 1024.0;

/// The subset of KVM's per-vCPU binary statistics (KVM_GET_STATS_FD) the predictor uses.
/// The VMM hands in cumulative values; the collector turns them into per-window deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVcpuStats {
    pub exits: u64,
    pub halt_wait_ns: u64,
    /// HLT exits; `None` where the kernel does not count them, so a window without one says
    /// nothing.
    #[serde(default)]
    pub halt_exits: Option<u64>,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub page_faults: u64,
}

impl KvmVcpuStats {
    pub(crate) fn since(&self, earlier: &KvmVcpuStats) -> KvmVcpuStats {
        KvmVcpuStats {
            exits: self.exits.wrapping_sub(earlier.exits),
            halt_wait_ns: self.halt_wait_ns.wrapping_sub(earlier.halt_wait_ns),
            halt_exits: match (self.halt_exits, earlier.halt_exits) {
                (Some(now), Some(then)) => Some(now.wrapping_sub(then)),
                _ => None,
            },
            io_exits: self.io_exits.wrapping_sub(earlier.io_exits),
            mmio_exits: self.mmio_exits.wrapping_sub(earlier.mmio_exits),
            page_faults: self.page_faults.wrapping_sub(earlier.page_faults),
        }
    }
}

/// Memory as seen from both sides at window close, in MiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    /// From the balloon statistics queue or the guest agent, when the guest reports them.
    pub guest_total: Option<f64>,
    pub guest_available: Option<f64>,
    /// Resident pages of the guest memory mapping on the host.
    pub host_rss: f64,
    /// Memory currently plugged into the guest (boot memory plus hot-plugged blocks).
    pub plugged: f64,
}

impl MemorySample {
    /// The guest's own view is preferred because host RSS never shrinks when the guest
    /// frees pages (until they are ballooned or unplugged), so it overstates demand.
    pub fn used(&self) -> f64 {
        match (self.guest_total, self.guest_available) {
            (Some(total), Some(avail)) => (total - avail).max(0.0),
            _ => self.host_rss,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuWindow {
    pub exits: ExitCounts,
    pub kvm: KvmVcpuStats,
    /// CPU time the vCPU thread consumed during the window.
    pub cpu_ns: u64,
    /// End of the latest window in which the vCPU exited at all, to spot a vCPU that stopped
    /// exiting (no clock is read per exit).
    pub last_exit_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceWindow {
    pub id: DeviceId,
    pub kind: DeviceKind,
    pub ops: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub throttled: u64,
}

/// Everything collected for one VM over one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    pub start_ns: u64,
    pub duration_ns: u64,
    pub vcpus: Vec<VcpuWindow>,
    pub devices: Vec<DeviceWindow>,
    pub memory: MemorySample,
}

impl Window {
    /// Whether every vCPU wanted a CPU all the window: each ran guest code (it exited) and
    /// none halted. The window's CPU time is then what the vCPUs and the host gave, a floor of
    /// the demand, not the demand: on a busy host a spinning vCPU gets only part of a core.
    /// A vCPU blocked without halting (an AP waiting for its start-up IPI, a paused VM) does
    /// not exit; where KVM does not count halts, nothing is claimed.
    fn vcpus_saturated(&self) -> bool {
        !self.vcpus.is_empty()
            && self
                .vcpus
                .iter()
                .all(|v| v.kvm.exits > 0 && v.kvm.halt_exits == Some(0))
    }

    /// Reduces the window to per-resource usage and rule signals.
    pub fn sample(&self) -> Sample {
        let secs = self.duration_ns.max(1) as f64 / 1e9;
        let mut usage = Usage {
            cpu: self.vcpus.iter().map(|v| v.cpu_ns).sum::<u64>() as f64 / 1e9 / secs,
            mem: self.memory.used(),
            blk: 0.0,
            net: 0.0,
        };
        // Only the slots the signals need are summed over the vCPUs, not every exit counter.
        let mut signals = Signals {
            unknown_exits: self.vcpus.iter().map(|v| v.exits.unknown()).sum(),
            faults: self.vcpus.iter().map(|v| v.kvm.page_faults).sum(),
            exits: self.vcpus.iter().map(|v| v.kvm.exits).sum(),
            cpu_saturated: self.vcpus_saturated(),
            ..Signals::default()
        };
        for d in &self.devices {
            if d.kind == DeviceKind::Absent {
                continue;
            }
            let rate = (d.read_bytes + d.written_bytes) as f64 / MIB / secs;
            match d.kind {
                DeviceKind::Block => {
                    usage.blk += rate;
                    signals.blk_throttled += d.throttled;
                }
                DeviceKind::Net => {
                    usage.net += rate;
                    signals.net_throttled += d.throttled;
                }
                _ => {}
            }
            let exits: u64 = self.vcpus.iter().map(|v| v.exits.device(d.id)).sum();
            let touched = d.ops + exits;
            signals.io_ops += touched;
            if touched > 0 {
                match d.kind {
                    DeviceKind::Console | DeviceKind::Platform => {
                        signals.platform_devices |= 1 << d.id.index()
                    }
                    _ => signals.devices |= 1 << d.id.index(),
                }
            }
        }
        Sample {
            t_ms: self.start_ns / 1_000_000,
            usage,
            signals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_view_wins_over_rss() {
        let mut m = MemorySample {
            guest_total: Some(1024.0),
            guest_available: Some(300.0),
            host_rss: 1000.0,
            plugged: 1024.0,
        };
        assert_eq!(m.used(), 724.0);
        m.guest_available = None;
        assert_eq!(m.used(), 1000.0);
    }

    #[test]
    fn rate_limiter_waits_are_summed_per_resource() {
        let device = |i: u8, kind: DeviceKind, throttled: u64| DeviceWindow {
            id: DeviceId::new(i).unwrap(),
            kind,
            ops: 1,
            read_bytes: 1 << 20,
            written_bytes: 0,
            throttled,
        };
        let w = Window {
            duration_ns: 1_000_000_000,
            devices: vec![
                device(0, DeviceKind::Block, 3),
                device(1, DeviceKind::Block, 1),
                device(2, DeviceKind::Net, 2),
            ],
            ..Window::default()
        };
        let s = w.sample();
        assert_eq!((s.signals.blk_throttled, s.signals.net_throttled), (4, 2));
        assert_eq!((s.usage.blk, s.usage.net), (2.0, 1.0));
        assert!(s.signals.throttled(crate::resource::Resource::Blk));
        assert!(!s.signals.throttled(crate::resource::Resource::Cpu));
    }

    #[test]
    fn kvm_delta_subtracts_fieldwise() {
        let a = KvmVcpuStats {
            exits: 10,
            halt_wait_ns: 5,
            halt_exits: Some(1),
            io_exits: 3,
            mmio_exits: 2,
            page_faults: 1,
        };
        let b = KvmVcpuStats {
            exits: 15,
            halt_wait_ns: 9,
            halt_exits: Some(3),
            io_exits: 4,
            mmio_exits: 2,
            page_faults: 7,
        };
        assert_eq!(
            b.since(&a),
            KvmVcpuStats {
                exits: 5,
                halt_wait_ns: 4,
                halt_exits: Some(2),
                io_exits: 1,
                mmio_exits: 0,
                page_faults: 6
            }
        );
        let unknown = KvmVcpuStats {
            halt_exits: None,
            ..b
        };
        assert_eq!(unknown.since(&a).halt_exits, None);
        assert_eq!(b.since(&unknown).halt_exits, None);
    }

    #[test]
    fn a_window_is_saturated_only_if_every_vcpu_ran_and_none_halted() {
        let vcpu = |exits, halt_exits| VcpuWindow {
            kvm: KvmVcpuStats {
                exits,
                halt_exits,
                ..KvmVcpuStats::default()
            },
            cpu_ns: 40_000_000,
            ..VcpuWindow::default()
        };
        let saturated = |vcpus: Vec<VcpuWindow>| {
            Window {
                duration_ns: 100_000_000,
                vcpus,
                ..Window::default()
            }
            .sample()
            .signals
            .cpu_saturated
        };
        let cpu = crate::resource::Resource::Cpu;
        assert!(saturated(vec![vcpu(90, Some(0))]));
        assert!(saturated(vec![vcpu(90, Some(0)), vcpu(3, Some(0))]));
        assert!(
            !saturated(vec![vcpu(90, Some(0)), vcpu(3, Some(1))]),
            "one halted"
        );
        assert!(
            !saturated(vec![vcpu(90, Some(0)), vcpu(0, Some(0))]),
            "one never ran"
        );
        assert!(!saturated(vec![vcpu(90, None)]), "halts not counted");
        assert!(!saturated(vec![]));
        let w = Window {
            duration_ns: 100_000_000,
            vcpus: vec![vcpu(90, Some(0))],
            ..Window::default()
        };
        assert!(w.sample().signals.throttled(cpu), "a floor of the demand");
    }
}
