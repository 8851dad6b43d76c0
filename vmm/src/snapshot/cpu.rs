//! The host CPU a snapshot was taken on. The guest reads the host's CPUID on some KVMs and runs
//! the instructions it found there: a snapshot restores only on a CPU of the same vendor that
//! has every feature the first one had.

use serde::{Deserialize, Serialize};

/// CPUID leaves (leaf, subleaf) whose feature bits a guest may have acted on.
const FEATURE_LEAVES: [(u32, u32); 5] = [(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];

/// One feature leaf's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureLeaf {
    pub leaf: u32,
    pub subleaf: u32,
    /// ecx, edx, and ebx where the leaf has features there.
    pub regs: [u32; 3],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub vendor: String,
    pub features: Vec<FeatureLeaf>,
}

/// Why a snapshot cannot run on this CPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuMismatch {
    #[error("the snapshot was taken on a {saved} CPU; this host's is {host}")]
    Vendor { saved: String, host: String },
    #[error(
        "the snapshot's CPU has features this host lacks: CPUID leaf {leaf:#x}.{subleaf} {reg} \
         bits {missing:#x}"
    )]
    Features {
        leaf: u32,
        subleaf: u32,
        reg: &'static str,
        missing: u32,
    },
}

fn cpuid(leaf: u32, subleaf: u32) -> std::arch::x86_64::CpuidResult {
    std::arch::x86_64::__cpuid_count(leaf, subleaf)
}

impl HostCpu {
    /// This host's.
    pub fn this_host() -> Self {
        let v = cpuid(0, 0);
        let mut vendor = Vec::with_capacity(12);
        for r in [v.ebx, v.edx, v.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let max_ext = cpuid(0x8000_0000, 0).eax;
        let features = FEATURE_LEAVES
            .iter()
            .filter(|(leaf, _)| {
                if *leaf >= 0x8000_0000 {
                    *leaf <= max_ext
                } else {
                    *leaf <= v.eax
                }
            })
            .map(|&(leaf, subleaf)| {
                let r = cpuid(leaf, subleaf);
                // Leaf 1's ebx holds the APIC id and counts, not features.
                let ebx = if leaf == 1 { 0 } else { r.ebx };
                FeatureLeaf {
                    leaf,
                    subleaf,
                    regs: [r.ecx, r.edx, ebx],
                }
            })
            .collect();
        Self {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            features,
        }
    }

    /// Whether a snapshot taken on `self` can run on `host`.
    pub fn runs_on(&self, host: &HostCpu) -> Result<(), CpuMismatch> {
        if self.vendor != host.vendor {
            return Err(CpuMismatch::Vendor {
                saved: self.vendor.clone(),
                host: host.vendor.clone(),
            });
        }
        for saved in &self.features {
            let have = host
                .features
                .iter()
                .find(|f| f.leaf == saved.leaf && f.subleaf == saved.subleaf)
                .map_or([0; 3], |f| f.regs);
            for ((reg, s), h) in ["ecx", "edx", "ebx"].into_iter().zip(saved.regs).zip(have) {
                let missing = s & !h;
                if missing != 0 {
                    return Err(CpuMismatch::Features {
                        leaf: saved.leaf,
                        subleaf: saved.subleaf,
                        reg,
                        missing,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_runs_on_its_own_host_and_not_on_another_vendor_or_a_lesser_cpu() {
        let host = HostCpu::this_host();
        assert_eq!(host.vendor.len(), 12, "{:?}", host.vendor);
        assert!(host.features.iter().any(|f| f.leaf == 1 && f.regs[1] != 0));
        host.runs_on(&host).unwrap();

        let mut other = host.clone();
        other.vendor = "GenuineIotel".into();
        let e = other.runs_on(&host).unwrap_err();
        assert!(e.to_string().contains("GenuineIotel CPU"), "{e}");

        // A saved CPU with one more feature bit than this host: refused, naming the bit.
        let mut richer = host.clone();
        let leaf1 = richer.features.iter_mut().find(|f| f.leaf == 1).unwrap();
        let absent = (0..32).map(|b| 1u32 << b).find(|b| leaf1.regs[0] & b == 0);
        let Some(bit) = absent else { return };
        leaf1.regs[0] |= bit;
        assert_eq!(
            richer.runs_on(&host).unwrap_err(),
            CpuMismatch::Features {
                leaf: 1,
                subleaf: 0,
                reg: "ecx",
                missing: bit
            }
        );
        // The other way round is fine: the host has more than the guest saw.
        host.runs_on(&richer).unwrap();
    }
}
