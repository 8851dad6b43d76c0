//! vCPUs: each runs KVM_RUN on its own named thread and dispatches PIO/MMIO exits to the buses.
//! Every exit is then told, with the device the bus resolved, to the [`ExitObserver`] the
//! thread was handed; the loop itself knows nothing of who counts exits or why.
//!
//! The VMM thread controls a vCPU through a channel of [`VcpuEvent`]s plus a "kick": a real-time
//! signal whose handler sets `kvm_run.immediate_exit`, so a vCPU inside KVM_RUN returns at once
//! and one about to enter it does not block (the signal may land just before the ioctl).

use std::cell::Cell;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::cpuid::{filter_cpuid, Topology};
use crate::arch::x86_64::regs::{setup_boot_vcpu, setup_fpu, BootEntry, RegsError};
use crate::arch::x86_64::{lapic, msr};
use crate::exit::{ExitReason, ExitSignal, ShutdownRegs};
use crate::seccomp::{self, ThreadKind};
use crate::vmm_config::cpu_config::BitFilter;
use exits::{handle_exit, Next};
pub use exits::{ExitObserver, IoBuses};

mod exits;
pub mod spawner;
mod state;
pub use state::{saved_msr_indices, StateError, VcpuState};

/// `_IO(KVMIO, 0xce)`: a vCPU's binary statistics file (Linux 5.14+).
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;

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
    #[error(
        "vCPU {index}: cannot {action} MSR {msr:#x} of the CPU template (cpu-config.msr_modifiers)"
    )]
    TemplateMsr {
        index: u8,
        msr: u32,
        action: &'static str,
    },
    #[error("vCPU {index}: the CPU template changes {count} MSRs; at most {max} are taken")]
    TooManyTemplateMsrs { index: u8, count: usize, max: usize },
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
    #[error("vCPU {index}: {source}")]
    State { index: u8, source: StateError },
    #[error("vCPU {index} can only be saved while the VM is paused")]
    NotPaused { index: u8 },
    #[error("vCPU {index} was not started: its thread could not be filtered: {why}")]
    Unfiltered { index: u8, why: String },
    #[error("cannot start the vCPU spawner thread: {0}")]
    Spawner(std::io::Error),
    #[error("the vCPU spawner thread has stopped")]
    SpawnerGone,
}

/// Requests from the VMM thread to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Read the whole state (only while paused).
    SaveState,
    /// Leave the run loop for good.
    Finish,
}

/// A vCPU thread's acknowledgement of an event.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Box<Result<VcpuState, VcpuError>>),
}

/// What a vCPU thread's name starts with: Firecracker's, by which Kata Containers finds the vCPU
/// threads (to move them into the pod's cgroup and to count the VM's CPUs).
pub const THREAD_NAME_PREFIX: &str = "fc_vcpu ";

/// The name of vCPU `index`'s thread, Firecracker's `fc_vcpu <index>`.
pub fn thread_name(index: u8) -> String {
    format!("{THREAD_NAME_PREFIX}{index}")
}

