//! The VM's vCPUs and their threads. The boot vCPUs start when the VM is built; with ACPI, vCPUs
//! up to `max_vcpus` are plugged and unplugged while the guest runs ([`Vcpus::set_count`]).
//!
//! Plug: the vCPU's thread starts (from the spawner, see `vstate::vcpu::spawner`) and waits in
//! KVM for the guest's INIT/SIPI; the hot-plug controller shows it present with an insert event,
//! and the GED interrupts the guest, whose ACPI code notifies its OS, which brings the CPU up.
//! Unplug: the controller shows a remove event and the GED interrupts; the guest takes the CPU
//! offline and ejects it (`_EJ0`), its consent. Only then does the thread end
//! ([`Vcpus::reap_ejected`]); until then the removal is pending and further changes wait.
//!
//! Every possible vCPU is made in KVM and configured at build, though its thread starts only
//! when it is plugged: later the VMM thread's seccomp filter would not let it make one (a new
//! vCPU's run page is a mapping of its fd, a file mapping the steady stage refuses), and KVM
//! cannot delete a vCPU anyway. An unplugged vCPU keeps its fd and exit counters, and comes back
//! with them.

use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::acpi::cpu_hotplug::{CpuHotplug, CpuHotplugError, CpuState};
use devices::acpi::ged::{Ged, EVENT_CPU_HOTPLUG};
use predictor::telemetry::{ExitRecorder, ExitTotals};
use serde::Serialize;

use crate::device_manager::acpi::AcpiDevices;
use crate::exit::ExitSignal;
use crate::metrics::METRICS;
use crate::vstate::vcpu::spawner::Spawner;
use crate::vstate::vcpu::{
    IoBuses, Stopped, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuResponse, VcpuState,
};

/// How long a vCPU gets to acknowledge a pause or resume.
const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a change of the vCPU count was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("vcpu_count must be at least 1")]
    Zero,
    #[error("vcpu_count {requested} is above max_vcpus {max} (machine-config.max_vcpus, set at boot, bounds hot-plug)")]
    AboveMax { requested: u8, max: u8 },
    #[error("this VM cannot change its vCPU count while it runs: {0}")]
    NoHotplug(&'static str),
    #[error("the guest has not ejected vCPU {cpu} yet: its removal is pending, and the vCPU count changes again once it is gone (GET /hotplug/vcpus)")]
    EjectPending { cpu: u8 },
    #[error("the VM is paused: resume it before changing its vCPUs")]
    Paused,
    #[error("vCPU {cpu} is unusable: {why}")]
    Lost { cpu: u8, why: String },
    #[error("{0}")]
    Controller(#[from] CpuHotplugError),
    #[error("cannot interrupt the guest about the change: {0}")]
    Notify(std::io::Error),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
}

impl HotplugError {
    /// A request that conflicts with the VM's state (it may succeed later), not a bad one.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            HotplugError::EjectPending { .. } | HotplugError::Paused
        )
    }
}

/// What a change of the vCPU count did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CountChange {
    /// vCPUs whose threads started (the guest was told of them).
    pub plugged: Vec<u8>,
    /// vCPUs the guest was asked to give up.
    pub removal_requested: Vec<u8>,
}

/// One vCPU as `GET /hotplug/vcpus` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuInfo {
    pub index: u8,
    /// `running`, `plugged` (running; the guest has not taken note yet), `removing` (running;
    /// the guest has not ejected it yet), `unplugged`, or `lost` (its thread failed).
    pub state: &'static str,
    /// The thread's kernel id while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<libc::pid_t>,
}

/// `GET /hotplug/vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuStatus {
    /// vCPUs with a running thread (pending removals included).
    pub online: u8,
    pub max_vcpus: u8,
    /// Whether the VM can plug and unplug vCPUs (it has ACPI).
    pub hotplug: bool,
    /// Whether the guest has taken the CPU hot-plug controller into use (read a vCPU's status
    /// from it): until then a plug may come before the guest could take note of it.
    pub guest_uses_hotplug: bool,
    pub vcpus: Vec<VcpuInfo>,
}

/// Where a vCPU's thread stands.
enum Run {
    /// Not running: its fd and exit observer, ready to start.
    Idle(Stopped),
    Running(VcpuHandle),
    /// Its thread panicked or could not start; the vCPU cannot run again.
    Lost(String),
}

struct Slot {
    index: u8,
    exits: ExitTotals,
    /// KVM's binary statistics file of the vCPU, if asked for; taken once by telemetry.
    stats: Option<std::io::Result<File>>,
    run: Run,
    /// Bumped each time the thread starts, so a reader can tell a new thread from the old.
    starts: u64,
}

/// The hot-plug side: the controller, the event device and the thread that starts vCPUs.
struct Hotplug {
    devices: AcpiDevices,
    spawner: Spawner,
}

