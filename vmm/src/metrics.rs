//! The VMM's counters: kept cumulative, written as Firecracker-style JSON (deltas since the last
//! flush) to the metrics file or FIFO, and served in Prometheus text format on `GET /metrics`.
//!
//! A vCPU's exits are counted once, by the [`ExitRecorder`] its thread is handed as its exit
//! observer, in cache lines only that thread writes; the metrics sum every vCPU's totals, and the
//! predictor reads the same counters per window.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use devices::legacy::SerialCounters;
use devices::virtio::DeviceCounters;
use predictor::telemetry::{Access, ExitCounts, ExitKind, ExitRecorder, ExitTotals};

use crate::vstate::vcpu::ExitObserver;

/// A vCPU's exit counter is its exit observer: one relaxed load and store per exit.
impl ExitObserver for ExitRecorder {
    #[inline]
    fn observe(&mut self, exit: ExitKind) {
        self.record(exit);
    }
}

/// Counters of the API server.
#[derive(Debug, Default)]
pub struct ApiCounters {
    pub requests: AtomicU64,
    /// Requests answered 4xx.
    pub client_errors: AtomicU64,
    /// Requests answered 5xx.
    pub server_errors: AtomicU64,
    /// From `--start-time-us` to a serving API (Firecracker's metric).
    pub process_startup_time_us: AtomicU64,
    /// CPU time from `--start-time-cpu-us` (plus `--parent-cpu-time-us`) to a serving API.
    pub process_startup_time_cpu_us: AtomicU64,
}

/// Counters of VM lifecycle events.
#[derive(Debug, Default)]
pub struct VmmCounters {
    pub guest_resets: AtomicU64,
    pub metrics_flushes: AtomicU64,
    pub metrics_write_failures: AtomicU64,
}

/// Every counter of the process.
#[derive(Default)]
pub struct Metrics {
    pub api: ApiCounters,
    pub vmm: VmmCounters,
    vcpus: Mutex<Vec<ExitTotals>>,
    serial: Mutex<Option<Arc<SerialCounters>>>,
    devices: Mutex<Vec<(String, Arc<DeviceCounters>)>>,
    sink: Mutex<Option<Sink>>,
    /// The microVM's id, for lines with `emit_id`.
    instance_id: std::sync::OnceLock<String>,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// One named value: `group` and `name` form the JSON key and the Prometheus metric name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub group: String,
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
}

pub use crate::vmm_config::MetricsConfig;

/// Errors of the metrics sink.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics are already configured (to {0})")]
    AlreadyConfigured(PathBuf),
    #[error("cannot open metrics file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics are not configured: PUT /metrics first")]
    NotConfigured,
    #[error("cannot write metrics to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open metrics destination and what it was last sent.
struct Sink {
    path: PathBuf,
    file: File,
    last: BTreeMap<(String, &'static str), u64>,
    /// Added to every line: `id` and `properties`.
    header: serde_json::Map<String, serde_json::Value>,
}

impl Metrics {
    /// The microVM's id (`--id`), set once at start.
    pub fn set_instance_id(&self, id: &str) {
        let _ = self.instance_id.set(id.to_string());
    }

    /// A new vCPU's exit counter, reported from now on.
    pub fn register_vcpu(&self, exits: ExitTotals) {
        lock(&self.vcpus).push(exits);
    }

    pub fn register_serial(&self, counters: Arc<SerialCounters>) {
        *lock(&self.serial) = Some(counters);
    }

    /// A virtio device's counters, reported as group `name` (e.g. `block_rootfs`).
    pub fn register_device(&self, name: String, counters: Arc<DeviceCounters>) {
        lock(&self.devices).push((name, counters));
    }

