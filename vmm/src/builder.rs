//! Builds a running microVM from a validated [`VmConfig`].

use std::borrow::Cow;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::virtio::balloon::Balloon;
use devices::virtio::block::Block;
use devices::virtio::device_writes::DeviceWrites;
use devices::virtio::mem::{MemLayout, VirtioMem};
use devices::virtio::net::Net;
use devices::virtio::pmem::Pmem;
use devices::virtio::rng::Rng;
use devices::virtio::vhost_user_block::VhostUserBlock;
use devices::virtio::vsock::Vsock;
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::acpi::{self, AcpiError};
use crate::arch::x86_64::cpuid::Topology;
use crate::arch::x86_64::layout::{hotplug_region_start, ram_ranges, RSDP_START};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::boot::load_boot_source;
use crate::console::{ConsoleInput, RawTerminal};
use crate::device_manager::acpi::{self as acpi_devices, AcpiDeviceError};
use crate::device_manager::legacy::{self, LegacyError};
use crate::device_manager::mmio::{MmioDeviceManager, MmioError};
use crate::device_manager::registry::DeviceRegistry;
use crate::device_manager::registry::RegisteredDevice;
use crate::event_loop::{Subscriber, Wakeup};
use crate::exit::ExitSignal;
use crate::microvm::{MicroVm, VirtioHandles};
use crate::snapshot::{DeviceState, SnapshotState};
use crate::vcpus::Vcpus;
use crate::vmm_config::{
    parse_mac, ConfigError, CpuConfig, DriveConfig, JsonPath, MachineConfig, MemoryHotplugConfig,
    Segment, VmConfig, VsockConfig,
};
use crate::vstate::memory::{
    create_guest_memory, create_hotplug_region, create_shared_guest_memory,
};
use crate::vstate::vcpu::spawner::Spawner;
use crate::vstate::vcpu::{register_kick_handler, saved_msr_indices, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors of building a microVM. [`BuildError::Config`] points at the spec field at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM lacks the {0:?} capability this VMM needs")]
    MissingCap(Cap),
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Legacy(#[from] LegacyError),
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error(transparent)]
    BootTimer(#[from] crate::device_manager::registry::RegistryError),
    #[error(transparent)]
    AcpiDevice(#[from] AcpiDeviceError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    MemoryFile(#[from] crate::snapshot::memory::MemoryFileError),
    #[error("the snapshot does not match its own configuration: {0}")]
    SnapshotMismatch(String),
    #[error("cannot restore device {name}: {source}")]
    RestoreDevice {
        name: String,
        source: devices::persist::PersistError,
    },
}

/// Where a VM's guest state comes from.
pub enum Source<'a> {
    /// A fresh boot: the kernel is loaded and the boot vCPU starts at its entry.
    Boot,
    /// A snapshot: guest memory mapped from its file, every vCPU and device given back its
    /// saved state; the vCPUs start paused unless `resume`.
    Snapshot {
        state: &'a SnapshotState,
        memory: &'a std::fs::File,
        memory_path: &'a str,
        resume: bool,
    },
}

/// The CPU template the VM boots with, in custom-template form: `cpu-config`, else
/// `machine-config.cpu_template` where it fits this host's CPU vendor and model. Firecracker
/// keeps one template, the one set last; the API clears the other when one is set, and a spec
/// file's `cpu-config` comes after its `machine-config`, so it wins there too.
fn cpu_template<'a>(
    config: &'a VmConfig,
    cpuid: &kvm_bindings::CpuId,
) -> Result<Option<Cow<'a, CpuConfig>>, ConfigError> {
    if let Some(custom) = &config.cpu_config {
        return Ok(Some(Cow::Borrowed(custom)));
    }
    let Some(template) = config.machine_config.cpu_template else {
        return Ok(None);
    };
    let leaf = |function| cpuid.as_slice().iter().find(|e| e.function == function);
    let mut vendor = [0u8; 12];
    if let Some(e) = leaf(0) {
        vendor[..4].copy_from_slice(&e.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&e.ecx.to_le_bytes());
    }
    let signature = leaf(1).map_or(0, |e| e.eax);
    Ok(template.for_host(&vendor, signature)?.map(Cow::Owned))
}

