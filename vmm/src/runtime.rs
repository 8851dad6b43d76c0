//! The VMM thread: one event loop that exists before the VM does, owns the VM's configuration and,
//! once started, the VM; it serves API requests between events and returns why the VM ended.

use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::autopilot::elastic::ElasticMemory;
use crate::autopilot::exits::now_ns;
use crate::autopilot::{Autopilot, PredictorStatus};
use crate::builder::build_microvm;
use crate::exit::{ExitReason, ExitSignal};
use crate::idle_trim::IdleTrim;
use crate::metrics::METRICS;
use crate::microvm::{MicroVm, RunState};
use crate::rpc::{ActionError, ActionRequest, InstanceInfo, InstanceState, VmmAction, VmmData};
use crate::seccomp::{self, ThreadKind};
use crate::vmm_config::{
    validate_drives, validate_interfaces, BalloonStatsUpdate, BalloonUpdate, DriveUpdate,
    HugePages, MemoryHotplugSizeUpdate, MemoryHotplugStatus, NetworkInterfaceUpdate,
    PredictorUpdate, VmConfig,
};

/// Every fd the VMM thread serves is a subscriber of one event manager.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors of setting up the VMM thread.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create the event loop: {0}")]
    EventManager(event_manager::Error),
    #[error("cannot create the exit event: {0}")]
    ExitEvent(std::io::Error),
    #[error("cannot catch termination signals: {0}")]
    Signals(std::io::Error),
}

fn start_metrics_timer(event_manager: &mut EventManager<Subscriber>) -> std::io::Result<()> {
    let mut timer = TimerFd::new()?;
    timer.reset(METRICS_FLUSH_PERIOD, Some(METRICS_FLUSH_PERIOD))?;
    event_manager.add_subscriber(Arc::new(Mutex::new(MetricsTimer(timer))));
    Ok(())
}

/// Drains an eventfd whose only job is to wake the loop; the loop then looks at the queue or
/// signal behind it.
struct Wakeup(EventFd);

impl MutEventSubscriber for Wakeup {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch wakeup eventfd {}: {e}", self.0.as_raw_fd());
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Writes the metrics every [`METRICS_FLUSH_PERIOD`], as Firecracker does, once a sink exists.
struct MetricsTimer(TimerFd);

/// How often configured metrics are flushed without being asked.
pub const METRICS_FLUSH_PERIOD: Duration = Duration::from_secs(60);

impl MutEventSubscriber for MetricsTimer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch the metrics timer: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.wait();
        if let Err(e) = METRICS.flush() {
            tracing::warn!("periodic metrics flush: {e}");
        }
    }
}

/// `list` with `item` in place of the entry with the same id, or added at the end (a PUT of a
/// device section), for validation before it replaces the configuration.
fn upsert_by_id<T: Clone>(list: &[T], item: T, id: fn(&T) -> &String) -> Vec<T> {
    let mut list = list.to_vec();
    match list.iter_mut().find(|existing| id(existing) == id(&item)) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
    list
}

/// The VMM thread's state.
pub struct Runtime {
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    config: VmConfig,
    vm: Option<MicroVm>,
    autopilot: Option<Autopilot>,
    /// Gives back unused parts of transparent huge pages once the guest idles.
    idle_trim: Option<IdleTrim>,
    /// The VM's cgroup the jailer made (`--cgroup-dir`), where the predictor sets the CPU quota.
    vm_cgroup: Option<jailer::cgroup::Cgroup>,
    api: Option<Receiver<ActionRequest>>,
    id: String,
    /// The model store entry the predictor starts from (a profiled launch).
    warm: Option<crate::profile::store::WarmStart>,
}

