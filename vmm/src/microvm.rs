//! A booted microVM: its vCPU threads and the host resources they run on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{I8042Error, I8042};
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::balloon::stats::StatsReport;
use devices::virtio::balloon::Balloon;
use devices::virtio::block::{Block, BlockError};
use devices::virtio::discard::PAGE_SIZE;
use devices::virtio::mem::VirtioMem;
use devices::virtio::net::{Net, NetError};

use devices::virtio::DeviceCounters;
use predictor::telemetry::DeviceKind;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::autopilot::kvm_stats::{KvmStatsError, KvmStatsReader};
use crate::autopilot::Limited;
use crate::vmm_config::{DriveConfig, NetworkInterfaceConfig};

use crate::autopilot::host::thread_cpu_ns;
use crate::console::RawTerminal;
use crate::device_manager::legacy::ResetToExit;
use crate::vstate::memory::{resident_bytes, trim_zero_pages, TrimReport};
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vstate::vm::Vm;

/// How long a vCPU gets to acknowledge a pause or resume.
const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The virtio devices that can change while the guest runs, by their spec ids, and every
/// device's counters in MMIO slot order (for the predictor).
#[derive(Default)]
pub struct VirtioHandles {
    pub blocks: Vec<(String, Arc<Mutex<Block>>)>,
    pub nets: Vec<(String, Arc<Mutex<Net>>)>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub memory: Option<Arc<Mutex<VirtioMem>>>,
    pub telemetry: Vec<(DeviceKind, Arc<DeviceCounters>)>,
}

fn limited<T>(
    devices: &[(String, Arc<Mutex<T>>)],
    base: impl Fn(&str) -> Option<RateLimiterConfig>,
) -> Vec<Limited<T>> {
    devices
        .iter()
        .map(|(id, device)| Limited {
            id: id.clone(),
            device: device.clone(),
            base: base(id),
        })
        .collect()
}

impl VirtioHandles {
    /// The drives with the limiters `drives` configured for them.
    pub fn limited_blocks(&self, drives: &[DriveConfig]) -> Vec<Limited<Block>> {
        limited(&self.blocks, |id| {
            drives
                .iter()
                .find(|d| d.drive_id == id)
                .and_then(|d| d.rate_limiter)
        })
    }

    /// The interfaces with their configured transmit limiters (rx and tx get the same size).
    pub fn limited_nets(&self, ifaces: &[NetworkInterfaceConfig]) -> Vec<Limited<Net>> {
        limited(&self.nets, |id| {
            ifaces
                .iter()
                .find(|n| n.iface_id == id)
                .and_then(|n| n.tx_rate_limiter)
        })
    }
}

fn lock<T>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the guest's memory costs the host now, and what the guest says of it: cheap enough to
/// read every predictor window.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryAccounting {
    /// Host memory behind guest RAM and the hotplug region (resident pages).
    pub guest_rss_bytes: u64,
    pub plugged_bytes: u64,
    pub requested_bytes: u64,
    /// Pages the guest holds in the balloon, in bytes.
    pub balloon_bytes: u64,
    pub balloon_target_bytes: u64,
    /// The guest's latest statistics (balloon stats queue) and when they came.
    pub guest_report: Option<StatsReport>,
}

fn find<'a, T>(
    devices: &'a [(String, Arc<Mutex<T>>)],
    id: &str,
) -> Option<std::sync::MutexGuard<'a, T>> {
    let (_, dev) = devices.iter().find(|(i, _)| i == id)?;
    Some(lock(dev))
}

/// Whether the vCPUs are running guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// A booted microVM. Dropping it without [`MicroVm::stop`] leaves threads to die with the process.
pub struct MicroVm {
    // Field order is drop order: vCPU threads are joined in `stop` before memory and the VM go.
    vcpus: Vec<VcpuHandle>,
    state: RunState,
    i8042: Arc<Mutex<I8042<ResetToExit>>>,
    virtio: VirtioHandles,
    _terminal: Option<RawTerminal>,
    _vm: Vm,
    /// Guest RAM and the hotplug region.
    mem: GuestMemoryMmap,
}

