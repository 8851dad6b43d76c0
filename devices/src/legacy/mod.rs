//! Legacy PC devices on the PIO bus: the 16550 serial port, the i8042 controller, and the
//! ports of hardware a microVM lacks but Linux probes.

mod absent;
mod i8042;
mod serial;

pub use absent::{Absent, ABSENT_PORTS};
pub use i8042::{I8042Error, I8042};
pub use serial::{SerialCounters, SerialDevice, SerialError, SerialHooks};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Raises a guest interrupt by writing an eventfd that KVM routes to a GSI (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
