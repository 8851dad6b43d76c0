//! Logging: stderr from the start, re-pointed at run time by `PUT /logger` (Firecracker's
//! LoggerConfig) to a file or FIFO, with its level, level names and source locations.
//!
//! A small `tracing` subscriber of its own rather than tracing-subscriber's: the VMM logs
//! events, never spans, and tracing-subscriber's registry keeps span storage whose shard table
//! alone is 32 KiB written at start-up (4096 slots of 8 bytes), resident in every VMM process
//! whether a span is ever made or not (docs/memory.md).

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber};

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

/// Opens a file or FIFO for writing without blocking on a FIFO that has no reader yet (the
/// log's and the metrics' destinations, Firecracker's way).
pub fn open_nonblocking(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
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
}

/// What the logger writes and where: one value, replaced whole by `PUT /logger`.
struct Settings {
    level: LevelFilter,
    /// Only events of this module path and those below it.
    module: Option<String>,
    show_level: bool,
    show_origin: bool,
    out: Box<dyn Write + Send>,
}

impl Settings {
    fn stderr(level: LevelFilter) -> Self {
        Settings {
            level,
            module: None,
            show_level: true,
            show_origin: false,
            out: Box::new(std::io::stderr()),
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= self.level
            && self.module.as_deref().is_none_or(|m| {
                meta.target()
                    .strip_prefix(m)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
    }

    /// One event as one line: `<UTC time> <LEVEL> <file>:<line>: <message> <field>=<value>...`.
    fn line(&self, now: SystemTime, event: &Event<'_>) -> String {
        let meta = event.metadata();
        let mut line = utc_timestamp(now);
        if self.show_level {
            let _ = write!(line, " {:>5}", meta.level());
        }
        if self.show_origin {
            if let (Some(file), Some(n)) = (meta.file(), meta.line()) {
                let _ = write!(line, " {file}:{n}:");
            }
        }
        event.record(&mut Fields(&mut line));
        line.push('\n');
        line
    }
}

/// Appends an event's message, then its other fields as `name=value`.
struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = match field.name() {
            "message" => write!(self.0, " {value:?}"),
            name => write!(self.0, " {name}={value:?}"),
        };
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = match field.name() {
            "message" => write!(self.0, " {value}"),
            name => write!(self.0, " {name}={value:?}"),
        };
    }
}

/// The process's subscriber, over [`SETTINGS`]. Callsites are told once whether they log at
/// all (and again after each `PUT /logger`), so a disabled `trace!` on the vCPU exit path costs
/// a load and a branch.
struct Logger(&'static Mutex<Settings>);

static SETTINGS: OnceLock<Mutex<Settings>> = OnceLock::new();

fn lock(settings: &Mutex<Settings>) -> std::sync::MutexGuard<'_, Settings> {
    // Settings are replaced whole; a panic while writing a line leaves them usable.
    settings.lock().unwrap_or_else(|p| p.into_inner())
}

impl Subscriber for Logger {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        lock(self.0).enabled(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(lock(self.0).level)
    }

