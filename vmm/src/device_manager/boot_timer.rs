//! Firecracker's boot timer (`--boot-timer`): a one-page MMIO device at the start of the 32-bit
//! MMIO gap; the guest writes 123 to its first byte when it has booted, and the VMM logs the
//! wall-clock and CPU time since the VM was built, in Firecracker's words.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::persist::{Persist, PersistError};
use devices::BusDevice;
use predictor::telemetry::DeviceKind;

use super::registry::{Attachment, Bus, DeviceRegistry, RegistryError};
use crate::arch::x86_64::layout::MMIO32_START;

/// Where the device sits (Firecracker's `BOOT_DEVICE_MEM_START`); virtio devices start after it.
pub const BOOT_TIMER_BASE: u64 = MMIO32_START;
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The value that says "booted".
const MAGIC: u8 = 123;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Puts the device in every VM this process builds.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The device: when the VM was built.
pub struct BootTimer {
    start_us: u64,
    start_cpu_us: u64,
}

impl BootTimer {
    fn now() -> Self {
        let (start_us, start_cpu_us) = crate::cli::now_us();
        Self {
            start_us,
            start_cpu_us,
        }
    }

    /// Firecracker's log line for a boot that ended now.
    fn report(&self) -> String {
        let (now, cpu) = crate::cli::now_us();
        let us = now.saturating_sub(self.start_us);
        let cpu_us = cpu.saturating_sub(self.start_cpu_us);
        format!(
            "Guest-boot-time = {us:>6} us {} ms, {cpu_us:>6} CPU us {} CPU ms",
            us / 1000,
            cpu_us / 1000
        )
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [MAGIC] {
            tracing::info!("{}", self.report());
        }
    }
}

/// Nothing to keep across a snapshot: the guest booted before it, and the time it measures is
/// from the VM's build in this process.
impl Persist for BootTimer {
    type State = ();

    fn save(&mut self) {}

    fn restore(&mut self, _state: ()) -> Result<(), PersistError> {
        Ok(())
    }
}

/// Attaches the device when `--boot-timer` asked for it.
pub fn attach(registry: &mut DeviceRegistry) -> Result<(), RegistryError> {
    if !enabled() {
        return Ok(());
    }
    let timer = Arc::new(Mutex::new(BootTimer::now()));
    registry.attach(Attachment {
        device: timer.clone(),
        bus: Bus::Mmio,
        base: BOOT_TIMER_BASE,
        len: BOOT_TIMER_LEN,
        name: "boot_timer".into(),
        kind: DeviceKind::Platform,
        counters: None,
        persist: timer,
        // Not in the DSDT: the guest writes to the address Firecracker documents.
        aml: Vec::new(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_reads_like_firecrackers() {
        let t = BootTimer {
            start_us: 0,
            start_cpu_us: 0,
        };
        let line = t.report();
        assert!(line.starts_with("Guest-boot-time = "), "{line}");
        assert!(line.contains(" us ") && line.ends_with(" CPU ms"), "{line}");
    }
}
