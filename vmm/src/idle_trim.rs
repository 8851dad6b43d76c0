//! Idle trim: transparent huge pages make a guest's first touch of memory fast (one host fault
//! per 2 MiB instead of per 4 KiB), but every 2 MiB the guest touched at all stays resident. Once
//! the guest has gone idle after taking memory, the VMM gives back the zero pages of the huge
//! pages it hardly uses, so an idle microVM costs the host what a 4 KiB-paged one would
//! (measurements: docs/memory.md).
//!
//! A timer checks once a second: vCPUs that used under 1 % of the period are idle; the trim then
//! runs if resident guest memory grew by at least one huge page since the last trim. A guest that
//! stays busy is never paused for it, and an idle one is paused once per growth, not per tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};

use crate::autopilot::window::WindowTimer;
use crate::microvm::MicroVm;
use crate::runtime::Subscriber;
use crate::vstate::memory::resident_bytes;

/// How often the guest's activity is looked at.
pub const PERIOD: Duration = Duration::from_secs(1);
/// vCPU time per period (all vCPUs together) below which the guest counts as idle: 1 %.
const IDLE_CPU_NS: u64 = PERIOD.as_nanos() as u64 / 100;
/// Growth of resident guest memory since the last trim that makes a new trim worth its pause.
const GROWTH_BYTES: u64 = 2 << 20;

/// The trim's state, kept by the VMM thread.
pub struct IdleTrim {
    due: Arc<AtomicBool>,
    last_cpu_ns: u64,
    /// Resident guest memory after the last trim (0 before the first).
    after_last_trim: u64,
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
            after_last_trim: 0,
        })
    }

    /// Trims `vm`'s memory if a period passed, the guest was idle through it and it took memory
    /// since the last trim.
    pub fn run_if_due(&mut self, vm: &mut MicroVm) {
        if !self.due.swap(false, Ordering::AcqRel) {
            return;
        }
        let cpu = vm.vcpu_cpu_ns();
        let busy = cpu.saturating_sub(self.last_cpu_ns);
        self.last_cpu_ns = cpu;
        if busy >= IDLE_CPU_NS {
            return;
        }
        let resident = resident_bytes(vm.guest_memory());
        if resident < self.after_last_trim + GROWTH_BYTES {
            return;
        }
        match vm.trim_memory() {
            Ok(report) => {
                self.after_last_trim = resident.saturating_sub(report.freed_bytes);
                tracing::debug!(
                    "idle trim: {} of {} resident huge pages split, {} KiB given back",
                    report.huge_pages_trimmed,
                    report.huge_pages_scanned,
                    report.freed_bytes >> 10
                );
            }
            Err(e) => tracing::warn!("idle trim: {e}"),
        }
    }
}
