//! Seccomp filters per thread kind, and their tightening at run time.
//!
//! `resources/seccomp/x86_64.json` holds, for each thread kind (VMM, API, vCPU), one filter per
//! stage; build.rs compiles them to BPF. The "boot" filters are allow-lists (anything else kills
//! the process with SIGSYS). "steady" and "quarantine" are deny-lists that fail their syscalls
//! with EPERM; a thread moving to a later stage installs each one in between on top of what it
//! has, and the kernel applies every installed filter, so a stage can only get stricter.
//!
//! A stage is requested process-wide ([`request_stage`]); each thread installs it itself at its
//! next safe point ([`catch_up`]): a vCPU before its next KVM_RUN, the VMM thread at its next loop
//! iteration, an API thread at its next request.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use seccompiler::{apply_filter, sock_filter, BpfProgram};
use serde::{Deserialize, Serialize};

/// Errors of installing filters and changing stages.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot install the {kind} thread's {stage} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        stage: Stage,
        source: seccompiler::Error,
    },
    #[error("seccomp is off (--no-seccomp)")]
    Disabled,
    #[error("cannot read the filter file: {0}")]
    CustomRead(std::io::Error),
    #[error("the filter file is larger than {CUSTOM_FILE_LIMIT} bytes")]
    CustomTooLarge,
    #[error("not a compiled filter file (Firecracker's seccompiler-bin format): {0}")]
    CustomFormat(String),
    #[error("the filter file has no filter for the {0} threads")]
    CustomMissing(&'static str),
    #[error("the {0} filter has {1} instructions; the kernel takes at most {BPF_MAX_LEN}")]
    CustomTooLong(&'static str, usize),
    #[error("the seccomp stage is already {current}; it can only get stricter, not go back to {requested}")]
    Looser { current: Stage, requested: Stage },
}

/// The threads that get a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: devices, API actions, the predictor.
    Vmm,
    /// The API socket's accept and client threads.
    Api,
    /// A thread running KVM_RUN.
    Vcpu,
    /// The thread that starts vCPUs plugged in later: a vCPU's filter plus thread creation.
    VcpuSpawner,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VcpuSpawner => "vcpu_spawner",
        }
    }
}

impl ThreadKind {
    /// The stage a thread of this kind starts in. API and vCPU threads never open or map files
    /// nor exec, so they start with the steady filter on top of boot: their boot allow-lists
    /// admit `openat` only so that steady fails it with EPERM (glibc's malloc probes
    /// /sys/devices/system/cpu/online when a thread makes its first arena) instead of killing.
    fn first_stage(self) -> Stage {
        match self {
            ThreadKind::Vmm => Stage::Boot,
            ThreadKind::Api | ThreadKind::Vcpu | ThreadKind::VcpuSpawner => Stage::Steady,
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ThreadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            ThreadKind::Vmm,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::VcpuSpawner,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("{s:?} is not one of vmm, api, vcpu, vcpu_spawner"))
    }
}

/// How much a thread may still do, from most to least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Everything a thread of its kind needs to set up and run the VM.
    Boot = 0,
    /// The guest is up: no more file opens, no mmap of files, no execve.
    Steady = 1,
    /// An anomaly was seen: also no new sockets and no new guest memory.
    Quarantine = 2,
}

impl Stage {
    const ALL: [Stage; 3] = [Stage::Boot, Stage::Steady, Stage::Quarantine];

    fn from_u8(v: u8) -> Stage {
        Self::ALL[usize::from(v).min(Self::ALL.len() - 1)]
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Boot => "boot",
            Stage::Steady => "steady",
            Stage::Quarantine => "quarantine",
        })
    }
}