/// Applies a CPU template to the CPUID every vCPU is given, as Firecracker does: the
/// capabilities it adds must be there, each modifier's leaf must be one KVM offers (it takes
/// the modifier's flags), and its bits are written over KVM's. Hosts whose KVM does not
/// intercept CPUID (software KVMs such as kvm_pvm, for guest user code) show the guest the
/// host's CPUID there whatever is set here.
fn apply_cpu_template(
    template: &CpuConfig,
    kvm: &Kvm,
    cpuid: &mut kvm_bindings::CpuId,
) -> Result<(), ConfigError> {
    use crate::vmm_config::cpu_config::CpuidRegister;
    let path = |field| JsonPath::keys(&["cpu-config", field]);
    for cap in template.required_capabilities() {
        if kvm.check_extension_raw(cap.into()) <= 0 {
            return Err(ConfigError::new(
                path("kvm_capabilities"),
                format!("this host's KVM lacks capability {cap}"),
            ));
        }
    }
    for (leaf, subleaf, flags, register, filter) in template.cpuid_filters() {
        let entry = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == leaf && e.index == subleaf)
            .ok_or_else(|| {
                ConfigError::new(
                    path("cpuid_modifiers"),
                    format!("CPUID leaf {leaf:#x} subleaf {subleaf:#x} is not one this host's KVM offers"),
                )
            })?;
        entry.flags = flags;
        let r = match register {
            CpuidRegister::Eax => &mut entry.eax,
            CpuidRegister::Ebx => &mut entry.ebx,
            CpuidRegister::Ecx => &mut entry.ecx,
            CpuidRegister::Edx => &mut entry.edx,
        };
        *r = filter.apply(u64::from(*r)) as u32;
    }
    Ok(())
}

/// KVM features the VMM relies on; checked up front for a clear message on odd hosts.
const REQUIRED_CAPS: [Cap; 8] = [
    Cap::Irqchip,
    Cap::Pit2,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::ExtCpuid,
    Cap::ImmediateExit,
];

/// The console's writer behind `serial.rate_limiter`: bytes over the rate are refused (the
/// UART counts them as lost) instead of delaying the guest, as Firecracker drops them.
struct LimitedWriter {
    inner: Box<dyn Write + Send>,
    bucket: devices::rate_limiter::DropBucket,
}

impl Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.bucket.take(buf.len() as u64) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn serial_output(config: &VmConfig) -> Result<Box<dyn Write + Send>, ConfigError> {
    let out = serial_sink(config)?;
    match config.serial.as_ref().and_then(|s| s.rate_limiter.as_ref()) {
        None => Ok(out),
        Some(bucket) => Ok(Box::new(LimitedWriter {
            inner: out,
            bucket: devices::rate_limiter::DropBucket::new(bucket).map_err(|e| {
                ConfigError::new(JsonPath::keys(&["serial", "rate_limiter"]), e.to_string())
            })?,
        })),
    }
}

fn serial_sink(config: &VmConfig) -> Result<Box<dyn Write + Send>, ConfigError> {
    match config
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.as_ref())
    {
        None => Ok(Box::new(std::io::stdout())),
        Some(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|f| Box::new(f) as Box<dyn Write + Send>)
            .map_err(|e| {
                ConfigError::new(
                    JsonPath::keys(&["serial", "serial_out_path"]),
                    format!("cannot open {}: {e}", path.display()),
                )
            }),
    }
}

/// Creates the VM, loads the guest and starts its vCPUs. The VM's host-side event sources join
/// `event_manager`; the VM ends through `exit`.
pub fn build_microvm(
    config: &VmConfig,
    exit: Arc<ExitSignal>,
    event_manager: &mut EventManager<Subscriber>,
) -> Result<MicroVm, BuildError> {
    assemble(config, exit, event_manager, Source::Boot)
}

