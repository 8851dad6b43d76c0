//! Why a microVM ended, and the one place every thread reports it.
//!
//! Several threads can see an end at nearly the same time (the i8042 reset on one vCPU, then the
//! guest's fallback triple fault on the next instruction). The first reason wins, so the VMM
//! reports what the guest asked for rather than what happened after it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`).
    GuestReset,
    /// The guest asked KVM for a system shutdown or reset (KVM_EXIT_SYSTEM_EVENT).
    GuestSystemEvent { vcpu: u8, kind: u32 },
    /// A vCPU halted with no in-kernel irqchip to wake it (KVM_EXIT_HLT).
    GuestHalted { vcpu: u8 },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN), with the vCPU's registers as KVM left them.
    TripleFault {
        vcpu: u8,
        regs: Option<ShutdownRegs>,
    },
    /// KVM could not run the guest any further (internal error, failed entry...).
    GuestCrashed { vcpu: u8, detail: String },
    /// A VMM-side failure while running.
    VmmError(String),
    /// The VMM received a terminating signal.
    Signal(i32),
    /// The predictor's anomaly response ended the VM (`anomaly.action: kill`), for this reason.
    KilledByPredictor(String),
}

/// A vCPU's registers as read right after its KVM_EXIT_SHUTDOWN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownRegs {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cs_selector: u16,
    pub cs_base: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl ShutdownRegs {
    /// The architectural state after INIT: KVM on AMD (SVM) INITs a vCPU when it intercepts a
    /// shutdown (the VMCB is undefined afterwards), so its registers no longer say where the
    /// guest was. KVM on Intel leaves them as they were at the triple fault.
    pub fn is_reset_state(&self) -> bool {
        const CR0_PE: u64 = 1;
        self.rip == 0xfff0 && self.cs_base == 0xffff_0000 && self.cr0 & CR0_PE == 0
    }
}

impl fmt::Display for ShutdownRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} (base {:#x}) cr0={:#x} cr2={:#x} \
             cr3={:#x} cr4={:#x} efer={:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs_selector,
            self.cs_base,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer
        )
    }
}

/// Process exit codes, documented in README.md.
pub mod code {
    pub const OK: i32 = 0;
    /// The VMM failed (KVM unavailable, a host resource, a runtime error).
    pub const VMM_ERROR: i32 = 1;
    /// The spec or the command line is wrong.
    pub const BAD_CONFIG: i32 = 2;
    /// The guest crashed (triple fault, KVM emulation failure).
    pub const GUEST_CRASH: i32 = 3;
    /// The predictor killed the VM for anomalous behaviour.
    pub const KILLED_BY_PREDICTOR: i32 = 4;
}

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestSystemEvent { .. }
            | ExitReason::GuestHalted { .. } => code::OK,
            ExitReason::TripleFault { .. } | ExitReason::GuestCrashed { .. } => code::GUEST_CRASH,
            ExitReason::VmmError(_) => code::VMM_ERROR,
            ExitReason::Signal(sig) => 128 + sig,
            ExitReason::KilledByPredictor(_) => code::KILLED_BY_PREDICTOR,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset the machine (i8042)"),
            ExitReason::GuestSystemEvent { vcpu, kind } => {
                write!(f, "vCPU {vcpu}: guest system event {kind}")
            }
            ExitReason::GuestHalted { vcpu } => write!(f, "vCPU {vcpu}: guest halted"),
            ExitReason::TripleFault { vcpu, regs } => {
                write!(f, "vCPU {vcpu}: guest triple fault (KVM_EXIT_SHUTDOWN)")?;
                match regs {
                    Some(r) if r.is_reset_state() => write!(
                        f,
                        "; registers {r}: the reset state (KVM on AMD INITs a vCPU at a \
                         shutdown, so where the guest faulted is lost: see its console, or \
                         trace kvm:kvm_exit on the host for the guest's last rip)"
                    ),
                    Some(r) => write!(f, "; registers {r}"),
                    None => Ok(()),
                }
            }
            ExitReason::GuestCrashed { vcpu, detail } => write!(f, "vCPU {vcpu}: {detail}"),
            ExitReason::VmmError(msg) => write!(f, "{msg}"),
            ExitReason::Signal(sig) => write!(f, "received signal {sig}"),
            ExitReason::KilledByPredictor(why) => write!(f, "killed by the predictor: {why}"),
        }
    }
}

