//! `cpu-config` (`PUT /cpu-config`): Firecracker's custom CPU template for x86_64 — KVM
//! capabilities the VM needs, and bit modifiers for CPUID leaves and MSRs — and the static
//! template names of `machine-config.cpu_template`.

use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath};

/// `machine-config.cpu_template` (deprecated in Firecracker); `static_cpu_templates` gives each
/// its custom form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// A custom CPU template (the x86_64 fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities as numbers; `"!N"` takes one off the list of those required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    pub leaf: String,
    pub subleaf: String,
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    pub register: CpuidRegister,
    pub bitmap: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    pub addr: String,
    pub bitmap: String,
}

/// Bits to set and bits to keep: `value & !mask | bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitFilter {
    /// Bits the template decides.
    pub mask: u64,
    /// Their values.
    pub bits: u64,
}

impl BitFilter {
    pub fn apply(self, value: u64) -> u64 {
        value & !self.mask | self.bits
    }

    /// The `0b` bitmap `parse_bitmap` reads back, `width` digits.
    pub fn to_bitmap(self, width: usize) -> String {
        let digits: String = (0..width)
            .rev()
            .map(|i| match (self.mask >> i & 1, self.bits >> i & 1) {
                (0, _) => 'x',
                (_, 0) => '0',
                _ => '1',
            })
            .collect();
        format!("0b{digits}")
    }
}

fn field(name: &'static str) -> JsonPath {
    JsonPath::keys(&["cpu-config", name])
}

/// A number written in hex (`0x`), binary (`0b`) or decimal.
pub fn parse_number(text: &str) -> Option<u64> {
    let t = text.trim();
    if let Some(h) = t.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else if let Some(b) = t.strip_prefix("0b") {
        u64::from_str_radix(&b.replace('_', ""), 2).ok()
    } else {
        t.parse().ok()
    }
}

/// `0b` followed by `width` of `0`, `1` and `x` (don't care), underscores ignored.
pub fn parse_bitmap(text: &str, width: usize) -> Option<BitFilter> {
    let body: String = text
        .strip_prefix("0b")?
        .chars()
        .filter(|c| *c != '_')
        .collect();
    if body.len() != width {
        return None;
    }
    let mut f = BitFilter { mask: 0, bits: 0 };
    for (i, c) in body.chars().rev().enumerate() {
        match c {
            '0' => f.mask |= 1 << i,
            '1' => {
                f.mask |= 1 << i;
                f.bits |= 1 << i;
            }
            'x' => {}
            _ => return None,
        }
    }
    Some(f)
}

impl CpuConfig {
    /// Checks every number and bitmap; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for cap in &self.kvm_capabilities {
            if cap.trim_start_matches('!').parse::<u32>().is_err() {
                return Err(ConfigError::new(
                    field("kvm_capabilities"),
                    format!("{cap:?} is not a KVM capability number (\"N\" or \"!N\")"),
                ));
            }
        }
        for m in &self.cpuid_modifiers {
            for n in [&m.leaf, &m.subleaf] {
                if parse_number(n).is_none_or(|v| v > u64::from(u32::MAX)) {
                    return Err(ConfigError::new(
                        field("cpuid_modifiers"),
                        format!("{n:?} is not a 32-bit leaf or subleaf"),
                    ));
                }
            }
            for r in &m.modifiers {
                if parse_bitmap(&r.bitmap, 32).is_none() {
                    return Err(ConfigError::new(
                        field("cpuid_modifiers"),
                        format!("{:?} is not \"0b\" and 32 of 0, 1 or x", r.bitmap),
                    ));
                }
            }
        }
        for m in &self.msr_modifiers {
            if parse_number(&m.addr).is_none_or(|v| v > u64::from(u32::MAX)) {
                return Err(ConfigError::new(
                    field("msr_modifiers"),
                    format!("{:?} is not a 32-bit MSR address", m.addr),
                ));
            }
            if parse_bitmap(&m.bitmap, 64).is_none() {
                return Err(ConfigError::new(
                    field("msr_modifiers"),
                    format!("{:?} is not \"0b\" and 64 of 0, 1 or x", m.bitmap),
                ));
            }
        }
        Ok(())
    }

    /// The capabilities the template adds to those the VM needs.
    pub fn required_capabilities(&self) -> impl Iterator<Item = u32> + '_ {
        self.kvm_capabilities
            .iter()
            .filter(|c| !c.starts_with('!'))
            .filter_map(|c| c.parse().ok())
    }

    /// The CPUID modifiers as (leaf, subleaf, KVM flags, register, filter).
    pub fn cpuid_filters(&self) -> Vec<(u32, u32, u32, CpuidRegister, BitFilter)> {
        let mut out = Vec::new();
        for m in &self.cpuid_modifiers {
            let (Some(leaf), Some(subleaf)) = (parse_number(&m.leaf), parse_number(&m.subleaf))
            else {
                continue;
            };
            for r in &m.modifiers {
                if let Some(f) = parse_bitmap(&r.bitmap, 32) {
                    out.push((leaf as u32, subleaf as u32, m.flags, r.register, f));
                }
            }
        }
        out
    }

    /// The MSR modifiers as (address, filter).
    pub fn msr_filters(&self) -> Vec<(u32, BitFilter)> {
        self.msr_modifiers
            .iter()
            .filter_map(|m| Some((parse_number(&m.addr)? as u32, parse_bitmap(&m.bitmap, 64)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_bitmaps_and_templates() {
        assert_eq!(parse_number("0x10a"), Some(0x10a));
        assert_eq!(parse_number("0b101"), Some(5));
        assert_eq!(parse_number("266"), Some(266));
        assert_eq!(parse_number("x"), None);
        let f = parse_bitmap(&format!("0b{}10x1", "x".repeat(28)), 32).unwrap();
        assert_eq!((f.mask, f.bits), (0b1101, 0b1001));
        assert_eq!(f.apply(0b0110), 0b1011);
        assert!(parse_bitmap("0b101", 32).is_none());
        let c: CpuConfig = serde_json::from_value(serde_json::json!({
            "kvm_capabilities": ["121", "!55"],
            "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": format!("0b{}", "x".repeat(31) + "0")}]}],
            "msr_modifiers": [{"addr": "0x10a", "bitmap": format!("0b{}", "0".repeat(64))}]
        }))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.required_capabilities().collect::<Vec<_>>(), vec![121]);
        assert_eq!(c.cpuid_filters()[0].0, 1);
        assert_eq!(c.msr_filters()[0].0, 0x10a);
        let bad: CpuConfig =
            serde_json::from_value(serde_json::json!({"kvm_capabilities": ["abc"]})).unwrap();
        assert!(bad.validate().is_err());
        assert!(
            serde_json::from_value::<CpuConfig>(serde_json::json!({"reg_modifiers": []})).is_err()
        );
        assert_eq!(f.to_bitmap(32), format!("0b{}10x1", "x".repeat(28)));
        assert_eq!(parse_bitmap(&f.to_bitmap(32), 32), Some(f));
    }
}
