//! The prescient VMM.