/// A configured vCPU, before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The MSRs a snapshot saves ([`saved_msr_indices`]).
    saved_msrs: Arc<[u32]>,
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
        Ok(Self {
            index,
            fd,
            saved_msrs: Arc::from([]),
        })
    }

    /// Sets the MSRs a snapshot of this vCPU saves (none until set).
    pub fn set_saved_msrs(&mut self, msrs: Arc<[u32]>) {
        self.saved_msrs = msrs;
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

    /// Puts a saved state back instead of [`Vcpu::configure`]: the vCPU goes on where it was.
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        state.restore(&self.fd).map_err(|source| VcpuError::State {
            index: self.index,
            source,
        })
    }

    /// The custom CPU template's MSR modifiers, as Firecracker applies them: each MSR's value
    /// (the boot one, or KVM's default) is read, changed under the modifier's mask and written
    /// back. An MSR KVM does not take fails the boot, naming it.
    pub fn modify_msrs(&self, modifiers: &[(u32, BitFilter)]) -> Result<(), VcpuError> {
        if modifiers.is_empty() {
            return Ok(());
        }
        let index = self.index;
        let entries: Vec<kvm_msr_entry> = modifiers
            .iter()
            .map(|&(msr, _)| kvm_msr_entry {
                index: msr,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuError::TooManyTemplateMsrs {
                index,
                count: entries.len(),
                max: KVM_MAX_MSR_ENTRIES,
            })?;
        let failed = |done: usize, action| VcpuError::TemplateMsr {
            index,
            msr: entries[done.min(entries.len() - 1)].index,
            action,
        };
        let read = self.fd.get_msrs(&mut msrs).map_err(|_| failed(0, "read"))?;
        if read != entries.len() {
            return Err(failed(read, "read"));
        }
        for (entry, (_, filter)) in msrs.as_mut_slice().iter_mut().zip(modifiers) {
            entry.data = filter.apply(entry.data);
        }
        let set = self.fd.set_msrs(&msrs).map_err(|_| failed(0, "write"))?;
        if set != entries.len() {
            return Err(failed(set, "write"));
        }
        Ok(())
    }

    /// Opens the vCPU's KVM binary statistics file. Only before the thread starts: KVM takes a
    /// vCPU's ioctls one at a time, and its own thread holds it inside KVM_RUN.
    pub fn stats_file(&self) -> std::io::Result<File> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; the vCPU fd is
        // open for the call.
        let fd = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just handed us this fd and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The vCPU's fd, for what the VMM thread asks KVM about it before the thread starts.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Starts the vCPU on a thread named [`thread_name`], telling `observer` of every exit; with
    /// `paused` it waits for [`VcpuEvent::Resume`] before it first runs. The thread is a child
    /// of the calling thread (and so starts under its seccomp filters); when it is finished
    /// ([`VcpuHandle::finish`]) the vCPU and the observer come back, to be started again later
    /// (a vCPU plugged back in).
    pub fn start(
        self,
        buses: Arc<IoBuses>,
        exit: Arc<ExitSignal>,
        observer: Box<dyn ExitObserver>,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (event_tx, event_rx) = channel();
        let (response_tx, response_rx) = channel();
        let (tid_tx, tid_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(thread_name(index))
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let mut runner = VcpuRunner {
                    index,
                    fd: self.fd,
                    observer,
                    buses,
                    exit,
                    events: event_rx,
                    responses: response_tx,
                    saved_msrs: self.saved_msrs,
                };
                runner.run(paused);
                let VcpuRunner {
                    fd,
                    observer,
                    saved_msrs,
                    ..
                } = runner;
                (
                    Vcpu {
                        index,
                        fd,
                        saved_msrs,
                    },
                    observer,
                )
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        // Not waited for here: on a busy host the new thread may take milliseconds to be
        // scheduled, and a restore's resume would wait that long for every vCPU in turn.
        Ok(VcpuHandle {
            index,
            tid: OnceLock::new(),
            tid_rx,
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
    observer: Box<dyn ExitObserver>,
    buses: Arc<IoBuses>,
    exit: Arc<ExitSignal>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    saved_msrs: Arc<[u32]>,
}

impl VcpuRunner {
    fn run(&mut self, paused: bool) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        // A vCPU whose filter is missing must not run the guest: it ends the VM instead.
        let index = self.index;
        let unfiltered = move |e| ExitReason::VmmError(format!("vCPU {index}: {e}"));
        if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
            self.exit.request(unfiltered(e));
        }
        let mut paused = paused;
        loop {
            if self.exit.is_requested() || !self.handle_events(paused) {
                break;
            }
            // The safe point: between two KVM_RUNs, with no exit half-handled.
            if let Err(e) = seccomp::catch_up(ThreadKind::Vcpu) {
                self.exit.request(unfiltered(e));
                break;
            }
            let next = match self.fd.run() {
                Ok(exit) => handle_exit(self.index, exit, &self.buses, self.observer.as_mut()),
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
                self.exit.request(self.with_regs(reason));
                break;
            }
            paused = false;
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }

    /// A triple fault is easier to debug knowing where the guest was.
    fn with_regs(&self, reason: ExitReason) -> ExitReason {
        match reason {
            ExitReason::TripleFault { vcpu, regs: None } => {
                let regs = match (self.fd.get_regs(), self.fd.get_sregs()) {
                    (Ok(r), Ok(s)) => Some(ShutdownRegs {
                        rip: r.rip,
                        rsp: r.rsp,
                        rflags: r.rflags,
                        cs_selector: s.cs.selector,
                        cs_base: s.cs.base,
                        cr0: s.cr0,
                        cr2: s.cr2,
                        cr3: s.cr3,
                        cr4: s.cr4,
                        efer: s.efer,
                    }),
                    _ => None,
                };
                ExitReason::TripleFault { vcpu, regs }
            }
            other => other,
        }
    }

    /// Finishes an I/O exit KVM has not completed yet (the data of an MMIO or port read goes
    /// into the guest's register only on the next KVM_RUN), without running guest code: after
    /// this the registers are what the guest will see.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // With immediate_exit set KVM completes the I/O and returns EINTR before guest entry.
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        self.complete_pending_io();
        VcpuState::save(&self.fd, &self.saved_msrs).map_err(|source| VcpuError::State {
            index: self.index,
            source,
        })
    }

    /// Serves queued events; while paused (from the start with `paused`), blocks until resumed or
    /// finished. Returns false when the vCPU must stop.
    fn handle_events(&mut self, paused: bool) -> bool {
        let mut paused = paused;
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
                VcpuEvent::SaveState => {
                    let saved = if paused {
                        self.save_state()
                    } else {
                        Err(VcpuError::NotPaused { index: self.index })
                    };
                    let _ = self.responses.send(VcpuResponse::Saved(Box::new(saved)));
                }
                VcpuEvent::Finish => return false,
            }
        }
    }
}