/// The compiled filters, by thread kind then stage (the order of [`Stage::ALL`]).
const FILTERS: [(ThreadKind, [&[u8]; 3]); 4] = [
    (
        ThreadKind::Vmm,
        [
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vmm_boot.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vmm_steady.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vmm_quarantine.bpf")),
        ],
    ),
    (
        ThreadKind::Api,
        [
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/api_boot.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/api_steady.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/api_quarantine.bpf")),
        ],
    ),
    (
        ThreadKind::Vcpu,
        [
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vcpu_boot.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vcpu_steady.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vcpu_quarantine.bpf")),
        ],
    ),
    (
        ThreadKind::VcpuSpawner,
        [
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vcpu_spawner_boot.bpf")),
            include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vcpu_spawner_steady.bpf")),
            include_bytes!(concat!(
                env!("OUT_DIR"),
                "/seccomp/vcpu_spawner_quarantine.bpf"
            )),
        ],
    ),
];

/// A user's filter file (`--seccomp-filter`) is read up to this size, as Firecracker does.
const CUSTOM_FILE_LIMIT: usize = 100_000;
const BPF_MAX_LEN: usize = 4096;

/// The user's filters (`--seccomp-filter`), by thread kind, in place of the boot filters.
static CUSTOM: std::sync::OnceLock<Vec<(ThreadKind, BpfProgram)>> = std::sync::OnceLock::new();

/// Loads a filter file in Firecracker's format: a `bitcode`-serialised map from thread
/// category (`vmm`, `api`, `vcpu`) to its BPF program, each instruction a `sock_filter` read
/// as a little-endian u64. Each thread kind then installs its program instead of prescient's
/// boot filter (an empty program: no filter for that kind); the later stages still stack on top.
pub fn load_custom_filters(path: &std::path::Path) -> Result<(), SeccompError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(CUSTOM_FILE_LIMIT as u64 + 1).read_to_end(&mut bytes))
        .map_err(SeccompError::CustomRead)?;
    if bytes.len() > CUSTOM_FILE_LIMIT {
        return Err(SeccompError::CustomTooLarge);
    }
    let map: std::collections::HashMap<String, Vec<u64>> =
        bitcode::deserialize(&bytes).map_err(|e| SeccompError::CustomFormat(e.to_string()))?;
    let map: std::collections::HashMap<String, Vec<u64>> = map
        .into_iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    let mut filters = Vec::new();
    for kind in [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu] {
        let program = map
            .get(kind.name())
            .ok_or(SeccompError::CustomMissing(kind.name()))?;
        if program.len() > BPF_MAX_LEN {
            return Err(SeccompError::CustomTooLong(kind.name(), program.len()));
        }
        let program = program
            .iter()
            .map(|i| {
                let b = i.to_le_bytes();
                sock_filter {
                    code: u16::from_le_bytes([b[0], b[1]]),
                    jt: b[2],
                    jf: b[3],
                    k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                }
            })
            .collect();
        filters.push((kind, program));
    }
    // Set once, before any thread installs a filter.
    let _ = CUSTOM.set(filters);
    Ok(())
}

