//! Logging: stderr from the start, re-pointed at run time by `PUT /logger` (Firecracker's
//! LoggerConfig) to a file or FIFO, with its level, level names and source locations.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

/// The filter and the output are reloaded separately: tracing-subscriber cannot reload a layer
/// that carries its own filter. `Targets` rather than `EnvFilter`: a level and one module is all
/// the API sets, and `EnvFilter` compiles regular expressions at start-up (code and heap every
/// VMM would carry for nothing).
type FilteredRegistry = Layered<reload::Layer<Targets, Registry>, Registry>;
type OutputLayer = Box<dyn Layer<FilteredRegistry> + Send + Sync>;

struct Handles {
    filter: reload::Handle<Targets, Registry>,
    output: reload::Handle<OutputLayer, FilteredRegistry>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

/// Firecracker's log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    #[serde(alias = "error", alias = "ERROR")]
    Error,
    #[serde(alias = "warning", alias = "warn", alias = "WARNING", alias = "Warn")]
    Warning,
    #[serde(alias = "info", alias = "INFO")]
    Info,
    #[serde(alias = "debug", alias = "DEBUG")]
    Debug,
    #[serde(alias = "trace", alias = "TRACE")]
    Trace,
    #[serde(alias = "off", alias = "OFF")]
    Off,
}

impl LogLevel {
    fn filter(self) -> LevelFilter {
        match self {
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warning => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
            LogLevel::Off => LevelFilter::OFF,
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    pub log_path: Option<PathBuf>,
    pub level: Option<LogLevel>,
    pub show_level: Option<bool>,
    pub show_log_origin: Option<bool>,
    /// Only log events of this module path (e.g. `vmm::api`).
    pub module: Option<String>,
}

/// Errors of configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open log file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid module filter {0:?}")]
    Module(String),
    #[error("the logger was not initialised")]
    NotInitialised,
    #[error("cannot replace the logger: {0}")]
    Reload(reload::Error),
}

/// Logs to stderr at `level` (error, warn, info, debug, trace; anything else: warn).
pub fn init(level: &str) {
    let level: LevelFilter = level.parse().unwrap_or(LevelFilter::WARN);
    let (filter, filter_handle) = reload::Layer::new(Targets::new().with_default(level));
    let stderr: OutputLayer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .boxed();
    let (output, output_handle) = reload::Layer::new(stderr);
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init();
    if installed.is_ok() {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            output: output_handle,
        });
    }
}

/// Applies `config`: fields left out keep their defaults (stderr, warning level, level names
/// shown, no source locations).
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let handles = HANDLES.get().ok_or(LoggerError::NotInitialised)?;
    let level = config.level.unwrap_or(LogLevel::Warning).filter();
    let filter = match &config.module {
        None => Targets::new().with_default(level),
        Some(module) if is_module_path(module) => {
            // Only the named module logs: everything else is off.
            Targets::new()
                .with_default(LevelFilter::OFF)
                .with_target(module.clone(), level)
        }
        Some(module) => return Err(LoggerError::Module(module.clone())),
    };
    let origin = config.show_log_origin.unwrap_or(false);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_level(config.show_level.unwrap_or(true))
        .with_file(origin)
        .with_line_number(origin);
    let output: OutputLayer = match &config.log_path {
        None => fmt.with_writer(std::io::stderr).boxed(),
        Some(path) => {
            let file =
                crate::metrics::open_nonblocking(path).map_err(|source| LoggerError::Open {
                    path: path.clone(),
                    source,
                })?;
            fmt.with_ansi(false).with_writer(Arc::new(file)).boxed()
        }
    };
    handles.output.reload(output).map_err(LoggerError::Reload)?;
    handles.filter.reload(filter).map_err(LoggerError::Reload)
}

/// A Rust module path: `::`-separated identifiers.
fn is_module_path(module: &str) -> bool {
    module.split("::").all(|segment| {
        segment
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_filters_are_module_paths() {
        assert!(is_module_path("vmm"));
        assert!(is_module_path("vmm::api::http"));
        for bad in ["", "vmm::", "::vmm", "vmm=debug", "a b", "9vmm", "vmm:api"] {
            assert!(!is_module_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn firecracker_level_names_parse() {
        let c: LoggerConfig = serde_json::from_str(
            r#"{"log_path": "/tmp/x", "level": "Warning", "show_level": true}"#,
        )
        .unwrap();
        assert_eq!(c.level, Some(LogLevel::Warning));
        let c: LoggerConfig = serde_json::from_str(r#"{"level": "debug"}"#).unwrap();
        assert_eq!(c.level.unwrap().filter(), LevelFilter::DEBUG);
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"level": "Loud"}"#).is_err());
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"path": "/x"}"#).is_err());
    }
}