impl Runtime {
    /// A VMM thread for the VM `config` describes (possibly still incomplete, for the API to fill).
    pub fn new(id: String, config: VmConfig) -> Result<Self, RuntimeError> {
        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(RuntimeError::EventManager)?;
        let exit = Arc::new(ExitSignal::new().map_err(RuntimeError::ExitEvent)?);
        exit.catch_termination_signals()
            .map_err(RuntimeError::Signals)?;
        let wake = exit
            .event_fd()
            .try_clone()
            .map_err(RuntimeError::ExitEvent)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(Wakeup(wake))));
        Ok(Self {
            event_manager,
            exit,
            config,
            vm: None,
            autopilot: None,
            idle_trim: None,
            vm_cgroup: None,
            api: None,
            id,
            warm: None,
        })
    }

    /// The VM's cgroup, handed over by the jailer.
    pub fn set_vm_cgroup(&mut self, cgroup: jailer::cgroup::Cgroup) {
        self.vm_cgroup = Some(cgroup);
    }

    /// Starts the predictor from a model store entry instead of cold.
    pub fn set_warm_start(&mut self, warm: crate::profile::store::WarmStart) {
        self.warm = Some(warm);
    }

    /// Serves `requests`; `wake` is written by whoever queues one.
    pub fn attach_api(&mut self, requests: Receiver<ActionRequest>, wake: EventFd) {
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(Wakeup(wake))));
        self.api = Some(requests);
    }

    /// Boots the configured VM, then filters this thread's syscalls (after the vCPU threads
    /// started, so that they do not inherit the VMM thread's filter on top of their own).
    pub fn start(&mut self) -> Result<(), ActionError> {
        if self.vm.is_some() {
            return Err(ActionError::NotAllowedAfterBoot);
        }
        let mut autopilot = match &self.config.predictor {
            Some(p) if p.enabled => Some(Autopilot::new(
                p,
                &self.config.machine_config,
                &self.id,
                now_ns(),
            )?),
            _ => None,
        };
        if let (Some(a), Some(w)) = (&mut autopilot, self.warm.take()) {
            a.warm_start(&w);
        }
        let mut vm = build_microvm(
            &self.config,
            self.exit.clone(),
            &mut self.event_manager,
            autopilot.as_mut().map(Autopilot::collector),
        )?;
        if let Some(a) = &mut autopilot {
            if let Err(e) = a.attach(
                &self.id,
                &mut vm,
                &self.config.drives,
                &self.config.network_interfaces,
                self.vm_cgroup.clone(),
                &mut self.event_manager,
            ) {
                vm.stop();
                return Err(ActionError::Predictor(e.to_string()));
            }
            let virtio = vm.virtio();
            if let Some(memory) = ElasticMemory::new(
                self.config.machine_config.mem_size_mib,
                virtio.memory.clone(),
                virtio.balloon.clone(),
            ) {
                a.set_memory_actuator(Box::new(memory));
            }
        }
        if self.config.machine_config.huge_pages == HugePages::Transparent {
            match IdleTrim::start(&mut self.event_manager) {
                Ok(t) => self.idle_trim = Some(t),
                Err(e) => tracing::warn!("no idle trim of guest memory: {e}"),
            }
        }
        self.vm = Some(vm);
        self.autopilot = autopilot;
        if let Err(e) = seccomp::install(ThreadKind::Vmm) {
            // An unfiltered VMM thread must not serve a running guest.
            self.exit.request(ExitReason::VmmError(e.to_string()));
            return Err(e.into());
        }
        Ok(())
    }

    /// The VMM thread's safe point: installs any seccomp stage requested since, and kicks the
    /// vCPUs so that they reach theirs.
    fn catch_up_seccomp(&mut self) -> Result<(), seccomp::SeccompError> {
        let before = seccomp::installed();
        seccomp::catch_up(ThreadKind::Vmm)?;
        if seccomp::installed() != before {
            if let Some(vm) = &self.vm {
                vm.kick_vcpus();
            }
        }
        Ok(())
    }

    /// Closes a predictor window if its clock ticked.
    fn close_window(&mut self) {
        let (Some(autopilot), Some(vm)) = (&mut self.autopilot, &mut self.vm) else {
            return;
        };
        if !autopilot.take_due() {
            return;
        }
        match autopilot.close_window(now_ns(), vm, &self.exit) {
            Ok(changes) => {
                for (id, limiter) in changes.drives {
                    if let Some(d) = self.config.drives.iter_mut().find(|d| d.drive_id == id) {
                        d.rate_limiter = Some(limiter);
                    }
                }
                for (id, limiter) in changes.nets {
                    let iface = self
                        .config
                        .network_interfaces
                        .iter_mut()
                        .find(|n| n.iface_id == id);
                    if let Some(n) = iface {
                        n.rx_rate_limiter = Some(limiter);
                        n.tx_rate_limiter = Some(limiter);
                    }
                }
            }
            Err(e) => tracing::error!("predictor window: {e}"),
        }
    }

    /// `PATCH /predictor`: before boot the section, after boot the live policy too.
    fn patch_predictor(&mut self, update: PredictorUpdate) -> Result<VmmData, ActionError> {
        let current = self
            .config
            .predictor
            .as_ref()
            .ok_or(ActionError::NoPredictor)?;
        let next = update.apply(current);
        next.validate(&self.config.machine_config)?;
        if self.vm.is_some() {
            let autopilot = self
                .autopilot
                .as_mut()
                .ok_or(ActionError::PredictorNotStarted)?;
            autopilot.reconfigure(&next, &self.config.machine_config)?;
        }
        self.config.predictor = Some(next);
        Ok(VmmData::Empty)
    }

    /// The VM's end signal (tests and embedders end the VM through it).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Serves events and requests until the VM ends, then stops it and says why it ended.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = self.catch_up_seccomp() {
                break ExitReason::VmmError(e.to_string());
            }
            if let Err(e) = self.event_manager.run() {
                break ExitReason::VmmError(format!("event loop failed: {e}"));
            }
            self.close_window();
            if let (Some(trim), Some(vm)) = (&mut self.idle_trim, &mut self.vm) {
                trim.run_if_due(vm);
            }
            self.serve_requests();
        };
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
        // After the vCPU threads are gone, so their cgroup can go too.
        self.autopilot = None;
        reason
    }

    fn serve_requests(&mut self) {
        let Some(requests) = self.api.take() else {
            return;
        };
        while let Ok(request) = requests.try_recv() {
            let result = self.handle(request.action);
            // A client that hung up no longer wants the answer.
            let _ = request.reply.send(result);
        }
        self.api = Some(requests);
    }

    fn before_boot(&self) -> Result<(), ActionError> {
        match self.vm {
            Some(_) => Err(ActionError::NotAllowedAfterBoot),
            None => Ok(()),
        }
    }

    fn running_vm(&mut self) -> Result<&mut MicroVm, ActionError> {
        self.vm.as_mut().ok_or(ActionError::NotAllowedBeforeBoot)
    }

    /// `PATCH /drives/{id}`: any field before boot, the rate limiter live after.
    fn patch_drive(&mut self, update: DriveUpdate) -> Result<VmmData, ActionError> {
        let index = self
            .config
            .drives
            .iter()
            .position(|d| d.drive_id == update.drive_id)
            .ok_or_else(|| ActionError::NoSuchDrive(update.drive_id.clone()))?;
        let mut drives = self.config.drives.clone();
        if let Some(path) = &update.path_on_host {
            if self.vm.is_some() {
                return Err(ActionError::DriveFieldFixedAfterBoot("path_on_host"));
            }
            drives[index].path_on_host = path.clone();
        }
        if update.rate_limiter.is_some() {
            drives[index].rate_limiter = update.rate_limiter;
        }
        validate_drives(&drives)?;
        if let (Some(vm), Some(limiter)) = (&self.vm, update.rate_limiter) {
            vm.update_drive_rate_limiter(&update.drive_id, limiter)
                .ok_or_else(|| ActionError::NoSuchDrive(update.drive_id.clone()))??;
        }
        self.config.drives = drives;
        Ok(VmmData::Empty)
    }

    /// `PATCH /network-interfaces/{id}`: the rate limiters, live after boot.
    fn patch_interface(&mut self, update: NetworkInterfaceUpdate) -> Result<VmmData, ActionError> {
        let missing = || ActionError::NoSuchInterface(update.iface_id.clone());
        let mut ifaces = self.config.network_interfaces.clone();
        let iface = ifaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
            .ok_or_else(missing)?;
        if update.rx_rate_limiter.is_some() {
            iface.rx_rate_limiter = update.rx_rate_limiter;
        }
        if update.tx_rate_limiter.is_some() {
            iface.tx_rate_limiter = update.tx_rate_limiter;
        }
        validate_interfaces(&ifaces)?;
        if let Some(vm) = &self.vm {
            vm.update_net_rate_limiters(
                &update.iface_id,
                update.rx_rate_limiter,
                update.tx_rate_limiter,
            )
            .ok_or_else(missing)??;
        }
        self.config.network_interfaces = ifaces;
        Ok(VmmData::Empty)
    }

    /// `PATCH /balloon`: a new target, live after boot.
    fn patch_balloon(&mut self, update: BalloonUpdate) -> Result<VmmData, ActionError> {
        let mut balloon = self.config.balloon.clone().ok_or(ActionError::NoBalloon)?;
        balloon.amount_mib = update.amount_mib;
        balloon.validate(self.config.machine_config.mem_size_mib)?;
        if let Some(vm) = &self.vm {
            let mut device = vm.balloon().ok_or(ActionError::NoBalloon)?;
            device.set_target_pages(balloon.options().target_pages);
        }
        self.config.balloon = Some(balloon);
        Ok(VmmData::Empty)
    }

    /// `PATCH /balloon/statistics`: how often the guest is asked for statistics.
    fn patch_balloon_stats(&mut self, update: BalloonStatsUpdate) -> Result<VmmData, ActionError> {
        let mut balloon = self.config.balloon.clone().ok_or(ActionError::NoBalloon)?;
        balloon.stats_polling_interval_s = update.stats_polling_interval_s;
        balloon.stats_polling_interval_ms = update.stats_polling_interval_ms;
        if let Some(vm) = &self.vm {
            let mut device = vm.balloon().ok_or(ActionError::NoBalloon)?;
            device.set_stats_interval(update.interval())?;
        }
        self.config.balloon = Some(balloon);
        Ok(VmmData::Empty)
    }

    fn balloon_stats(&self) -> Result<VmmData, ActionError> {
        let vm = self.vm.as_ref().ok_or(ActionError::NotAllowedBeforeBoot)?;
        let device = vm.balloon().ok_or(ActionError::NoBalloon)?;
        if device.options().stats_interval.is_zero() {
            return Err(ActionError::BalloonStatsDisabled);
        }
        Ok(VmmData::BalloonStats(Box::new(device.stats())))
    }

    /// `PATCH /hotplug/memory`: the size the guest should plug, after boot.
    fn patch_memory_hotplug(
        &mut self,
        update: MemoryHotplugSizeUpdate,
    ) -> Result<VmmData, ActionError> {
        let config = self
            .config
            .memory_hotplug
            .as_ref()
            .ok_or(ActionError::NoMemoryHotplug)?;
        config.validate_request(update.requested_size_mib)?;
        let vm = self.vm.as_ref().ok_or(ActionError::NotAllowedBeforeBoot)?;
        let mut device = vm.hotplug_memory().ok_or(ActionError::NoMemoryHotplug)?;
        device.set_requested_bytes(update.requested_size_mib << 20)?;
        Ok(VmmData::Empty)
    }

    fn memory_hotplug_status(&self) -> Result<VmmData, ActionError> {
        let config = self
            .config
            .memory_hotplug
            .as_ref()
            .ok_or(ActionError::NoMemoryHotplug)?;
        let (plugged, requested) = match self.vm.as_ref().and_then(MicroVm::hotplug_memory) {
            Some(device) => (device.plugged_bytes(), device.requested_bytes()),
            None => (0, 0),
        };
        Ok(VmmData::MemoryHotplug(MemoryHotplugStatus {
            total_size_mib: config.total_size_mib,
            block_size_mib: config.block_size_mib,
            slot_size_mib: config.slot_size_mib,
            plugged_size_mib: plugged >> 20,
            requested_size_mib: requested >> 20,
        }))
    }

    /// Carries out one action.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmData, ActionError> {
        match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                id: self.id.clone(),
                state: match self.vm.as_ref().map(MicroVm::state) {
                    None => InstanceState::NotStarted,
                    Some(RunState::Running) => InstanceState::Running,
                    Some(RunState::Paused) => InstanceState::Paused,
                },
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
                app_name: "prescient".to_string(),
            })),
            VmmAction::GetVmConfig => Ok(VmmData::VmConfig(Box::new(self.config.clone()))),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::MachineConfig(self.config.machine_config.clone()))
            }
            VmmAction::PutBootSource(boot) => {
                self.before_boot()?;
                boot.validate()?;
                self.config.boot_source = Some(boot);
                Ok(VmmData::Empty)
            }
            VmmAction::PutMachineConfig(machine) => {
                self.before_boot()?;
                machine.validate()?;
                self.config.machine_config = machine;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMachineConfig(update) => {
                self.before_boot()?;
                let machine = update.apply(&self.config.machine_config);
                machine.validate()?;
                self.config.machine_config = machine;
                Ok(VmmData::Empty)
            }
            VmmAction::PutSerial(serial) => {
                self.before_boot()?;
                serial.validate()?;
                self.config.serial = Some(serial);
                Ok(VmmData::Empty)
            }
            VmmAction::PutDrive(drive) => {
                self.before_boot()?;
                let drives = upsert_by_id(&self.config.drives, drive, |d| &d.drive_id);
                validate_drives(&drives)?;
                self.config.drives = drives;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchDrive(update) => self.patch_drive(update),
            VmmAction::PutNetworkInterface(iface) => {
                self.before_boot()?;
                let ifaces = upsert_by_id(&self.config.network_interfaces, iface, |n| &n.iface_id);
                validate_interfaces(&ifaces)?;
                self.config.network_interfaces = ifaces;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(update) => self.patch_interface(update),
            VmmAction::PutVsock(vsock) => {
                self.before_boot()?;
                vsock.validate()?;
                self.config.vsock = Some(vsock);
                Ok(VmmData::Empty)
            }
            VmmAction::PutEntropy(entropy) => {
                self.before_boot()?;
                entropy.validate()?;
                self.config.entropy = Some(entropy);
                Ok(VmmData::Empty)
            }
            VmmAction::PutBalloon(balloon) => {
                self.before_boot()?;
                balloon.validate(self.config.machine_config.mem_size_mib)?;
                self.config.balloon = Some(balloon);
                Ok(VmmData::Empty)
            }
            VmmAction::PatchBalloon(update) => self.patch_balloon(update),
            VmmAction::GetBalloon => self
                .config
                .balloon
                .clone()
                .map(VmmData::Balloon)
                .ok_or(ActionError::NoBalloon),
            VmmAction::GetBalloonStats => self.balloon_stats(),
            VmmAction::PatchBalloonStats(update) => self.patch_balloon_stats(update),
            VmmAction::PutMemoryHotplug(hotplug) => {
                self.before_boot()?;
                hotplug.validate()?;
                self.config.memory_hotplug = Some(hotplug);
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMemoryHotplug(update) => self.patch_memory_hotplug(update),
            VmmAction::GetMemoryHotplug => self.memory_hotplug_status(),
            VmmAction::StartInstance => {
                self.start()?;
                Ok(VmmData::Empty)
            }
            // Pausing a paused VM (or resuming a running one) is not an error: the state asked
            // for is the state it is in.
            VmmAction::Pause => {
                let vm = self.running_vm()?;
                if vm.state() == RunState::Running {
                    vm.pause()?;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::Resume => {
                let vm = self.running_vm()?;
                if vm.state() == RunState::Paused {
                    vm.resume()?;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::SendCtrlAltDel => {
                self.running_vm()?.send_ctrl_alt_del()?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutMetrics(config) => {
                METRICS.configure(&config)?;
                if let Err(e) = start_metrics_timer(&mut self.event_manager) {
                    tracing::warn!("metrics will only be written on FlushMetrics: {e}");
                }
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => {
                METRICS.flush()?;
                Ok(VmmData::Empty)
            }
            VmmAction::SetSeccompStage(stage) => {
                seccomp::request_stage(stage)?;
                // In force for this thread before the answer goes out.
                self.catch_up_seccomp()?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutLogger(config) => {
                crate::logger::configure(&config)?;
                Ok(VmmData::Empty)
            }
            VmmAction::GetPredictor => {
                let status = match (&self.autopilot, &self.config.predictor) {
                    (Some(a), _) => a.status(),
                    (None, Some(p)) => PredictorStatus::idle(p.clone()),
                    (None, None) => return Err(ActionError::NoPredictor),
                };
                Ok(VmmData::Predictor(Box::new(status)))
            }
            VmmAction::GetPredictorDecisions { since } => match &self.autopilot {
                Some(a) => Ok(VmmData::PredictorDecisions(a.decisions(since))),
                None if self.config.predictor.is_some() => Err(ActionError::PredictorNotStarted),
                None => Err(ActionError::NoPredictor),
            },
            VmmAction::PatchPredictor(update) => self.patch_predictor(update),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_replaces_by_id_and_appends_new_ids() {
        let list = vec![("a".to_string(), 1), ("b".to_string(), 2)];
        fn id(e: &(String, i32)) -> &String {
            &e.0
        }
        let replaced = upsert_by_id(&list, ("a".to_string(), 9), id);
        assert_eq!(replaced, vec![("a".to_string(), 9), ("b".to_string(), 2)]);
        let appended = upsert_by_id(&list, ("c".to_string(), 3), id);
        assert_eq!(appended.len(), 3);
        assert_eq!(appended[2], ("c".to_string(), 3));
    }

    #[test]
    fn the_predictor_section_is_read_and_patched_before_boot() {
        use crate::vmm_config::{PredictorConfig, Range};
        let mut rt = Runtime::new("t".into(), VmConfig::default()).unwrap();
        assert!(matches!(
            rt.handle(VmmAction::GetPredictor),
            Err(ActionError::NoPredictor)
        ));
        rt.config.predictor = Some(PredictorConfig::default());
        let update: PredictorUpdate =
            serde_json::from_str(r#"{"budget": {"memory_mib": {"min": 16, "max": 64}}}"#).unwrap();
        rt.handle(VmmAction::PatchPredictor(update)).unwrap();
        match rt.handle(VmmAction::GetPredictor).unwrap() {
            VmmData::Predictor(s) => {
                assert!(!s.running);
                assert_eq!(
                    s.config.budget.memory_mib,
                    Some(Range {
                        min: 16.0,
                        max: 64.0
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        let bad: PredictorUpdate =
            serde_json::from_str(r#"{"budget": {"cpu_cores": {"min": 1, "max": 4}}}"#).unwrap();
        let e = rt.handle(VmmAction::PatchPredictor(bad)).unwrap_err();
        assert!(e.to_string().contains("predictor.budget.cpu_cores"), "{e}");
        assert!(matches!(
            rt.handle(VmmAction::GetPredictorDecisions { since: 0 }),
            Err(ActionError::PredictorNotStarted)
        ));
    }
}