/// The BPF program of `kind` at `stage`, from build.rs's bytes (8 per instruction, as the
/// kernel's `struct sock_filter`, little-endian).
fn program(kind: ThreadKind, stage: Stage) -> BpfProgram {
    let (_, stages) = FILTERS
        .iter()
        .find(|(k, _)| *k == kind)
        .expect("FILTERS lists every thread kind");
    stages[stage as usize]
        .chunks_exact(8)
        .map(|b| sock_filter {
            code: u16::from_le_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect()
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static REQUESTED: AtomicU8 = AtomicU8::new(Stage::Boot as u8);
/// The thread kind whose first filter is followed by a forbidden syscall (test hook), or
/// [`NO_VIOLATION`].
static VIOLATION: AtomicU8 = AtomicU8::new(NO_VIOLATION);
/// The thread kind that panics at its first safe point under its filter (test hook), or
/// [`NO_VIOLATION`].
static PANIC: AtomicU8 = AtomicU8::new(NO_VIOLATION);
const NO_VIOLATION: u8 = u8::MAX;

thread_local! {
    /// The last stage this thread installed; None before its first filter.
    static INSTALLED: Cell<Option<Stage>> = const { Cell::new(None) };
    /// Whose filters this thread runs under; None while unfiltered.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Turns filtering on for threads that start (or reach [`install`]) from now on. Off by
/// default, so that tests and embedders running the VMM in their own process are not filtered.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Test hook (`--seccomp-test-violation KIND`): the first thread of `kind` to install its
/// filter then makes a syscall outside it, to show that the filter kills the process. It does
/// not change any filter.
pub fn set_test_violation(kind: ThreadKind) {
    VIOLATION.store(kind as u8, Ordering::Release);
}

/// Test hook (`--test-panic KIND`): the first thread of `kind` to reach a safe point with its
/// filter installed panics there, to show that the panic path (the terminal's restore, the
/// clean-up) runs under that thread's filter. The VMM thread's first safe point is its first
/// loop iteration, a vCPU's is before its first KVM_RUN, the API's is its first connection.
pub fn set_test_panic(kind: ThreadKind) {
    PANIC.store(kind as u8, Ordering::Release);
}

/// The stage threads are moving to.
pub fn requested_stage() -> Stage {
    Stage::from_u8(REQUESTED.load(Ordering::Acquire))
}

/// Asks every filtered thread to move to `stage` at its next safe point. Asking for the stage
/// already requested is fine; asking for a looser one is an error.
pub fn request_stage(stage: Stage) -> Result<(), SeccompError> {
    if !is_enabled() {
        return Err(SeccompError::Disabled);
    }
    let before = Stage::from_u8(REQUESTED.fetch_max(stage as u8, Ordering::AcqRel));
    if before > stage {
        return Err(SeccompError::Looser {
            current: before,
            requested: stage,
        });
    }
    Ok(())
}

/// Installs this thread's filters: its kind's boot filter, those up to its first stage, and
/// every stage requested since.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !is_enabled() || INSTALLED.get().is_some() {
        return Ok(());
    }
    apply(kind, Stage::Boot)?;
    install_up_to(kind, kind.first_stage())?;
    if VIOLATION.load(Ordering::Acquire) == kind as u8 {
        // SAFETY: personality(0xffffffff) only queries the execution domain; no filter allows
        // it, so the process dies here with SIGSYS.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
    }
    install_up_to(kind, requested_stage())
}

/// Records that this thread runs under the filters of `kind` its parent installed up to
/// `stage` (a thread inherits its creator's filters).
pub fn inherited(kind: ThreadKind, stage: Option<Stage>) {
    INSTALLED.set(stage);
    KIND.set(stage.map(|_| kind));
}

/// The kind of thread whose filters this thread runs under; None while unfiltered. What a
/// thread may do on its way out (the panic hook) depends on it.
pub fn filtered_as() -> Option<ThreadKind> {
    KIND.get()
}

/// The last stage this thread installed, for the threads it starts ([`inherited`]).
pub fn installed() -> Option<Stage> {
    INSTALLED.get()
}

/// At a safe point: installs the filters of any stage requested since this thread's last one.
/// Cheap when there is nothing to do; a thread not yet filtered stays so.
pub fn catch_up(kind: ThreadKind) -> Result<(), SeccompError> {
    if INSTALLED.get().is_none() {
        return Ok(());
    }
    if PANIC.load(Ordering::Relaxed) == kind as u8
        && PANIC
            .compare_exchange(
                kind as u8,
                NO_VIOLATION,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    {
        panic!("test hook: the {kind} thread panics under its seccomp filter (--test-panic)");
    }
    install_up_to(kind, requested_stage())
}

/// Installs each stage after this thread's last one, up to `wanted`.
fn install_up_to(kind: ThreadKind, wanted: Stage) -> Result<(), SeccompError> {
    let mut at = INSTALLED.get().unwrap_or(Stage::Boot);
    while at < wanted {
        at = Stage::from_u8(at as u8 + 1);
        apply(kind, at)?;
    }
    Ok(())
}

fn apply(kind: ThreadKind, stage: Stage) -> Result<(), SeccompError> {
    let custom = CUSTOM
        .get()
        .filter(|_| stage == Stage::Boot)
        .and_then(|c| c.iter().find(|(k, _)| *k == kind))
        .map(|(_, p)| p.clone());
    let program = custom.unwrap_or_else(|| program(kind, stage));
    if !program.is_empty() {
        apply_filter(&program).map_err(|source| SeccompError::Install {
            kind,
            stage,
            source,
        })?;
    }
    INSTALLED.set(Some(stage));
    KIND.set(Some(kind));
    tracing::debug!("{kind} thread: {stage} seccomp filter installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_was_compiled() {
        for (kind, _) in FILTERS {
            for stage in Stage::ALL {
                let p = program(kind, stage);
                assert!(p.len() > 4, "{kind} {stage}: {} instructions", p.len());
            }
        }
    }

    #[test]
    fn stages_order_and_names() {
        assert!(Stage::Boot < Stage::Steady && Stage::Steady < Stage::Quarantine);
        let s: Stage = serde_json::from_str("\"quarantine\"").unwrap();
        assert_eq!(s, Stage::Quarantine);
        assert_eq!(Stage::Steady.to_string(), "steady");
        assert_eq!("vcpu".parse::<ThreadKind>(), Ok(ThreadKind::Vcpu));
        assert!("io".parse::<ThreadKind>().is_err());
    }

    /// The ioctls each thread kind makes under its boot filter, numbered from kvm-bindings'
    /// structures rather than read from the JSON: a filter that lost one kills the VMM when it
    /// makes it (a merge once moved the fd-0 condition of the TCSETS rule onto
    /// KVM_GET_DIRTY_LOG's, and the first snapshot with dirty page tracking died of SIGSYS).
    mod requests {
        use kvm_bindings::*;
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

        // The VMM thread: snapshots, virtio-mem slots, non-blocking sockets.
        ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
        ioctl_iow_nr!(
            KVM_SET_USER_MEMORY_REGION,
            KVMIO,
            0x46,
            kvm_userspace_memory_region
        );
        ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
        ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
        ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
        // A vCPU thread: running, and reading its state for a snapshot.
        ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
        ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
        ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
        ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
        ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
        ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
        ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
        ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
        ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
        ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
        ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
        ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    }

    /// Whether `kind`'s boot filter lets the one syscall `call` makes through (it may then
    /// fail) or kills the process. In a child, so that this test binary stays unfiltered.
    fn allowed(kind: ThreadKind, call: impl Fn()) -> bool {
        let boot = program(kind, Stage::Boot);
        // SAFETY: the child only installs the filter, makes one syscall and exits; it takes no
        // lock and does not allocate.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = if apply_filter(&boot).is_ok() { 0 } else { 1 };
            call();
            // The way out each kind's filter allows: the VMM ends the process, the others
            // their thread (the child's only one).
            let exit = match kind {
                ThreadKind::Vmm => libc::SYS_exit_group,
                ThreadKind::Api | ThreadKind::Vcpu | ThreadKind::VcpuSpawner => libc::SYS_exit,
            };
            // SAFETY: ends the forked child.
            unsafe { libc::syscall(exit, code) };
            unreachable!("exit returned");
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFSIGNALED(status) {
            assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "status {status:#x}");
            return false;
        }
        assert_eq!(libc::WEXITSTATUS(status), 0, "the filter did not install");
        true
    }

    /// Whether `kind`'s boot filter lets `ioctl(fd, request)` through.
    fn ioctl_allowed(kind: ThreadKind, fd: i32, request: libc::c_ulong) -> bool {
        allowed(kind, || {
            // SAFETY: an ioctl with a null argument; the fd is not open or is the test's stdin.
            unsafe { libc::ioctl(fd, request as _, 0usize) };
        })
    }

    /// std's channels (`std::sync::mpsc`) back off with `sched_yield` when a receiver finds a
    /// slot its sender has claimed but not yet written, or a sender meets a block still being
    /// installed. Every thread kind uses a channel: a vCPU thread that polled its events while
    /// the VMM thread was sending it `Finish` died of SIGSYS after a guest's reset (a nested
    /// KVM host, 1 exit in 6).
    #[test]
    fn every_thread_kind_may_yield_as_std_channels_do() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::VcpuSpawner,
        ] {
            assert!(
                allowed(kind, || {
                    // SAFETY: sched_yield has no arguments and cannot fail.
                    unsafe { libc::sched_yield() };
                }),
                "{kind}: sched_yield kills"
            );
        }
    }

    #[test]
    fn each_thread_may_make_its_ioctls_on_any_fd_and_tcsets_only_on_stdin() {
        use requests::*;
        const NOT_OPEN: i32 = 1000;
        let needs: [(ThreadKind, &[(&str, libc::c_ulong)]); 2] = [
            (
                ThreadKind::Vmm,
                &[
                    ("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG()),
                    ("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION()),
                    ("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP()),
                    ("KVM_GET_CLOCK", KVM_GET_CLOCK()),
                    ("KVM_GET_PIT2", KVM_GET_PIT2()),
                    ("FIONBIO", libc::FIONBIO),
                ],
            ),
            (
                ThreadKind::Vcpu,
                &[
                    ("KVM_RUN", KVM_RUN()),
                    ("KVM_GET_REGS", KVM_GET_REGS()),
                    ("KVM_GET_SREGS", KVM_GET_SREGS()),
                    ("KVM_GET_MSRS", KVM_GET_MSRS()),
                    ("KVM_GET_LAPIC", KVM_GET_LAPIC()),
                    ("KVM_GET_CPUID2", KVM_GET_CPUID2()),
                    ("KVM_GET_MP_STATE", KVM_GET_MP_STATE()),
                    ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS()),
                    ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS()),
                    ("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ()),
                    ("KVM_GET_XSAVE", KVM_GET_XSAVE()),
                    ("KVM_GET_XCRS", KVM_GET_XCRS()),
                ],
            ),
        ];
        for (kind, requests) in needs {
            for &(name, request) in requests {
                assert!(
                    ioctl_allowed(kind, NOT_OPEN, request),
                    "{kind}: {name} ({request:#x}) kills"
                );
            }
        }
        for kind in [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu] {
            assert!(
                ioctl_allowed(kind, 0, libc::TCSETS),
                "{kind}: TCSETS on fd 0"
            );
            assert!(
                !ioctl_allowed(kind, NOT_OPEN, libc::TCSETS),
                "{kind}: TCSETS on another fd than 0 is allowed"
            );
        }
        // KVM's ioctls belong to the threads above only.
        assert!(!ioctl_allowed(ThreadKind::Api, NOT_OPEN, KVM_RUN()));
    }

    /// Filters in a child process, so that this test binary stays unfiltered: the boot filter
    /// allows what the thread needs, steady makes `open` fail with EPERM, and a syscall outside
    /// the allow-list kills the process with SIGSYS.
    #[test]
    fn steady_denies_opens_and_boot_kills_the_unlisted() {
        // Built before the fork: the child must not allocate (another test thread may hold the
        // allocator's lock at fork time).
        let boot = program(ThreadKind::Vmm, Stage::Boot);
        let steady = program(ThreadKind::Vmm, Stage::Steady);
        // SAFETY: the child only makes syscalls and exits; no locks are taken after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                apply_filter(&boot).ok()?;
                let path = c"/dev/null";
                // SAFETY: a valid path; the fd, if any, is closed right away.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    return Some(10);
                }
                // SAFETY: closing the fd just opened.
                unsafe { libc::close(fd) };
                apply_filter(&steady).ok()?;
                // SAFETY: as above.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                if fd >= 0 || errno != Some(libc::EPERM) {
                    return Some(11);
                }
                // SAFETY: personality query; the filter kills the process here.
                unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
                Some(12)
            })()
            .unwrap_or(13);
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child ended with status {status:#x} (exit code {})",
            libc::WEXITSTATUS(status)
        );
    }
}
