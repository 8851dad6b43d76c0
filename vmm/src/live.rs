//! Changes to a running VM's devices, whoever makes them (an API PATCH or the autopilot), go
//! through one function, [`apply`]: the device takes the change, then the VM's configuration
//! records it, so `GET /vm/config` always shows what runs.

use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::balloon::{BalloonError, PAGES_PER_MIB};
use devices::virtio::block::BlockError;
use devices::virtio::mem::MemError;
use devices::virtio::net::NetError;

use crate::microvm::MicroVm;
use crate::vcpus::HotplugError;
use crate::vmm_config::{BalloonStatsUpdate, VmConfig};

/// One change to a device of a running VM, by the device's spec id.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveChange {
    DriveRateLimiter {
        drive_id: String,
        limiter: RateLimiterConfig,
    },
    /// The drive is served from another host file (Firecracker's PATCH `path_on_host`).
    DriveBacking {
        drive_id: String,
        path_on_host: std::path::PathBuf,
    },
    PmemRateLimiter {
        id: String,
        limiter: RateLimiterConfig,
    },
    /// Either limiter may stay as it is (`None`).
    NetRateLimiters {
        iface_id: String,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    },
    /// Memory the balloon should hold.
    BalloonTarget {
        amount_mib: u32,
    },
    BalloonStats(BalloonStatsUpdate),
    /// Memory the guest should have plugged from the virtio-mem region.
    HotplugRequested {
        size_mib: u64,
    },
    /// vCPUs the VM should have: plugged now, or removed once the guest ejects them.
    VcpuCount {
        vcpu_count: u8,
    },
}

