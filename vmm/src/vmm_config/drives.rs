//! `drives[]`: virtio-blk disks, Firecracker's fields.

use std::collections::HashSet;
use std::path::PathBuf;

use devices::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
use serde::{Deserialize, Serialize};

use super::{check_file, ConfigError, JsonPath, Segment};

/// One disk: a host file (`path_on_host`) served by prescient, or a vhost-user-block backend
/// (`socket`) that serves it from another process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, into = "DriveView")]
pub struct DriveConfig {
    pub drive_id: String,
    /// Empty for a vhost-user drive.
    #[serde(default)]
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// With `is_root_device`: boot from this partition (`root=PARTUUID=...`) instead of /dev/vda.
    #[serde(default)]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Firecracker's `cache_type`; left out, prescient flushes to the disk (`Writeback`, where
    /// Firecracker's default is `Unsafe`).
    #[serde(default)]
    pub cache_type: CacheType,
    /// Firecracker's `io_engine`: `Async` serves the drive through io_uring.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Firecracker's vhost-user-block socket: the backend listening there serves the disk.
    #[serde(default)]
    pub socket: Option<String>,
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

/// A drive as `GET /vm/config` shows it: as Firecracker does, a vhost-user drive without the
/// fields only a file drive has.
#[derive(Serialize)]
struct DriveView {
    drive_id: String,
    #[serde(skip_serializing_if = "is_empty_path")]
    path_on_host: PathBuf,
    is_root_device: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_read_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partuuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limiter: Option<RateLimiterConfig>,
    cache_type: CacheType,
    #[serde(skip_serializing_if = "Option::is_none")]
    io_engine: Option<IoEngine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
}

impl From<DriveConfig> for DriveView {
    fn from(d: DriveConfig) -> Self {
        let file = d.socket.is_none();
        Self {
            drive_id: d.drive_id,
            path_on_host: d.path_on_host,
            is_root_device: d.is_root_device,
            is_read_only: file.then_some(d.is_read_only),
            partuuid: d.partuuid,
            rate_limiter: d.rate_limiter,
            cache_type: d.cache_type,
            io_engine: file.then_some(d.io_engine),
            socket: d.socket,
        }
    }
}

/// How the guest's FLUSH is served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// FLUSH is not offered; written data reaches the disk when the host's page cache writes it.
    Unsafe,
    /// FLUSH is offered and reaches the disk (fdatasync) before it is acknowledged.
    #[default]
    Writeback,
}

/// How requests reach the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// On the VMM thread, one request at a time.
    #[default]
    Sync,
    /// io_uring (Firecracker's engine for host kernels from 5.10.51): requests complete
    /// later, straight between the file and guest memory.
    Async,
}

/// `PATCH /drives/{id}`: a new backing file or rate limiter for a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Checks a device id: what Firecracker accepts, so ids travel between the two.
pub fn validate_id(path: JsonPath, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 64 {
        return Err(ConfigError::new(
            path,
            format!("{id:?} must be 1 to 64 characters"),
        ));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ConfigError::new(
            path,
            format!("{id:?} may only contain letters, digits and '_'"),
        ));
    }
    Ok(())
}

/// Checks a limiter's buckets by building one.
pub fn validate_rate_limiter(
    path: JsonPath,
    limiter: &Option<RateLimiterConfig>,
) -> Result<(), ConfigError> {
    match limiter {
        Some(cfg) => RateLimiter::new(*cfg)
            .map(|_| ())
            .map_err(|e| ConfigError::new(path, e.to_string())),
        None => Ok(()),
    }
}

/// Refill period of the bandwidth buckets the predictor and profiles size: short, so that a
/// resize shows within a predictor window.
pub const BANDWIDTH_REFILL_MS: u64 = 100;

