//! Per-VM telemetry: lock-free per-vCPU exit counters, the devices' own totals, and the window
//! built from them.

mod cells;
pub mod collector;
pub mod recorder;
pub mod window;

pub use collector::{Collector, CollectorError, WindowInputs, DEFAULT_WINDOW};
pub use recorder::{
    Access, DeviceId, DeviceKind, DeviceTotals, ExitCounts, ExitKind, ExitRecorder, ExitTotals,
    Target, EXIT_SLOTS, MAX_DEVICES,
};
pub use window::{DeviceWindow, KvmVcpuStats, MemorySample, VcpuWindow, Window};