/// A vCPU's thread as telemetry reads it.
pub struct VcpuTelemetry {
    pub index: u8,
    /// Which start of the vCPU's thread this is.
    pub start: u64,
    /// Its thread, for the thread's CPU clock.
    pub thread: libc::pthread_t,
    /// Its KVM binary statistics file, or why there is none (the first time only).
    pub stats: Option<std::io::Result<File>>,
    /// Its exit counts.
    pub exits: ExitTotals,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every vCPU of a VM.
pub struct Vcpus {
    slots: Vec<Slot>,
    buses: Arc<IoBuses>,
    exit: Arc<ExitSignal>,
    hotplug: Option<Hotplug>,
    /// Why a VM without hot-plug has none.
    no_hotplug: &'static str,
    paused: bool,
    /// Bumped whenever a thread starts or ends.
    generation: u64,
    /// Calls of [`Vcpus::renotify`] in a row that found a CPU event unread, and how many more
    /// it waits before raising it again (doubled each time: a guest that never handles
    /// hot-plug is not interrupted on and on).
    unread_calls: u32,
    raise_after: u32,
}

impl Vcpus {
    /// Takes every configured vCPU (index order) and starts the first `boot`; with the ACPI
    /// devices and a spawner, vCPUs can be plugged and unplugged later (else `Err` says why
    /// not). `stats`: open each vCPU's KVM statistics file for the predictor. `paused`: the
    /// boot vCPUs wait for [`Vcpus::resume`] before they first run (a restored VM).
    pub fn start(
        vcpus: Vec<Vcpu>,
        boot: u8,
        buses: Arc<IoBuses>,
        exit: Arc<ExitSignal>,
        stats: bool,
        hotplug: Result<(AcpiDevices, Spawner), &'static str>,
        paused: bool,
    ) -> Result<Self, VcpuError> {
        let slots = vcpus
            .into_iter()
            .map(|vcpu| {
                // Each vCPU counts its exits once; the metrics and the predictor read the
                // same counts, across unplugs and plugs.
                let (recorder, exits) = ExitRecorder::new();
                METRICS.register_vcpu(exits.clone());
                Slot {
                    index: vcpu.index(),
                    exits,
                    stats: stats.then(|| vcpu.stats_file()),
                    run: Run::Idle((vcpu, Box::new(recorder))),
                    starts: 0,
                }
            })
            .collect();
        let mut all = Self {
            slots,
            buses,
            exit,
            no_hotplug: *hotplug.as_ref().err().unwrap_or(&""),
            hotplug: hotplug
                .ok()
                .map(|(devices, spawner)| Hotplug { devices, spawner }),
            paused,
            generation: 0,
            unread_calls: 0,
            raise_after: 1,
        };
        for i in 0..usize::from(boot) {
            // The boot vCPUs start from this (still unfiltered) thread.
            let Run::Idle((vcpu, observer)) =
                std::mem::replace(&mut all.slots[i].run, Run::Lost("starting".into()))
            else {
                continue;
            };
            let handle = vcpu.start(all.buses.clone(), all.exit.clone(), observer, paused)?;
            all.slots[i].run = Run::Running(handle);
            all.slots[i].starts += 1;
        }
        Ok(all)
    }

    fn running(&self) -> impl Iterator<Item = &VcpuHandle> {
        self.slots.iter().filter_map(|s| match &s.run {
            Run::Running(h) => Some(h),
            _ => None,
        })
    }

    /// vCPUs with a running thread.
    pub fn online(&self) -> u8 {
        self.running().count() as u8
    }

    /// The most vCPUs the VM can run.
    pub fn max(&self) -> u8 {
        self.slots.len() as u8
    }

    /// Whether vCPUs can be plugged and unplugged (the VM has ACPI and room above its count).
    pub fn can_hotplug(&self) -> bool {
        self.hotplug.is_some()
    }

    /// Changes whenever a vCPU thread starts or ends.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Kernel thread ids of the vCPU threads, and of the thread that starts the vCPUs plugged
    /// later (placed with them, a thread it starts is born in their cgroups).
    pub fn tids(&self) -> Vec<libc::pid_t> {
        let mut tids: Vec<_> = self.running().filter_map(VcpuHandle::tid).collect();
        tids.extend(self.hotplug.as_ref().map(|h| h.spawner.tid()));
        tids
    }

    /// The running vCPUs' threads (for their CPU clocks).
    pub fn threads(&self) -> Vec<libc::pthread_t> {
        self.running().filter_map(VcpuHandle::pthread).collect()
    }

    /// What telemetry reads of each running vCPU.
    pub fn telemetry(&mut self) -> Vec<VcpuTelemetry> {
        self.slots
            .iter_mut()
            .filter_map(|s| {
                let Run::Running(h) = &s.run else {
                    return None;
                };
                Some(VcpuTelemetry {
                    index: s.index,
                    start: s.starts,
                    thread: h.pthread()?,
                    stats: s.stats.take(),
                    exits: s.exits.clone(),
                })
            })
            .collect()
    }

