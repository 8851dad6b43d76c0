//! `memory-hotplug`: the virtio-mem region, with Firecracker's fields (and bodies of
//! `/hotplug/memory`).

use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath};

/// Largest hotplug region: 1 TiB.
pub const MAX_TOTAL_SIZE_MIB: u64 = 1 << 20;

/// The memory-hotplug section and `PUT /hotplug/memory` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// Size of the hotplug region, MiB.
    pub total_size_mib: u64,
    /// What the guest plugs at a time, MiB (a power of two, at least 2).
    #[serde(default = "default_block_size_mib")]
    pub block_size_mib: u64,
    /// What the host maps at a time (one KVM memory slot), MiB; a multiple of the block size.
    #[serde(default = "default_slot_size_mib")]
    pub slot_size_mib: u64,
}

fn default_block_size_mib() -> u64 {
    2
}

fn default_slot_size_mib() -> u64 {
    128
}

/// `PATCH /hotplug/memory` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    pub requested_size_mib: u64,
}

/// `GET /hotplug/memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHotplugStatus {
    pub total_size_mib: u64,
    pub block_size_mib: u64,
    pub slot_size_mib: u64,
    pub plugged_size_mib: u64,
    pub requested_size_mib: u64,
}

fn field(name: &'static str) -> JsonPath {
    JsonPath::keys(&["memory-hotplug", name])
}

impl MemoryHotplugConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = self.block_size_mib;
        if b < 2 || !b.is_power_of_two() {
            return Err(ConfigError::new(
                field("block_size_mib"),
                format!("must be a power of two of at least 2, got {b}"),
            ));
        }
        if self.slot_size_mib == 0 || !self.slot_size_mib.is_multiple_of(b) {
            return Err(ConfigError::new(
                field("slot_size_mib"),
                format!(
                    "must be a non-zero multiple of block_size_mib ({b}), got {}",
                    self.slot_size_mib
                ),
            ));
        }
        let t = self.total_size_mib;
        if t == 0 || t > MAX_TOTAL_SIZE_MIB || !t.is_multiple_of(self.slot_size_mib) {
            return Err(ConfigError::new(
                field("total_size_mib"),
                format!(
                    "must be a multiple of slot_size_mib ({}) between it and {MAX_TOTAL_SIZE_MIB}, got {t}",
                    self.slot_size_mib
                ),
            ));
        }
        Ok(())
    }

    /// Checks a requested size against the region.
    pub fn validate_request(&self, requested_mib: u64) -> Result<(), ConfigError> {
        if requested_mib > self.total_size_mib || !requested_mib.is_multiple_of(self.block_size_mib)
        {
            return Err(ConfigError::new(
                JsonPath::keys(&["requested_size_mib"]),
                format!(
                    "must be a multiple of block_size_mib ({}) no larger than total_size_mib ({}), got {requested_mib}",
                    self.block_size_mib, self.total_size_mib
                ),
            ));
        }
        Ok(())
    }

    pub fn total_path() -> JsonPath {
        field("total_size_mib")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(total: u64, block: u64, slot: u64) -> MemoryHotplugConfig {
        MemoryHotplugConfig {
            total_size_mib: total,
            block_size_mib: block,
            slot_size_mib: slot,
        }
    }

    #[test]
    fn defaults_follow_firecracker_and_bad_geometry_names_its_field() {
        let c: MemoryHotplugConfig = serde_json::from_str(r#"{"total_size_mib": 1024}"#).unwrap();
        assert_eq!(c, config(1024, 2, 128));
        c.validate().unwrap();
        let field_of = |c: MemoryHotplugConfig| c.validate().unwrap_err().path.to_string();
        assert_eq!(
            field_of(config(1024, 3, 129)),
            "memory-hotplug.block_size_mib"
        );
        assert_eq!(
            field_of(config(1024, 1, 128)),
            "memory-hotplug.block_size_mib"
        );
        assert_eq!(
            field_of(config(1024, 2, 127)),
            "memory-hotplug.slot_size_mib"
        );
        assert_eq!(
            field_of(config(1000, 2, 128)),
            "memory-hotplug.total_size_mib"
        );
        assert_eq!(field_of(config(0, 2, 128)), "memory-hotplug.total_size_mib");
        assert_eq!(
            field_of(config(2 << 20, 2, 128)),
            "memory-hotplug.total_size_mib"
        );
        c.validate_request(512).unwrap();
        assert!(c.validate_request(513).is_err());
        assert!(c.validate_request(2048).is_err());
    }
}