/// The VM's end, as reported by the first thread that saw it, plus an eventfd that wakes the
/// VMM loop.
pub struct ExitSignal {
    requested: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

/// Signal number caught by the termination handler, 0 if none: a handler may only touch atomics.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The exit eventfd the termination handler writes, -1 before one exists.
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another one came first, and wakes the VMM loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::debug!("exit requested: {reason}");
            *slot = Some(reason);
            self.requested.store(true, Ordering::Release);
            // The eventfd counter cannot overflow from one write per VM lifetime.
            let _ = self.evt.write(1);
        }
    }

    /// Cheap check for the vCPU loop: has anything ended the VM?
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire) || PENDING_SIGNAL.load(Ordering::Relaxed) != 0
    }

    /// The reason, folding in a termination signal caught since.
    pub fn reason(&self) -> Option<ExitReason> {
        let sig = PENDING_SIGNAL.load(Ordering::Relaxed);
        if sig != 0 {
            self.request(ExitReason::Signal(sig));
        }
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// Routes SIGTERM, SIGINT and SIGHUP to this signal so that the VMM ends cleanly (terminal
    /// restored, threads joined) instead of dying mid-write.
    pub fn catch_termination_signals(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        SIGNAL_EVENT_FD.store(self.evt.as_raw_fd(), Ordering::Relaxed);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            vmm_sys_util::signal::register_signal_handler(sig, on_termination_signal)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(())
    }
}

extern "C" fn on_termination_signal(
    num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    PENDING_SIGNAL.store(num, Ordering::Relaxed);
    let fd = SIGNAL_EVENT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of the right size.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_loop() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.requested.load(Ordering::Relaxed));
        s.request(ExitReason::GuestReset);
        s.request(ExitReason::TripleFault {
            vcpu: 0,
            regs: None,
        });
        assert_eq!(s.reason(), Some(ExitReason::GuestReset));
        assert!(s.is_requested());
        assert_eq!(s.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn exit_codes_separate_clean_ends_guest_crashes_and_vmm_errors() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(
            ExitReason::TripleFault {
                vcpu: 1,
                regs: None
            }
            .exit_code(),
            3
        );
        assert_eq!(ExitReason::VmmError("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::Signal(15).exit_code(), 143);
    }

    #[test]
    fn a_triple_fault_names_the_registers_and_says_when_kvm_reset_them() {
        let regs = ShutdownRegs {
            rip: 0x10,
            cs_selector: 0x10,
            cr0: 0x8000_0011,
            ..Default::default()
        };
        let msg = ExitReason::TripleFault {
            vcpu: 1,
            regs: Some(regs),
        }
        .to_string();
        assert!(
            msg.starts_with("vCPU 1: guest triple fault (KVM_EXIT_SHUTDOWN); registers rip=0x10 "),
            "{msg}"
        );
        assert!(msg.contains("cr0=0x80000011"), "{msg}");
        assert!(!msg.contains("reset state"), "{msg}");
        // What KVM on AMD leaves: the vCPU after INIT.
        let reset = ShutdownRegs {
            rip: 0xfff0,
            cs_selector: 0xf000,
            cs_base: 0xffff_0000,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        assert!(reset.is_reset_state());
        let msg = ExitReason::TripleFault {
            vcpu: 0,
            regs: Some(reset),
        }
        .to_string();
        assert!(msg.contains("rip=0xfff0"), "{msg}");
        assert!(msg.contains("the reset state"), "{msg}");
    }
}