    /// Stops every running vCPU at its next exit; they keep their state.
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        if let Err(e) = self.for_each_running(VcpuEvent::Pause, VcpuResponse::Paused) {
            // Some vCPUs may have stopped (or stop later, on the event already sent): the VM
            // stays running, so let them all go again rather than leave the guest half stopped.
            if let Err(r) = self.for_each_running(VcpuEvent::Resume, VcpuResponse::Resumed) {
                tracing::warn!("after a failed pause ({e}), resuming failed too: {r}");
            }
            return Err(e);
        }
        self.paused = true;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        self.for_each_running(VcpuEvent::Resume, VcpuResponse::Resumed)?;
        self.paused = false;
        Ok(())
    }

    fn for_each_running(&self, event: VcpuEvent, expect: VcpuResponse) -> Result<(), VcpuError> {
        // Send to all first so they stop together, then collect the answers.
        for vcpu in self.running() {
            vcpu.send(event)?;
        }
        for vcpu in self.running() {
            vcpu.await_response(&expect, VCPU_RESPONSE_TIMEOUT, event)?;
        }
        Ok(())
    }

    /// Every vCPU's state, in vCPU order; the VM must be paused. A vCPU without a running
    /// thread cannot be saved (a VM that can plug vCPUs is refused before this).
    pub fn save_states(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.slots
            .iter()
            .map(|s| match &s.run {
                Run::Running(h) => h.save_state(VCPU_RESPONSE_TIMEOUT),
                _ => Err(VcpuError::Gone { index: s.index }),
            })
            .collect()
    }

    /// Makes every running vCPU leave KVM_RUN once, to look at what changed (a seccomp stage).
    pub fn kick(&self) {
        for vcpu in self.running() {
            vcpu.kick();
        }
    }