impl MicroVm {
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        vcpus: Vec<VcpuHandle>,
        terminal: Option<RawTerminal>,
        i8042: Arc<Mutex<I8042<ResetToExit>>>,
        virtio: VirtioHandles,
    ) -> Self {
        Self {
            vcpus,
            state: RunState::Running,
            i8042,
            virtio,
            _terminal: terminal,
            _vm: vm,
            mem,
        }
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn virtio(&self) -> &VirtioHandles {
        &self.virtio
    }

    /// Kernel thread ids of the vCPU threads.
    pub fn vcpu_tids(&self) -> Vec<libc::pid_t> {
        self.vcpus.iter().map(VcpuHandle::tid).collect()
    }

    /// Per running vCPU: index, thread, and its KVM stats reader (taken; once).
    #[allow(clippy::type_complexity)]
    pub fn vcpu_telemetry(
        &mut self,
    ) -> Vec<(u8, libc::pthread_t, Result<KvmStatsReader, KvmStatsError>)> {
        self.vcpus
            .iter_mut()
            .filter_map(|v| {
                let thread = v.pthread()?;
                let stats = v.take_kvm_stats()?;
                Some((v.index(), thread, stats))
            })
            .collect()
    }

    /// Stops every vCPU at its next exit; they keep their state.
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        self.for_each_vcpu(VcpuEvent::Pause, VcpuResponse::Paused)?;
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        self.for_each_vcpu(VcpuEvent::Resume, VcpuResponse::Resumed)?;
        self.state = RunState::Running;
        Ok(())
    }

    fn for_each_vcpu(&self, event: VcpuEvent, expect: VcpuResponse) -> Result<(), VcpuError> {
        // Send to all first so they stop together, then collect the answers.
        for vcpu in &self.vcpus {
            vcpu.send(event)?;
        }
        for vcpu in &self.vcpus {
            vcpu.await_response(expect, VCPU_RESPONSE_TIMEOUT, event)?;
        }
        Ok(())
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), I8042Error> {
        self.i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send_ctrl_alt_del()
    }

    /// Replaces a drive's rate limiter while the guest runs; None if there is no such drive.
    pub fn update_drive_rate_limiter(
        &self,
        drive_id: &str,
        limiter: RateLimiterConfig,
    ) -> Option<Result<(), BlockError>> {
        Some(find(&self.virtio.blocks, drive_id)?.update_rate_limiter(limiter))
    }

    /// Replaces an interface's rate limiters while the guest runs; None if there is no such
    /// interface.
    pub fn update_net_rate_limiters(
        &self,
        iface_id: &str,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> Option<Result<(), NetError>> {
        Some(find(&self.virtio.nets, iface_id)?.update_rate_limiters(rx, tx))
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<std::sync::MutexGuard<'_, Balloon>> {
        self.virtio.balloon.as_deref().map(lock)
    }

    /// The virtio-mem device, if the VM has a hotplug region.
    pub fn hotplug_memory(&self) -> Option<std::sync::MutexGuard<'_, VirtioMem>> {
        self.virtio.memory.as_deref().map(lock)
    }

    /// The host's and the guest's view of the guest's memory.
    pub fn memory_accounting(&mut self) -> MemoryAccounting {
        let mut a = MemoryAccounting {
            guest_rss_bytes: resident_bytes(&self.mem),
            ..MemoryAccounting::default()
        };
        if let Some(mem) = self.hotplug_memory() {
            a.plugged_bytes = mem.plugged_bytes();
            a.requested_bytes = mem.requested_bytes();
        }
        if let Some(balloon) = self.balloon() {
            a.balloon_bytes = u64::from(balloon.actual_pages()) * PAGE_SIZE;
            a.balloon_target_bytes = u64::from(balloon.options().target_pages) * PAGE_SIZE;
            a.guest_report = balloon.latest_report();
        }
        a
    }

    /// CPU time the vCPU threads have used so far, in ns.
    pub fn vcpu_cpu_ns(&self) -> u64 {
        self.vcpus
            .iter()
            .filter_map(VcpuHandle::pthread)
            .map(|t| thread_cpu_ns(t).unwrap_or(0))
            .sum()
    }

    /// Gives the host back the zero pages of mostly unused huge pages of guest memory
    /// ([`trim_zero_pages`], from `from`, at most `max_scanned` resident pieces), with the vCPUs
    /// paused meanwhile; a VM the user paused stays paused. Runs on the VMM thread, which is also
    /// the one that runs the devices.
    pub fn trim_memory(
        &mut self,
        from: GuestAddress,
        max_scanned: u64,
    ) -> Result<(TrimReport, Option<GuestAddress>), VcpuError> {
        if self.state == RunState::Paused {
            return Ok(trim_zero_pages(&self.mem, from, max_scanned));
        }
        self.pause()?;
        let result = trim_zero_pages(&self.mem, from, max_scanned);
        self.resume()?;
        Ok(result)
    }

    /// Makes every vCPU leave KVM_RUN once, to look at what changed (a seccomp stage).
    pub fn kick_vcpus(&self) {
        for vcpu in &self.vcpus {
            vcpu.kick();
        }
    }

    /// Stops and joins every vCPU thread, then releases the VM.
    pub fn stop(mut self) {
        for vcpu in self.vcpus.drain(..) {
            vcpu.finish();
        }
    }
}
