//! One window's observation in the form the policy, the scores and trace files share.

use crate::resource::{Resource, Usage};
use serde::{Deserialize, Serialize};

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What a window saw besides resource use: the anomaly rules' inputs and the leading
/// indicators forecasters may use. Every field defaults to zero so traces that only carry
/// usage (synthetic ones, or ones recorded without exit telemetry) still parse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Completed virtio requests plus port and MMIO exits that reached a known device.
    #[serde(default)]
    pub io_ops: u64,
    /// Port or MMIO exits whose address belongs to no device.
    #[serde(default)]
    pub unknown_exits: u64,
    /// Bit `i` set when device `i` saw any I/O during the window.
    #[serde(default)]
    pub devices: u32,
    /// Bit `i` set when device `i`, the console or a platform device, saw any I/O during the
    /// window: kept apart from `devices`, whose first use after learning is a finding.
    /// Written only when non-zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub platform_devices: u32,
    /// Leading indicator: page faults during the window (the guest's, as KVM counted them, or
    /// a recorded process tree's minor + major faults); a burst comes with memory growth.
    /// Written only when non-zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub faults: u64,
    /// Leading indicator: vCPU exits during the window (VM traces only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exits: u64,
    /// CFS periods of the window in which the VM's CPU quota ran out: its vCPUs wanted more
    /// than they got, so the window's CPU use is a lower bound of its demand, not the demand.
    /// Written only when non-zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cpu_throttled: u64,
    /// Every vCPU wanted a CPU the whole window (none halted): the window's CPU use is what the
    /// vCPUs online and the host allowed, a lower bound of its demand. Written only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpu_saturated: bool,
    /// Times during the window a block device's rate limiter made its queue wait: the
    /// bandwidth bucket (or an ops bucket) ran dry, so the window's block use is a lower bound
    /// of its demand. Written only when non-zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blk_throttled: u64,
    /// The same for the network interfaces' limiters.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub net_throttled: u64,
}

impl Signals {
    /// Whether the actuator's limit on `r` held the guest back during the window (the CPU
    /// quota ran out, a device's rate limiter made a queue wait): its use is then a floor of
    /// its demand.
    pub fn throttled(&self, r: Resource) -> bool {
        match r {
            Resource::Cpu => self.cpu_throttled > 0 || self.cpu_saturated,
            Resource::Mem => false,
            Resource::Blk => self.blk_throttled > 0,
            Resource::Net => self.net_throttled > 0,
        }
    }
}

/// One window: when it started, how much of each resource was used, and the rule signals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_ms: u64,
    #[serde(flatten)]
    pub usage: Usage,
    #[serde(flatten)]
    pub signals: Signals,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_only_line_parses_with_zero_signals() {
        let s: Sample =
            serde_json::from_str(r#"{"t_ms":100,"cpu":1.0,"mem":512.0,"blk":2.5,"net":0.5}"#)
                .unwrap();
        assert_eq!(s.t_ms, 100);
        assert_eq!(s.usage.mem, 512.0);
        assert_eq!(s.signals, Signals::default());
    }

    #[test]
    fn round_trips_flat() {
        let s = Sample {
            t_ms: 7,
            usage: Usage {
                cpu: 0.25,
                mem: 1.0,
                blk: 2.0,
                net: 3.0,
            },
            signals: Signals {
                io_ops: 4,
                unknown_exits: 1,
                devices: 0b101,
                platform_devices: 0b10,
                faults: 12,
                exits: 0,
                cpu_throttled: 3,
                cpu_saturated: false,
                blk_throttled: 0,
                net_throttled: 2,
            },
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""unknown_exits":1"#), "{json}");
        assert!(json.contains(r#""cpu_throttled":3"#), "{json}");
        assert!(
            json.contains(r#""net_throttled":2"#) && !json.contains("blk_throttled"),
            "{json}"
        );
        assert!(json.contains(r#""platform_devices":2"#), "{json}");
        assert!(
            json.contains(r#""faults":12"#) && !json.contains(r#""exits""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Sample>(&json).unwrap(), s);
    }
}