    fn controller(&self) -> Option<MutexGuard<'_, CpuHotplug>> {
        self.hotplug.as_ref().map(|h| lock(&h.devices.cpu_hotplug))
    }

    /// Asks for `count` vCPUs: plugs the lowest unplugged ones, or asks the guest to give up the
    /// highest. Refused, with nothing changed, for 0, above `max_vcpus`, without ACPI, while
    /// paused, and while the guest has not ejected a vCPU whose removal was asked before.
    pub fn set_count(&mut self, count: u8) -> Result<CountChange, HotplugError> {
        if count == 0 {
            return Err(HotplugError::Zero);
        }
        if count > self.max() {
            return Err(HotplugError::AboveMax {
                requested: count,
                max: self.max(),
            });
        }
        let online = self.online();
        let Some(hotplug) = &self.hotplug else {
            return match count == online {
                true => Ok(CountChange::default()),
                false => Err(HotplugError::NoHotplug(self.no_hotplug)),
            };
        };
        if let Some(cpu) = lock(&hotplug.devices.cpu_hotplug).removal_pending() {
            return Err(HotplugError::EjectPending { cpu });
        }
        if count == online {
            return Ok(CountChange::default());
        }
        if self.paused {
            return Err(HotplugError::Paused);
        }
        let change = if count > online {
            self.plug(count - online)?
        } else {
            self.request_removal(online - count)?
        };
        let hotplug = self.hotplug.as_ref().expect("checked above");
        lock(&hotplug.devices.ged)
            .notify(EVENT_CPU_HOTPLUG)
            .map_err(HotplugError::Notify)?;
        Ok(change)
    }

    /// Starts the threads of the `n` lowest unplugged vCPUs and marks them inserted.
    fn plug(&mut self, n: u8) -> Result<CountChange, HotplugError> {
        let picked: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.run, Run::Idle(_)))
            .map(|(i, _)| i)
            .take(usize::from(n))
            .collect();
        if picked.len() < usize::from(n) {
            let cpu = self
                .slots
                .iter()
                .find_map(|s| match &s.run {
                    Run::Lost(why) => Some((s.index, why.clone())),
                    _ => None,
                })
                .unwrap_or((0, "no vCPU left to plug".into()));
            return Err(HotplugError::Lost {
                cpu: cpu.0,
                why: cpu.1,
            });
        }
        let hotplug = self
            .hotplug
            .as_ref()
            .expect("plug is only called with hot-plug");
        let mut change = CountChange::default();
        for i in picked {
            let slot = &mut self.slots[i];
            let Run::Idle((vcpu, observer)) =
                std::mem::replace(&mut slot.run, Run::Lost("starting".into()))
            else {
                unreachable!("picked idle slots only");
            };
            match hotplug
                .spawner
                .spawn(vcpu, self.buses.clone(), self.exit.clone(), observer)
            {
                Ok(handle) => {
                    slot.run = Run::Running(handle);
                    slot.starts += 1;
                    self.generation += 1;
                }
                Err(e) => {
                    slot.run = Run::Lost(e.to_string());
                    return Err(e.into());
                }
            }
            lock(&hotplug.devices.cpu_hotplug).insert(slot.index)?;
            change.plugged.push(slot.index);
        }
        Ok(change)
    }

    /// Asks the guest to give up the `n` highest running vCPUs (never vCPU 0).
    fn request_removal(&mut self, n: u8) -> Result<CountChange, HotplugError> {
        let picked: Vec<u8> = self
            .slots
            .iter()
            .rev()
            .filter(|s| s.index != 0 && matches!(s.run, Run::Running(_)))
            .map(|s| s.index)
            .take(usize::from(n))
            .collect();
        let mut controller = self
            .controller()
            .expect("removal is only asked with hot-plug");
        for &cpu in &picked {
            controller.request_removal(cpu)?;
        }
        Ok(CountChange {
            plugged: Vec::new(),
            removal_requested: picked,
        })
    }

    /// Raises the CPU hot-plug interrupt again if an event the guest has still not taken was
    /// already unread at the previous call (then after 2, 4, ... calls more while it stays
    /// unread): an interrupt raised before the guest's handler was there (Linux reads the
    /// controller when it scans ACPI, a little before its GED driver binds) is lost, while the
    /// events wait in the controller. Returns whether it did.
    pub fn renotify(&mut self) -> Result<bool, HotplugError> {
        let Some(hotplug) = &self.hotplug else {
            return Ok(false);
        };
        let unread = lock(&hotplug.devices.ged).pending() & EVENT_CPU_HOTPLUG != 0
            && lock(&hotplug.devices.cpu_hotplug).events_pending();
        if !unread {
            (self.unread_calls, self.raise_after) = (0, 1);
            return Ok(false);
        }
        self.unread_calls = self.unread_calls.saturating_add(1);
        let again = self.unread_calls > self.raise_after;
        if again {
            self.unread_calls = 1;
            self.raise_after = self.raise_after.saturating_mul(2);
            lock(&hotplug.devices.ged)
                .notify(EVENT_CPU_HOTPLUG)
                .map_err(HotplugError::Notify)?;
            tracing::info!("CPU hot-plug event unread by the guest: raised again");
        }
        Ok(again)
    }

    /// Ends the threads of the vCPUs the guest ejected since the last call (the VMM thread calls
    /// this when the controller's eject event fires); returns them.
    pub fn reap_ejected(&mut self) -> Vec<u8> {
        let ejected = match self.controller() {
            Some(mut c) => c.take_ejected(),
            None => return Vec::new(),
        };
        for &cpu in &ejected {
            let slot = &mut self.slots[usize::from(cpu)];
            let Run::Running(handle) =
                std::mem::replace(&mut slot.run, Run::Lost("stopping".into()))
            else {
                continue;
            };
            slot.run = match handle.finish() {
                Some(stopped) => Run::Idle(stopped),
                None => Run::Lost("its thread panicked".into()),
            };
            self.generation += 1;
            tracing::info!("vCPU {cpu} ejected by the guest; its thread has ended");
        }
        ejected
    }

    /// Each vCPU's state, for `GET /hotplug/vcpus`.
    pub fn status(&self) -> VcpuStatus {
        let controller = self.controller();
        let vcpus = self
            .slots
            .iter()
            .map(|s| {
                let (state, tid) = match &s.run {
                    Run::Running(h) => {
                        let state = match controller.as_ref().map(|c| c.state(s.index)) {
                            Some(CpuState::Removing) => "removing",
                            Some(CpuState::Present {
                                acknowledged: false,
                            }) => "plugged",
                            _ => "running",
                        };
                        (state, h.tid())
                    }
                    Run::Idle(_) => ("unplugged", None),
                    Run::Lost(_) => ("lost", None),
                };
                VcpuInfo {
                    index: s.index,
                    state,
                    tid,
                }
            })
            .collect();
        VcpuStatus {
            online: self.online(),
            max_vcpus: self.max(),
            hotplug: self.can_hotplug(),
            guest_uses_hotplug: controller.as_ref().is_some_and(|c| c.in_use()),
            vcpus,
        }
    }

    /// The event device, for tests of what the guest was told.
    pub fn ged(&self) -> Option<Arc<Mutex<Ged>>> {
        self.hotplug.as_ref().map(|h| h.devices.ged.clone())
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        for s in &mut self.slots {
            if let Run::Running(h) = std::mem::replace(&mut s.run, Run::Lost("stopped".into())) {
                let _ = h.finish();
            }
        }
        // The spawner thread ends with it.
        self.hotplug = None;
    }
}
