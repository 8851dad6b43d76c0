//! The window clock: a timerfd in the VMM thread's event loop. Its handler only marks a window
//! due; the VMM thread closes it right after, where it owns the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// The monotonic clock every predictor timestamp uses.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct WindowTimer {
    timer: TimerFd,
    due: Arc<AtomicBool>,
}

impl WindowTimer {
    /// A periodic timer; `due` is set every `period`.
    pub fn new(period: Duration, due: Arc<AtomicBool>) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(period, Some(period))?;
        Ok(Self { timer, due })
    }
}

impl MutEventSubscriber for WindowTimer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!("cannot watch the predictor window timer: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Expirations missed while the loop was busy collapse into one window.
        let _ = self.timer.wait();
        self.due.store(true, Ordering::Release);
    }
}
