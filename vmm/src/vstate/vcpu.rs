//! vCPUs: each runs KVM_RUN on its own named thread and dispatches PIO/MMIO exits to the buses.
//!
//! The VMM thread controls a vCPU through a channel of [`VcpuEvent`]s plus a "kick": a real-time
//! signal whose handler sets `kvm_run.immediate_exit`, so a vCPU inside KVM_RUN returns at once
//! and one about to enter it does not block (the signal may land just before the ioctl).

use std::cell::Cell;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use kvm_bindings::{kvm_run, CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use predictor::telemetry::ExitKind;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::cpuid::{filter_cpuid, Topology};
use crate::arch::x86_64::regs::{setup_boot_vcpu, setup_fpu, BootEntry, RegsError};
use crate::arch::x86_64::{lapic, msr};
use crate::autopilot::exits::ExitTelemetry;
use crate::autopilot::kvm_stats::{KvmStatsError, KvmStatsReader};
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::{VcpuCounters, METRICS};
use crate::seccomp::{self, ThreadKind};

/// Errors of creating, configuring and controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: cannot set {what}: {source}")]
    Configure {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted {set} of {total} boot MSRs")]
    PartialMsrs { index: u8, set: usize, total: usize },
    #[error("vCPU {index}: {source}")]
    Regs { index: u8, source: RegsError },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("vCPU {index} did not answer {event:?} within {timeout:?}")]
    NoResponse {
        index: u8,
        event: VcpuEvent,
        timeout: Duration,
    },
    #[error("vCPU {index} has stopped")]
    Gone { index: u8 },
}

/// Requests from the VMM thread to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Leave the run loop for good.
    Finish,
}

/// A vCPU thread's acknowledgement of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
}

/// The devices a vCPU's exits reach.
#[derive(Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// A configured vCPU, before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    /// The VM ends for this reason.
    End(ExitReason),
}

thread_local! {
    /// This thread's kvm_run page, for the kick handler (null outside vCPU threads).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mmap'ed kvm_run, set by the vCPU thread
            // before it enables kicks and valid until the thread ends; a byte store is
            // async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
    fence(Ordering::Release);
}

/// The kick signal: the first real-time signal.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; once per process, before any vCPU thread starts.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::KickHandler)
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self { index, fd })
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; the entry state too for the boot vCPU (the
    /// others wait in KVM for the guest's INIT/SIPI).
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        topology: Topology,
        mem: &GuestMemoryMmap,
        entry: BootEntry,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let configure = |what, source| VcpuError::Configure {
            index,
            what,
            source,
        };
        let mut cpuid = supported_cpuid.clone();
        filter_cpuid(&mut cpuid, index, topology);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| configure("CPUID", e))?;

        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(|e| configure("MSRs", e))?;
        let total = msrs.as_slice().len();
        if set != total {
            return Err(VcpuError::PartialMsrs { index, set, total });
        }

        setup_fpu(&self.fd).map_err(|source| VcpuError::Regs { index, source })?;
        let mut lapic_state = self.fd.get_lapic().map_err(|e| configure("LAPIC", e))?;
        lapic::set_lint(&mut lapic_state);
        self.fd
            .set_lapic(&lapic_state)
            .map_err(|e| configure("LAPIC", e))?;

        if index == 0 {
            setup_boot_vcpu(&self.fd, mem, entry)
                .map_err(|source| VcpuError::Regs { index, source })?;
        }
        Ok(())
    }

    /// Starts the vCPU on a thread named `vcpu<N>`; with `telemetry`, every exit is recorded
    /// for the predictor.
    pub fn start(
        self,
        buses: Arc<IoBuses>,
        exit: Arc<ExitSignal>,
        telemetry: Option<ExitTelemetry>,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (event_tx, event_rx) = channel();
        let (response_tx, response_rx) = channel();
        let (tid_tx, tid_rx) = channel();
        let counters = METRICS.register_vcpu();
        // Only the predictor reads KVM's stats: a VM without one opens no stats fd.
        let kvm_stats = telemetry
            .is_some()
            .then(|| KvmStatsReader::open(self.fd.as_raw_fd()));
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let mut runner = VcpuRunner {
                    index,
                    fd: self.fd,
                    counters,
                    telemetry,
                    buses,
                    exit,
                    events: event_rx,
                    responses: response_tx,
                };
                runner.run();
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        let tid = tid_rx.recv().map_err(|_| VcpuError::Gone { index })?;
        Ok(VcpuHandle {
            index,
            tid,
            kvm_stats,
            thread: Some(thread),
            events: event_tx,
            responses: response_rx,
        })
    }
}

/// The state a vCPU thread owns.
struct VcpuRunner {
    index: u8,
    fd: VcpuFd,
    counters: Arc<VcpuCounters>,
    telemetry: Option<ExitTelemetry>,
    buses: Arc<IoBuses>,
    exit: Arc<ExitSignal>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
}

