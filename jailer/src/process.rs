//! The jailed process: what it inherits (fds, environment), its limits, the namespaces it joins,
//! its identity, and the exec into the VMM.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::args::ResourceLimit;

/// Errors of preparing the process and exec'ing the VMM.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot close inherited file descriptors: {0}")]
    CloseFds(std::io::Error),
    #[error("cannot set resource limit {resource} to {value}: {source}")]
    Rlimit {
        resource: u32,
        value: u64,
        source: std::io::Error,
    },
    #[error("cannot join network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create a pid namespace: {0}")]
    PidNs(std::io::Error),
    #[error("cannot fork: {0}")]
    Fork(std::io::Error),
    #[error("cannot forward signals to the VMM: {0}")]
    Signals(std::io::Error),
    #[error("cannot detach from the terminal: {0}")]
    Detach(std::io::Error),
    #[error("cannot write the pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}")]
    Identity {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot execute {path}: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("an argument holds a NUL byte: {0:?}")]
    Nul(String),
}

type Result<T> = std::result::Result<T, ProcessError>;

fn check(rc: libc::c_long, err: impl FnOnce(std::io::Error) -> ProcessError) -> Result<()> {
    if rc < 0 {
        Err(err(std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Closes every descriptor but stdin, stdout and stderr, so that nothing the caller had open
/// (sockets, host files) follows the VMM into the jail.
pub fn close_inherited_fds() -> Result<()> {
    // SAFETY: close_range(2) on descriptors this process owns; none is in use by Rust objects at
    // this point (the jailer opens its files after this).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    check(rc, ProcessError::CloseFds)
}

pub fn set_rlimits(limits: &[ResourceLimit]) -> Result<()> {
    for limit in limits {
        let value = libc::rlimit {
            rlim_cur: limit.value,
            rlim_max: limit.value,
        };
        // SAFETY: setrlimit(2) with a valid resource and a live struct.
        let rc = unsafe { libc::setrlimit(limit.resource, &value) };
        check(rc.into(), |source| ProcessError::Rlimit {
            resource: limit.resource,
            value: limit.value,
            source,
        })?;
    }
    Ok(())
}

pub fn join_netns(path: &Path) -> Result<()> {
    let err = |source| ProcessError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let ns = std::fs::File::open(path).map_err(err)?;
    // SAFETY: setns(2) on a descriptor we own, asking for a network namespace only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    check(rc.into(), err)
}

/// Opened before the pivot, for a daemon's stdio.
pub fn open_dev_null() -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(ProcessError::Detach)
}

/// The child a waiting jailer passes termination signals on to; 0 before the fork and in the
/// child (which ignores them until the VMM it execs installs its own handlers).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe; the child has not been reaped while we wait.
        unsafe { libc::kill(child, sig) };
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP reach the child instead of ending this process: the user's
/// Ctrl-C or `kill` of the jailer they started must end the VMM cleanly (its terminal restored),
/// not leave it running behind an exited parent. Set before the fork, so that no signal finds
/// the parent without it; the child's exec resets them.
fn forward_termination_signals() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sigaction(2) with a zeroed, then filled, struct alive for the call; the handler
        // only calls kill(2) and reads an atomic.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        check(rc.into(), ProcessError::Signals)?;
    }
    Ok(())
}

/// Writes the VMM's pid (as the host sees it) to `pid_file`, as Firecracker's jailer does for
/// every jail: callers such as Kata Containers find the VMM there.
fn write_pid(pid_file: &Path, pid: libc::pid_t) -> Result<()> {
    std::fs::write(pid_file, format!("{pid}\n")).map_err(|source| ProcessError::PidFile {
        path: pid_file.to_path_buf(),
        source,
    })
}

/// Forks when the VMM must be a child: to be pid 1 of a new pid namespace, or to leave a
/// session leader behind for `setsid`. Returns in the VMM's process only, once its pid is in
/// `pid_file`. A daemon's parent exits 0; otherwise the parent waits, passing termination
/// signals on to the child, and exits as the child did.
pub fn split(new_pid_ns: bool, daemon_stdio: Option<OwnedFd>, pid_file: &Path) -> Result<()> {
    if !new_pid_ns && daemon_stdio.is_none() {
        // This process becomes the VMM.
        return write_pid(pid_file, std::process::id() as libc::pid_t);
    }
    if new_pid_ns {
        // SAFETY: unshare(2) with a flag; only children made after it are in the namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        check(rc.into(), ProcessError::PidNs)?;
    }
    if daemon_stdio.is_none() {
        forward_termination_signals()?;
    }
    // SAFETY: the jailer is single-threaded here, so the child may run any code after fork.
    let pid = unsafe { libc::fork() };
    check(pid.into(), ProcessError::Fork)?;
    if pid > 0 {
        CHILD.store(pid, Ordering::Relaxed);
        if let Err(e) = write_pid(pid_file, pid) {
            // SAFETY: kill(2) of our own child, which must not run unaccounted for.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
        if daemon_stdio.is_some() {
            std::process::exit(0);
        }
        std::process::exit(wait_exit_code(pid));
    }
    if let Some(null) = daemon_stdio {
        // SAFETY: setsid(2) in a child that is not a process group leader.
        check(unsafe { libc::setsid() }.into(), ProcessError::Detach)?;
        for fd in 0..3 {
            // SAFETY: dup2(2) of a descriptor we own onto the standard ones.
            check(
                unsafe { libc::dup2(null.as_raw_fd(), fd) }.into(),
                ProcessError::Detach,
            )?;
        }
    }
    Ok(())
}

/// The exit code a shell would report for child `pid`.
fn wait_exit_code(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child with a live status word.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// Becomes `uid`/`gid` for good, with no supplementary groups.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    let identity = |what| move |source| ProcessError::Identity { what, source };
    // SAFETY: setgroups(2) with a one-element array alive for the call.
    check(
        unsafe { libc::setgroups(1, &gid) }.into(),
        identity("drop supplementary groups"),
    )?;
    // SAFETY: plain integer arguments.
    check(
        unsafe { libc::setresgid(gid, gid, gid) }.into(),
        identity("set the group id"),
    )?;
    // SAFETY: plain integer arguments.
    check(
        unsafe { libc::setresuid(uid, uid, uid) }.into(),
        identity("set the user id"),
    )
}

/// Replaces this process with `path` run with `args`, in an empty environment.
pub fn exec(path: &Path, args: &[String]) -> Result<std::convert::Infallible> {
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| ProcessError::Nul(String::from_utf8_lossy(s).into()))
    };
    let program = c(path.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for a in args {
        argv.push(c(a.as_bytes())?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: NUL-terminated strings and null-terminated arrays, all alive for the call; execve
    // returns only on failure.
    unsafe { libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    Err(ProcessError::Exec {
        path: path.to_path_buf(),
        source: std::io::Error::last_os_error(),
    })
}
