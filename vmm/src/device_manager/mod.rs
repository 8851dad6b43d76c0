//! Creates the VM's devices and attaches them to the buses and interrupt lines, registering each
//! one as it goes (`registry`).

pub mod legacy;
pub mod mmio;
pub mod registry;
