//! What the window closer reads of the VM each window, beside the exit counts the collector reads
//! itself: per vCPU KVM's binary statistics and the thread's CPU time, per device its cumulative
//! request counters (straight into the window inputs), and the guest's memory from both sides.
//! The buffers are kept between windows.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use devices::virtio::DeviceCounters;
use predictor::telemetry::{
    Collector, CollectorError, DeviceTotals, KvmVcpuStats, MemorySample, WindowInputs,
};

use super::host::thread_cpu_ns;
use super::kvm_stats::KvmStatsReader;
use crate::microvm::{MemoryAccounting, MicroVm};
use crate::vcpus::VcpuTelemetry;

const MIB: f64 = 1024.0 * 1024.0;

/// A running vCPU thread the collector counts (collector order).
struct VcpuSource {
    index: u8,
    /// Which start of the vCPU's thread: a vCPU unplugged and plugged again is a new source.
    start: u64,
    thread: libc::pthread_t,
}

/// The sources of one VM's window inputs.
pub struct Inputs {
    boot_mib: u64,
    vcpus: Vec<VcpuSource>,
    /// KVM's statistics of each vCPU that ever ran, by index (kept across unplugs).
    readers: Vec<Option<KvmStatsReader>>,
    kvm_errors: Vec<String>,
    /// The VM's vCPU generation the sources were last matched against.
    generation: u64,
    devices: Vec<Option<Arc<DeviceCounters>>>,
    kvm: Vec<KvmVcpuStats>,
    cpu_ns: Vec<u64>,
    totals: Vec<DeviceTotals>,
}

impl Inputs {
    /// Registers every running vCPU and every device on the VM's buses with `collector`. The
    /// text says how KVM's statistics are read (or why they are not).
    pub fn attach(
        vm: &mut MicroVm,
        boot_mib: u64,
        collector: &mut Collector,
    ) -> Result<(Self, String), CollectorError> {
        let mut devices = Vec::new();
        for d in vm.devices() {
            collector.add_device(d.info.id, d.info.kind)?;
            devices.push(d.counters.clone());
        }
        let mut inputs = Self {
            boot_mib,
            vcpus: Vec::new(),
            readers: Vec::new(),
            kvm_errors: Vec::new(),
            generation: vm.vcpu_generation(),
            kvm: Vec::new(),
            cpu_ns: Vec::new(),
            totals: Vec::with_capacity(devices.len()),
            devices,
        };
        for v in vm.vcpu_telemetry() {
            // The boot vCPUs count from their first instruction.
            inputs.take_on(v, collector, false);
        }
        let kvm_status = if inputs.kvm_errors.is_empty() {
            format!("reading KVM binary stats of {} vCPUs", inputs.vcpus.len())
        } else {
            let errors = inputs.kvm_errors.join("; ");
            tracing::warn!("predictor runs without KVM stats: {errors}");
            format!("unavailable, windows go without: {errors}")
        };
        Ok((inputs, kvm_status))
    }

    /// Starts counting a running vCPU; `from_now`: its KVM statistics count from their present
    /// values (a vCPU plugged back in), else from zero.
    fn take_on(&mut self, v: VcpuTelemetry, collector: &mut Collector, from_now: bool) {
        let slot = usize::from(v.index);
        if self.readers.len() <= slot {
            self.readers.resize_with(slot + 1, || None);
        }
        if let Some(file) = v.stats {
            self.readers[slot] = file
                .map_err(super::kvm_stats::KvmStatsError::Ioctl)
                .and_then(KvmStatsReader::new)
                .map_err(|e| self.kvm_errors.push(format!("vCPU {}: {e}", v.index)))
                .ok();
        }
        let baseline = match (&mut self.readers[slot], from_now) {
            (Some(r), true) => r.read().unwrap_or_default(),
            _ => KvmVcpuStats::default(),
        };
        collector.add_vcpu_from(&v.exits, baseline);
        self.vcpus.push(VcpuSource {
            index: v.index,
            start: v.start,
            thread: v.thread,
        });
    }