impl VcpuRunner {
    fn run(&mut self) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        // A vCPU whose filter is missing must not run the guest: it ends the VM instead.
        let index = self.index;
        let unfiltered = move |e| ExitReason::VmmError(format!("vCPU {index}: {e}"));
        if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
            self.exit.request(unfiltered(e));
        }
        loop {
            if self.exit.is_requested() || !self.handle_events() {
                break;
            }
            // The safe point: between two KVM_RUNs, with no exit half-handled.
            if let Err(e) = seccomp::catch_up(ThreadKind::Vcpu) {
                self.exit.request(unfiltered(e));
                break;
            }
            let next = match self.fd.run() {
                Ok(exit) => handle_exit(
                    self.index,
                    exit,
                    &self.buses,
                    &self.counters,
                    self.telemetry.as_mut(),
                ),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: clear the flag so the next KVM_RUN runs, then look at events.
                    self.fd.set_kvm_immediate_exit(0);
                    Next::Continue
                }
                Err(e) => Next::End(ExitReason::VmmError(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                ))),
            };
            if let Next::End(reason) = next {
                self.exit.request(self.with_rip(reason));
                break;
            }
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }

    /// A triple fault is easier to debug knowing where the guest was.
    fn with_rip(&self, reason: ExitReason) -> ExitReason {
        match reason {
            ExitReason::TripleFault { vcpu, rip: None } => ExitReason::TripleFault {
                vcpu,
                rip: self.fd.get_regs().ok().map(|r| r.rip),
            },
            other => other,
        }
    }

    /// Serves queued events; while paused, blocks until resumed or finished. Returns false when
    /// the vCPU must stop.
    fn handle_events(&mut self) -> bool {
        let mut paused = false;
        loop {
            let event = if paused {
                match self.events.recv() {
                    Ok(e) => e,
                    Err(_) => return false,
                }
            } else {
                match self.events.try_recv() {
                    Ok(e) => e,
                    Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                }
            };
            // A closed response channel means the VMM is going away; Finish follows.
            match event {
                VcpuEvent::Pause => {
                    paused = true;
                    let _ = self.responses.send(VcpuResponse::Paused);
                }
                VcpuEvent::Resume => {
                    let _ = self.responses.send(VcpuResponse::Resumed);
                    if paused {
                        return true;
                    }
                }
                VcpuEvent::Finish => return false,
            }
        }
    }
}

