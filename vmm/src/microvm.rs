//! A booted microVM: its vCPU threads and the host resources they run on.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::legacy::{I8042Error, I8042};
use devices::virtio::balloon::stats::StatsReport;
use devices::virtio::balloon::Balloon;
use devices::virtio::block::Block;
use devices::virtio::device_writes::DeviceWrites;
use devices::virtio::discard::PAGE_SIZE;
use devices::virtio::mem::VirtioMem;
use devices::virtio::net::Net;
use devices::virtio::pmem::Pmem;
use devices::virtio::vhost_user_block::VhostUserBlock;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::console::RawTerminal;
use crate::device_manager::legacy::ResetToExit;
use crate::device_manager::registry::RegisteredDevice;
use crate::vcpus::{CountChange, HotplugError, VcpuStatus, VcpuTelemetry, Vcpus};
use crate::vstate::memory::{resident_bytes, trim_zero_pages, TrimReport};
use crate::vstate::vcpu::{VcpuError, VcpuState};
use crate::vstate::vm::{Vm, VmError};

/// The virtio devices that can change while the guest runs, by their spec ids.
#[derive(Default)]
pub struct VirtioHandles {
    pub blocks: Vec<(String, Arc<Mutex<Block>>)>,
    pub vhost_user_blocks: Vec<(String, Arc<Mutex<VhostUserBlock>>)>,
    pub nets: Vec<(String, Arc<Mutex<Net>>)>,
    pub pmems: Vec<(String, Arc<Mutex<Pmem>>)>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub memory: Option<Arc<Mutex<VirtioMem>>>,
    /// The pages the devices wrote since the last snapshot (with dirty page tracking).
    pub writes: Arc<DeviceWrites>,
}

fn lock<T>(device: &Mutex<T>) -> MutexGuard<'_, T> {
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

fn find<'a, T>(devices: &'a [(String, Arc<Mutex<T>>)], id: &str) -> Option<MutexGuard<'a, T>> {
    let (_, dev) = devices.iter().find(|(i, _)| i == id)?;
    Some(lock(dev))
}

/// A device's name with its saved state (or why it could not be saved).
pub type SavedDevice<T = Vec<u8>> = (String, T);

/// Whether the vCPUs are running guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// A booted microVM. Dropping it without [`MicroVm::stop`] leaves threads to die with the process.
pub struct MicroVm {
    // Field order is drop order: vCPU threads are joined in `stop` before memory and the VM go.
    vcpus: Vcpus,
    state: RunState,
    i8042: Arc<Mutex<I8042<ResetToExit>>>,
    virtio: VirtioHandles,
    /// Every device on the VM's buses.
    devices: Vec<RegisteredDevice>,
    _terminal: Option<RawTerminal>,
    vm: Vm,
    /// Guest RAM and the hotplug region.
    mem: GuestMemoryMmap,
    /// The pages the idle trim gave back since the last snapshot, one bitmap per region (empty
    /// until the first): a Diff snapshot found by residency must write them (as zeroes), or a
    /// restore would read the older snapshot's content there.
    trimmed: Vec<Vec<u64>>,
}