    /// The current cumulative values.
    pub fn samples(&self) -> Vec<Sample> {
        let mut exits = ExitCounts::default();
        for v in lock(&self.vcpus).iter() {
            exits.add(&v.counts());
        }
        let serial = lock(&self.serial).clone().unwrap_or_default();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = |group: &str, name, help, value| Sample {
            group: group.to_string(),
            name,
            help,
            value,
        };
        let mut samples = vec![
            s(
                "api_server",
                "requests",
                "API requests served",
                load(&self.api.requests),
            ),
            s(
                "api_server",
                "client_errors",
                "API requests answered 4xx",
                load(&self.api.client_errors),
            ),
            s(
                "api_server",
                "server_errors",
                "API requests answered 5xx",
                load(&self.api.server_errors),
            ),
            s(
                "api_server",
                "process_startup_time_us",
                "microseconds from --start-time-us to a serving API",
                load(&self.api.process_startup_time_us),
            ),
            s(
                "api_server",
                "process_startup_time_cpu_us",
                "CPU microseconds from --start-time-cpu-us to a serving API",
                load(&self.api.process_startup_time_cpu_us),
            ),
            s(
                "vcpu",
                "exit_io_in",
                "vCPU exits for port reads",
                exits.accesses(true, Access::Read),
            ),
            s(
                "vcpu",
                "exit_io_out",
                "vCPU exits for port writes",
                exits.accesses(true, Access::Write),
            ),
            s(
                "vcpu",
                "exit_mmio_read",
                "vCPU exits for MMIO reads",
                exits.accesses(false, Access::Read),
            ),
            s(
                "vcpu",
                "exit_mmio_write",
                "vCPU exits for MMIO writes",
                exits.accesses(false, Access::Write),
            ),
            s(
                "vcpu",
                "unclaimed_access",
                "port or MMIO accesses no device owns",
                exits.unknown(),
            ),
            s(
                "uart",
                "bytes_out",
                "console bytes written by the guest",
                load(&serial.bytes_out),
            ),
            s(
                "uart",
                "bytes_lost",
                "console bytes the host could not take",
                load(&serial.bytes_lost),
            ),
            s(
                "uart",
                "reads",
                "console input reads by the guest",
                load(&serial.reads),
            ),
            s(
                "vmm",
                "guest_resets",
                "guest resets through the i8042",
                load(&self.vmm.guest_resets),
            ),
            s(
                "vmm",
                "metrics_flushes",
                "metrics flushes written",
                load(&self.vmm.metrics_flushes),
            ),
            s(
                "vmm",
                "metrics_write_failures",
                "metrics flushes that failed",
                load(&self.vmm.metrics_write_failures),
            ),
        ];
        for (group, c) in lock(&self.devices).iter() {
            let counters = [
                ("requests", "device requests served", &c.requests),
                (
                    "bytes_to_guest",
                    "bytes the device wrote to guest buffers",
                    &c.bytes_to_guest,
                ),
                (
                    "bytes_from_guest",
                    "bytes the device took from guest buffers",
                    &c.bytes_from_guest,
                ),
                (
                    "invalid_requests",
                    "malformed requests or descriptor chains",
                    &c.invalid_requests,
                ),
                ("io_errors", "host I/O failures", &c.io_errors),
                (
                    "throttled",
                    "times the rate limiter made the queue wait",
                    &c.throttled,
                ),
                (
                    "invalid_register_access",
                    "register accesses the virtio spec forbids",
                    &c.invalid_register_access,
                ),
            ];
            samples.extend(counters.map(|(name, help, v)| s(group, name, help, load(v))));
        }
        samples.extend(self.firecracker_aggregates());
        samples
    }

