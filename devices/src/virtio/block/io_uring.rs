//! The `Async` engine (Firecracker's `io_engine: "Async"`): reads, writes and flushes go to an
//! io_uring and complete later, while the VMM thread serves other events. Data moves straight
//! between the disk file and guest memory (the iovecs point into guest RAM), with no bounce
//! buffer. Completions raise an eventfd the event loop watches.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{IoKind, IoPlan, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// Requests in flight at once (the queue holds at most this many chains).
pub const RING_ENTRIES: u32 = 256;

/// Errors of setting up the ring.
#[derive(Debug, thiserror::Error)]
pub enum AsyncIoError {
    #[error("cannot set up an io_uring (the host kernel needs io_uring, 5.10.51 or later, not disabled by kernel.io_uring_disabled): {0}")]
    Setup(std::io::Error),
    #[error("cannot create the io_uring completion eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register the completion eventfd with the io_uring: {0}")]
    Register(std::io::Error),
}

/// Host iovecs into guest memory.
struct IoVecs {
    _held: Vec<libc::iovec>,
}

// SAFETY: the pointers address guest memory, which every thread of the VMM may access (it is
// shared with the vCPUs); only the kernel dereferences them, while the request is in flight.
unsafe impl Send for IoVecs {}

/// A chain whose I/O is in flight.
struct Pending {
    head: u16,
    status: GuestAddress,
    plan: IoPlan,
    /// Kept alive until the kernel is done with them.
    _iovecs: IoVecs,
}

/// What a completion means for the chain it belongs to.
pub struct Completed {
    pub head: u16,
    pub plan: IoPlan,
    /// Bytes the guest was given (the data and the status byte).
    pub used: u32,
    pub ok: bool,
}

/// The ring, its eventfd and the chains in flight.
pub struct AsyncIo {
    ring: IoUring,
    event: EventFd,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    unsubmitted: u32,
}

impl std::fmt::Debug for AsyncIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncIo")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// The guest's byte runs of a chain: device-readable ones, then device-writable ones.
type Runs = (Vec<(GuestAddress, u32)>, Vec<(GuestAddress, u32)>);

fn runs(chain: &DescriptorChain<&GuestMemoryMmap>) -> Runs {
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    for d in chain.clone() {
        if d.len() == 0 {
            continue;
        }
        if d.is_write_only() {
            writable.push((d.addr(), d.len()));
        } else {
            readable.push((d.addr(), d.len()));
        }
    }
    (readable, writable)
}

/// Host iovecs for `len` bytes of `runs` after the first `skip` bytes; None when a run is not
/// in guest memory.
fn iovecs(
    mem: &GuestMemoryMmap,
    runs: &[(GuestAddress, u32)],
    mut skip: usize,
    mut len: usize,
) -> Option<Vec<libc::iovec>> {
    let mut out = Vec::new();
    for &(addr, run_len) in runs {
        if len == 0 {
            break;
        }
        let run_len = run_len as usize;
        if skip >= run_len {
            skip -= run_len;
            continue;
        }
        let take = (run_len - skip).min(len);
        let start = addr.checked_add(skip as u64)?;
        let slice = mem.get_slice(start, take).ok()?;
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: take,
        });
        skip = 0;
        len -= take;
    }
    (len == 0).then_some(out)
}

impl AsyncIo {
    pub fn new() -> Result<Self, AsyncIoError> {
        let ring = IoUring::new(RING_ENTRIES).map_err(AsyncIoError::Setup)?;
        let event = EventFd::new(EFD_NONBLOCK).map_err(AsyncIoError::EventFd)?;
        ring.submitter()
            .register_eventfd(event.as_raw_fd())
            .map_err(AsyncIoError::Register)?;
        Ok(Self {
            ring,
            event,
            slots: (0..RING_ENTRIES).map(|_| None).collect(),
            free: (0..RING_ENTRIES as usize).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// The fd the event loop watches for completions.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request can be queued now.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues `plan` for the chain `chain` on `disk`; false (nothing queued) when the chain's
    /// buffers are not all in guest memory, which the caller answers itself.
    pub fn queue(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &DescriptorChain<&GuestMemoryMmap>,
        plan: IoPlan,
        disk: &File,
    ) -> bool {
        let Some(slot) = self.free.last().copied() else {
            return false;
        };
        let (readable, writable) = runs(chain);
        let Some(&(last, last_len)) = writable.last() else {
            return false;
        };
        let Some(status) = last.checked_add(u64::from(last_len) - 1) else {
            return false;
        };
        let iov = match plan.kind {
            // The header's 16 bytes come first among the readable bytes.
            IoKind::Write => iovecs(mem, &readable, 16, plan.len),
            IoKind::Read => iovecs(mem, &writable, 0, plan.len),
            IoKind::Flush => Some(Vec::new()),
        };
        let Some(iov) = iov else {
            return false;
        };
        let fd = types::Fd(disk.as_raw_fd());
        let entry = match plan.kind {
            IoKind::Read => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(plan.offset)
                .build(),
            IoKind::Write => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(plan.offset)
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the iovecs point into guest memory, which stays mapped as long as the device
        // (and so this ring) exists, and the iovec array itself is kept in the slot until the
        // completion is reaped (or the ring is drained on reset and drop).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return false;
        }
        self.free.pop();
        self.slots[slot] = Some(Pending {
            head: chain.head_index(),
            status,
            plan,
            _iovecs: IoVecs { _held: iov },
        });
        self.unsubmitted += 1;
        true
    }

    /// Hands what was queued to the kernel.
    pub fn submit(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            Err(e) => tracing::warn!("io_uring submit: {e}; retried at the next event"),
        }
    }

    /// Reaps every completion: each chain's status byte is written; the caller returns them
    /// to the guest.
    pub fn complete(&mut self, mem: &GuestMemoryMmap) -> Vec<Completed> {
        let _ = self.event.read();
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(p) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let expected = match p.plan.kind {
                IoKind::Flush => 0,
                _ => p.plan.len as i32,
            };
            let ok = cqe.result() == expected;
            let status = if ok {
                VIRTIO_BLK_S_OK
            } else {
                VIRTIO_BLK_S_IOERR
            };
            let data = if ok && p.plan.kind == IoKind::Read {
                p.plan.len as u32
            } else {
                0
            };
            let used = match mem.write_obj(status, p.status) {
                Ok(()) => data + 1,
                Err(_) => data,
            };
            done.push(Completed {
                head: p.head,
                plan: p.plan,
                used,
                ok,
            });
        }
        done
    }

    /// Waits for everything in flight (a reset must not leave the kernel writing into guest
    /// memory the driver took back).
    pub fn drain(&mut self, mem: &GuestMemoryMmap) -> Vec<Completed> {
        self.submit();
        let mut done = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("io_uring drain: {e}");
                    break;
                }
            }
            done.extend(self.complete(mem));
        }
        done
    }
}
