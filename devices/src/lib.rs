//! Emulated devices of a prescient microVM: the I/O buses, the legacy PIO devices, the virtio
//! devices and the ACPI platform devices (the event device and the CPU hot-plug controller).

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod persist;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