impl MicroVm {
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        vcpus: Vcpus,
        terminal: Option<RawTerminal>,
        i8042: Arc<Mutex<I8042<ResetToExit>>>,
        virtio: VirtioHandles,
        devices: Vec<RegisteredDevice>,
    ) -> Self {
        Self {
            vcpus,
            state: RunState::Running,
            i8042,
            virtio,
            devices,
            _terminal: terminal,
            vm,
            mem,
            trimmed: Vec::new(),
        }
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// A VM whose vCPUs were started paused (a snapshot loaded without `resume_vm`).
    pub(crate) fn started_paused(mut self) -> Self {
        self.state = RunState::Paused;
        self
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn virtio(&self) -> &VirtioHandles {
        &self.virtio
    }

    /// Every device on the VM's buses, in attach order (their ids).
    pub fn devices(&self) -> &[RegisteredDevice] {
        &self.devices
    }

    /// Kernel thread ids of the vCPU threads (and of the thread that starts plugged vCPUs, so
    /// that cgroups holding these hold them too).
    pub fn vcpu_tids(&self) -> Vec<libc::pid_t> {
        self.vcpus.tids()
    }

    /// What telemetry reads of each running vCPU (each stats file is handed over once).
    pub fn vcpu_telemetry(&mut self) -> Vec<VcpuTelemetry> {
        self.vcpus.telemetry()
    }

    /// Changes whenever a vCPU thread starts or ends.
    pub fn vcpu_generation(&self) -> u64 {
        self.vcpus.generation()
    }

    /// vCPUs with a running thread.
    pub fn vcpus_online(&self) -> u8 {
        self.vcpus.online()
    }

    /// Whether vCPUs can be plugged and unplugged while the VM runs.
    pub fn can_hotplug_vcpus(&self) -> bool {
        self.vcpus.can_hotplug()
    }

    /// Plugs vCPUs or asks the guest to give some up (see [`Vcpus::set_count`]).
    pub fn set_vcpu_count(&mut self, count: u8) -> Result<CountChange, HotplugError> {
        self.vcpus.set_count(count)
    }

    /// Raises a CPU hot-plug event the guest has left unread since the last call again.
    pub fn renotify_vcpu_events(&mut self) -> Result<bool, HotplugError> {
        self.vcpus.renotify()
    }

    /// Ends the threads of the vCPUs the guest has ejected; returns them.
    pub fn reap_ejected_vcpus(&mut self) -> Vec<u8> {
        self.vcpus.reap_ejected()
    }

    pub fn vcpu_status(&self) -> VcpuStatus {
        self.vcpus.status()
    }

    /// Stops every vCPU at its next exit; they keep their state.
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        self.vcpus.pause()?;
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        self.vcpus.resume()?;
        self.state = RunState::Running;
        Ok(())
    }

    /// The KVM VM (its in-kernel devices' state, its dirty page log).
    pub fn kvm_vm(&self) -> &Vm {
        &self.vm
    }

    /// Every vCPU's state, in vCPU order; the VM must be paused.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.vcpus.save_states()
    }

    /// Every device's snapshot state by its registered name, or the device that failed and why.
    pub fn save_devices(&self) -> Result<Vec<SavedDevice>, SavedDevice<String>> {
        self.devices
            .iter()
            .map(|d| {
                let mut device = d.persist.lock().unwrap_or_else(|p| p.into_inner());
                let bytes = device
                    .save_bytes()
                    .map_err(|e| (d.info.name.clone(), e.to_string()))?;
                Ok((d.info.name.clone(), bytes))
            })
            .collect()
    }

    /// The pages the guest (KVM's log) and its devices (their returned chains) wrote since the
    /// last call, one bitmap per region of [`MicroVm::guest_memory`] (RAM regions are KVM slots
    /// 0.., the hotplug region's slots follow).
    pub fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let hotplug = self.hotplug_memory().map(|m| m.layout());
        let ram = self.mem.num_regions() - usize::from(hotplug.is_some());
        let mut out = Vec::with_capacity(self.mem.num_regions());
        for (slot, region) in self.mem.iter().take(ram).enumerate() {
            out.push(self.vm.dirty_log(slot as u32, region.len())?);
        }
        if let Some(l) = hotplug {
            let mut bits = Vec::new();
            for k in 0..l.slots() {
                bits.extend(self.vm.dirty_log((ram + k) as u32, l.slot_size)?);
            }
            out.push(bits);
        }
        for (bits, written) in out.iter_mut().zip(self.virtio.writes.take()) {
            bits.iter_mut().zip(written).for_each(|(b, w)| *b |= w);
        }
        Ok(out)
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), I8042Error> {
        self.i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send_ctrl_alt_del()
    }

    /// The drive with this spec id.
    pub fn drive(&self, drive_id: &str) -> Option<MutexGuard<'_, Block>> {
        find(&self.virtio.blocks, drive_id)
    }

    /// The vhost-user drive with this spec id.
    pub fn vhost_user_drive(&self, drive_id: &str) -> Option<MutexGuard<'_, VhostUserBlock>> {
        find(&self.virtio.vhost_user_blocks, drive_id)
    }

    /// The network interface with this spec id.
    pub fn net(&self, iface_id: &str) -> Option<MutexGuard<'_, Net>> {
        find(&self.virtio.nets, iface_id)
    }

    pub fn pmem(&self, id: &str) -> Option<MutexGuard<'_, Pmem>> {
        find(&self.virtio.pmems, id)
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<MutexGuard<'_, Balloon>> {
        self.virtio.balloon.as_deref().map(lock)
    }

    /// The virtio-mem device, if the VM has a hotplug region.
    pub fn hotplug_memory(&self) -> Option<MutexGuard<'_, VirtioMem>> {
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

    /// The running vCPUs' threads (for their CPU clocks).
    pub fn vcpu_threads(&self) -> Vec<libc::pthread_t> {
        self.vcpus.threads()
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
        let paused = self.state == RunState::Paused;
        if !paused {
            self.pause()?;
        }
        if self.trimmed.is_empty() {
            self.trimmed = self
                .mem
                .iter()
                .map(|r| vec![0; (r.len() / PAGE_SIZE).div_ceil(64) as usize])
                .collect();
        }
        let (mem, trimmed) = (&self.mem, &mut self.trimmed);
        let result = trim_zero_pages(mem, from, max_scanned, &mut |addr, len| {
            let Some((index, region)) = mem
                .iter()
                .enumerate()
                .find(|(_, r)| r.to_region_addr(addr).is_some())
            else {
                return;
            };
            let first = (addr.0 - region.start_addr().0) / PAGE_SIZE;
            for page in first..first + len / PAGE_SIZE {
                trimmed[index][(page / 64) as usize] |= 1 << (page % 64);
            }
        });
        if !paused {
            self.resume()?;
        }
        Ok(result)
    }

    /// The pages the idle trim gave back since [`MicroVm::forget_trimmed`], one bitmap per region
    /// of [`MicroVm::guest_memory`]; empty if none was.
    pub fn trimmed_pages(&self) -> &[Vec<u64>] {
        &self.trimmed
    }

    /// A snapshot holds guest memory as it is now: later Diffs need only what the trim gives back
    /// after it.
    pub fn forget_trimmed(&mut self) {
        self.trimmed.clear();
    }

    /// Makes every vCPU leave KVM_RUN once, to look at what changed (a seccomp stage).
    pub fn kick_vcpus(&self) {
        self.vcpus.kick();
    }

    /// Stops and joins every vCPU thread, then releases the VM.
    pub fn stop(mut self) {
        self.vcpus.stop();
    }
}