/// A limiter with a bandwidth bucket of `mibps` MiB/s and the `ops` bucket of `base` kept.
pub fn bandwidth_limiter(mibps: f64, base: Option<RateLimiterConfig>) -> RateLimiterConfig {
    let bytes = mibps * (1u64 << 20) as f64 * BANDWIDTH_REFILL_MS as f64 / 1000.0;
    RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: bytes.round().max(1.0) as u64,
            one_time_burst: None,
            refill_time: BANDWIDTH_REFILL_MS,
        }),
        ops: base.and_then(|b| b.ops),
    }
}

fn field(index: usize, name: &'static str) -> JsonPath {
    JsonPath(vec![
        Segment::Key("drives"),
        Segment::Index(index),
        Segment::Key(name),
    ])
}

impl DriveConfig {
    /// Checks this drive as entry `index` of `drives`.
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        validate_id(field(index, "drive_id"), &self.drive_id)?;
        if self.partuuid.is_some() && !self.is_root_device {
            return Err(ConfigError::new(
                field(index, "partuuid"),
                "only the root device can name a partition",
            ));
        }
        if self.socket.is_some() {
            return self.validate_vhost_user(index);
        }
        if is_empty_path(&self.path_on_host) {
            return Err(ConfigError::new(
                field(index, "path_on_host"),
                "missing: a drive needs a file (path_on_host) or a vhost-user backend (socket)",
            ));
        }
        check_file(field(index, "path_on_host"), &self.path_on_host)?;
        validate_rate_limiter(field(index, "rate_limiter"), &self.rate_limiter)
    }

    /// A vhost-user drive: the backend serves the file and decides read-only, and requests never
    /// pass through prescient (no rate limiter, no I/O engine).
    fn validate_vhost_user(&self, index: usize) -> Result<(), ConfigError> {
        let only_for_files = [
            ("path_on_host", !is_empty_path(&self.path_on_host)),
            ("is_read_only", self.is_read_only),
            ("rate_limiter", self.rate_limiter.is_some()),
            ("io_engine", self.io_engine != IoEngine::default()),
        ];
        match only_for_files.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(ConfigError::new(
                field(index, name),
                format!(
                    "a vhost-user drive (socket) cannot have {name}: its backend serves the disk"
                ),
            )),
            None => Ok(()),
        }
    }

    /// For a vhost-user drive configured through the API: a backend must be listening, and is
    /// asked what it serves, as Firecracker does when the drive is configured (400 otherwise).
    pub fn probe_backend(&self, index: usize) -> Result<(), ConfigError> {
        match self.vhost_user_socket() {
            Some(socket) => devices::virtio::vhost_user_block::probe(socket)
                .map(|_| ())
                .map_err(|e| ConfigError::new(field(index, "socket"), e.to_string())),
            None => Ok(()),
        }
    }

    /// The drive's vhost-user backend socket, if it has one.
    pub fn vhost_user_socket(&self) -> Option<&std::path::Path> {
        self.socket.as_deref().map(std::path::Path::new)
    }

    /// Whether FLUSH is offered and synced.
    pub fn writeback(&self) -> bool {
        self.cache_type == CacheType::Writeback
    }
}

