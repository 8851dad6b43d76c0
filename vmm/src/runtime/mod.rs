//! The VMM thread: one event loop that exists before the VM does, owns the VM's configuration and,
//! once started, the VM; it serves API requests between events (`actions`), closes the
//! predictor's windows, and returns why the VM ended.

mod actions;

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::autopilot::{now_ns, Autopilot};
use crate::builder::{assemble, Source};
use crate::event_loop::{Subscriber, Wakeup};
use crate::exit::{ExitReason, ExitSignal};
use crate::idle_trim::IdleTrim;
use crate::metrics::METRICS;
use crate::microvm::MicroVm;
use crate::rpc::{ActionError, ActionRequest};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, CreateParams, LoadParams, SnapshotError};
use crate::vmm_config::{HugePages, VmConfig};

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

/// An empty data store bound to this VM's id.
fn new_mmds(id: &str, limit: usize) -> mmds::Mmds {
    let mut store = mmds::Mmds::new(limit);
    store.set_instance_id(id);
    store
}

fn start_metrics_timer(event_manager: &mut EventManager<Subscriber>) -> std::io::Result<()> {
    let mut timer = TimerFd::new()?;
    timer.reset(METRICS_FLUSH_PERIOD, Some(METRICS_FLUSH_PERIOD))?;
    event_manager.add_subscriber(Arc::new(Mutex::new(MetricsTimer(timer))));
    Ok(())
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
    /// The metadata service's data store: the API writes it, the guest reads it through the
    /// interfaces `mmds-config` names.
    mmds: Arc<Mutex<mmds::Mmds>>,
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
            mmds: Arc::new(Mutex::new(new_mmds(&id, mmds::DEFAULT_SIZE_LIMIT))),
            id,
            warm: None,
        })
    }

    /// The metadata store's size limit (`--mmds-size-limit`) and the document it starts with
    /// (`--metadata`).
    pub fn set_mmds(
        &mut self,
        limit: usize,
        metadata: Option<&std::path::Path>,
    ) -> Result<(), String> {
        let mut store = new_mmds(&self.id, limit);
        if let Some(path) = metadata {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
            store
                .put(value)
                .map_err(|e| format!("--metadata {}: {e}", path.display()))?;
        }
        self.mmds = Arc::new(Mutex::new(store));
        Ok(())
    }

    fn mmds(&self) -> std::sync::MutexGuard<'_, mmds::Mmds> {
        self.mmds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the metadata service on the interfaces `mmds-config` names.
    fn attach_mmds(&self, vm: &MicroVm) -> Result<(), ActionError> {
        let Some(config) = &self.config.mmds_config else {
            return Ok(());
        };
        {
            let mut store = self.mmds();
            store.set_version(config.version);
            store.set_imds_compat(config.imds_compat);
        }
        for id in &config.network_interfaces {
            let mut net = vm
                .net(id)
                .ok_or_else(|| ActionError::NoSuchInterface(id.clone()))?;
            net.attach_mmds(mmds::MmdsStack::new(config.address(), self.mmds.clone()))
                .map_err(|e| ActionError::Mmds(e.to_string()))?;
        }
        Ok(())
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
        self.launch(Source::Boot)
    }

    /// `PUT /snapshot/load`: a fresh VMM (nothing configured yet) runs the snapshot's VM, paused
    /// unless `resume_vm`. A refused snapshot leaves this VMM as it was, serving its API.
    pub fn load_snapshot(&mut self, params: &LoadParams) -> Result<(), ActionError> {
        if self.vm.is_some() {
            return Err(ActionError::NotAllowedAfterBoot);
        }
        if self.config != VmConfig::default() {
            return Err(ActionError::LoadAfterConfiguration);
        }
        let start = std::time::Instant::now();
        let load = |e: SnapshotError| ActionError::LoadSnapshot(e.to_string());
        params.check_supported().map_err(load)?;
        let state = snapshot::read_state(&params.snapshot_path).map_err(load)?;
        let mut config = state.config(&params.snapshot_path).map_err(load)?;
        params.apply_overrides(&mut config).map_err(load)?;
        // Not part of the snapshot, as in Firecracker: the load request decides.
        config.machine_config.track_dirty_pages = params.tracks_dirty_pages();
        let memory_path = params.memory_path().map_err(load)?;
        let memory = snapshot::open_memory(memory_path).map_err(load)?;
        let memory_path = memory_path.display().to_string();
        let before = std::mem::replace(&mut self.config, config);
        let source = Source::Snapshot {
            state: &state,
            memory: &memory,
            memory_path: &memory_path,
            resume: params.resume_vm,
        };
        let result = self.launch(source);
        if let Err(e) = result {
            self.config = before;
            return Err(ActionError::LoadSnapshot(e.to_string()));
        }
        tracing::info!(
            "snapshot {} loaded ({}) in {:?}",
            params.snapshot_path.display(),
            if params.resume_vm {
                "resumed"
            } else {
                "paused"
            },
            start.elapsed()
        );
        Ok(())
    }

    /// `PUT /snapshot/create`: the paused VM's state and memory to the files named.
    pub fn create_snapshot(&mut self, params: &CreateParams) -> Result<(), ActionError> {
        let vm = self.vm.as_mut().ok_or(ActionError::NotAllowedBeforeBoot)?;
        let predictor = match &self.autopilot {
            Some(a) => Some(
                a.save_state(now_ns())
                    .map_err(|e| ActionError::CreateSnapshot(e.to_string()))?,
            ),
            None => None,
        };
        snapshot::create(vm, &self.config, predictor, params)
            .map(|_| ())
            .map_err(|e| ActionError::CreateSnapshot(e.to_string()))
    }

    fn launch(&mut self, source: Source<'_>) -> Result<(), ActionError> {
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
        if let (Some(a), Source::Snapshot { state, .. }) = (&mut autopilot, &source) {
            if let Some(saved) = &state.predictor {
                // The VM runs the same either way; only the predictor would start cold.
                if let Err(e) = a.restore_state(saved, &self.config.machine_config, now_ns()) {
                    tracing::warn!("predictor starts cold: {e}");
                }
            }
        }
        // A restored VM's memory is its snapshot's file, mapped privately in 4 KiB pages: no
        // huge pages to trim, and a page given back there would read the file again.
        let anonymous_memory = matches!(source, Source::Boot);
        let mut vm = assemble(
            &self.config,
            self.exit.clone(),
            &mut self.event_manager,
            source,
        )?;
        if let Err(e) = self.attach_mmds(&vm) {
            vm.stop();
            return Err(e);
        }
        if let Some(a) = &mut autopilot {
            if let Err(e) = a.attach(
                &self.id,
                &mut vm,
                &mut self.config,
                &self.exit,
                self.vm_cgroup.clone(),
                &mut self.event_manager,
            ) {
                vm.stop();
                return Err(ActionError::Predictor(e.to_string()));
            }
        }
        if anonymous_memory && self.config.machine_config.huge_pages == HugePages::Transparent {
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
        if let Err(e) = autopilot.close_window(now_ns(), vm, &mut self.config, &self.exit) {
            tracing::error!("predictor window: {e}");
        }
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
            if let Some(vm) = &mut self.vm {
                // A vCPU the guest ejected: its thread ends here, on the VMM thread.
                vm.reap_ejected_vcpus();
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
        // The last counts, as Firecracker writes them on its way out.
        match METRICS.flush() {
            Ok(()) | Err(crate::metrics::MetricsError::NotConfigured) => {}
            Err(e) => tracing::warn!("final metrics flush: {e}"),
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
}