    /// Firecracker's aggregate device sections under Firecracker's counter names, for the
    /// counters that count the same thing: the sum over every drive (`block`) and interface
    /// (`net`), and the vsock's byte counts. Kata Containers' metrics reader decodes only these
    /// names (its `FirecrackerMetrics`).
    fn firecracker_aggregates(&self) -> Vec<Sample> {
        type Pick = fn(&DeviceCounters) -> &AtomicU64;
        const BLOCK: [(&str, &str, Pick); 5] = [
            ("read_bytes", "bytes read by the guest, all drives", |c| {
                &c.bytes_to_guest
            }),
            (
                "write_bytes",
                "bytes written by the guest, all drives",
                |c| &c.bytes_from_guest,
            ),
            (
                "invalid_reqs_count",
                "malformed requests, all drives",
                |c| &c.invalid_requests,
            ),
            ("execute_fails", "host I/O failures, all drives", |c| {
                &c.io_errors
            }),
            (
                "rate_limiter_throttled_events",
                "rate limiter waits, all drives",
                |c| &c.throttled,
            ),
        ];
        const BYTES: [(&str, &str, Pick); 2] = [
            ("rx_bytes_count", "bytes delivered to the guest", |c| {
                &c.bytes_to_guest
            }),
            ("tx_bytes_count", "bytes sent by the guest", |c| {
                &c.bytes_from_guest
            }),
        ];
        let devices = lock(&self.devices);
        let sum = |prefix: &str, pick: Pick| -> u64 {
            devices
                .iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|(_, c)| pick(c).load(Ordering::Relaxed))
                .sum()
        };
        let mut out = Vec::new();
        for (group, prefix, names) in [
            ("block", "block_", &BLOCK[..]),
            ("net", "net_", &BYTES[..]),
            ("vsock", "vsock", &BYTES[..]),
        ] {
            if devices.iter().any(|(name, _)| name.starts_with(prefix)) {
                out.extend(names.iter().map(|&(name, help, pick)| Sample {
                    group: group.to_string(),
                    name,
                    help,
                    value: sum(prefix, pick),
                }));
            }
        }
        out
    }

