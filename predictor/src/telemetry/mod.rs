//! Per-VM telemetry: lock-free per-thread counters and the window built from them.

mod cells;
pub mod collector;
pub mod recorder;
pub mod window;

pub use collector::{Collector, CollectorError, WindowInputs, DEFAULT_WINDOW};
pub use recorder::{
    DeviceId, DeviceKind, DeviceRecorder, ExitCounts, ExitKind, ExitRecorder, Target, EXIT_SLOTS,
    MAX_DEVICES,
};
pub use window::{DeviceWindow, KvmVcpuStats, MemorySample, VcpuWindow, Window};
