//! Sizing a VM from its workload's profile before boot: vCPUs from the CPU demand, boot RAM and
//! the virtio-mem region from the memory footprint, drive bandwidth buckets from the block
//! I/O, and a stricter start (seccomp stage, anomaly threshold) for a flagged workload.

use super::Profile;
use crate::seccomp::Stage;
use crate::vmm_config::{bandwidth_limiter, VmConfig, MAX_VCPUS};

/// Memory above the probe's peak: the probe saw a few seconds, the VM runs longer.
const MEM_HEADROOM: f64 = 1.25;
/// Memory the guest needs besides what the probe saw it use (page tables, a kernel that
/// grows its caches), MiB.
const MEM_FLOOR_MIB: f64 = 16.0;
/// Boot RAM is a multiple of this, MiB.
const MEM_ALIGN_MIB: u64 = 16;
/// Block bandwidth bucket above the probe's p95.
const IO_HEADROOM: f64 = 2.0;
/// Demand this far under a whole vCPU does not need that vCPU (measurement noise).
const CPU_TOLERANCE: f64 = 0.1;
/// A flagged workload's anomaly threshold, as a fraction of the configured one.
const FLAGGED_THRESHOLD: f64 = 0.5;

/// What sizing changed.
#[derive(Debug, Default, PartialEq)]
pub struct Sized {
    /// One line per change: the field, old -> new, and why.
    pub changes: Vec<String>,
    /// The seccomp stage to request right after boot.
    pub seccomp: Option<Stage>,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Applies `profile` to `config`.
pub fn apply(profile: &Profile, config: &mut VmConfig) -> Sized {
    let mut out = Sized::default();
    let changes = &mut out.changes;
    let mut change = |field: &str, from: String, to: String, why: String| {
        if from != to {
            changes.push(format!("{field}: {from} -> {to} ({why})"));
        }
    };

    let m = &mut config.machine_config;
    let p95 = profile.cpu_demand.p95;
    let wanted = ((p95 - CPU_TOLERANCE).ceil().max(1.0) as u64).min(u64::from(MAX_VCPUS)) as u8;
    let vcpus = wanted.max(m.vcpu_count);
    change(
        "machine-config.vcpu_count",
        m.vcpu_count.to_string(),
        vcpus.to_string(),
        format!("cpu_demand p95 {p95:.2} vCPU-s/s, never below the spec's"),
    );
    m.vcpu_count = vcpus;
    if m.smt && vcpus > 1 && !vcpus.is_multiple_of(2) {
        m.vcpu_count = (vcpus + 1).min(MAX_VCPUS);
    }
    // A spec that can plug vCPUs keeps room to plug beyond the profiled boot count.
    if let Some(max) = m.max_vcpus.filter(|&max| max < m.vcpu_count) {
        change(
            "machine-config.max_vcpus",
            max.to_string(),
            m.vcpu_count.to_string(),
            "at least the profiled vcpu_count".into(),
        );
        m.max_vcpus = Some(m.vcpu_count);
    }

    let peak = profile.memory_footprint.peak_mib;
    let boot = round_up(
        (peak * MEM_HEADROOM + MEM_FLOOR_MIB).ceil() as u64,
        MEM_ALIGN_MIB,
    );
    change(
        "machine-config.mem_size_mib",
        m.mem_size_mib.to_string(),
        boot.to_string(),
        format!("peak {peak:.0} MiB x {MEM_HEADROOM} + {MEM_FLOOR_MIB} MiB"),
    );
    m.mem_size_mib = boot;
    if let Some(h) = &mut config.memory_hotplug {
        // Room to grow past what the probe saw, at least one slot.
        let total = round_up(((peak / 2.0).ceil() as u64).max(1), h.slot_size_mib);
        change(
            "memory-hotplug.total_size_mib",
            h.total_size_mib.to_string(),
            total.to_string(),
            format!(
                "half the peak {peak:.0} MiB, whole {} MiB slots",
                h.slot_size_mib
            ),
        );
        h.total_size_mib = total;
    }

    for d in &mut config.drives {
        let io = profile
            .io_intensity
            .iter()
            .find(|i| i.kind == "block" && i.device == d.drive_id);
        if let Some(io) = io.filter(|io| io.mib_per_s.p95 > 0.0) {
            let mibps = (io.mib_per_s.p95 * IO_HEADROOM).max(1.0);
            let field = format!("drives[{}].rate_limiter", d.drive_id);
            if d.rate_limiter.is_some() {
                change(
                    &field,
                    "the spec's".into(),
                    "kept".into(),
                    "the profile does not override a configured limiter".into(),
                );
                continue;
            }
            let limiter = bandwidth_limiter(mibps, None);
            change(
                &field,
                "none".into(),
                serde_json::to_string(&limiter).unwrap_or_default(),
                format!("block p95 {:.1} MiB/s x {IO_HEADROOM}", io.mib_per_s.p95),
            );
            d.rate_limiter = Some(limiter);
        }
    }

    if !profile.security_flags.is_empty() {
        let flags: Vec<&str> = profile
            .security_flags
            .iter()
            .map(|f| f.flag.as_str())
            .collect();
        out.seccomp = Some(Stage::Steady);
        out.changes.push(format!(
            "seccomp: every thread starts in stage steady once the VM is built (flags: {})",
            flags.join(", ")
        ));
        if let Some(p) = &mut config.predictor {
            let before = p.anomaly.threshold;
            p.anomaly.threshold = before * FLAGGED_THRESHOLD;
            out.changes.push(format!(
                "predictor.anomaly.threshold: {before} -> {} (flagged workload)",
                p.anomaly.threshold
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{
        IoIntensity, MemoryFootprint, Percentiles, ProbeInfo, SecurityFlag, StaticAnalysis,
    };

    pub(crate) fn profile(cpu_p95: f64, peak: f64, blk_p95: f64) -> Profile {
        Profile {
            version: 1,
            fingerprint: "f".into(),
            kernel_sha256: "k".into(),
            inputs: vec![],
            probe: ProbeInfo {
                duration_s: 5.0,
                windows: 50,
                window_ms: 100,
                vcpu_count: 2,
                mem_size_mib: 512,
                ended: "stopped".into(),
            },
            cpu_demand: Percentiles {
                p50: cpu_p95,
                p95: cpu_p95,
            },
            cpu_used: Percentiles::default(),
            memory_footprint: MemoryFootprint {
                peak_mib: peak,
                working_set_mib: peak,
            },
            io_intensity: vec![IoIntensity {
                kind: "block".into(),
                device: "d".into(),
                source: "metrics".into(),
                mib_per_s: Percentiles {
                    p50: blk_p95,
                    p95: blk_p95,
                },
                ops_per_s: Percentiles::default(),
            }],
            security_flags: vec![],
            dependency_list: vec![],
            static_analysis: StaticAnalysis {
                kernel: Default::default(),
                exec: None,
            },
        }
    }

    fn spec() -> VmConfig {
        VmConfig::parse(
            r#"{"boot-source":{"kernel_image_path":"/k"},
                "machine-config":{"vcpu_count":1,"mem_size_mib":1024},
                "drives":[{"drive_id":"d","path_on_host":"/d","is_root_device":false,"is_read_only":false}],
                "memory-hotplug":{"total_size_mib":1024},
                "predictor":{}}"#,
        )
        .unwrap()
    }

    #[test]
    fn sizes_cpu_memory_hotplug_and_bandwidth() {
        let mut c = spec();
        let s = apply(&profile(1.95, 300.0, 20.0), &mut c);
        assert_eq!(c.machine_config.vcpu_count, 2);
        // 300 * 1.25 + 16 = 391 -> 400.
        assert_eq!(c.machine_config.mem_size_mib, 400);
        assert_eq!(c.memory_hotplug.as_ref().unwrap().total_size_mib, 256);
        let bw = c.drives[0].rate_limiter.unwrap().bandwidth.unwrap();
        assert_eq!(bw.size * 1000 / bw.refill_time, 40 << 20);
        assert_eq!(s.seccomp, None);
        assert_eq!(s.changes.len(), 4, "{:#?}", s.changes);
        assert!(s.changes[0].starts_with("machine-config.vcpu_count: 1 -> 2"));
    }

    #[test]
    fn never_below_the_spec_vcpus_and_noise_does_not_add_one() {
        let mut c = spec();
        c.machine_config.vcpu_count = 2;
        apply(&profile(0.3, 10.0, 0.0), &mut c);
        assert_eq!(c.machine_config.vcpu_count, 2);
        let mut c = spec();
        apply(&profile(2.05, 10.0, 0.0), &mut c);
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert!(c.drives[0].rate_limiter.is_none());
    }

    #[test]
    fn max_vcpus_stays_at_least_the_profiled_vcpu_count() {
        let mut c = spec();
        c.machine_config.max_vcpus = Some(2);
        let s = apply(&profile(2.9, 10.0, 0.0), &mut c);
        assert_eq!(c.machine_config.vcpu_count, 3);
        assert_eq!(c.machine_config.max_vcpus, Some(3));
        c.machine_config.validate().unwrap();
        assert!(
            s.changes[1].starts_with("machine-config.max_vcpus: 2 -> 3"),
            "{:#?}",
            s.changes
        );
        let mut c = spec();
        c.machine_config.max_vcpus = Some(4);
        apply(&profile(1.5, 10.0, 0.0), &mut c);
        assert_eq!(c.machine_config.max_vcpus, Some(4));
    }

    #[test]
    fn a_flagged_workload_starts_steady_with_a_lower_threshold() {
        let mut c = spec();
        let mut p = profile(1.0, 10.0, 0.0);
        p.security_flags.push(SecurityFlag {
            flag: "unknown_port_or_mmio".into(),
            detail: "x".into(),
        });
        let before = c.predictor.as_ref().unwrap().anomaly.threshold;
        let s = apply(&p, &mut c);
        assert_eq!(s.seccomp, Some(Stage::Steady));
        assert_eq!(c.predictor.unwrap().anomaly.threshold, before * 0.5);
    }
}
