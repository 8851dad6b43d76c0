//! `drives[]`: virtio-blk disks, Firecracker's fields.

use std::collections::HashSet;
use std::path::PathBuf;

use devices::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
use serde::{Deserialize, Serialize};

use super::{check_file, ConfigError, JsonPath, Segment};

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// With `is_root_device`: boot from this partition (`root=PARTUUID=...`) instead of /dev/vda.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Firecracker's `cache_type`; left out, prescient flushes to the disk (`Writeback`, where
    /// Firecracker's default is `Unsafe`).
    #[serde(default)]
    pub cache_type: CacheType,
    /// Firecracker's `io_engine`: `Async` serves the drive through io_uring.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Firecracker's vhost-user-block socket: refused (prescient has no vhost-user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
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
        check_file(field(index, "path_on_host"), &self.path_on_host)?;
        if self.partuuid.is_some() && !self.is_root_device {
            return Err(ConfigError::new(
                field(index, "partuuid"),
                "only the root device can name a partition",
            ));
        }
        if self.socket.is_some() {
            return Err(ConfigError::new(
                field(index, "socket"),
                "vhost-user-block drives are not supported by prescient; give path_on_host",
            ));
        }
        validate_rate_limiter(field(index, "rate_limiter"), &self.rate_limiter)
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
}
