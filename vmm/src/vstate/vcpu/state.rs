//! A vCPU's complete architectural state, as KVM hands it out: what a snapshot saves and a
//! restore puts back before the vCPU runs again.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Errors of reading or writing a vCPU's state; each names the piece.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot get {what}: {source}")]
    Get {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set {what}: {source}")]
    Set {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {total} saved MSRs (it refused MSR {index:#x})")]
    PartialMsrs {
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("{0} entries do not fit a KVM list")]
    TooMany(&'static str),
}

/// Everything KVM keeps about one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The FPU, SSE and AVX state (XSAVE covers what KVM_GET_FPU would).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency, where KVM tells it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// The MSRs KVM can both read and write for `vcpu`: its index list less the ones a get refuses
/// (KVM lists some that only exist with features the guest CPU lacks). Asked on the VMM thread
/// while the VM is built: a vCPU thread, under its filter, cannot open `/dev/kvm`.
pub fn saved_msr_indices(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm.get_msr_index_list().map_err(|source| StateError::Get {
        what: "KVM's MSR index list",
        source,
    })?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    // KVM_GET_MSRS stops at the first MSR it refuses: drop that one and read on.
    let mut readable = Vec::with_capacity(indices.len());
    while !indices.is_empty() {
        let got = read_msrs(vcpu, &indices)?.len();
        readable.extend_from_slice(&indices[..got]);
        let skip = (got + 1).min(indices.len());
        indices.drain(..skip);
    }
    if readable.is_empty() {
        return Err(StateError::Get {
            what: "any MSR",
            source: kvm_ioctls::Error::new(libc::EIO),
        });
    }
    Ok(readable)
}

/// A `kvm_msrs` holds at most `KVM_MAX_MSR_ENTRIES` (256): MSRs go to KVM in chunks below it.
const MSR_CHUNK: usize = 200;

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany("MSR"))?;
        let got = vcpu.get_msrs(&mut msrs).map_err(|source| StateError::Get {
            what: "MSRs",
            source,
        })?;
        out.extend_from_slice(&msrs.as_slice()[..got]);
        if got < chunk.len() {
            break;
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the whole state, the MSRs `msr_indices` lists ([`saved_msr_indices`]). The vCPU
    /// must be out of KVM_RUN with no I/O half done (see `VcpuRunner::complete_pending_io`).
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let get = |what: &'static str| move |source| StateError::Get { what, source };
        let indices = msr_indices;
        let msrs = read_msrs(vcpu, indices)?;
        if msrs.len() != indices.len() {
            return Err(StateError::Get {
                what: "MSRs",
                source: kvm_ioctls::Error::new(libc::EIO),
            });
        }
        Ok(Self {
            cpuid: vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(get("CPUID"))?
                .as_slice()
                .to_vec(),
            msrs,
            regs: vcpu.get_regs().map_err(get("registers"))?,
            sregs: vcpu.get_sregs().map_err(get("special registers"))?,
            xsave: vcpu.get_xsave().map_err(get("XSAVE state"))?,
            xcrs: vcpu.get_xcrs().map_err(get("XCRs"))?,
            debug_regs: vcpu.get_debug_regs().map_err(get("debug registers"))?,
            lapic: vcpu.get_lapic().map_err(get("LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(get("MP state"))?,
            events: vcpu.get_vcpu_events().map_err(get("vCPU events"))?,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Puts the state back into a fresh vCPU, in the order KVM needs: CPUID before anything
    /// that depends on features, special registers before MSRs and the LAPIC, pending events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let set = |what: &'static str| move |source| StateError::Set { what, source };
        if let Some(khz) = self.tsc_khz {
            // A host of another TSC frequency scales the guest's; where KVM cannot, the guest
            // keeps the host's and only its time sources' calibration is off.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = vcpu.set_tsc_khz(khz) {
                    tracing::warn!("cannot set the guest TSC to {khz} kHz: {e}");
                }
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::TooMany("CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        vcpu.set_mp_state(self.mp_state).map_err(set("MP state"))?;
        vcpu.set_regs(&self.regs).map_err(set("registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(set("special registers"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB region KVM_GET_XSAVE filled on a host of the
        // same CPU features (checked before any restore), so KVM reads no further than it.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(set("XSAVE state"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(set("XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(set("debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(set("LAPIC"))?;
        let mut done = 0;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::TooMany("MSR"))?;
            let n = vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
            done += n;
            if n != chunk.len() {
                return Err(StateError::PartialMsrs {
                    set: done,
                    total: self.msrs.len(),
                    index: chunk[n].index,
                });
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(set("vCPU events"))?;
        Ok(())
    }
}
