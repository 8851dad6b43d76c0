//! Emulated devices of a prescient microVM: the I/O buses and the legacy PIO devices (virtio-mmio
//! devices join them in later work).

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
