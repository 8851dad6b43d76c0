//! The block and network actuators: an allocation in MiB/s, split evenly over the VM's drives
//! (or interfaces), becomes each device's bandwidth bucket; the ops bucket each was configured
//! with stays.

use devices::rate_limiter::RateLimiterConfig;
use predictor::resource::Resource;

use super::{Actuator, ActuatorError, Context, Knob, Target};
use crate::live::{self, LiveChange};
use crate::vmm_config::{bandwidth_limiter, VmConfig};

/// The rate-limited devices of one resource, with the limiters they were configured with.
pub struct Bandwidth {
    resource: Resource,
    devices: Vec<(String, Option<RateLimiterConfig>)>,
}

impl Bandwidth {
    /// The VM's drives (`Resource::Blk`) or interfaces (`Resource::Net`); None when it has none.
    pub fn of(resource: Resource, config: &VmConfig) -> Option<Self> {
        let devices: Vec<_> = match resource {
            Resource::Blk => config
                .drives
                .iter()
                .map(|d| (d.drive_id.clone(), d.rate_limiter))
                .collect(),
            // rx and tx get the same size; the transmit side's ops bucket is kept.
            Resource::Net => config
                .network_interfaces
                .iter()
                .map(|n| (n.iface_id.clone(), n.tx_rate_limiter))
                .collect(),
            Resource::Cpu | Resource::Mem => Vec::new(),
        };
        (!devices.is_empty()).then_some(Self { resource, devices })
    }

    fn change(&self, id: &str, limiter: RateLimiterConfig) -> LiveChange {
        match self.resource {
            Resource::Net => LiveChange::NetRateLimiters {
                iface_id: id.to_string(),
                rx: Some(limiter),
                tx: Some(limiter),
            },
            _ => LiveChange::DriveRateLimiter {
                drive_id: id.to_string(),
                limiter,
            },
        }
    }
}

impl Actuator for Bandwidth {
    fn knob(&self) -> Knob {
        Knob::Resource(self.resource)
    }

    fn describe(&self) -> String {
        let ids: Vec<&str> = self.devices.iter().map(|(id, _)| id.as_str()).collect();
        format!("bandwidth buckets of {}", ids.join(", "))
    }

    fn apply(&mut self, target: Target, ctx: &mut Context) -> Result<String, ActuatorError> {
        let total = match target {
            Target::Allocation(r, mibps) if r == self.resource => mibps,
            _ => {
                return Err(ActuatorError::WrongTarget {
                    knob: self.resource.name(),
                    target,
                })
            }
        };
        let each = total / self.devices.len() as f64;
        let mut errors = Vec::new();
        for (id, base) in &self.devices {
            let change = self.change(id, bandwidth_limiter(each, *base));
            if let Err(e) = live::apply(Some(&mut *ctx.vm), ctx.config, &change) {
                errors.push(format!("{id}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(format!(
                "{total:.0} MiB/s over {} device(s)",
                self.devices.len()
            ))
        } else {
            Err(ActuatorError::Refused(errors.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_actuator_per_resource_with_devices() {
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "boot-source": {"kernel_image_path": "/k"},
            "drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
                       {"drive_id": "b", "path_on_host": "/b", "is_root_device": false}],
        }))
        .unwrap();
        let blk = Bandwidth::of(Resource::Blk, &config).unwrap();
        assert_eq!(blk.knob(), Knob::Resource(Resource::Blk));
        assert_eq!(blk.describe(), "bandwidth buckets of a, b");
        assert!(Bandwidth::of(Resource::Net, &config).is_none());
        assert!(Bandwidth::of(Resource::Cpu, &config).is_none());
        assert_eq!(
            blk.change("b", RateLimiterConfig::default()),
            LiveChange::DriveRateLimiter {
                drive_id: "b".into(),
                limiter: RateLimiterConfig::default()
            }
        );
    }
}