    /// Spans are not recorded: every span is the same one, and entering it changes nothing.
    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut settings = lock(self.0);
        if !settings.enabled(event.metadata()) {
            return;
        }
        let line = settings.line(SystemTime::now(), event);
        // A full FIFO or a closed file drops the line: the VMM does not stop for its log.
        let _ = settings.out.write_all(line.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Logs to stderr at `level` (error, warn, info, debug, trace; anything else: warn).
pub fn init(level: &str) {
    let level: LevelFilter = level.parse().unwrap_or(LevelFilter::WARN);
    if SETTINGS.set(Mutex::new(Settings::stderr(level))).is_ok() {
        if let Some(settings) = SETTINGS.get() {
            let _ = tracing::dispatcher::set_global_default(Dispatch::new(Logger(settings)));
        }
    }
}

/// Applies `config`: fields left out keep their defaults (stderr, warning level, level names
/// shown, no source locations).
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let new = settings_of(config)?;
    *lock(SETTINGS.get().ok_or(LoggerError::NotInitialised)?) = new;
    tracing::callsite::rebuild_interest_cache();
    Ok(())
}

fn settings_of(config: &LoggerConfig) -> Result<Settings, LoggerError> {
    let module = match &config.module {
        Some(m) if !is_module_path(m) => return Err(LoggerError::Module(m.clone())),
        m => m.clone(),
    };
    let out: Box<dyn Write + Send> = match &config.log_path {
        None => Box::new(std::io::stderr()),
        Some(path) => Box::new(open_nonblocking(path).map_err(|source| LoggerError::Open {
            path: path.clone(),
            source,
        })?),
    };
    Ok(Settings {
        level: config.level.unwrap_or(LogLevel::Warning).filter(),
        module,
        show_level: config.show_level.unwrap_or(true),
        show_origin: config.show_log_origin.unwrap_or(false),
        out,
    })
}

/// `now` as RFC 3339 UTC with microseconds: `2026-12-07T06:03:54.248087Z`.
fn utc_timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar; H. Hinnant's
    // days_from_civil inverted), in eras of 400 years that start on March 1st.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
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
    use std::sync::Arc;

    #[test]
    fn module_filters_are_module_paths() {
        assert!(is_module_path("vmm"));
        assert!(is_module_path("vmm::api::http"));
        for bad in ["", "vmm::", "::vmm", "vmm=debug", "a b", "9vmm", "vmm:api"] {
            assert!(!is_module_path(bad), "{bad:?}");
        }
    }

    /// A log output the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    fn logger(config: &LoggerConfig) -> (Logger, Captured) {
        let out = Captured::default();
        let mut settings = settings_of(config).unwrap();
        settings.out = Box::new(out.clone());
        (Logger(Box::leak(Box::new(Mutex::new(settings)))), out)
    }

    #[test]
    fn events_are_lines_at_the_level_asked() {
        let (log, out) = logger(&LoggerConfig {
            level: Some(LogLevel::Info),
            ..LoggerConfig::default()
        });
        tracing::subscriber::with_default(log, || {
            tracing::warn!(vcpu = 3, port = "0x80", "unclaimed write");
            tracing::info!("plain");
            tracing::debug!("too detailed");
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        // 2026-12-07T06:03:54.248087Z
        let (time, rest) = lines[0].split_at(27);
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert_eq!(rest, "  WARN unclaimed write vcpu=3 port=\"0x80\"");
        assert_eq!(&lines[1][27..], "  INFO plain");
    }

    #[test]
    fn level_names_origin_and_module_are_as_configured() {
        let (log, out) = logger(&LoggerConfig {
            level: Some(LogLevel::Debug),
            show_level: Some(false),
            show_log_origin: Some(true),
            module: Some("vmm::logger".into()),
            ..LoggerConfig::default()
        });
        tracing::subscriber::with_default(log, || {
            tracing::debug!("here");
            tracing::error!(target: "vmm::api", "elsewhere");
            tracing::error!(target: "vmm::loggers", "a sibling, not below");
            tracing::error!(target: "vmm::logger::sub", "below");
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0][27..].starts_with(" vmm/src/logger.rs:") && lines[0].ends_with(": here"),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with(": below"), "{}", lines[1]);
        assert!(settings_of(&LoggerConfig {
            module: Some("vmm=debug".into()),
            ..LoggerConfig::default()
        })
        .is_err());
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        use std::time::Duration;
        for (secs, micros, want) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.000005Z"),
            (1_234_567_890, 123_456, "2009-02-13T23:31:30.123456Z"),
            (1_796_601_599, 999_999, "2026-12-06T23:59:59.999999Z"),
            (4_102_531_199, 0, "2100-01-01T23:59:59.000000Z"),
        ] {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            assert_eq!(utc_timestamp(t), want);
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
