//! Firecracker's command-line flags that set up the process before a VM exists: the logger,
//! the instance id, process start times, and the statement about PCI.

use std::path::PathBuf;

use crate::logger::{LogLevel, LoggerConfig, LoggerError};
use crate::metrics::METRICS;

/// What `--version` prints after the program name; a tool that looks for Firecracker's
/// `Firecracker vX.Y.Z` finds the API version prescient follows.
pub const VERSION_LINE: &str = concat!(
    "v",
    env!("CARGO_PKG_VERSION"),
    " (Firecracker v",
    crate::firecracker_version!(),
    " compatible)"
);

/// What `--version` prints after `Firecracker` when the binary is installed as `firecracker`
/// (as Kata Containers needs it: it names the jailer's pid file `firecracker.pid`): Firecracker's
/// own line, whose second word Kata parses as the version it checks (at least 0.21.1).
pub const FIRECRACKER_VERSION_LINE: &str = concat!(
    "v",
    crate::firecracker_version!(),
    " (prescient v",
    env!("CARGO_PKG_VERSION"),
    ")"
);

/// Where Firecracker serves its API when no socket is named.
pub const DEFAULT_API_SOCK: &str = jailer::DEFAULT_API_SOCK;

/// What `--enable-pci` gets.
pub const NO_PCI: &str = "--enable-pci: prescient has no PCI transport; every device is a \
    virtio-mmio device announced on the kernel command line (virtio_mmio.device=...), which \
    Linux guests with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES use as they would the PCI ones. \
    Continuing with virtio-mmio.";

/// `--log-path`, `--level`, `--show-level`, `--show-log-origin`, `--module`: the `PUT /logger`
/// fields, from the start.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct LoggerArgs {
    /// Write the log to this file or FIFO instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level (Firecracker's): Error, Warning, Info, Debug, Trace or Off, any case.
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub level: Option<LogLevel>,
    /// Prefix each log line with its level.
    #[arg(long)]
    pub show_level: bool,
    /// Add the source file and line of each log line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Only log events of this module path (e.g. `vmm::api`).
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
}

fn parse_level(text: &str) -> Result<LogLevel, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
        format!("{text:?} is not a log level (Error, Warning, Info, Debug, Trace, Off)")
    })
}

impl LoggerArgs {
    /// Reconfigures the logger if any flag was given.
    pub fn apply(&self) -> Result<(), LoggerError> {
        let given = self.log_path.is_some()
            || self.level.is_some()
            || self.show_level
            || self.show_log_origin
            || self.module.is_some();
        if !given {
            return Ok(());
        }
        crate::logger::configure(&LoggerConfig {
            log_path: self.log_path.clone(),
            level: self.level,
            // Firecracker leaves both off unless asked.
            show_level: Some(self.show_level),
            show_log_origin: Some(self.show_log_origin),
            module: self.module.clone(),
        })
    }
}

/// `--start-time-us`, `--start-time-cpu-us`, `--parent-cpu-time-us`: when the process (or the
/// jailer that started it) began, so that the time to a serving API can be reported.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ProcessTimes {
    /// When the process started (CLOCK_MONOTONIC, microseconds).
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// The process's CPU time when it started (microseconds).
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// CPU time the parent (the jailer) spent before the exec (microseconds).
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the one we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Monotonic and process CPU time now, in microseconds.
pub fn now_us() -> (u64, u64) {
    (
        clock_us(libc::CLOCK_MONOTONIC),
        clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
    )
}

impl ProcessTimes {
    /// Once the API serves: the start-up time into the metrics (Firecracker's
    /// `api_server.process_startup_time_us` and `_cpu_us`) and the log.
    pub fn report(&self) {
        let (now, cpu) = now_us();
        if let Some(start) = self.start_time_us {
            let us = now.saturating_sub(start);
            METRICS
                .api
                .process_startup_time_us
                .store(us, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("Process startup time is {us} us.");
        }
        if let Some(start) = self.start_time_cpu_us {
            let us = cpu.saturating_sub(start) + self.parent_cpu_time_us.unwrap_or(0);
            METRICS
                .api
                .process_startup_time_cpu_us
                .store(us, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("Process startup CPU time is {us} us.");
        }
    }
}

/// Firecracker's rule for `--id`.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("--id {id:?}: must be 1 to 64 characters"));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!(
            "--id {id:?}: may only contain letters, digits and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_ids_follow_firecracker() {
        assert_eq!(parse_level("Warning"), Ok(LogLevel::Warning));
        assert_eq!(parse_level("debug"), Ok(LogLevel::Debug));
        assert_eq!(parse_level("OFF"), Ok(LogLevel::Off));
        assert!(parse_level("loud").is_err());
        assert!(validate_instance_id("anonymous-instance").is_ok());
        assert!(validate_instance_id("").is_err());
        assert!(validate_instance_id("a_b").is_err());
        assert!(validate_instance_id(&"a".repeat(65)).is_err());
    }
}
