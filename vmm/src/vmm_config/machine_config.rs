//! `machine-config`: vCPUs, memory and the pages behind it.

use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath};

/// Bounded by the MP table, which must fit in the EBDA.
pub const MAX_VCPUS: u8 = crate::arch::x86_64::mptable::MAX_CPUS;

/// The host pages behind guest memory: Firecracker's `huge_pages` field, with its values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// The host's default pages (4 KiB unless the host's THP setting is `always`): the host pays
    /// for exactly the pages the guest touched, at one fault per 4 KiB page.
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`): a guest's first touch of memory costs
    /// one fault per 2 MiB instead of per 4 KiB. Once the guest idles, prescient gives back the
    /// zero pages of the huge pages it hardly uses ([`crate::idle_trim`]). The default (unlike
    /// Firecracker's `None`): first-touch speed of huge pages, idle footprint of 4 KiB pages;
    /// the measurements behind the choice are in docs/memory.md.
    #[default]
    Transparent,
    /// 2 MiB pages from the host's hugetlbfs pool (`MAP_HUGETLB`), reserved by the host admin
    /// beforehand (`vm.nr_hugepages`); taken from the pool as the guest touches memory.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl std::fmt::Display for HugePages {
    /// The spec's spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Transparent => "Transparent",
            Self::Hugetlbfs2M => "2M",
        })
    }
}

impl HugePages {
    /// Bytes of one host page of guest memory.
    pub fn page_bytes(self) -> u64 {
        match self {
            Self::None => 4 << 10,
            Self::Transparent | Self::Hugetlbfs2M => 2 << 20,
        }
    }
}

/// vCPU count, memory size, SMT and huge pages, with Firecracker's field names and defaults, and
/// two prescient extensions: `max_vcpus` (how many vCPUs the VM can be given while it runs;
/// `vcpu_count` stays the boot count, as in Firecracker), `acpi` (whether the guest is
/// described by ACPI tables, or by an MP table and `virtio_mmio.device=` command-line entries)
/// and `acpi_only` (the ACPI tables without the other two).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    /// KVM logs the pages the guest writes, so that `Diff` snapshots hold only those
    /// (Firecracker's field; costs the guest a little on every first write after a snapshot).
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// The most vCPUs the VM can have plugged at once (default: `vcpu_count`, no hot-plug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u8>,
    /// ACPI tables (default); `false` boots guests built without ACPI (or with `acpi=off`).
    #[serde(default = "acpi_default", skip_serializing_if = "is_default_acpi")]
    pub acpi: bool,
    /// The ACPI tables alone: no MP table and no `virtio_mmio.device=` entries beside them (by
    /// default both are given as well, as Firecracker does, for kernels built without ACPI). For
    /// kernels that have ACPI, whose command line then names no device; needs `acpi`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acpi_only: bool,
    /// Firecracker's static CPU template (deprecated there); checked against the host's CPU
    /// vendor at start.
    #[serde(default, skip_serializing_if = "no_template")]
    pub cpu_template: Option<super::CpuTemplate>,
}

/// `None` and `"None"` both mean no template; neither is shown (as in Firecracker).
fn no_template(t: &Option<super::CpuTemplate>) -> bool {
    matches!(t, None | Some(super::CpuTemplate::None))
}

fn acpi_default() -> bool {
    true
}

fn is_default_acpi(acpi: &bool) -> bool {
    *acpi
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            max_vcpus: None,
            acpi: acpi_default(),
            acpi_only: false,
            huge_pages: HugePages::default(),
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpu_count) {
            return Err(ConfigError::new(
                Self::vcpu_count_path(),
                format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpu_count),
            ));
        }
        if let Some(max) = self.max_vcpus {
            let at = JsonPath::keys(&["machine-config", "max_vcpus"]);
            if !(self.vcpu_count..=MAX_VCPUS).contains(&max) {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "must be between vcpu_count ({}) and {MAX_VCPUS}, got {max}",
                        self.vcpu_count
                    ),
                ));
            }
            if max > self.vcpu_count && !self.acpi {
                return Err(ConfigError::new(
                    at,
                    "plugging vCPUs needs ACPI (the guest learns of them through it); acpi is false",
                ));
            }
            if max > self.vcpu_count && self.smt {
                return Err(ConfigError::new(
                    at,
                    "vCPUs are plugged one at a time, not as SMT sibling pairs; smt must be false",
                ));
            }
        }
        if self.acpi_only && !self.acpi {
            return Err(ConfigError::new(
                JsonPath::keys(&["machine-config", "acpi_only"]),
                "the ACPI tables alone need ACPI; acpi is false",
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
        // A partial hugetlbfs page at the end could not be mapped. (Firecracker asks the same of
        // `Transparent`; here the last partial 2 MiB simply gets 4 KiB pages, so a Firecracker
        // spec with an odd size still boots under the default.)
        if self.huge_pages == HugePages::Hugetlbfs2M && !self.mem_size_mib.is_multiple_of(2) {
            return Err(ConfigError::new(
                Self::mem_path(),
                format!(
                    "with huge_pages {} the memory size must be a multiple of 2 MiB, got {}",
                    self.huge_pages, self.mem_size_mib
                ),
            ));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::new(
                Self::vcpu_count_path(),
                format!(
                    "with smt enabled the vCPU count must be 1 or even, got {}",
                    self.vcpu_count
                ),
            ));
        }
        Ok(())
    }

    /// The most vCPUs the VM may have plugged at once.
    pub fn max_vcpus(&self) -> u8 {
        self.max_vcpus
            .unwrap_or(self.vcpu_count)
            .max(self.vcpu_count)
    }

    pub fn vcpu_count_path() -> JsonPath {
        JsonPath::keys(&["machine-config", "vcpu_count"])
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
            huge_pages: HugePages::None,
            ..MachineConfig::default()
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

    #[test]
    fn max_vcpus_bounds_hot_plug_and_needs_acpi() {
        let with_max = |count, max, acpi, smt| MachineConfig {
            max_vcpus: Some(max),
            acpi,
            ..mc(count, 128, smt)
        };
        assert_eq!(mc(2, 128, false).max_vcpus(), 2);
        let ok = with_max(1, 4, true, false);
        ok.validate().unwrap();
        assert_eq!(ok.max_vcpus(), 4);
        let e = with_max(3, 2, true, false).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "machine-config.max_vcpus: must be between vcpu_count (3) and 32, got 2"
        );
        assert!(with_max(1, 33, true, false).validate().is_err());
        let e = with_max(1, 2, false, false).validate().unwrap_err();
        assert!(e.message.contains("needs ACPI"), "{e}");
        assert!(with_max(2, 4, true, true)
            .validate()
            .unwrap_err()
            .message
            .contains("smt"));
        // No hot-plug asked for: fine without ACPI.
        with_max(2, 2, false, false).validate().unwrap();
        // Firecracker's field set reads and writes as before; the extensions only when set.
        let fc: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
        assert!(fc.acpi && fc.max_vcpus.is_none());
        assert_eq!(
            serde_json::to_value(&fc).unwrap(),
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false, "huge_pages": "Transparent"})
        );
        let ext = serde_json::to_value(with_max(1, 4, true, false)).unwrap();
        assert_eq!(ext["max_vcpus"], 4);
        let off = serde_json::to_value(MachineConfig {
            acpi: false,
            ..mc(1, 128, false)
        })
        .unwrap();
        assert_eq!(off["acpi"], false);
        assert!(off.get("acpi_only").is_none());
    }

    #[test]
    fn acpi_only_needs_acpi() {
        let only: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 128, "acpi_only": true}"#)
                .unwrap();
        only.validate().unwrap();
        assert_eq!(serde_json::to_value(&only).unwrap()["acpi_only"], true);
        let err = MachineConfig {
            acpi: false,
            ..only
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("machine-config.acpi_only") && err.contains("acpi is false"),
            "{err}"
        );
    }

    #[test]
    fn huge_pages_take_firecrackers_values_and_need_whole_2_mib_pages() {
        let parse = |v: &str| {
            serde_json::from_str::<MachineConfig>(&format!(
                r#"{{"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": {v}}}"#
            ))
        };
        assert_eq!(parse(r#""None""#).unwrap().huge_pages, HugePages::None);
        let thp = parse(r#""Transparent""#).unwrap();
        assert_eq!(thp.huge_pages, HugePages::Transparent);
        assert!(
            thp.validate().is_ok(),
            "the last partial 2 MiB gets small pages"
        );
        let hugetlb = parse(r#""2M""#).unwrap();
        assert_eq!(hugetlb.huge_pages, HugePages::Hugetlbfs2M);
        let e = hugetlb.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "machine-config.mem_size_mib: with huge_pages 2M the memory size must be a multiple of 2 MiB, got 129"
        );
        assert!(parse(r#""1G""#).is_err());
        let default: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 129}"#).unwrap();
        assert_eq!(default.huge_pages, HugePages::Transparent);
        assert!(default.validate().is_ok());
        assert_eq!(
            serde_json::to_value(&hugetlb).unwrap()["huge_pages"],
            serde_json::json!("2M")
        );
    }
}
