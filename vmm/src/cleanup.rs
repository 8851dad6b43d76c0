//! What the VMM removes from the host when it exits: its API socket and the VM's cgroup; and the
//! terminal mode it puts back ([`crate::console`]).
//!
//! [`register_api_sock`] and [`register_cgroup`] name them; [`run`] removes them, and runs from
//! the guard that `main` holds (normal ends, errors, and termination signals, which end the VMM
//! loop) and from the panic hook (a panic aborts in release builds, skipping every destructor).
//! A process killed by SIGKILL, or by its seccomp filter (SIGSYS), runs neither: its socket and
//! cgroup stay, and its terminal stays in raw mode (`stty sane` recovers it).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use jailer::cgroup::Cgroup;

use crate::seccomp::ThreadKind;

/// Host state to remove at exit.
#[derive(Debug)]
struct Leftovers {
    api_sock: Option<PathBuf>,
    cgroup: Option<Cgroup>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    api_sock: None,
    cgroup: None,
});

fn leftovers() -> std::sync::MutexGuard<'static, Leftovers> {
    LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The panic hook, set once. It runs on the panicking thread, under that thread's seccomp
/// filter, before a release build aborts, so it only does what that filter allows: every
/// thread restores the terminal (`ioctl(0, TCSETS)` is in every filter), but only the VMM thread
/// (or an unfiltered one) may unlink the API socket and remove the cgroup; a vCPU or API
/// thread's panic leaves them, as a SIGKILL does. A filtered thread reports the panic itself,
/// as Firecracker does: the default hook's backtrace (`RUST_BACKTRACE`) reads the binary
/// (getcwd, open, mmap), which no filter allows, and the filter would kill the process with
/// SIGSYS in the middle of the report (`--no-seccomp` gives the backtrace); then it aborts, in
/// every build.
fn hook_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            match crate::seccomp::filtered_as() {
                None | Some(ThreadKind::Vmm) => run(),
                Some(ThreadKind::Vcpu | ThreadKind::VcpuSpawner | ThreadKind::Api) => {
                    crate::console::restore_terminal()
                }
            }
            if crate::seccomp::filtered_as().is_none() {
                previous(info);
                return;
            }
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("<unnamed>");
            // Nothing more to do if stderr is gone; a failing eprintln! would panic again.
            let _ = writeln!(
                std::io::stderr(),
                "\nthread '{name}' {info}\nnote: no backtrace under seccomp (--no-seccomp gives one)"
            );
            // A filtered VMM never half-survives a panic (a vCPU gone, the API deaf): a debug
            // build aborts here as a release build (panic = "abort") does right after the hook,
            // so both, and the tests, take the one path users get.
            std::process::abort();
        }));
    });
}

/// The API socket this VMM bound (never one it found already there).
pub fn register_api_sock(path: PathBuf) {
    hook_panics();
    leftovers().api_sock = Some(path);
}

/// The VM's cgroup, given to this VMM.
pub fn register_cgroup(cgroup: Cgroup) {
    hook_panics();
    leftovers().cgroup = Some(cgroup);
}

/// Restores the terminal and removes what was registered, once. A cgroup that still holds this process (the jailer
/// put the VMM in it) cannot be removed while it runs; that is logged, not an error.
pub fn run() {
    crate::console::restore_terminal();
    let (api_sock, cgroup) = {
        let mut l = leftovers();
        (l.api_sock.take(), l.cgroup.take())
    };
    if let Some(path) = api_sock {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the API socket {}: {e}", path.display()),
        }
    }
    if let Some(cgroup) = cgroup {
        if let Err(e) = cgroup.remove() {
            tracing::info!("VM cgroup left for the caller to remove: {e}");
        }
    }
}

/// Runs [`run`] when dropped: `main` holds one for its whole body.
pub struct Guard(());

impl Guard {
    /// Also sets the panic hook, so that every panic is reported, and cleaned up after, under
    /// the filters.
    pub fn new() -> Self {
        hook_panics();
        Guard(())
    }
}

impl Default for Guard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        run();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_removed_once() {
        let dir = std::env::temp_dir().join(format!("prescient-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("cg")).unwrap();
        let sock = dir.join("api.sock");
        std::fs::write(&sock, b"").unwrap();
        register_api_sock(sock.clone());
        register_cgroup(Cgroup::open(vec![dir.join("cg")]).unwrap());
        drop(Guard::new());
        assert!(!sock.exists());
        assert!(!dir.join("cg").exists());
        std::fs::write(&sock, b"").unwrap();
        run();
        assert!(sock.exists(), "a second run removes nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