/// Checks every drive and the rules between them.
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    let mut ids = HashSet::new();
    let mut root = None;
    for (i, d) in drives.iter().enumerate() {
        d.validate(i)?;
        if !ids.insert(d.drive_id.as_str()) {
            return Err(ConfigError::new(
                field(i, "drive_id"),
                format!("drive id {:?} is used twice", d.drive_id),
            ));
        }
        if d.is_root_device {
            if let Some(first) = root {
                return Err(ConfigError::new(
                    field(i, "is_root_device"),
                    format!("drives[{first}] is already the root device"),
                ));
            }
            root = Some(i);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_buckets_keep_the_ops_bucket() {
        let ops = TokenBucketConfig {
            size: 100,
            one_time_burst: None,
            refill_time: 1000,
        };
        let base = RateLimiterConfig {
            bandwidth: None,
            ops: Some(ops),
        };
        let l = bandwidth_limiter(10.0, Some(base));
        assert_eq!(l.bandwidth.unwrap().size, 1024 * 1024);
        assert_eq!(l.bandwidth.unwrap().refill_time, 100);
        assert_eq!(l.ops, Some(ops));
        assert_eq!(bandwidth_limiter(0.0, None).bandwidth.unwrap().size, 1);
    }

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: std::env::current_exe().unwrap(),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            rate_limiter: None,
            cache_type: CacheType::default(),
            io_engine: IoEngine::default(),
            socket: None,
        }
    }

    #[test]
    fn drive_rules_each_have_their_message() {
        assert!(validate_drives(&[drive("rootfs", true), drive("data_1", false)]).is_ok());
        let e = validate_drives(&[drive("a", true), drive("b", true)]).unwrap_err();
        assert_eq!(e.path.to_string(), "drives[1].is_root_device");
        let e = validate_drives(&[drive("a", false), drive("a", false)]).unwrap_err();
        assert!(e.message.contains("used twice"));
        let e = validate_drives(&[drive("bad/id", false)]).unwrap_err();
        assert_eq!(e.path.to_string(), "drives[0].drive_id");
        let mut d = drive("x", false);
        d.path_on_host = "/nonexistent.img".into();
        assert_eq!(
            validate_drives(&[d]).unwrap_err().path.to_string(),
            "drives[0].path_on_host"
        );
        let mut d = drive("x", false);
        d.partuuid = Some("1234".into());
        assert!(validate_drives(&[d]).is_err());
        let mut d = drive("x", false);
        d.rate_limiter =
            serde_json::from_str(r#"{"ops": {"size": 0, "refill_time": 10}}"#).unwrap();
        assert_eq!(
            validate_drives(&[d]).unwrap_err().path.to_string(),
            "drives[0].rate_limiter"
        );
    }

    #[test]
    fn a_vhost_user_drive_takes_no_file_fields_and_a_file_drive_needs_its_file() {
        let mut d = drive("vu", false);
        d.socket = Some("/run/vu.sock".into());
        // path_on_host given as well: Firecracker refuses the pair too.
        let e = validate_drives(std::slice::from_ref(&d)).unwrap_err();
        assert_eq!(e.path.to_string(), "drives[0].path_on_host");
        d.path_on_host = PathBuf::new();
        // No backend is asked here: the checks are structural (PUT asks it, `probe_backend`).
        assert!(validate_drives(std::slice::from_ref(&d)).is_ok());
        d.is_read_only = true;
        let e = validate_drives(std::slice::from_ref(&d)).unwrap_err();
        assert_eq!(e.path.to_string(), "drives[0].is_read_only");
        d.is_read_only = false;
        d.io_engine = IoEngine::Async;
        let e = validate_drives(std::slice::from_ref(&d)).unwrap_err();
        assert_eq!(e.path.to_string(), "drives[0].io_engine");
        let e = d.probe_backend(0).unwrap_err();
        assert_eq!(e.path.to_string(), "drives[0].socket");
        assert!(e.message.contains("/run/vu.sock"), "{}", e.message);
        let mut f = drive("file", false);
        f.path_on_host = PathBuf::new();
        let e = validate_drives(&[f]).unwrap_err();
        assert!(e.message.contains("socket"), "{}", e.message);
        // Read back as Firecracker writes it: no path_on_host for a vhost-user drive.
        d.io_engine = IoEngine::Sync;
        let json = serde_json::to_value(&d).unwrap();
        for absent in ["path_on_host", "is_read_only", "io_engine"] {
            assert!(json.get(absent).is_none(), "{json}");
        }
        assert_eq!(serde_json::from_value::<DriveConfig>(json).unwrap(), d);
        let file = serde_json::to_value(drive("f", false)).unwrap();
        assert_eq!(file["is_read_only"], false);
        assert_eq!(file["io_engine"], "Sync");
    }
}
