//! What the host knows about the VM's threads: their CPU time. (Resident guest memory is
//! `MicroVm::memory_accounting`.)

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

#[cfg(test)]
mod tests {
    use super::*;

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
