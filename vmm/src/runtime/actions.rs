//! What the VMM thread does for each API request: the configuration before boot, the running VM
//! after it. Changes to a running VM's devices go through [`live::apply`], as the autopilot's do.

use devices::virtio::balloon::Balloon;

use super::{start_metrics_timer, Runtime};
use crate::autopilot::PredictorStatus;
use crate::live::{self, LiveChange};
use crate::metrics::METRICS;
use crate::microvm::{MicroVm, RunState};
use crate::rpc::{
    ActionError, InstanceInfo, InstanceState, MachineConfigUpdate, VmmAction, VmmData,
};
use crate::seccomp;
use crate::vmm_config::{
    validate_drives, validate_interfaces, BalloonStatsUpdate, BalloonUpdate, DriveUpdate,
    MemoryHotplugSizeUpdate, MemoryHotplugStatus, NetworkInterfaceUpdate, PredictorUpdate,
};

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

impl Runtime {
    /// `PATCH /predictor`: before boot the section, after boot the live policy too.
    fn patch_predictor(&mut self, update: PredictorUpdate) -> Result<VmmData, ActionError> {
        let current = self
            .config
            .predictor
            .as_ref()
            .ok_or(ActionError::NoPredictor)?;
        let next = update.apply(current);
        next.validate(&self.config.machine_config)?;
        if let Some(vm) = self.vm.as_mut() {
            let autopilot = self
                .autopilot
                .as_mut()
                .ok_or(ActionError::PredictorNotStarted)?;
            autopilot.reconfigure(&next, vm, &mut self.config, &self.exit)?;
        }
        self.config.predictor = Some(next);
        Ok(VmmData::Empty)
    }

    fn before_boot(&self) -> Result<(), ActionError> {
        match self.vm {
            Some(_) => Err(ActionError::NotAllowedAfterBoot),
            None => Ok(()),
        }
    }

    /// A VM that started without `mmds-config` has no metadata service: its store can no longer
    /// be read or written (Firecracker's rule).
    fn mmds_in_use(&self) -> Result<(), ActionError> {
        if self.vm.is_some() && self.config.mmds_config.is_none() {
            return Err(mmds::StoreError::NotInitialized.into());
        }
        Ok(())
    }

    fn running_vm(&mut self) -> Result<&mut MicroVm, ActionError> {
        self.vm.as_mut().ok_or(ActionError::NotAllowedBeforeBoot)
    }

    /// `PATCH /drives/{id}`: the backing file and the rate limiter, before boot in the
    /// configuration, after boot live (a new file is opened and the guest told its new size).
    fn patch_drive(&mut self, update: DriveUpdate) -> Result<VmmData, ActionError> {
        let index = self
            .config
            .drives
            .iter()
            .position(|d| d.drive_id == update.drive_id)
            .ok_or_else(|| ActionError::NoSuchDrive(update.drive_id.clone()))?;
        let mut drives = self.config.drives.clone();
        if drives[index].socket.is_some()
            && update.path_on_host.is_none()
            && update.rate_limiter.is_none()
        {
            // Firecracker's update of a vhost-user drive: its backend's disk changed, the
            // configuration space is read again and the guest told.
            let vm = self.running_vm()?;
            let mut drive = vm
                .vhost_user_drive(&update.drive_id)
                .ok_or_else(|| ActionError::NoSuchDrive(update.drive_id.clone()))?;
            drive.refresh_config()?;
            return Ok(VmmData::Empty);
        }
        if let Some(path) = &update.path_on_host {
            drives[index].path_on_host = path.clone();
        }
        if update.rate_limiter.is_some() {
            drives[index].rate_limiter = update.rate_limiter;
        }
        validate_drives(&drives)?;
        if let Some(path_on_host) = update.path_on_host {
            let change = LiveChange::DriveBacking {
                drive_id: update.drive_id.clone(),
                path_on_host,
            };
            live::apply(self.vm.as_mut(), &mut self.config, &change)?;
        }
        if let Some(limiter) = update.rate_limiter {
            let change = LiveChange::DriveRateLimiter {
                drive_id: update.drive_id,
                limiter,
            };
            live::apply(self.vm.as_mut(), &mut self.config, &change)?;
        }
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
        let change = LiveChange::NetRateLimiters {
            iface_id: update.iface_id,
            rx: update.rx_rate_limiter,
            tx: update.tx_rate_limiter,
        };
        live::apply(self.vm.as_mut(), &mut self.config, &change)?;
        Ok(VmmData::Empty)
    }

