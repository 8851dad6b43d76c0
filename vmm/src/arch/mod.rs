//! Architecture-specific VM setup. prescient targets x86_64 only.

pub mod x86_64;