    /// Follows vCPUs plugged and unplugged since the last window: an ended thread's source goes
    /// (its clock can no longer be read), a new one's joins.
    pub fn sync(
        &mut self,
        vm: &mut MicroVm,
        collector: &mut Collector,
    ) -> Result<(), CollectorError> {
        if vm.vcpu_generation() == self.generation {
            return Ok(());
        }
        self.generation = vm.vcpu_generation();
        let running = vm.vcpu_telemetry();
        let same = |a: &VcpuSource, b: &VcpuTelemetry| a.index == b.index && a.start == b.start;
        let mut position = 0;
        while position < self.vcpus.len() {
            if running.iter().any(|r| same(&self.vcpus[position], r)) {
                position += 1;
            } else {
                collector.remove_vcpu(position)?;
                self.vcpus.remove(position);
            }
        }
        for r in running {
            if !self.vcpus.iter().any(|v| same(v, &r)) {
                self.take_on(r, collector, true);
            }
        }
        Ok(())
    }

    /// Reads everything now.
    pub fn read(&mut self, vm: &mut MicroVm) -> WindowInputs<'_> {
        self.kvm.clear();
        self.cpu_ns.clear();
        for v in &self.vcpus {
            let kvm = match &mut self.readers[usize::from(v.index)] {
                Some(r) => r.read().unwrap_or_default(),
                None => KvmVcpuStats::default(),
            };
            self.kvm.push(kvm);
            self.cpu_ns.push(thread_cpu_ns(v.thread).unwrap_or(0));
        }
        self.totals.clear();
        self.totals.extend(self.devices.iter().map(|c| match c {
            Some(c) => DeviceTotals {
                ops: c.requests.load(Ordering::Relaxed),
                read_bytes: c.bytes_to_guest.load(Ordering::Relaxed),
                written_bytes: c.bytes_from_guest.load(Ordering::Relaxed),
                throttled: c.throttled.load(Ordering::Relaxed),
            },
            None => DeviceTotals::default(),
        }));
        WindowInputs {
            kvm: &self.kvm,
            cpu_ns: &self.cpu_ns,
            devices: &self.totals,
            memory: memory_sample(self.boot_mib, &vm.memory_accounting()),
        }
    }
}

/// The guest's memory as the host sees it (resident pages) and as the guest reports it (balloon
/// statistics), in MiB.
fn memory_sample(boot_mib: u64, a: &MemoryAccounting) -> MemorySample {
    let report = a.guest_report.as_ref().map(|r| r.stats);
    let total = report.and_then(|s| s.total_memory);
    let available = report.and_then(|s| s.available_memory.or(s.free_memory));
    let (guest_total, guest_available) = match (total, available) {
        (Some(t), Some(a)) => (Some(t as f64 / MIB), Some(a as f64 / MIB)),
        _ => (None, None),
    };
    let plugged = boot_mib as f64 + a.plugged_bytes as f64 / MIB - a.balloon_bytes as f64 / MIB;
    MemorySample {
        guest_total,
        guest_available,
        host_rss: a.guest_rss_bytes as f64 / MIB,
        plugged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::balloon::stats::{GuestStats, StatsReport};

    #[test]
    fn the_guest_report_and_the_hosts_view_both_reach_the_sample() {
        let mut a = MemoryAccounting {
            guest_rss_bytes: 300 << 20,
            plugged_bytes: 128 << 20,
            balloon_bytes: 64 << 20,
            ..MemoryAccounting::default()
        };
        let s = memory_sample(256, &a);
        assert_eq!((s.guest_total, s.host_rss, s.plugged), (None, 300.0, 320.0));
        assert_eq!(s.used(), 300.0, "no report: resident memory");
        a.guest_report = Some(StatsReport {
            stats: GuestStats {
                total_memory: Some(384 << 20),
                free_memory: Some(184 << 20),
                ..GuestStats::default()
            },
            at: std::time::Instant::now(),
        });
        let s = memory_sample(256, &a);
        assert_eq!(s.used(), 200.0, "the guest's own view wins");
    }
}