/// Guest RAM (and the hotplug region, if any) as `source` has it: fresh anonymous memory, or
/// mapped from a snapshot's memory file after checking that the file's layout is the one the
/// configuration gives.
fn guest_memory(
    config: &VmConfig,
    source: &Source<'_>,
) -> Result<(GuestMemoryMmap, Option<GuestRegionMmap>), BuildError> {
    let machine = &config.machine_config;
    let Source::Snapshot {
        state,
        memory,
        memory_path,
        ..
    } = source
    else {
        // A vhost-user backend maps guest memory itself: it must be a file it can be given.
        let mem = if config.drives.iter().any(|d| d.socket.is_some()) {
            create_shared_guest_memory(machine.mem_bytes(), machine.huge_pages)
        } else {
            create_guest_memory(machine.mem_bytes(), machine.huge_pages)
        }
        .map_err(|e| ConfigError::new(MachineConfig::mem_path(), e.to_string()))?;
        return Ok((mem, None));
    };
    let mut expected: Vec<(u64, u64)> = ram_ranges(machine.mem_bytes());
    if let Some(h) = &config.memory_hotplug {
        let start = hotplug_region_start(machine.mem_bytes(), h.slot_size_mib << 20)
            .ok_or_else(|| BuildError::SnapshotMismatch("no room for the hotplug region".into()))?;
        expected.push((start, h.total_size_mib << 20));
    }
    let saved: Vec<(u64, u64)> = state.memory.iter().map(|r| (r.guest_addr, r.len)).collect();
    if saved != expected {
        return Err(BuildError::SnapshotMismatch(format!(
            "memory regions {saved:x?}, the configuration gives {expected:x?}"
        )));
    }
    let mut regions = crate::snapshot::memory::map_file(memory, memory_path, &state.memory)?;
    let hotplug = config.memory_hotplug.as_ref().and_then(|_| regions.pop());
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| BuildError::SnapshotMismatch(format!("memory regions: {e}")))?;
    Ok((mem, hotplug))
}

