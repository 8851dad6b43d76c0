//! Idle trim: transparent huge pages make a guest's first touch of memory fast (one host fault
//! per 2 MiB instead of per 4 KiB), but every 2 MiB the guest touched at all stays resident. Once
//! the guest has gone idle after taking memory, the VMM gives back the zero pages of the huge
//! pages it hardly uses, so an idle microVM costs the host what a 4 KiB-paged one would
//! (measurements: docs/memory.md).
//!
//! A timer checks once a second: vCPUs that used under 1 % of the period are idle. A pass over
//! guest memory starts when resident guest memory grew by at least one huge page since the last
//! pass, and goes in steps of at most `STEP` resident huge pages, one step per idle second, each
//! with the vCPUs paused (a few ms). A guest that stays busy is never paused for it, and an idle
//! one is paused for a pass once per growth, not per tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;

use crate::autopilot::host::thread_cpu_ns;
use crate::autopilot::window::WindowTimer;
use crate::event_loop::Subscriber;
use crate::microvm::MicroVm;
use crate::vstate::memory::resident_bytes;

/// How often the guest's activity is looked at.
pub const PERIOD: Duration = Duration::from_secs(1);
/// vCPU time per period (all vCPUs together) below which the guest counts as idle: 1 %.
const IDLE_CPU_NS: u64 = PERIOD.as_nanos() as u64 / 100;
/// Growth of resident guest memory since the last pass that makes a new pass worth its pauses.
const GROWTH_BYTES: u64 = 2 << 20;
/// Resident huge pages one step looks at (64 MiB): the pause stays a few milliseconds however
/// large the guest.
const STEP: u64 = 32;

/// The trim's state, kept by the VMM thread.
pub struct IdleTrim {
    due: Arc<AtomicBool>,
    last_cpu_ns: u64,
    /// Resident guest memory after the last pass (0 before the first).
    after_last_pass: u64,
    /// Where the pass under way goes on.
    cursor: Option<GuestAddress>,
}

impl IdleTrim {
    /// Starts the trim's timer in the VMM thread's loop.
    pub fn start(event_manager: &mut EventManager<Subscriber>) -> std::io::Result<Self> {
        let due = Arc::new(AtomicBool::new(false));
        let timer = WindowTimer::new(PERIOD, due.clone())?;
        event_manager.add_subscriber(Arc::new(std::sync::Mutex::new(timer)));
        Ok(Self {
            due,
            last_cpu_ns: 0,
            after_last_pass: 0,
            cursor: None,
        })
    }

    /// Takes a trim step on `vm` if a period passed, the guest was idle through it, and a pass
    /// is under way or the guest took memory since the last one.
    pub fn run_if_due(&mut self, vm: &mut MicroVm) {
        if !self.due.swap(false, Ordering::AcqRel) {
            return;
        }
        let cpu: u64 = vm
            .vcpu_threads()
            .into_iter()
            .map(|t| thread_cpu_ns(t).unwrap_or(0))
            .sum();
        let busy = cpu.saturating_sub(self.last_cpu_ns);
        self.last_cpu_ns = cpu;
        if busy >= IDLE_CPU_NS {
            return;
        }
        let from = match self.cursor {
            Some(at) => at,
            None if resident_bytes(vm.guest_memory()) >= self.after_last_pass + GROWTH_BYTES => {
                GuestAddress(0)
            }
            None => return,
        };
        let start = Instant::now();
        match vm.trim_memory(from, STEP) {
            Ok((report, next)) => {
                tracing::debug!(
                    "idle trim from {:#x}: {} of {} resident huge pages split, {} KiB given back, \
                     vCPUs paused {} us",
                    from.0,
                    report.huge_pages_trimmed,
                    report.huge_pages_scanned,
                    report.freed_bytes >> 10,
                    start.elapsed().as_micros()
                );
                self.cursor = next;
                if next.is_none() {
                    self.after_last_pass = resident_bytes(vm.guest_memory());
                }
            }
            Err(e) => tracing::warn!("idle trim: {e}"),
        }
    }
}
