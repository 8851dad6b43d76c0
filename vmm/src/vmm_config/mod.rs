//! The VM spec: one serde model for the `--config-file` JSON and (later) the API, modelled on
//! Firecracker's configuration file so that users can bring theirs.

mod balloon;
mod boot_source;
pub mod cpu_config;
mod drives;
mod entropy;
pub mod json_path;
mod machine_config;
mod memory_hotplug;
mod metrics;
mod mmds;
mod net;
mod pmem;
mod predictor;
mod serial;
pub mod static_cpu_templates;
mod vsock;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use balloon::{BalloonConfig, BalloonStatsUpdate, BalloonUpdate, HintingStart};
pub use boot_source::{BootSourceConfig, KernelFormat, DEFAULT_BOOT_ARGS};
pub use cpu_config::{CpuConfig, CpuTemplate};
pub use drives::{
    bandwidth_limiter, validate_drives, validate_id, validate_rate_limiter, CacheType, DriveConfig,
    DriveUpdate, IoEngine,
};
pub use entropy::EntropyConfig;
pub use json_path::{JsonPath, Segment};
pub use machine_config::{HugePages, MachineConfig, MAX_VCPUS};
pub use memory_hotplug::{MemoryHotplugConfig, MemoryHotplugSizeUpdate, MemoryHotplugStatus};
pub use metrics::MetricsConfig;
pub use mmds::MmdsConfig;
pub use net::{parse_mac, validate_interfaces, NetworkInterfaceConfig, NetworkInterfaceUpdate};
pub use pmem::{validate_pmem, PmemConfig, PmemUpdate};
pub use predictor::{
    AnomalyResponse, BudgetConfig, PredictorConfig, PredictorUpdate, Range, VcpuPolicy,
    DEFAULT_IO_MAX_MIBPS,
};
pub use serial::SerialConfig;
pub use vsock::VsockConfig;

/// A whole microVM. The boot source may be missing only while a VM is being configured through the
/// API; a spec file must name it and a VM cannot start without it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<CpuConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<PmemConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<PredictorConfig>,
    /// Firecracker's `logger` section: the process's logger, set up as `PUT /logger` does when
    /// the file is loaded. Not part of the VM, so never written back (`GET /vm/config`,
    /// snapshots), as in Firecracker.
    #[serde(default, skip_serializing)]
    pub logger: Option<crate::logger::LoggerConfig>,
    /// Firecracker's `metrics` section, as `PUT /metrics`; likewise never written back.
    #[serde(default, skip_serializing)]
    pub metrics: Option<MetricsConfig>,
}

/// A spec that parsed but cannot describe a VM, or a VM that cannot be built from it: the place
/// in the spec and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: JsonPath,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: JsonPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

/// Errors of reading a spec file, each naming the file and, where there is one, the line:column.
#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    #[error("cannot read VM spec {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid VM spec {file}:{line}:{column}: {path}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        path: String,
        message: String,
    },
}

impl SpecFileError {
    /// Places a post-parse error at its value in the file's text (line 1:1 if it cannot be found,
    /// e.g. a section left to its default).
    pub fn at(file: &Path, text: &str, err: ConfigError) -> Self {
        let (line, column) = json_path::locate(text, &err.path).unwrap_or((1, 1));
        SpecFileError::Invalid {
            file: file.to_path_buf(),
            line,
            column,
            path: err.path.to_string(),
            message: err.message,
        }
    }
}

impl VmConfig {
    /// Parses a spec (syntax, types, unknown fields) without checking the host.
    pub fn parse(text: &str) -> Result<Self, (String, serde_json::Error)> {
        // The path-tracking parser only explains a failure: a good spec goes through the plain
        // one, so the VMM of a good spec never maps the other's (much larger) code into memory.
        serde_json::from_str(text).or_else(|_| {
            let mut de = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let path = e.path().to_string();
                (path, e.into_inner())
            })
        })
    }

    /// Reads, parses and validates a spec file.
    pub fn from_file(file: &Path) -> Result<Self, SpecFileError> {
        let text = std::fs::read_to_string(file).map_err(|source| SpecFileError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|(path, e)| SpecFileError::Invalid {
            file: file.to_path_buf(),
            line: e.line(),
            column: e.column(),
            path,
            message: strip_position(&e),
        })?;
        config
            .validate()
            .and_then(|()| config.boot_source().map(|_| ()))
            .map_err(|e| SpecFileError::at(file, &text, e))?;
        Ok(config)
    }

    /// Checks what serde cannot: value ranges and the files the spec names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(boot) = &self.boot_source {
            boot.validate()?;
        }
        self.validate_for_restore()
    }

    /// Everything [`VmConfig::validate`] checks but the boot source: a VM restored from a
    /// snapshot does not read its kernel, which need not exist any more.
    pub fn validate_for_restore(&self) -> Result<(), ConfigError> {
        self.machine_config.validate()?;
        validate_drives(&self.drives)?;
        validate_interfaces(&self.network_interfaces)?;
        validate_pmem(&self.pmem, &self.drives)?;
        if let Some(entropy) = &self.entropy {
            entropy.validate()?;
        }
        if let Some(serial) = &self.serial {
            serial.validate()?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate(self.machine_config.mem_size_mib)?;
        }
        if let Some(hotplug) = &self.memory_hotplug {
            hotplug.validate()?;
            if let Some(i) = self.drives.iter().position(|d| d.socket.is_some()) {
                // The backend maps guest memory once, at activation; hot-plugged memory would be
                // memory it cannot reach.
                return Err(ConfigError::new(
                    JsonPath(vec![
                        Segment::Key("drives"),
                        Segment::Index(i),
                        Segment::Key("socket"),
                    ]),
                    "a vhost-user drive cannot be combined with memory-hotplug: its backend \
                     would not see hot-plugged memory",
                ));
            }
        }
        if let Some(cpu) = &self.cpu_config {
            cpu.validate()?;
        }
        if let Some(mmds) = &self.mmds_config {
            mmds.validate(&self.network_interfaces)?;
        }
        if let Some(predictor) = &self.predictor {
            predictor.validate(&self.machine_config)?;
        }
        Ok(())
    }

    /// The boot source, which a VM needs to start.
    pub fn boot_source(&self) -> Result<&BootSourceConfig, ConfigError> {
        self.boot_source.as_ref().ok_or_else(|| {
            ConfigError::new(
                JsonPath::keys(&["boot-source"]),
                "missing: a VM needs a kernel (kernel_image_path)",
            )
        })
    }
}

