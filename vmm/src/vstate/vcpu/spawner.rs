//! The thread that starts the vCPUs plugged in while the VM runs.
//!
//! A thread starts under its creator's seccomp filters, and filters only ever get stricter. A
//! vCPU thread started by the VMM thread would run under the VMM thread's filters as well as its
//! own, and those do not allow KVM_RUN. So a VM that can plug vCPUs gets one more thread at
//! build, before any filter is installed: its own filters (`vcpu_spawner`) allow what a vCPU
//! thread needs plus starting threads, and the vCPUs it starts install theirs on top, which
//! leaves them exactly the vCPU filters of the current stage. It also places them: on cgroup v1
//! a thread starts in its creator's cgroups, so with this thread in the VM's CPU cgroup every
//! vCPU it starts is born inside the quota.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{ExitObserver, IoBuses, Vcpu, VcpuError, VcpuHandle};
use crate::exit::ExitSignal;
use crate::seccomp::{self, ThreadKind};

/// A vCPU to start and what its thread needs.
struct Request {
    vcpu: Vcpu,
    buses: Arc<IoBuses>,
    exit: Arc<ExitSignal>,
    observer: Box<dyn ExitObserver>,
}

/// The VMM thread's side of the spawner thread.
pub struct Spawner {
    requests: Option<Sender<Request>>,
    replies: Receiver<Result<VcpuHandle, VcpuError>>,
    thread: Option<JoinHandle<()>>,
    tid: libc::pid_t,
}

impl Spawner {
    /// Starts the spawner thread (named `vcpu_spawner`); before any seccomp filter is installed
    /// in the calling thread.
    pub fn start() -> Result<Self, VcpuError> {
        let (request_tx, request_rx) = channel::<Request>();
        let (reply_tx, reply_rx) = channel();
        let (tid_tx, tid_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("vcpu_spawner".into())
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let filtered = seccomp::install(ThreadKind::VcpuSpawner);
                if let Err(e) = &filtered {
                    tracing::error!("the vCPU spawner will start no vCPU: {e}");
                }
                for r in request_rx {
                    let index = r.vcpu.index();
                    let started = match &filtered {
                        // A thread it starts must not run unfiltered, nor under a looser stage.
                        Ok(()) => seccomp::catch_up(ThreadKind::VcpuSpawner)
                            .map_err(|e| VcpuError::Unfiltered {
                                index,
                                why: e.to_string(),
                            })
                            // A plugged vCPU runs at once: a paused VM plugs none.
                            .and_then(|()| r.vcpu.start(r.buses, r.exit, r.observer, false)),
                        Err(e) => Err(VcpuError::Unfiltered {
                            index,
                            why: e.to_string(),
                        }),
                    };
                    if reply_tx.send(started).is_err() {
                        break;
                    }
                }
            })
            .map_err(VcpuError::Spawner)?;
        let tid = tid_rx.recv().map_err(|_| VcpuError::SpawnerGone)?;
        Ok(Self {
            requests: Some(request_tx),
            replies: reply_rx,
            thread: Some(thread),
            tid,
        })
    }

    /// The spawner thread's kernel id (for cgroups).
    pub fn tid(&self) -> libc::pid_t {
        self.tid
    }

    /// Starts `vcpu` on a new thread of the spawner's and returns its handle.
    pub fn spawn(
        &self,
        vcpu: Vcpu,
        buses: Arc<IoBuses>,
        exit: Arc<ExitSignal>,
        observer: Box<dyn ExitObserver>,
    ) -> Result<VcpuHandle, VcpuError> {
        let requests = self.requests.as_ref().ok_or(VcpuError::SpawnerGone)?;
        requests
            .send(Request {
                vcpu,
                buses,
                exit,
                observer,
            })
            .map_err(|_| VcpuError::SpawnerGone)?;
        self.replies.recv().map_err(|_| VcpuError::SpawnerGone)?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop.
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
