//! x86_64: guest physical layout, boot-time CPU state, CPUID/MSRs, LAPIC and the MP table.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