/// serde_json appends " at line L column C" to its messages; we print the position ourselves.
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

/// Checks that `path` names a readable regular file; the error names the spec field.
fn check_file(field: JsonPath, path: &Path) -> Result<std::fs::File, ConfigError> {
    let file = std::fs::File::open(path).map_err(|e| {
        ConfigError::new(
            field.clone(),
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    let meta = file.metadata().map_err(|e| {
        ConfigError::new(
            field.clone(),
            format!("cannot stat {}: {e}", path.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(ConfigError::new(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Each file gets a name of its own: tests run in parallel and must not see each other's
    /// half-written files.
    fn write_temp(name: &str, contents: &[u8]) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("prescient-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{n}-{name}"));
        std::fs::File::create(&p)
            .unwrap()
            .write_all(contents)
            .unwrap();
        p
    }

    fn elf_kernel() -> PathBuf {
        let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1];
        elf.resize(64, 0);
        write_temp("vmlinux", &elf)
    }

    fn spec(body: &str) -> PathBuf {
        write_temp("vm.json", body.as_bytes())
    }

    fn err_of(body: &str) -> String {
        VmConfig::from_file(&spec(body)).unwrap_err().to_string()
    }

    #[test]
    fn the_logger_and_metrics_sections_are_read_and_never_written_back() {
        // Kata Containers' config file (fc.go) points both at FIFOs in the jail.
        let c = VmConfig::parse(
            r#"{"logger": {"level": "Error", "log_path": "/logs.fifo"},
                "metrics": {"metrics_path": "/metrics.fifo"}}"#,
        )
        .unwrap();
        let logger = c.logger.clone().unwrap();
        assert_eq!(logger.log_path.as_deref(), Some(Path::new("/logs.fifo")));
        assert_eq!(logger.level, Some(crate::logger::LogLevel::Error));
        assert_eq!(
            c.metrics.as_ref().unwrap().metrics_path,
            Path::new("/metrics.fifo")
        );
        let written = serde_json::to_value(&c).unwrap();
        assert!(written.get("logger").is_none() && written.get("metrics").is_none());
        let (path, _) = VmConfig::parse(r#"{"logger": {"level": "Loud"}}"#).unwrap_err();
        assert_eq!(path, "logger.level");
    }

    #[test]
    fn a_firecracker_style_spec_parses_with_defaults() {
        let k = elf_kernel();
        let body = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256}}}}"#,
            k.display()
        );
        let c = VmConfig::from_file(&spec(&body)).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.mem_size_mib, 256);
        assert!(!c.machine_config.smt);
        assert_eq!(
            c.boot_source().unwrap().boot_args.as_deref(),
            Some("console=ttyS0")
        );

        let body = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
            k.display()
        );
        let c = VmConfig::from_file(&spec(&body)).unwrap();
        assert_eq!(c.machine_config, MachineConfig::default());
    }

    #[test]
    fn unknown_fields_name_their_path_and_position() {
        let e = err_of("{\n \"boot-source\": {\"kernel_image_path\": \"x\", \"kernel\": 1}}");
        assert!(e.contains(".json:2:"), "{e}");
        assert!(e.contains("boot-source"), "{e}");
        assert!(e.contains("unknown field `kernel`"), "{e}");
        let e = err_of(r#"{"boot-source": {"kernel_image_path": "x"}, "extra": {}}"#);
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        let e = err_of("{\"boot-source\": {\"kernel_image_path\": \"x\"},\n \"machine-config\": {\"vcpu_count\": \"two\"}}");
        assert!(e.contains(".json:2:"), "{e}");
        assert!(e.contains("machine-config.vcpu_count"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
        let e = err_of("{\"boot-source\": ");
        assert!(e.contains("EOF"), "{e}");
        let e = err_of(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 8}}"#);
        assert!(
            e.contains("boot-source: missing: a VM needs a kernel"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let k = elf_kernel();
        let body = format!(
            "{{\"boot-source\": {{\"kernel_image_path\": \"{}\"}},\n  \"machine-config\": {{\"vcpu_count\": 0, \"mem_size_mib\": 64}}}}",
            k.display()
        );
        let e = err_of(&body);
        assert!(
            e.contains(".json:2:36: machine-config.vcpu_count: must be between 1 and 32, got 0"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_is_reported_as_such() {
        let e = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("cannot read VM spec /nonexistent/vm.json"));
    }

    #[test]
    fn serialises_back_to_an_accepted_document() {
        let k = elf_kernel();
        let body = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "serial": {{}}}}"#,
            k.display()
        );
        let c = VmConfig::from_file(&spec(&body)).unwrap();
        let again = VmConfig::parse(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }
}
