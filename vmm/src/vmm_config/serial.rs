//! `serial`: where the guest's console goes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath};

/// Firecracker's serial section: with no `serial_out_path` the console goes to stdout.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Console bytes past this bucket's rate are dropped (and counted), as in Firecracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<devices::rate_limiter::TokenBucketConfig>,
}

impl SerialConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(bucket) = &self.rate_limiter {
            devices::rate_limiter::DropBucket::new(bucket).map_err(|e| {
                ConfigError::new(JsonPath::keys(&["serial", "rate_limiter"]), e.to_string())
            })?;
        }
        let Some(path) = &self.serial_out_path else {
            return Ok(());
        };
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        match parent {
            Some(dir) if !dir.is_dir() => Err(ConfigError::new(
                JsonPath::keys(&["serial", "serial_out_path"]),
                format!("directory {} does not exist", dir.display()),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_directory_must_exist() {
        let ok = SerialConfig {
            serial_out_path: Some(std::env::temp_dir().join("console.log")),
            rate_limiter: None,
        };
        assert!(ok.validate().is_ok());
        let bad = SerialConfig {
            rate_limiter: None,
            serial_out_path: Some(PathBuf::from("/nonexistent-dir/console.log")),
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("serial.serial_out_path: directory /nonexistent-dir does not exist"));
    }
}
