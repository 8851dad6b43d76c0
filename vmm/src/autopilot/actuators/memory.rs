//! The memory actuator over the VM's elastic-memory devices: memory above boot RAM comes from
//! virtio-mem blocks, memory below it goes into the balloon, and the guest is never left with
//! less than it uses (its balloon statistics, or its resident memory when it reports nothing).

use devices::virtio::balloon::PAGES_PER_MIB;
use predictor::resource::Resource;

use super::{Actuator, ActuatorError, Context, Knob, Target};
use crate::live::{self, LiveChange};
use crate::vmm_config::VmConfig;

const MIB: u64 = 1 << 20;

/// virtio-mem and/or the balloon of one VM, by their configured geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElasticMemory {
    boot_mib: u64,
    /// The hotplug region's size and block size, MiB.
    hotplug: Option<(u64, u64)>,
    balloon: bool,
}

/// The memory to ask for: the allocation, never below what the guest uses.
pub fn memory_target_mib(allocation_mib: f64, used_mib: f64) -> u64 {
    allocation_mib.max(used_mib).max(0.0).ceil() as u64
}

impl ElasticMemory {
    /// None when the VM has neither device.
    pub fn of(config: &VmConfig) -> Option<Self> {
        let hotplug = config
            .memory_hotplug
            .as_ref()
            .map(|h| (h.total_size_mib, h.block_size_mib));
        let balloon = config.balloon.is_some();
        (hotplug.is_some() || balloon).then_some(Self {
            boot_mib: config.machine_config.mem_size_mib,
            hotplug,
            balloon,
        })
    }

    /// The device settings that give the guest `mib` in total, clamped to what the devices can
    /// give, and that total: whole blocks plugged above boot RAM, the balloon below it.
    fn plan(&self, mib: u64) -> (Vec<LiveChange>, u64) {
        let mib = mib.min(self.boot_mib + self.hotplug.map_or(0, |(size, _)| size));
        let mut changes = Vec::new();
        let mut total = self.boot_mib;
        if let Some((_, block)) = self.hotplug {
            let plug = mib.saturating_sub(self.boot_mib).div_ceil(block) * block;
            changes.push(LiveChange::HotplugRequested { size_mib: plug });
            total += plug;
        }
        if self.balloon {
            // Below boot RAM only the balloon can take memory back; above it, none is ballooned.
            let take = self.boot_mib.saturating_sub(mib);
            changes.push(LiveChange::BalloonTarget {
                amount_mib: u32::try_from(take).unwrap_or(u32::MAX),
            });
            total -= take;
        }
        (changes, total)
    }
}

impl Actuator for ElasticMemory {
    fn knob(&self) -> Knob {
        Knob::Resource(Resource::Mem)
    }

    fn describe(&self) -> String {
        "virtio-mem/balloon".into()
    }