/// What a vCPU thread hands back when it ends: the vCPU and its exit observer.
pub type Stopped = (Vcpu, Box<dyn ExitObserver>);

/// The VMM thread's side of a running vCPU.
pub struct VcpuHandle {
    index: u8,
    tid: OnceLock<Option<libc::pid_t>>,
    tid_rx: Receiver<libc::pid_t>,
    thread: Option<JoinHandle<Stopped>>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The thread's kernel id (for cgroups), once the thread has said it; None if it ended
    /// before.
    pub fn tid(&self) -> Option<libc::pid_t> {
        *self.tid.get_or_init(|| self.tid_rx.recv().ok())
    }

    /// The thread (for its CPU clock); None once joined.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread.as_ref().map(|t| t.as_pthread_t())
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
        expect: &VcpuResponse,
        timeout: Duration,
        event: VcpuEvent,
    ) -> Result<(), VcpuError> {
        let same = |r: &VcpuResponse| std::mem::discriminant(r) == std::mem::discriminant(expect);
        self.response(timeout, event, same).map(|_| ())
    }

    /// The vCPU's first answer within `timeout` that `wanted` takes; others before it are late
    /// answers to earlier requests that timed out, not this one's.
    fn response(
        &self,
        timeout: Duration,
        event: VcpuEvent,
        wanted: impl Fn(&VcpuResponse) -> bool,
    ) -> Result<VcpuResponse, VcpuError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(r) if wanted(&r) => return Ok(r),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::NoResponse {
                        index: self.index,
                        event,
                        timeout,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::Gone { index: self.index })
                }
            }
        }
    }

    /// The vCPU's whole state; it must be paused.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuError> {
        self.send(VcpuEvent::SaveState)?;
        let saved = |r: &VcpuResponse| matches!(r, VcpuResponse::Saved(_));
        match self.response(timeout, VcpuEvent::SaveState, saved)? {
            VcpuResponse::Saved(state) => *state,
            _ => unreachable!("only a Saved answer is taken"),
        }
    }

    /// Ends the vCPU's thread and joins it; returns the vCPU to start again, or None if the
    /// thread panicked.
    pub fn finish(mut self) -> Option<Stopped> {
        let _ = self.send(VcpuEvent::Finish);
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(stopped) => Some(stopped),
            Err(_) => {
                tracing::error!("vCPU {} thread panicked", self.index);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

    fn read_msr(vcpu: &Vcpu, msr: u32) -> u64 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: msr,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.fd.get_msrs(&mut msrs).unwrap(), 1);
        msrs.as_slice()[0].data
    }

    #[test]
    fn template_msr_modifiers_change_only_their_bits_and_unknown_msrs_are_named() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = Vcpu::new(&vm, 0).unwrap();
        let boot = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            data: 0x1234_0000,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.fd.set_msrs(&boot).unwrap(), 1);
        // The low 16 bits become 0xbeef; the rest keep the boot value.
        let filter = BitFilter {
            mask: 0xffff,
            bits: 0xbeef,
        };
        vcpu.modify_msrs(&[(MSR_KERNEL_GS_BASE, filter)]).unwrap();
        assert_eq!(read_msr(&vcpu, MSR_KERNEL_GS_BASE), 0x1234_beef);

        let e = vcpu
            .modify_msrs(&[(MSR_KERNEL_GS_BASE, filter), (0x2fff_0000, filter)])
            .unwrap_err();
        assert!(e.to_string().contains("0x2fff0000"), "{e}");
        let many = vec![(MSR_KERNEL_GS_BASE, filter); KVM_MAX_MSR_ENTRIES + 1];
        assert!(matches!(
            vcpu.modify_msrs(&many),
            Err(VcpuError::TooManyTemplateMsrs { .. })
        ));
    }
}
