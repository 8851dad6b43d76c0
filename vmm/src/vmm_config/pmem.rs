//! `pmem[]`: virtio-pmem devices (Firecracker's fields): a host file mapped into guest memory.

use std::collections::HashSet;
use std::path::PathBuf;

use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

use super::drives::{validate_id, validate_rate_limiter};
use super::{check_file, ConfigError, DriveConfig, JsonPath, Segment};

/// One device (and the `PUT /pmem/{id}` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    pub id: String,
    pub path_on_host: PathBuf,
    /// Boot from it: `root=/dev/pmem0`.
    #[serde(default)]
    pub root_device: bool,
    /// Mapped read-only (and a read-only KVM slot: guest stores fault).
    #[serde(default)]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /pmem/{id}`: the rate limiter, live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemUpdate {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

fn field(index: usize, name: &'static str) -> JsonPath {
    JsonPath(vec![
        Segment::Key("pmem"),
        Segment::Index(index),
        Segment::Key(name),
    ])
}

/// Checks every device and the rules between them and the drives (one root device in all).
pub fn validate_pmem(pmem: &[PmemConfig], drives: &[DriveConfig]) -> Result<(), ConfigError> {
    let mut ids = HashSet::new();
    let mut root = drives.iter().any(|d| d.is_root_device);
    for (i, p) in pmem.iter().enumerate() {
        validate_id(field(i, "id"), &p.id)?;
        let file = check_file(field(i, "path_on_host"), &p.path_on_host)?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(ConfigError::new(
                field(i, "path_on_host"),
                format!(
                    "{} is empty: a pmem backing file needs a size",
                    p.path_on_host.display()
                ),
            ));
        }
        validate_rate_limiter(field(i, "rate_limiter"), &p.rate_limiter)?;
        if !ids.insert(p.id.as_str()) {
            return Err(ConfigError::new(
                field(i, "id"),
                format!("pmem id {:?} is used twice", p.id),
            ));
        }
        if p.root_device {
            if root {
                return Err(ConfigError::new(
                    field(i, "root_device"),
                    "another drive or pmem device is already the root device",
                ));
            }
            root = true;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pmem(id: &str, root: bool) -> PmemConfig {
        PmemConfig {
            id: id.into(),
            path_on_host: std::env::current_exe().unwrap(),
            root_device: root,
            read_only: true,
            rate_limiter: None,
        }
    }

    #[test]
    fn ids_files_and_one_root_device() {
        assert!(validate_pmem(&[pmem("p0", true), pmem("p1", false)], &[]).is_ok());
        let e = validate_pmem(&[pmem("p0", true), pmem("p1", true)], &[]).unwrap_err();
        assert_eq!(e.path.to_string(), "pmem[1].root_device");
        let e = validate_pmem(&[pmem("p0", false), pmem("p0", false)], &[]).unwrap_err();
        assert!(e.message.contains("used twice"), "{e}");
        let mut missing = pmem("p0", false);
        missing.path_on_host = "/nonexistent".into();
        let e = validate_pmem(&[missing], &[]).unwrap_err();
        assert_eq!(e.path.to_string(), "pmem[0].path_on_host");
        let root_drive: DriveConfig = serde_json::from_value(serde_json::json!({
            "drive_id": "rootfs", "path_on_host": std::env::current_exe().unwrap(), "is_root_device": true
        }))
        .unwrap();
        assert!(validate_pmem(&[pmem("p0", true)], &[root_drive]).is_err());
        assert!(serde_json::from_value::<PmemConfig>(
            serde_json::json!({"id": "p", "path_on_host": "/x", "dax": true})
        )
        .is_err());
    }
}
