//! The memory actuator over the VM's elastic-memory devices: memory above boot RAM comes from
//! virtio-mem blocks, memory below it goes into the balloon. The guest's balloon statistics are
//! its own view of what it uses.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::balloon::{Balloon, PAGES_PER_MIB};
use devices::virtio::mem::VirtioMem;

use super::actuators::{ActuatorError, GuestMemoryStats, MemoryActuator, MemoryState};
use super::exits::now_ns;

const MIB: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// virtio-mem and/or the balloon of one VM.
pub struct ElasticMemory {
    boot_mib: u64,
    hotplug: Option<Arc<Mutex<VirtioMem>>>,
    balloon: Option<Arc<Mutex<Balloon>>>,
}

impl ElasticMemory {
    /// None when the VM has neither device.
    pub fn new(
        boot_mib: u64,
        hotplug: Option<Arc<Mutex<VirtioMem>>>,
        balloon: Option<Arc<Mutex<Balloon>>>,
    ) -> Option<Self> {
        (hotplug.is_some() || balloon.is_some()).then_some(Self {
            boot_mib,
            hotplug,
            balloon,
        })
    }

    /// The most memory the devices can give the guest.
    fn max_mib(&self) -> u64 {
        self.boot_mib
            + self
                .hotplug
                .as_ref()
                .map_or(0, |m| lock(m).layout().size / MIB)
    }
}

impl MemoryActuator for ElasticMemory {
    fn state(&self) -> MemoryState {
        let plugged_mib = self
            .hotplug
            .as_ref()
            .map_or(0, |m| lock(m).plugged_bytes() / MIB);
        let (balloon_mib, guest) = match &self.balloon {
            None => (0, None),
            Some(b) => {
                let b = lock(b);
                let guest = b.latest_report().and_then(|r| {
                    let total = r.stats.total_memory?;
                    let available = r.stats.available_memory.or(r.stats.free_memory)?;
                    let age_ns = u64::try_from(r.at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    Some(GuestMemoryStats {
                        used_mib: total.saturating_sub(available) / MIB,
                        available_mib: available / MIB,
                        at_ms: now_ns().saturating_sub(age_ns) / 1_000_000,
                    })
                });
                (u64::from(b.actual_pages() / PAGES_PER_MIB), guest)
            }
        };
        MemoryState {
            boot_mib: self.boot_mib,
            plugged_mib,
            balloon_mib,
            guest,
        }
    }

    fn request_total_mib(&mut self, mib: u64) -> Result<u64, ActuatorError> {
        let refused = |reason: String| ActuatorError::Refused {
            requested: mib,
            reason,
        };
        let mib = mib.min(self.max_mib());
        let mut total = self.boot_mib;
        if let Some(m) = &self.hotplug {
            let mut m = lock(m);
            let block_mib = m.layout().block_size / MIB;
            let plug = mib.saturating_sub(self.boot_mib).div_ceil(block_mib) * block_mib;
            m.set_requested_bytes(plug * MIB)
                .map_err(|e| refused(e.to_string()))?;
            total += plug;
        }
        if let Some(b) = &self.balloon {
            // Below boot RAM only the balloon can take memory back; above it, none is ballooned.
            let take = self.boot_mib.saturating_sub(mib);
            let pages = u32::try_from(take * u64::from(PAGES_PER_MIB))
                .map_err(|_| refused(format!("a balloon of {take} MiB")))?;
            lock(b).set_target_pages(pages);
            total -= take;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::balloon::BalloonOptions;
    use devices::virtio::mem::{HotplugSlots, MemLayout};
    use std::time::Duration;

    struct NoSlots;
    impl HotplugSlots for NoSlots {
        fn set_present(&mut self, _: usize, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn devices() -> ElasticMemory {
        let layout = MemLayout::new(4 << 30, 1 << 30, 2 * MIB, 128 * MIB).unwrap();
        let mem = VirtioMem::new(layout, Box::new(NoSlots)).unwrap();
        let balloon = Balloon::new(BalloonOptions {
            target_pages: 0,
            deflate_on_oom: true,
            stats_interval: Duration::from_secs(1),
            free_page_reporting: false,
        })
        .unwrap();
        ElasticMemory::new(
            256,
            Some(Arc::new(Mutex::new(mem))),
            Some(Arc::new(Mutex::new(balloon))),
        )
        .unwrap()
    }

    #[test]
    fn growth_plugs_whole_blocks_and_shrinking_below_boot_ram_inflates() {
        let mut e = devices();
        assert_eq!(e.request_total_mib(301).unwrap(), 302);
        let m = e.hotplug.clone().unwrap();
        let b = e.balloon.clone().unwrap();
        assert_eq!(lock(&m).requested_bytes(), 46 * MIB);
        assert_eq!(lock(&b).options().target_pages, 0);
        assert_eq!(e.request_total_mib(200).unwrap(), 200);
        assert_eq!(lock(&m).requested_bytes(), 0);
        assert_eq!(lock(&b).options().target_pages, 56 * 256);
        // Clamped to boot RAM plus the region.
        assert_eq!(e.request_total_mib(1 << 20).unwrap(), 256 + 1024);
        let s = e.state();
        assert_eq!((s.boot_mib, s.plugged_mib, s.balloon_mib), (256, 0, 0));
        assert!(s.guest.is_none(), "no report yet");
        assert!(ElasticMemory::new(256, None, None).is_none());
    }
}
