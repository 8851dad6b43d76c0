//! What the host knows about the VM's threads and memory: per-thread CPU time and how much of
//! guest memory is resident.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: usize = 4096;
const MIB: f64 = 1024.0 * 1024.0;

/// CPU time a thread of this process has used, in ns.
pub fn thread_cpu_ns(thread: libc::pthread_t) -> std::io::Result<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live (not yet joined) thread of this process; the call writes only
    // `clock`.
    let rc = unsafe { libc::pthread_getcpuclockid(thread, &mut clock) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes only the timespec it is given.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Counts resident guest pages with `mincore`, reusing one buffer.
#[derive(Default)]
pub struct ResidentMemory {
    pages: Vec<u8>,
}

impl ResidentMemory {
    /// Resident guest memory, MiB.
    pub fn mib(&mut self, mem: &GuestMemoryMmap) -> std::io::Result<f64> {
        let mut resident = 0usize;
        for region in mem.iter() {
            let len = region.len() as usize;
            self.pages.resize(len.div_ceil(PAGE), 0);
            let addr = region.as_ptr().cast::<libc::c_void>();
            // SAFETY: `addr..addr+len` is a live page-aligned mapping owned by `mem`, and `pages`
            // has one byte per page of it.
            if unsafe { libc::mincore(addr, len, self.pages.as_mut_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            resident += self.pages.iter().filter(|&&p| p & 1 != 0).count();
        }
        Ok((resident * PAGE) as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn resident_memory_grows_as_pages_are_touched() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let mut r = ResidentMemory::default();
        let before = r.mib(&mem).unwrap();
        for page in 0..(4 << 20) / PAGE as u64 {
            mem.write_obj(1u8, GuestAddress(page * PAGE as u64))
                .unwrap();
        }
        let after = r.mib(&mem).unwrap();
        assert!(after - before >= 3.9, "{before} -> {after}");
    }

    #[test]
    fn a_busy_thread_accumulates_cpu_time() {
        use std::os::unix::thread::JoinHandleExt;
        let (busy_tx, busy_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // Spin until this thread itself has run 20 ms, however loaded the host is.
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            while thread_cpu_ns(me).unwrap() < 20_000_000 {
                std::hint::spin_loop();
            }
            busy_tx.send(()).unwrap();
            let _ = done_rx.recv();
        });
        busy_rx.recv().unwrap();
        let ns = thread_cpu_ns(t.as_pthread_t()).unwrap();
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(ns >= 20_000_000, "{ns}");
    }
}