    /// `PATCH /balloon`: a new target, live after boot.
    fn patch_balloon(&mut self, update: BalloonUpdate) -> Result<VmmData, ActionError> {
        let mut balloon = self.config.balloon.clone().ok_or(ActionError::NoBalloon)?;
        balloon.amount_mib = update.amount_mib;
        balloon.validate(self.config.machine_config.mem_size_mib)?;
        let change = LiveChange::BalloonTarget {
            amount_mib: update.amount_mib,
        };
        live::apply(self.vm.as_mut(), &mut self.config, &change)?;
        Ok(VmmData::Empty)
    }

    /// `PATCH /balloon/statistics`: how often the guest is asked for statistics.
    fn patch_balloon_stats(&mut self, update: BalloonStatsUpdate) -> Result<VmmData, ActionError> {
        self.config.balloon.as_ref().ok_or(ActionError::NoBalloon)?;
        let change = LiveChange::BalloonStats(update);
        live::apply(self.vm.as_mut(), &mut self.config, &change)?;
        Ok(VmmData::Empty)
    }

    /// The running VM's balloon, for the hinting paths (after boot only, as in Firecracker).
    fn hinting_balloon(&mut self) -> Result<std::sync::MutexGuard<'_, Balloon>, ActionError> {
        self.running_vm()?.balloon().ok_or(ActionError::NoBalloon)
    }

    fn balloon_stats(&self) -> Result<VmmData, ActionError> {
        let vm = self.vm.as_ref().ok_or(ActionError::NotAllowedBeforeBoot)?;
        let device = vm.balloon().ok_or(ActionError::NoBalloon)?;
        if device.options().stats_interval.is_zero() {
            return Err(ActionError::BalloonStatsDisabled);
        }
        Ok(VmmData::BalloonStats(Box::new(device.stats())))
    }

    /// `PATCH /machine-config`: any field before boot; on a running VM that can plug vCPUs only
    /// `vcpu_count`, which plugs vCPUs or asks the guest to give some up (refused while a
    /// removal is pending). A VM that cannot answers as Firecracker does: nothing after boot.
    fn patch_machine_config(
        &mut self,
        update: MachineConfigUpdate,
    ) -> Result<VmmData, ActionError> {
        let Some(vm) = self.vm.as_mut() else {
            let machine = update.apply(&self.config.machine_config);
            machine.validate()?;
            self.config.machine_config = machine;
            if update.cpu_template.is_some() {
                // Firecracker keeps one CPU template: a static one (or "None") replaces a
                // custom one.
                self.config.cpu_config = None;
            }
            return Ok(VmmData::Empty);
        };
        if !vm.can_hotplug_vcpus() {
            return Err(ActionError::NotAllowedAfterBoot);
        }
        let Some(vcpu_count) = update.only_vcpu_count() else {
            let given = serde_json::to_value(&update).unwrap_or_default();
            let fixed: Vec<String> = given
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| *k != "vcpu_count" && !v.is_null())
                .map(|(k, _)| k.clone())
                .collect();
            return Err(if fixed.is_empty() {
                ActionError::InvalidConfig(crate::vmm_config::ConfigError::new(
                    crate::vmm_config::MachineConfig::vcpu_count_path(),
                    "missing: a running VM's machine-config takes vcpu_count only",
                ))
            } else {
                ActionError::MachineFieldFixedAfterBoot(fixed.join(", "))
            });
        };
        let change = LiveChange::VcpuCount { vcpu_count };
        live::apply(Some(vm), &mut self.config, &change)?;
        Ok(VmmData::Empty)
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
        let vm = self.vm.as_mut().ok_or(ActionError::NotAllowedBeforeBoot)?;
        let change = LiveChange::HotplugRequested {
            size_mib: update.requested_size_mib,
        };
        live::apply(Some(vm), &mut self.config, &change)?;
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
            VmmAction::PutMachineConfig(mut machine) => {
                self.before_boot()?;
                machine.validate()?;
                // As in Firecracker, a body without `cpu_template` keeps the template set.
                if machine.cpu_template.is_none() {
                    machine.cpu_template = self.config.machine_config.cpu_template;
                } else {
                    self.config.cpu_config = None;
                }
                self.config.machine_config = machine;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMachineConfig(update) => self.patch_machine_config(update),
            VmmAction::PutSerial(serial) => {
                self.before_boot()?;
                serial.validate()?;
                self.config.serial = Some(serial);
                Ok(VmmData::Empty)
            }
            VmmAction::PutDrive(drive) => {
                self.before_boot()?;
                let drive_id = drive.drive_id.clone();
                let drives = upsert_by_id(&self.config.drives, drive, |d| &d.drive_id);
                validate_drives(&drives)?;
                if let Some((i, d)) = drives
                    .iter()
                    .enumerate()
                    .find(|(_, d)| d.drive_id == drive_id)
                {
                    d.probe_backend(i)?;
                }
                self.config.drives = drives;
                Ok(VmmData::Empty)
            }
            // Post-boot only, as in Firecracker (the spec or a PUT sets them before boot).
            VmmAction::PatchDrive(update) => {
                self.running_vm()?;
                self.patch_drive(update)
            }
            VmmAction::PutNetworkInterface(iface) => {
                self.before_boot()?;
                let ifaces = upsert_by_id(&self.config.network_interfaces, iface, |n| &n.iface_id);
                validate_interfaces(&ifaces)?;
                self.config.network_interfaces = ifaces;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(update) => {
                self.running_vm()?;
                self.patch_interface(update)
            }
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
            VmmAction::PatchBalloon(update) => {
                self.running_vm()?;
                self.patch_balloon(update)
            }
            VmmAction::GetBalloon => self
                .config
                .balloon
                .clone()
                .map(VmmData::Balloon)
                .ok_or(ActionError::NoBalloon),
            VmmAction::GetBalloonStats => self.balloon_stats(),
            VmmAction::PatchBalloonStats(update) => {
                self.running_vm()?;
                self.patch_balloon_stats(update)
            }
            VmmAction::PutMemoryHotplug(hotplug) => {
                self.before_boot()?;
                hotplug.validate()?;
                self.config.memory_hotplug = Some(hotplug);
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMemoryHotplug(update) => self.patch_memory_hotplug(update),
            VmmAction::GetMemoryHotplug => {
                self.running_vm()?;
                self.memory_hotplug_status()
            }
            VmmAction::GetVcpus => Ok(VmmData::Vcpus(
                self.vm
                    .as_ref()
                    .ok_or(ActionError::NotAllowedBeforeBoot)?
                    .vcpu_status(),
            )),
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
                self.running_vm()?;
                METRICS.flush()?;
                Ok(VmmData::Empty)
            }
            VmmAction::SetSeccompStage(stage) => {
                seccomp::request_stage(stage)?;
                // In force for this thread before the answer goes out.
                self.catch_up_seccomp()?;
                Ok(VmmData::Empty)
            }
            // Unlike Firecracker, the logger can be re-pointed while the VM runs (a new log
            // file; the seccomp tests use it to try opens from the VMM thread).
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
            VmmAction::CreateSnapshot(params) => {
                self.create_snapshot(&params)?;
                Ok(VmmData::Empty)
            }
            VmmAction::LoadSnapshot(params) => {
                self.load_snapshot(&params)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutMmds(value) => {
                self.mmds_in_use()?;
                self.mmds().put(value)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMmds(value) => {
                self.mmds_in_use()?;
                self.mmds().patch(&value)?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutPmem(pmem) => {
                self.before_boot()?;
                let list = upsert_by_id(&self.config.pmem, pmem, |p| &p.id);
                crate::vmm_config::validate_pmem(&list, &self.config.drives)?;
                self.config.pmem = list;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchPmem(update) => {
                self.running_vm()?;
                if !self.config.pmem.iter().any(|p| p.id == update.id) {
                    return Err(ActionError::NoSuchPmem(update.id));
                }
                if let Some(limiter) = update.rate_limiter {
                    crate::vmm_config::validate_rate_limiter(
                        crate::vmm_config::JsonPath::keys(&["pmem", "rate_limiter"]),
                        &Some(limiter),
                    )?;
                    let change = LiveChange::PmemRateLimiter {
                        id: update.id,
                        limiter,
                    };
                    live::apply(self.vm.as_mut(), &mut self.config, &change)?;
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PutCpuConfig(cpu) => {
                self.before_boot()?;
                cpu.validate()?;
                // It replaces a static template, as in Firecracker.
                self.config.machine_config.cpu_template = None;
                self.config.cpu_config = Some(cpu);
                Ok(VmmData::Empty)
            }
            VmmAction::StartBalloonHinting(start) => {
                self.hinting_balloon()?
                    .start_hinting(start.acknowledge_on_stop)?;
                Ok(VmmData::Empty)
            }
            VmmAction::GetBalloonHinting => Ok(VmmData::BalloonHinting(
                self.hinting_balloon()?.hinting_status()?,
            )),
            VmmAction::StopBalloonHinting => {
                self.hinting_balloon()?.stop_hinting()?;
                Ok(VmmData::Empty)
            }
            VmmAction::GetMmds => {
                self.mmds_in_use()?;
                Ok(VmmData::Mmds(self.mmds().document()))
            }
            VmmAction::PutMmdsConfig(mut config) => {
                self.before_boot()?;
                config.validate(&self.config.network_interfaces)?;
                // Shown with its address, default or not, as Firecracker shows it.
                config.ipv4_address = Some(config.address());
                self.config.mmds_config = Some(config);
                Ok(VmmData::Empty)
            }
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
        use crate::vmm_config::{PredictorConfig, Range, VmConfig};
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