/// Builds the VM `config` describes, its guest state from `source`.
pub fn assemble(
    config: &VmConfig,
    exit: Arc<ExitSignal>,
    event_manager: &mut EventManager<Subscriber>,
    source: Source<'_>,
) -> Result<MicroVm, BuildError> {
    match source {
        Source::Boot => config.validate()?,
        Source::Snapshot { .. } => config.validate_for_restore()?,
    }
    let machine = &config.machine_config;

    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
        return Err(BuildError::MissingCap(cap));
    }
    // A restored VM's vCPUs take their CPUID (template applied) from the snapshot.
    let supported_cpuid = match &source {
        Source::Boot => {
            let mut cpuid = kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(BuildError::SupportedCpuid)?;
            if kvm.check_extension(Cap::TscDeadlineTimer) {
                crate::arch::x86_64::cpuid::advertise_tsc_deadline(&mut cpuid);
            }
            let template = cpu_template(config, &cpuid)?;
            if let Some(t) = &template {
                apply_cpu_template(t, &kvm, &mut cpuid)?;
            }
            let msr_modifiers = template.map(|t| t.msr_filters()).unwrap_or_default();
            Some((cpuid, msr_modifiers))
        }
        Source::Snapshot { .. } => None,
    };

    let (mem, saved_hotplug) = guest_memory(config, &source)?;
    let vm = Vm::new(&kvm, machine.track_dirty_pages, &mem).map_err(|e| match e {
        VmError::MemorySlot { .. } => {
            BuildError::from(ConfigError::new(MachineConfig::mem_path(), e.to_string()))
        }
        e => e.into(),
    })?;
    if let Source::Snapshot { state, .. } = &source {
        // Before the devices: an interrupt a restored device raises again must not be lost
        // under the saved IOAPIC state.
        vm.restore_state(&state.vm)?;
    }

    let hotplug = match &config.memory_hotplug {
        Some(h) => Some(hotplug_memory(h, machine, &kvm, &mem, saved_hotplug)?),
        None => None,
    };
    // Devices see plugged memory too (a guest may put buffers there); boot code does not.
    let device_mem = match &hotplug {
        Some(h) => mem
            .insert_region(h.region.clone())
            .map_err(|e| ConfigError::new(MemoryHotplugConfig::total_path(), e.to_string()))?,
        None => mem.clone(),
    };

    let mut registry = DeviceRegistry::default();
    // KVM logs the guest's writes only; the devices' go into this log, for a Diff snapshot.
    let writes = if machine.track_dirty_pages {
        DeviceWrites::new(&device_mem)
    } else {
        DeviceWrites::default()
    };
    let mut mmio = MmioDeviceManager::with_device_writes(Arc::new(writes));
    let (virtio, mut extra_args) = attach_virtio_devices(
        config,
        &vm,
        &device_mem,
        hotplug,
        &mut mmio,
        &mut registry,
        event_manager,
    )?;
    // A kernel with ACPI finds the virtio devices in the DSDT and its CPUs in the MADT; one
    // without finds them on the command line and in the MP table. Both are given unless
    // `acpi_only`, as Firecracker does, so a kernel built without ACPI boots under the default
    // too (a kernel with ACPI prefers the MADT; its second probe of a device's window fails
    // harmlessly).
    let (boot_vcpus, max_vcpus) = (machine.vcpu_count, machine.max_vcpus());
    if matches!(source, Source::Snapshot { .. }) && max_vcpus > boot_vcpus {
        // `PUT /snapshot/create` refuses such a VM; only an edited file gets here.
        return Err(BuildError::SnapshotMismatch(format!(
            "max_vcpus {max_vcpus} above vcpu_count {boot_vcpus}: a VM with vCPU hot-plug is not \
             restored"
        )));
    }
    let legacy_tables = !machine.acpi_only;
    if legacy_tables {
        extra_args.extend(mmio.cmdline_entries());
    }
    let acpi_devices = if machine.acpi {
        let irq = mmio.take_irq()?;
        let devices = acpi_devices::attach(vm.fd(), &mut registry, irq, boot_vcpus, max_vcpus)?;
        let ejected = devices
            .ejected
            .try_clone()
            .map_err(|e| AcpiDeviceError::EventFd("vCPU eject event", e))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(Wakeup(ejected))));
        Some(devices)
    } else {
        None
    };

    // A snapshot's memory holds the kernel and its boot tables (MP, ACPI) already, and its
    // vCPUs their CPUID.
    let boot = match supported_cpuid {
        Some(supported_cpuid) => {
            if legacy_tables {
                mptable::setup_mptable(&mem, boot_vcpus)?;
            }
            let rsdp = machine.acpi.then_some(RSDP_START);
            let entry = load_boot_source(&mem, config.boot_source()?, &extra_args, rsdp)
                .map_err(|e| ConfigError::new(e.spec_field(), e.to_string()))?;
            Some((entry, supported_cpuid))
        }
        None => None,
    };

    let legacy = legacy::attach(vm.fd(), &mut registry, serial_output(config)?, exit.clone())?;
    crate::device_manager::boot_timer::attach(&mut registry)?;
    match &source {
        Source::Boot if machine.acpi => {
            let cpus = acpi::Cpus {
                boot: boot_vcpus,
                max: max_vcpus,
            };
            acpi::create_acpi_tables(&mem, cpus, &registry.aml())?;
        }
        Source::Boot => {}
        Source::Snapshot { state, .. } => restore_devices(registry.devices(), &state.devices)?,
    }

    let console_is_stdout = config
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.as_ref())
        .is_none();
    let terminal = if console_is_stdout {
        RawTerminal::enable()
    } else {
        None
    };
    if terminal.is_some() {
        event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            legacy.serial.clone(),
            legacy.serial_input_drained,
        ))));
    }

    register_kick_handler()?;
    // The topology is the largest the VM can have, so a vCPU plugged later fits it.
    let topology = Topology::new(max_vcpus, machine.smt);
    let mut vcpus = (0..max_vcpus)
        .map(|index| {
            let vcpu = Vcpu::new(vm.fd(), index)?;
            match (&source, &boot) {
                (Source::Snapshot { state, .. }, _) => {
                    let saved = state.vcpus.get(usize::from(index)).ok_or_else(|| {
                        BuildError::SnapshotMismatch(format!("no state for vCPU {index}"))
                    })?;
                    vcpu.restore(saved)?;
                }
                (Source::Boot, Some((entry, (supported_cpuid, msr_modifiers)))) => {
                    vcpu.configure(supported_cpuid, topology, &mem, *entry)?;
                    vcpu.modify_msrs(msr_modifiers)?;
                }
                (Source::Boot, None) => unreachable!("a boot always has an entry"),
            }
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    let paused = match &source {
        Source::Snapshot { state, resume, .. } => {
            if state.vcpus.len() != vcpus.len() {
                return Err(BuildError::SnapshotMismatch(format!(
                    "{} saved vCPUs, vcpu_count {}",
                    state.vcpus.len(),
                    boot_vcpus
                )));
            }
            !resume
        }
        Source::Boot => false,
    };
    // The MSRs a snapshot saves: a restored VM's are those its snapshot held; a booted one's
    // are asked of KVM here, where /dev/kvm can still be opened.
    let saved_msrs: Arc<[u32]> = match &source {
        Source::Snapshot { state, .. } => state.vcpus[0].msrs.iter().map(|m| m.index).collect(),
        Source::Boot => saved_msr_indices(&kvm, vcpus[0].fd())
            .map_err(|source| VcpuError::State { index: 0, source })?
            .into(),
    };
    for vcpu in &mut vcpus {
        vcpu.set_saved_msrs(saved_msrs.clone());
    }
    let hotplug = match acpi_devices {
        Some(devices) if max_vcpus > boot_vcpus => Ok((devices, Spawner::start()?)),
        Some(_) => Err("it was booted with max_vcpus equal to vcpu_count"),
        None => Err("it was booted without ACPI (machine-config.acpi is false)"),
    };
    let (buses, devices) = registry.finish();
    // KVM's stats files are opened only for the predictor, their one reader.
    let stats = config.predictor.as_ref().is_some_and(|p| p.enabled);
    let vcpus = Vcpus::start(
        vcpus,
        boot_vcpus,
        Arc::new(buses),
        exit.clone(),
        stats,
        hotplug,
        paused,
    )?;
    tracing::info!(
        "microVM started: {boot_vcpus} of at most {max_vcpus} vCPUs, {} MiB, ACPI {}",
        machine.mem_size_mib,
        if machine.acpi { "on" } else { "off" }
    );
    let vm = MicroVm::new(
        vm,
        device_mem,
        vcpus,
        terminal,
        legacy.i8042,
        virtio,
        devices,
    );
    Ok(if paused { vm.started_paused() } else { vm })
}

/// Gives every registered device its saved state, by name; the two lists must name the same
/// devices (the configuration they were built from is the snapshot's).
fn restore_devices(
    registered: &[RegisteredDevice],
    saved: &[DeviceState],
) -> Result<(), BuildError> {
    let names = |it: &mut dyn Iterator<Item = &String>| it.cloned().collect::<Vec<_>>();
    let have = names(&mut registered.iter().map(|d| &d.info.name));
    let want = names(&mut saved.iter().map(|d| &d.name));
    if have != want {
        return Err(BuildError::SnapshotMismatch(format!(
            "saved devices {want:?}, the configuration builds {have:?}"
        )));
    }
    for (device, state) in registered.iter().zip(saved) {
        device
            .persist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_bytes(&state.state)
            .map_err(|source| BuildError::RestoreDevice {
                name: state.name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// The virtio-mem region: its host mapping, geometry and first KVM slot number.
struct HotplugMemory {
    region: Arc<GuestRegionMmap>,
    layout: MemLayout,
    first_slot: u32,
}

fn hotplug_memory(
    config: &MemoryHotplugConfig,
    machine: &MachineConfig,
    kvm: &Kvm,
    boot_mem: &GuestMemoryMmap,
    saved: Option<GuestRegionMmap>,
) -> Result<HotplugMemory, ConfigError> {
    let err = |m: String| ConfigError::new(MemoryHotplugConfig::total_path(), m);
    const MIB: u64 = 1 << 20;
    let (size, block, slot) = (
        config.total_size_mib * MIB,
        config.block_size_mib * MIB,
        config.slot_size_mib * MIB,
    );
    let start = hotplug_region_start(machine.mem_bytes(), slot)
        .ok_or_else(|| err("no room above guest RAM for the hotplug region".to_string()))?;
    let layout = MemLayout::new(start, size, block, slot).map_err(|e| err(e.to_string()))?;
    let first_slot = boot_mem.num_regions();
    let available = kvm.get_nr_memslots().saturating_sub(first_slot);
    if layout.slots() > available {
        return Err(err(format!(
            "{} slots of {} MiB need more KVM memory slots than this host gives a VM ({available})",
            layout.slots(),
            config.slot_size_mib
        )));
    }
    let region = match saved {
        Some(r) => r,
        None => create_hotplug_region(start, size, machine.huge_pages)
            .map_err(|e| err(e.to_string()))?,
    };
    Ok(HotplugMemory {
        region: Arc::new(region),
        layout,
        first_slot: first_slot as u32,
    })
}

/// A device of a running VM by its spec id.
type Handle<T> = (String, Arc<Mutex<T>>);

/// The pmem devices: each file's mapping becomes a KVM slot above everything else in guest
/// physical memory (RAM, the 4 GiB line, the hotplug region), 2 MiB aligned, in the order of
/// the spec with the root device first (so it is /dev/pmem0).
#[allow(clippy::too_many_arguments)]
fn attach_pmem(
    config: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    hotplug: Option<&HotplugMemory>,
    registry: &mut DeviceRegistry,
    event_manager: &mut EventManager<Subscriber>,
    manager: &mut MmioDeviceManager,
    extra: &mut Vec<String>,
) -> Result<Vec<Handle<Pmem>>, BuildError> {
    const GIB: u64 = 1 << 30;
    let first_slot = match hotplug {
        Some(h) => h.first_slot + h.layout.slots() as u32,
        None => mem.num_regions() as u32,
    };
    let top = mem
        .iter()
        .map(|r| r.last_addr().raw_value() + 1)
        .max()
        .unwrap_or(0)
        .max(4 * GIB);
    let mut addr = top.next_multiple_of(GIB);
    let field = |i: usize, name: &'static str| {
        JsonPath(vec![
            Segment::Key("pmem"),
            Segment::Index(i),
            Segment::Key(name),
        ])
    };
    let mut order: Vec<usize> = (0..config.pmem.len()).collect();
    order.sort_by_key(|&i| !config.pmem[i].root_device);
    let mut pmems = Vec::new();
    for (slot, i) in (first_slot..).zip(order) {
        let p = &config.pmem[i];
        let mut device = Pmem::new(
            &p.id,
            &p.path_on_host,
            p.read_only,
            p.rate_limiter.unwrap_or_default(),
        )
        .map_err(|e| ConfigError::new(field(i, "path_on_host"), e.to_string()))?;
        let (host, size) = device.host_region();
        device.set_guest_address(addr);
        // SAFETY: the mapping belongs to the device, which lives as long as the VM.
        unsafe { vm.map_device_memory(slot, addr, size, host, p.read_only) }
            .map_err(|e| ConfigError::new(field(i, "path_on_host"), e.to_string()))?;
        addr += size;
        if p.root_device {
            extra.push("root=/dev/pmem0".to_string());
            extra.push(if p.read_only { "ro" } else { "rw" }.to_string());
        }
        let device = Arc::new(Mutex::new(device));
        let name = format!("pmem_{}", p.id);
        manager.attach(vm.fd(), mem, registry, event_manager, name, device.clone())?;
        pmems.push((p.id.clone(), device));
    }
    Ok(pmems)
}

/// The kernel parameters of the root drive `d`: which device or partition, and how to mount it.
fn root_device_args(d: &DriveConfig, read_only: bool) -> [String; 2] {
    let root = match &d.partuuid {
        Some(uuid) => format!("root=PARTUUID={uuid}"),
        None => "root=/dev/vda".to_string(),
    };
    [root, if read_only { "ro" } else { "rw" }.to_string()]
}

/// A drive's spec field, for errors about it.
fn drive_field(index: usize, name: &'static str) -> JsonPath {
    JsonPath(vec![
        Segment::Key("drives"),
        Segment::Index(index),
        Segment::Key(name),
    ])
}

/// Creates the virtio devices the spec names (the root drive first, so it is /dev/vda), each
/// registered by its attach under its metrics name, and returns the devices that can be changed
/// live, by id, and the kernel parameters they need (the root disk; not the devices themselves,
/// whose announcement depends on ACPI).
fn attach_virtio_devices(
    config: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    hotplug: Option<HotplugMemory>,
    manager: &mut MmioDeviceManager,
    registry: &mut DeviceRegistry,
    event_manager: &mut EventManager<Subscriber>,
) -> Result<(VirtioHandles, Vec<String>), BuildError> {
    let mut extra = Vec::new();
    let mut order: Vec<usize> = (0..config.drives.len()).collect();
    order.sort_by_key(|&i| !config.drives[i].is_root_device);
    let mut blocks = Vec::new();
    let mut vhost_user_blocks = Vec::new();
    let mut nets = Vec::new();
    for i in order {
        let d = &config.drives[i];
        let name = format!("block_{}", d.drive_id);
        if let Some(socket) = d.vhost_user_socket() {
            let mut block = VhostUserBlock::new(&d.drive_id, socket)
                .map_err(|e| ConfigError::new(drive_field(i, "socket"), e.to_string()))?;
            block.set_cache_writeback(d.writeback());
            if d.is_root_device {
                extra.extend(root_device_args(d, block.read_only()));
            }
            let block = Arc::new(Mutex::new(block));
            manager.attach(vm.fd(), mem, registry, event_manager, name, block.clone())?;
            vhost_user_blocks.push((d.drive_id.clone(), block));
            continue;
        }
        let block = Block::new(
            &d.drive_id,
            &d.path_on_host,
            d.is_read_only,
            d.rate_limiter.unwrap_or_default(),
        )
        .map_err(|e| ConfigError::new(drive_field(i, "path_on_host"), e.to_string()))?;
        let mut block = block;
        block.set_cache_writeback(d.writeback());
        if d.io_engine == crate::vmm_config::IoEngine::Async {
            block
                .use_io_uring()
                .map_err(|e| ConfigError::new(drive_field(i, "io_engine"), e.to_string()))?;
        }
        let block = Arc::new(Mutex::new(block));
        manager.attach(vm.fd(), mem, registry, event_manager, name, block.clone())?;
        if d.is_root_device {
            extra.extend(root_device_args(d, d.is_read_only));
        }
        blocks.push((d.drive_id.clone(), block));
    }
    for (i, n) in config.network_interfaces.iter().enumerate() {
        let net = Net::new(
            &n.iface_id,
            &n.host_dev_name,
            n.guest_mac.as_deref().and_then(parse_mac),
            n.rx_rate_limiter.unwrap_or_default(),
            n.tx_rate_limiter.unwrap_or_default(),
        )
        .map_err(|e| {
            ConfigError::new(
                JsonPath(vec![
                    Segment::Key("network-interfaces"),
                    Segment::Index(i),
                    Segment::Key("host_dev_name"),
                ]),
                e.to_string(),
            )
        })?;
        let mut net = net;
        if let Some(mtu) = n.mtu {
            net.set_mtu(mtu);
        }
        let net = Arc::new(Mutex::new(net));
        let name = format!("net_{}", n.iface_id);
        manager.attach(vm.fd(), mem, registry, event_manager, name, net.clone())?;
        nets.push((n.iface_id.clone(), net));
    }
    if let Some(entropy) = &config.entropy {
        let rng = Rng::new(entropy.rate_limiter.unwrap_or_default()).map_err(|e| {
            ConfigError::new(JsonPath::keys(&["entropy", "rate_limiter"]), e.to_string())
        })?;
        let rng = Arc::new(Mutex::new(rng));
        manager.attach(vm.fd(), mem, registry, event_manager, "entropy".into(), rng)?;
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(v.guest_cid, &v.uds_path)
            .map_err(|e| ConfigError::new(VsockConfig::uds_path_field(), e.to_string()))?;
        let vsock = Arc::new(Mutex::new(vsock));
        manager.attach(vm.fd(), mem, registry, event_manager, "vsock".into(), vsock)?;
    }
    let balloon = match &config.balloon {
        Some(b) => {
            let balloon = Balloon::new(b.options()).map_err(|e| {
                ConfigError::new(JsonPath::keys(&["balloon", "amount_mib"]), e.to_string())
            })?;
            let balloon = Arc::new(Mutex::new(balloon));
            let name = "balloon".to_string();
            manager.attach(vm.fd(), mem, registry, event_manager, name, balloon.clone())?;
            Some(balloon)
        }
        None => None,
    };
    let pmems = attach_pmem(
        config,
        vm,
        mem,
        hotplug.as_ref(),
        registry,
        event_manager,
        manager,
        &mut extra,
    )?;
    let memory = match hotplug {
        Some(h) => {
            let slots = vm.hotplug_slots(h.region, h.layout, h.first_slot);
            let device = VirtioMem::new(h.layout, Box::new(slots))
                .map_err(|e| ConfigError::new(MemoryHotplugConfig::total_path(), e.to_string()))?;
            let device = Arc::new(Mutex::new(device));
            let name = "memory_hotplug".to_string();
            manager.attach(vm.fd(), mem, registry, event_manager, name, device.clone())?;
            // Linux leaves added memory offline unless told otherwise. Online to ZONE_MOVABLE
            // where the zone ratio allows (auto-movable, Linux 5.15+), so that what was plugged
            // can be unplugged again: a block in ZONE_NORMAL can hold kernel memory for good
            // (seen with Linux 6.1: 4 MiB stayed plugged after unplugging 512 MiB).
            extra.push("memhp_default_state=online".to_string());
            extra.push("memory_hotplug.online_policy=auto-movable".to_string());
            Some(device)
        }
        None => None,
    };
    Ok((
        VirtioHandles {
            blocks,
            vhost_user_blocks,
            nets,
            pmems,
            balloon,
            memory,
            writes: manager.device_writes(),
        },
        extra,
    ))
}
