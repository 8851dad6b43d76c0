//! Per-vCPU CPUID: what KVM supports, with the APIC id, topology and hypervisor bit of this vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// The CPU topology the guest is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Number of vCPUs in the VM (one package).
    pub vcpus: u8,
    /// Hardware threads per core: 2 with SMT, else 1.
    pub threads_per_core: u8,
}

impl Topology {
    /// vCPU count and the SMT setting from the spec; SMT needs at least two vCPUs.
    pub fn new(vcpus: u8, smt: bool) -> Self {
        let threads_per_core = if smt && vcpus > 1 { 2 } else { 1 };
        Self {
            vcpus,
            threads_per_core,
        }
    }

    fn cores(&self) -> u32 {
        u32::from(self.vcpus).div_ceil(u32::from(self.threads_per_core))
    }
}

/// Bits needed to number `n` items: APIC id fields are sized in powers of two.
fn id_bits(n: u32) -> u32 {
    n.next_power_of_two().trailing_zeros()
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Level types of leaves 0xb/0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Shows the guest the TSC-deadline mode of its local APIC timer. KVM's in-kernel LAPIC emulates
/// it (KVM_CAP_TSC_DEADLINE_TIMER) but KVM_GET_SUPPORTED_CPUID leaves the bit to userspace, and
/// QEMU and Firecracker set it. Without it Linux calibrates the LAPIC timer against the PIT
/// and, where time is irregular (a loaded or nested host), rejects it ("APIC timer disabled due
/// to verification failure") and runs on the PIT's broadcast ticks, without high-resolution
/// timers.
pub fn advertise_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `index` of `topo`.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, topo: Topology) {
    let apic_id = u32::from(index);
    let smt_bits = id_bits(u32::from(topo.threads_per_core));
    let core_bits = id_bits(topo.cores()) + smt_bits;
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, apic_id, topo, smt_bits, core_bits);
    }
}

fn filter_entry(
    entry: &mut kvm_cpuid_entry2,
    apic_id: u32,
    topo: Topology,
    smt_bits: u32,
    core_bits: u32,
) {
    let vcpus = u32::from(topo.vcpus);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: initial APIC id [31:24], logical processors per package [23:16], CLFLUSH
            // line size in qwords [15:8].
            entry.ebx = (apic_id << 24) | ((1 << core_bits) << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            if vcpus > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX [31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 {
                vcpus
            } else {
                u32::from(topo.threads_per_core)
            };
            entry.eax &= 0x3fff;
            entry.eax |= ((topo.cores() - 1) << 26) | ((sharing - 1) << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
            entry.edx = apic_id;
            let (shift, count, level) = match entry.index {
                0 => (smt_bits, u32::from(topo.threads_per_core), LEVEL_SMT),
                1 => (core_bits, vcpus, LEVEL_CORE),
                // Further levels do not exist in our topology.
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = count;
            entry.ecx = (level << 8) | (entry.index & 0xff);
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX [15:12]: APIC id bits for cores; [7:0]: threads in package - 1.
            entry.ecx = (core_bits << 12) | (vcpus - 1);
        }
        LEAF_AMD_EXT_APIC_ID => {
            entry.eax = apic_id;
            entry.ebx = ((u32::from(topo.threads_per_core) - 1) << 8) | (apic_id >> smt_bits);
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn filtered(function: u32, index: u32, apic: u8, topo: Topology) -> kvm_cpuid_entry2 {
        let mut cpuid = CpuId::from_entries(&[entry(function, index)]).unwrap();
        filter_cpuid(&mut cpuid, apic, topo);
        cpuid.as_slice()[0]
    }

    #[test]
    fn leaf1_carries_the_apic_id_and_the_hypervisor_bit() {
        let topo = Topology::new(4, false);
        let e = filtered(1, 0, 3, topo);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        let single = filtered(1, 0, 0, Topology::new(1, true));
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn the_tsc_deadline_timer_is_advertised_in_leaf1_only() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(7, 0)]).unwrap();
        advertise_tsc_deadline(&mut cpuid);
        assert_ne!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(cpuid.as_slice()[1].ecx, 0);
    }

    #[test]
    fn extended_topology_describes_threads_and_cores() {
        let topo = Topology::new(6, true); // 3 cores x 2 threads
        let smt = filtered(0xb, 0, 5, topo);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (1, 2, LEVEL_SMT, 5)
        );
        let core = filtered(0xb, 1, 5, topo);
        // 3 cores need 2 bits above the SMT bit.
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (3, 6, LEVEL_CORE));
        let end = filtered(0xb, 2, 5, topo);
        assert_eq!((end.eax, end.ebx, end.ecx >> 8), (0, 0, 0));
    }

    #[test]
    fn amd_leaves_count_all_threads() {
        let e = filtered(LEAF_AMD_SIZE_IDS, 0, 0, Topology::new(8, false));
        assert_eq!(e.ecx & 0xff, 7);
        assert_eq!((e.ecx >> 12) & 0xf, 3);
    }

    #[test]
    fn id_bits_rounds_up_to_powers_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