    fn apply(&mut self, target: Target, ctx: &mut Context) -> Result<String, ActuatorError> {
        let Target::Allocation(Resource::Mem, allocation) = target else {
            return Err(ActuatorError::WrongTarget {
                knob: "mem",
                target,
            });
        };
        let now = {
            let plugged = ctx
                .vm
                .hotplug_memory()
                .map_or(0, |m| m.plugged_bytes() / MIB);
            let ballooned = ctx
                .vm
                .balloon()
                .map_or(0, |b| u64::from(b.actual_pages() / PAGES_PER_MIB));
            (self.boot_mib + plugged).saturating_sub(ballooned)
        };
        let wanted = memory_target_mib(allocation, ctx.used_mib);
        if wanted == now {
            return Ok(format!("memory already {wanted} MiB"));
        }
        let (changes, total) = self.plan(wanted);
        for change in &changes {
            live::apply(Some(&mut *ctx.vm), ctx.config, change).map_err(|e| {
                ActuatorError::Refused(format!("the memory device refused {wanted} MiB: {e}"))
            })?;
        }
        Ok(format!(
            "memory {now} -> {total} MiB requested (allocation {allocation:.0} MiB)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(boot_mib: u64, region_mib: u64, block_mib: u64) -> ElasticMemory {
        ElasticMemory {
            boot_mib,
            hotplug: Some((region_mib, block_mib)),
            balloon: true,
        }
    }

    #[test]
    fn growth_plugs_whole_blocks_and_shrinking_below_boot_ram_inflates() {
        let e = devices(256, 1024, 2);
        let (changes, total) = e.plan(301);
        assert_eq!(total, 302);
        assert_eq!(
            changes,
            [
                LiveChange::HotplugRequested { size_mib: 46 },
                LiveChange::BalloonTarget { amount_mib: 0 }
            ]
        );
        let (changes, total) = e.plan(200);
        assert_eq!(total, 200);
        assert_eq!(
            changes,
            [
                LiveChange::HotplugRequested { size_mib: 0 },
                LiveChange::BalloonTarget { amount_mib: 56 }
            ]
        );
        // Clamped to boot RAM plus the region.
        assert_eq!(e.plan(1 << 20).1, 256 + 1024);
        // Either device alone.
        let only_balloon = ElasticMemory { hotplug: None, ..e };
        assert_eq!(
            only_balloon.plan(512),
            (vec![LiveChange::BalloonTarget { amount_mib: 0 }], 256)
        );
    }

    #[test]
    fn the_target_never_goes_below_what_the_guest_uses() {
        assert_eq!(memory_target_mib(600.0, 200.0), 600);
        assert_eq!(memory_target_mib(300.0, 500.0), 500);
        assert_eq!(memory_target_mib(100.0, 300.4), 301);
    }

    #[test]
    fn the_devices_come_from_the_configuration() {
        let mut config: VmConfig = serde_json::from_value(serde_json::json!({
            "boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
            "memory-hotplug": {"total_size_mib": 1024, "block_size_mib": 128},
        }))
        .unwrap();
        assert_eq!(
            ElasticMemory::of(&config),
            Some(ElasticMemory {
                boot_mib: 256,
                hotplug: Some((1024, 128)),
                balloon: false
            })
        );
        config.memory_hotplug = None;
        assert_eq!(ElasticMemory::of(&config), None);
    }

    /// The policy and the actuator together over a guest-reported ramp: every window's demand
    /// fits in what was plugged by the end of the window before, and the memory goes back once
    /// the demand drops.
    #[test]
    fn a_ramp_is_plugged_ahead_of_demand_and_returned_after() {
        use predictor::policy::{Budget, Limits, PolicyConfig};
        use predictor::resource::Usage;
        use predictor::sample::Sample;
        use predictor::spec::{ForecasterKind, PolicySpec};

        let mut budget = Budget::from_capacity(&Usage {
            cpu: 1.0,
            mem: 1280.0,
            blk: 10.0,
            net: 10.0,
        });
        budget.0.mem = Limits {
            min: 256.0,
            max: 1280.0,
            initial: 256.0,
            step: 2.0,
        };
        let mut policy = PolicySpec {
            forecaster: ForecasterKind::Holt,
            model_path: None,
            budget,
            config: PolicyConfig {
                horizon: predictor::forecast::Horizon::new(5).unwrap(),
                ..PolicyConfig::default()
            },
        }
        .build()
        .unwrap();
        let mem = devices(256, 1024, 128);
        let mut total = 256;
        // Flat, a ramp of 8 MiB a window to 1000 MiB, a plateau, then back down.
        let demand: Vec<u64> = (0..60)
            .map(|_| 200)
            .chain((1..=100).map(|i| 200 + 8 * i))
            .chain((0..30).map(|_| 1000))
            .chain((0..150).map(|_| 200))
            .collect();
        let mut peak = 0;
        for (t, &d) in demand.iter().enumerate() {
            assert!(
                d <= total,
                "window {t}: demand {d} MiB above the {total} MiB plugged"
            );
            let decision = policy.decide(&Sample {
                t_ms: t as u64 * 100,
                usage: Usage {
                    cpu: 0.5,
                    mem: d as f64,
                    blk: 0.0,
                    net: 0.0,
                },
                signals: Default::default(),
            });
            if decision.resized.mem {
                total = mem
                    .plan(memory_target_mib(decision.allocation.mem, d as f64))
                    .1;
            }
            peak = peak.max(total);
        }
        assert!(peak >= 1000, "{peak}");
        // Returned, though not all the way to the floor: after the drop Holt's trend forecasts
        // near zero for a while, the band measures errors relative to the forecast, and those
        // huge relative errors stay in its quantile for hundreds of windows.
        assert!(
            total <= peak * 6 / 10,
            "still {total} of {peak} MiB plugged after the demand dropped to 200"
        );
    }
}
