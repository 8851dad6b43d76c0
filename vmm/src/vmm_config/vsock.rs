//! `vsock`: the virtio-vsock device, Firecracker's fields.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::drives::validate_id;
use super::{ConfigError, JsonPath};

/// Longest `uds_path` a Unix socket address holds (`sun_path` less its NUL).
const MAX_UDS_PATH: usize = 107;

/// The vsock section (and `PUT /vsock` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Firecracker's (deprecated) device id; accepted and checked, not otherwise used (nor
    /// shown, as in Firecracker).
    #[serde(default, skip_serializing)]
    pub vsock_id: Option<String>,
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// Where the VMM listens for host-initiated connections; guest-initiated ones to port P go
    /// to `<uds_path>_<P>`. Must not exist when the VM starts.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    pub fn uds_path_field() -> JsonPath {
        JsonPath::keys(&["vsock", "uds_path"])
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.vsock_id {
            validate_id(JsonPath::keys(&["vsock", "vsock_id"]), id)?;
        }
        devices::virtio::vsock::validate_cid(self.guest_cid).map_err(|e| {
            ConfigError::new(JsonPath::keys(&["vsock", "guest_cid"]), e.to_string())
        })?;
        let path = &self.uds_path;
        let len = path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH {
            return Err(ConfigError::new(
                Self::uds_path_field(),
                format!("must be 1 to {MAX_UDS_PATH} bytes, got {len}"),
            ));
        }
        match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => Err(ConfigError::new(
                Self::uds_path_field(),
                format!("directory {} does not exist", dir.display()),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vsock(cid: u64, path: &str) -> VsockConfig {
        VsockConfig {
            vsock_id: Some("vsock0".into()),
            guest_cid: cid,
            uds_path: path.into(),
        }
    }

    #[test]
    fn fields_are_checked_with_their_paths() {
        assert!(vsock(3, "/tmp/v.sock").validate().is_ok());
        let e = vsock(2, "/tmp/v.sock").validate().unwrap_err();
        assert_eq!(e.path.to_string(), "vsock.guest_cid");
        let e = vsock(3, "").validate().unwrap_err();
        assert_eq!(e.path.to_string(), "vsock.uds_path");
        let long = format!("/tmp/{}", "x".repeat(120));
        assert!(vsock(3, &long).validate().is_err());
        let e = vsock(3, "/nonexistent-dir/v.sock").validate().unwrap_err();
        assert!(e.message.contains("does not exist"), "{}", e.message);
        let mut bad_id = vsock(3, "/tmp/v.sock");
        bad_id.vsock_id = Some("a b".into());
        let e = bad_id.validate().unwrap_err();
        assert_eq!(e.path.to_string(), "vsock.vsock_id");
    }
}
