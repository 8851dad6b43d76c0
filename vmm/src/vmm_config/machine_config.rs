//! `machine-config`: vCPUs and memory.

use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath};

/// Bounded by the MP table, which must fit in the EBDA.
pub const MAX_VCPUS: u8 = crate::arch::x86_64::mptable::MAX_CPUS;

/// vCPU count, memory size and SMT, with Firecracker's field names and defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    /// Firecracker's static CPU template (deprecated there); checked against the host's CPU
    /// vendor at start.
    #[serde(default, skip_serializing_if = "no_template")]
    pub cpu_template: Option<super::CpuTemplate>,
}

/// `None` and `"None"` both mean no template; neither is shown (as in Firecracker).
fn no_template(t: &Option<super::CpuTemplate>) -> bool {
    matches!(t, None | Some(super::CpuTemplate::None))
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpu_count) {
            return Err(ConfigError::new(
                JsonPath::keys(&["machine-config", "vcpu_count"]),
                format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpu_count),
            ));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::new(
                Self::mem_path(),
                "must be at least 1 MiB, got 0",
            ));
        }
        if self.mem_size_mib.checked_mul(1 << 20).is_none() {
            return Err(ConfigError::new(
                Self::mem_path(),
                format!(
                    "{} MiB does not fit in a 64-bit address space",
                    self.mem_size_mib
                ),
            ));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::new(
                JsonPath::keys(&["machine-config", "vcpu_count"]),
                format!(
                    "with smt enabled the vCPU count must be 1 or even, got {}",
                    self.vcpu_count
                ),
            ));
        }
        Ok(())
    }

    /// Where memory errors found while building the VM point.
    pub fn mem_path() -> JsonPath {
        JsonPath::keys(&["machine-config", "mem_size_mib"])
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_size_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mc(vcpu_count: u8, mem_size_mib: u64, smt: bool) -> MachineConfig {
        MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt,
            cpu_template: None,
        }
    }

    #[test]
    fn bounds_are_enforced_with_their_own_messages() {
        assert!(mc(1, 1, false).validate().is_ok());
        assert!(mc(32, 128, false).validate().is_ok());
        let e = mc(33, 128, false).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "machine-config.vcpu_count: must be between 1 and 32, got 33"
        );
        let e = mc(1, 0, false).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "machine-config.mem_size_mib: must be at least 1 MiB, got 0"
        );
        assert!(mc(1, u64::MAX, false)
            .validate()
            .unwrap_err()
            .message
            .contains("64-bit"));
        assert!(mc(3, 128, true).validate().is_err());
        assert!(mc(4, 128, true).validate().is_ok());
    }
}