/// Acts on one KVM exit of vCPU `index`. Unclaimed port and MMIO reads see all-ones, as on a bus
/// with nothing attached; unclaimed writes are dropped.
fn handle_exit(
    index: u8,
    exit: VcpuExit<'_>,
    buses: &IoBuses,
    counters: &VcpuCounters,
    mut telemetry: Option<&mut ExitTelemetry>,
) -> Next {
    let vcpu = index;
    let count = |c: &std::sync::atomic::AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    let reason = match exit {
        VcpuExit::IoIn(port, data) => {
            count(&counters.exit_io_in);
            let claimed = buses.pio.read(u64::from(port), data);
            if !claimed {
                count(&counters.unclaimed_access);
                tracing::trace!("vCPU {index}: unclaimed PIO read of port {port:#x}");
                data.fill(0xff);
            }
            if let Some(t) = telemetry {
                t.pio(claimed);
            }
            return Next::Continue;
        }
        VcpuExit::IoOut(port, data) => {
            count(&counters.exit_io_out);
            let claimed = buses.pio.write(u64::from(port), data);
            if !claimed {
                count(&counters.unclaimed_access);
                tracing::trace!("vCPU {index}: unclaimed PIO write of port {port:#x}");
            }
            if let Some(t) = telemetry {
                t.pio(claimed);
            }
            return Next::Continue;
        }
        VcpuExit::MmioRead(addr, data) => {
            count(&counters.exit_mmio_read);
            let claimed = buses.mmio.read(addr, data);
            if !claimed {
                count(&counters.unclaimed_access);
                tracing::trace!("vCPU {index}: unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
            if let Some(t) = telemetry {
                t.mmio(addr, claimed);
            }
            return Next::Continue;
        }
        VcpuExit::MmioWrite(addr, data) => {
            count(&counters.exit_mmio_write);
            let claimed = buses.mmio.write(addr, data);
            if !claimed {
                count(&counters.unclaimed_access);
                tracing::trace!("vCPU {index}: unclaimed MMIO write at {addr:#x}");
            }
            if let Some(t) = telemetry {
                t.mmio(addr, claimed);
            }
            return Next::Continue;
        }
        VcpuExit::Intr => {
            if let Some(t) = telemetry.as_deref_mut() {
                t.other(ExitKind::Other);
            }
            return Next::Continue;
        }
        VcpuExit::Hlt => ExitReason::GuestHalted { vcpu },
        VcpuExit::Shutdown => ExitReason::TripleFault { vcpu, rip: None },
        VcpuExit::SystemEvent(kind, _)
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
        {
            ExitReason::GuestSystemEvent { vcpu, kind }
        }
        VcpuExit::FailEntry(reason, cpu) => ExitReason::GuestCrashed {
            vcpu,
            detail: format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
            ),
        },
        VcpuExit::InternalError => ExitReason::GuestCrashed {
            vcpu,
            detail: "KVM internal error (the guest ran an instruction KVM cannot emulate)"
                .to_string(),
        },
        other => ExitReason::GuestCrashed {
            vcpu,
            detail: format!("unexpected KVM exit {other:?}"),
        },
    };
    if let Some(t) = telemetry {
        t.other(match &reason {
            ExitReason::GuestHalted { .. } => ExitKind::Hlt,
            ExitReason::TripleFault { .. } => ExitKind::Shutdown,
            ExitReason::GuestSystemEvent { .. } => ExitKind::SystemEvent,
            _ => ExitKind::InternalError,
        });
    }
    Next::End(reason)
}

/// The VMM thread's side of a running vCPU.
pub struct VcpuHandle {
    index: u8,
    tid: libc::pid_t,
    kvm_stats: Option<Result<KvmStatsReader, KvmStatsError>>,
    thread: Option<JoinHandle<()>>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The thread's kernel id (for cgroups).
    pub fn tid(&self) -> libc::pid_t {
        self.tid
    }

    /// The thread (for its CPU clock); None once joined.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// The vCPU's KVM stats reader, opened at start when the VM has a predictor; taken once.
    pub fn take_kvm_stats(&mut self) -> Option<Result<KvmStatsReader, KvmStatsError>> {
        self.kvm_stats.take()
    }

    /// Queues `event` and kicks the vCPU out of KVM_RUN so it sees it.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        let gone = VcpuError::Gone { index: self.index };
        self.events.send(event).map_err(|_| gone)?;
        self.kick();
        Ok(())
    }

    /// Interrupts KVM_RUN; harmless if the vCPU is not in it.
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            // A thread that already ended cannot be interrupted and needs not be.
            let _ = thread.kill(kick_signal());
        }
    }

    /// Waits for the vCPU to acknowledge `event` (sent earlier) with `expect`.
    pub fn await_response(
        &self,
        expect: VcpuResponse,
        timeout: Duration,
        event: VcpuEvent,
    ) -> Result<(), VcpuError> {
        match self.responses.recv_timeout(timeout) {
            Ok(r) if r == expect => Ok(()),
            Ok(_) | Err(RecvTimeoutError::Timeout) => Err(VcpuError::NoResponse {
                index: self.index,
                event,
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone { index: self.index }),
        }
    }

    /// Stops the vCPU for good and joins its thread.
    pub fn finish(mut self) {
        let _ = self.send(VcpuEvent::Finish);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A port device that counts writes, to see exits reach the bus.
    struct Count(Arc<Mutex<Vec<u8>>>);
    impl devices::BusDevice for Count {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    #[test]
    fn unclaimed_reads_see_all_ones_and_claimed_ones_reach_the_device() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut buses = IoBuses::default();
        buses
            .pio
            .insert(Arc::new(Mutex::new(Count(seen.clone()))), 0x80, 1)
            .unwrap();

        let counters = VcpuCounters::default();
        let mut data = [0u8; 2];
        let next = handle_exit(0, VcpuExit::IoIn(0x81, &mut data), &buses, &counters, None);
        assert_eq!(next, Next::Continue);
        assert_eq!(data, [0xff, 0xff]);
        handle_exit(0, VcpuExit::IoIn(0x80, &mut data), &buses, &counters, None);
        assert_eq!(data, [0x42, 0x42]);
        handle_exit(0, VcpuExit::IoOut(0x80, &[7]), &buses, &counters, None);
        assert_eq!(*seen.lock().unwrap(), vec![7]);
        let mut mmio = [0u8; 4];
        handle_exit(
            0,
            VcpuExit::MmioRead(0xd000_0000, &mut mmio),
            &buses,
            &counters,
            None,
        );
        assert_eq!(mmio, [0xff; 4]);
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(get(&counters.exit_io_in), 2);
        assert_eq!(get(&counters.exit_io_out), 1);
        assert_eq!(get(&counters.exit_mmio_read), 1);
        assert_eq!(get(&counters.unclaimed_access), 2);
    }

    #[test]
    fn fatal_exits_end_the_vm_with_their_reason() {
        let buses = IoBuses::default();
        let c = VcpuCounters::default();
        assert_eq!(
            handle_exit(2, VcpuExit::Shutdown, &buses, &c, None),
            Next::End(ExitReason::TripleFault { vcpu: 2, rip: None })
        );
        assert!(matches!(
            handle_exit(1, VcpuExit::InternalError, &buses, &c, None),
            Next::End(ExitReason::GuestCrashed { vcpu: 1, .. })
        ));
        assert_eq!(
            handle_exit(0, VcpuExit::Hlt, &buses, &c, None),
            Next::End(ExitReason::GuestHalted { vcpu: 0 })
        );
    }
}
