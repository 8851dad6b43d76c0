//! Creates the VM's devices and attaches them to the buses and interrupt lines.

pub mod legacy;
pub mod mmio;