    /// Prometheus text exposition of every counter.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for s in self.samples() {
            let metric = format!("prescient_{}_{}_total", s.group, s.name);
            out.push_str(&format!(
                "# HELP {metric} {}\n# TYPE {metric} counter\n{metric} {}\n",
                s.help, s.value
            ));
        }
        out
    }

    /// Sends flushed metrics to `config.metrics_path` from now on.
    pub fn configure(&self, config: &MetricsConfig) -> Result<(), MetricsError> {
        let mut sink = lock(&self.sink);
        if let Some(s) = sink.as_ref() {
            return Err(MetricsError::AlreadyConfigured(s.path.clone()));
        }
        let file = crate::logger::open_nonblocking(&config.metrics_path).map_err(|source| {
            MetricsError::Open {
                path: config.metrics_path.clone(),
                source,
            }
        })?;
        let mut header = serde_json::Map::new();
        if config.emit_id {
            let id = self.instance_id.get().cloned().unwrap_or_default();
            header.insert("id".into(), id.into());
        }
        if let Some(p) = &config.properties {
            let p = p.iter().map(|(k, v)| (k.clone(), v.clone().into()));
            header.insert("properties".into(), serde_json::Map::from_iter(p).into());
        }
        *sink = Some(Sink {
            path: config.metrics_path.clone(),
            file,
            last: BTreeMap::new(),
            header,
        });
        Ok(())
    }

    /// Writes one JSON line with what changed since the last flush, Firecracker's format.
    pub fn flush(&self) -> Result<(), MetricsError> {
        let mut guard = lock(&self.sink);
        let sink = guard.as_mut().ok_or(MetricsError::NotConfigured)?;
        let mut groups: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
            BTreeMap::new();
        for s in self.samples() {
            let last = sink
                .last
                .insert((s.group.clone(), s.name), s.value)
                .unwrap_or(0);
            groups
                .entry(s.group)
                .or_default()
                .insert(s.name.to_string(), (s.value - last).into());
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut doc = sink.header.clone();
        doc.insert("utc_timestamp_ms".into(), now_ms.into());
        for (group, values) in groups {
            doc.insert(group, values.into());
        }
        let line = format!("{}\n", serde_json::Value::Object(doc));
        let result = sink.file.write_all(line.as_bytes());
        let counter = match result {
            Ok(()) => &self.vmm.metrics_flushes,
            Err(_) => &self.vmm.metrics_write_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result.map_err(|source| MetricsError::Write {
            path: sink.path.clone(),
            source,
        })
    }
}

/// Metrics state stays usable after a panic elsewhere: every update is a single store.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_and_interfaces_are_also_summed_under_firecrackers_names() {
        let m = Metrics::default();
        let device = |to: u64, from: u64| {
            let c = Arc::new(DeviceCounters::default());
            c.bytes_to_guest.store(to, Ordering::Relaxed);
            c.bytes_from_guest.store(from, Ordering::Relaxed);
            c
        };
        m.register_device("block_rootfs".into(), device(4096, 0));
        m.register_device("block_drive_0".into(), device(512, 1024));
        m.register_device("net_eth0".into(), device(60, 42));
        let value = |group: &str, name: &str| {
            m.samples()
                .into_iter()
                .find(|s| s.group == group && s.name == name)
                .map(|s| s.value)
        };
        assert_eq!(value("block", "read_bytes"), Some(4608));
        assert_eq!(value("block", "write_bytes"), Some(1024));
        assert_eq!(value("block_drive_0", "bytes_to_guest"), Some(512));
        assert_eq!(value("net", "rx_bytes_count"), Some(60));
        assert_eq!(value("net", "tx_bytes_count"), Some(42));
        // No vsock device, no vsock section.
        assert_eq!(value("vsock", "rx_bytes_count"), None);
    }

    #[test]
    fn vcpu_counters_are_summed_and_flushes_are_deltas() {
        use predictor::telemetry::Target;
        let m = Metrics::default();
        let (mut a, totals) = ExitRecorder::new();
        m.register_vcpu(totals);
        let (mut b, totals) = ExitRecorder::new();
        m.register_vcpu(totals);
        let out = ExitKind::Io(Access::Write, Target::Unknown);
        for _ in 0..3 {
            a.observe(out);
        }
        for _ in 0..4 {
            b.observe(out);
        }
        b.observe(ExitKind::Mmio(Access::Read, Target::Unknown));
        let value = |m: &Metrics, name: &str| {
            m.samples()
                .into_iter()
                .find(|s| s.name == name)
                .unwrap()
                .value
        };
        assert_eq!(value(&m, "exit_mmio_read"), 1);
        assert_eq!(value(&m, "unclaimed_access"), 8);
        assert_eq!(value(&m, "exit_io_out"), 7);

        assert!(matches!(m.flush(), Err(MetricsError::NotConfigured)));
        let dir = std::env::temp_dir().join(format!("prescient-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        let _ = std::fs::remove_file(&path);
        m.set_instance_id("vm-7");
        let mut config: MetricsConfig = serde_json::from_value(serde_json::json!({
            "metrics_path": path, "emit_id": true, "properties": {"zone": "a"}
        }))
        .unwrap();
        m.configure(&config).unwrap();
        config.emit_id = false;
        assert!(m.configure(&config).is_err());
        m.flush().unwrap();
        a.observe(out);
        m.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["vcpu"]["exit_io_out"], 7);
        assert_eq!(lines[1]["id"], "vm-7");
        assert_eq!(lines[1]["properties"]["zone"], "a");
        assert_eq!(
            lines[1]["vcpu"]["exit_io_out"], 1,
            "the second flush holds the delta"
        );
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 0);
    }

    #[test]
    fn prometheus_text_has_help_type_and_value_per_counter() {
        let m = Metrics::default();
        m.api.requests.fetch_add(5, Ordering::Relaxed);
        let text = m.prometheus();
        assert!(text.contains("# TYPE prescient_api_server_requests_total counter\n"));
        assert!(text.contains("\nprescient_api_server_requests_total 5\n"));
        assert_eq!(text.lines().count(), 3 * m.samples().len());
    }
}