/// Why a device refused a change.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("the running VM has no {0}")]
    NoDevice(String),
    #[error("{0}")]
    Drive(#[from] BlockError),
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("{0}")]
    Pmem(#[from] devices::virtio::pmem::PmemError),
    #[error("{0}")]
    Balloon(#[from] BalloonError),
    #[error("{0}")]
    MemoryHotplug(#[from] MemError),
    #[error("{0}")]
    Vcpus(#[from] HotplugError),
}

impl LiveError {
    /// A change that conflicts with what the VM is doing (it may be asked again later), rather
    /// than a bad one.
    pub fn is_conflict(&self) -> bool {
        matches!(self, LiveError::Vcpus(e) if e.is_conflict())
    }
}

/// Applies `change` to the running `vm` (before boot there is none) and records it in `config`.
pub fn apply(
    vm: Option<&mut MicroVm>,
    config: &mut VmConfig,
    change: &LiveChange,
) -> Result<(), LiveError> {
    if let Some(vm) = vm {
        apply_to_device(vm, change)?;
    }
    mirror(config, change);
    Ok(())
}

fn apply_to_device(vm: &mut MicroVm, change: &LiveChange) -> Result<(), LiveError> {
    let missing = |what: String| LiveError::NoDevice(what);
    match change {
        LiveChange::DriveRateLimiter { drive_id, limiter } => vm
            .drive(drive_id)
            .ok_or_else(|| missing(format!("drive {drive_id:?}")))?
            .update_rate_limiter(*limiter)?,
        LiveChange::DriveBacking {
            drive_id,
            path_on_host,
        } => vm
            .drive(drive_id)
            .ok_or_else(|| missing(format!("drive {drive_id:?}")))?
            .swap_backing(path_on_host)?,
        LiveChange::PmemRateLimiter { id, limiter } => vm
            .pmem(id)
            .ok_or_else(|| missing(format!("pmem device {id:?}")))?
            .update_rate_limiter(*limiter)?,
        LiveChange::NetRateLimiters { iface_id, rx, tx } => vm
            .net(iface_id)
            .ok_or_else(|| missing(format!("network interface {iface_id:?}")))?
            .update_rate_limiters(*rx, *tx)?,
        LiveChange::BalloonTarget { amount_mib } => vm
            .balloon()
            .ok_or_else(|| missing("balloon".into()))?
            .set_target_pages(amount_mib.saturating_mul(PAGES_PER_MIB)),
        LiveChange::BalloonStats(update) => vm
            .balloon()
            .ok_or_else(|| missing("balloon".into()))?
            .set_stats_interval(update.interval())?,
        LiveChange::HotplugRequested { size_mib } => vm
            .hotplug_memory()
            .ok_or_else(|| missing("virtio-mem device".into()))?
            .set_requested_bytes(size_mib << 20)?,
        LiveChange::VcpuCount { vcpu_count } => {
            let change = vm.set_vcpu_count(*vcpu_count)?;
            if !change.plugged.is_empty() || !change.removal_requested.is_empty() {
                tracing::info!(
                    "vCPUs: plugged {:?}, removal asked of {:?}",
                    change.plugged,
                    change.removal_requested
                );
            }
        }
    }
    Ok(())
}

/// Records an applied change in the configuration. What the configuration does not hold (the
/// plugged size is the device's state, not a setting) leaves it as it is.
fn mirror(config: &mut VmConfig, change: &LiveChange) {
    match change {
        LiveChange::DriveRateLimiter { drive_id, limiter } => {
            if let Some(d) = config.drives.iter_mut().find(|d| &d.drive_id == drive_id) {
                d.rate_limiter = Some(*limiter);
            }
        }
        LiveChange::DriveBacking {
            drive_id,
            path_on_host,
        } => {
            if let Some(d) = config.drives.iter_mut().find(|d| &d.drive_id == drive_id) {
                d.path_on_host = path_on_host.clone();
            }
        }
        LiveChange::PmemRateLimiter { id, limiter } => {
            if let Some(p) = config.pmem.iter_mut().find(|p| &p.id == id) {
                p.rate_limiter = Some(*limiter);
            }
        }
        LiveChange::NetRateLimiters { iface_id, rx, tx } => {
            let ifaces = &mut config.network_interfaces;
            if let Some(n) = ifaces.iter_mut().find(|n| &n.iface_id == iface_id) {
                n.rx_rate_limiter = rx.or(n.rx_rate_limiter);
                n.tx_rate_limiter = tx.or(n.tx_rate_limiter);
            }
        }
        LiveChange::BalloonTarget { amount_mib } => {
            if let Some(b) = &mut config.balloon {
                b.amount_mib = *amount_mib;
            }
        }
        LiveChange::BalloonStats(update) => {
            if let Some(b) = &mut config.balloon {
                b.stats_polling_interval_s = update.stats_polling_interval_s;
                b.stats_polling_interval_ms = update.stats_polling_interval_ms;
            }
        }
        LiveChange::HotplugRequested { .. } => {}
        LiveChange::VcpuCount { vcpu_count } => config.machine_config.vcpu_count = *vcpu_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm_config::{BalloonConfig, DriveConfig, NetworkInterfaceConfig};
    use devices::rate_limiter::TokenBucketConfig;

    fn limiter(size: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        }
    }

    /// Before boot (no VM) a change is only recorded; each kind lands in its own field.
    #[test]
    fn changes_are_mirrored_into_the_configuration() {
        let mut config: VmConfig = serde_json::from_value(serde_json::json!({
            "boot-source": {"kernel_image_path": "/k"},
            "drives": [{"drive_id": "d0", "path_on_host": "/d", "is_root_device": false}],
            "network-interfaces": [{"iface_id": "n0", "host_dev_name": "tap0",
                                    "rx_rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}],
            "balloon": {"amount_mib": 0, "deflate_on_oom": false},
        }))
        .unwrap();
        let changes = [
            LiveChange::DriveRateLimiter {
                drive_id: "d0".into(),
                limiter: limiter(1),
            },
            LiveChange::NetRateLimiters {
                iface_id: "n0".into(),
                rx: None,
                tx: Some(limiter(2)),
            },
            LiveChange::BalloonTarget { amount_mib: 64 },
            LiveChange::BalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 0,
                stats_polling_interval_ms: Some(100),
            }),
            LiveChange::HotplugRequested { size_mib: 128 },
            LiveChange::VcpuCount { vcpu_count: 3 },
            // An id the VM does not have changes nothing.
            LiveChange::DriveRateLimiter {
                drive_id: "nope".into(),
                limiter: limiter(3),
            },
        ];
        let before = config.clone();
        for c in &changes {
            apply(None, &mut config, c).unwrap();
        }
        let d: &DriveConfig = &config.drives[0];
        assert_eq!(d.rate_limiter, Some(limiter(1)));
        let n: &NetworkInterfaceConfig = &config.network_interfaces[0];
        assert_eq!(n.tx_rate_limiter, Some(limiter(2)));
        assert_eq!(
            n.rx_rate_limiter, before.network_interfaces[0].rx_rate_limiter,
            "a limiter not given stays"
        );
        let b: &BalloonConfig = config.balloon.as_ref().unwrap();
        assert_eq!(b.amount_mib, 64);
        assert_eq!(b.stats_polling_interval_ms, Some(100));
        assert_eq!(config.memory_hotplug, before.memory_hotplug);
        assert_eq!(config.machine_config.vcpu_count, 3);
    }
}
