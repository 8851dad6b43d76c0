//! Firecracker's static CPU templates (`machine-config.cpu_template`) as data: each one is a
//! custom template (`cpu_config::CpuConfig`), so the builder applies it by the same code as a
//! `PUT /cpu-config` one. The bits are Firecracker 1.17's (its `static_cpu_templates`), which
//! users of those templates rely on; so are the host CPUs each template may run on.

use super::cpu_config::{BitFilter, CpuConfig, CpuidLeafModifier, CpuidRegister, MsrModifier};
use super::cpu_config::{CpuTemplate, CpuidRegisterModifier};
use super::{ConfigError, JsonPath};

use CpuidRegister::{Eax, Ebx, Ecx, Edx};

/// One register of one CPUID leaf: the bits in `mask` take their values from `value`.
struct CpuidBits {
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    mask: u32,
    value: u32,
}

const fn id(leaf: u32, subleaf: u32, register: CpuidRegister, mask: u32, value: u32) -> CpuidBits {
    CpuidBits {
        leaf,
        subleaf,
        register,
        mask,
        value,
    }
}

/// IA32_ARCH_CAPABILITIES: which CPU vulnerabilities the guest may assume absent.
const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the leaf has subleaves.
const SUBLEAVES: u32 = 1;

/// A host CPU as CPUID.1:EAX gives it: extended family, extended model, family, model, stepping
/// (the processor-type bits 13:12 left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuModel {
    name: &'static str,
    signature: u32,
}

const SIGNATURE_MASK: u32 = 0x0fff_0fff;
const SKYLAKE: CpuModel = CpuModel {
    name: "Intel Skylake",
    signature: 0x0005_0654,
};
const CASCADE_LAKE: CpuModel = CpuModel {
    name: "Intel Cascade Lake",
    signature: 0x0005_0657,
};
const ICE_LAKE: CpuModel = CpuModel {
    name: "Intel Ice Lake",
    signature: 0x0006_06a6,
};
const MILAN: CpuModel = CpuModel {
    name: "AMD Milan",
    signature: 0x00a0_0f11,
};

/// Leaves 0x1, 0x7 and 0xd of T2 and the templates made from it: a Haswell-EP signature
/// (family 6, model 0x3f, stepping 2); off: debug store, MONITOR, VMX/SMX, EIST, thermal
/// monitors, PDCM, DCA, PSN, ACPI; MCE and MTRR on. Leaf 7 keeps Haswell's features from the
/// host (FSGSBASE, BMI1/2, AVX2, SMEP, INVPCID, SMAP ...), turns ERMS on and the later ones
/// off (AVX-512, SGX, MPX, TSX, SHA, CLWB, PT, PKU, VAES, LA57, RDPID ...); no MPX, AVX-512 or
/// PKRU XSAVE state; no XSAVEC, XGETBV with ECX=1 or XSAVES.
const T2_CORE: [CpuidBits; 8] = [
    id(0x1, 0, Eax, 0x0fff_3fff, 0x0003_06f2),
    id(0x1, 0, Ecx, 0x0004_cdfc, 0),
    id(0x1, 0, Edx, 0xe864_1080, 0x0000_1080),
    id(0x7, 0, Ebx, 0xffef_da14, 0x0000_0200),
    id(0x7, 0, Ecx, 0x4041_5f5e, 0),
    id(0x7, 0, Edx, 0x0000_011c, 0),
    id(0xd, 0, Eax, 0x0000_02f8, 0),
    id(0xd, 1, Eax, 0x0000_000e, 0),
];

/// T2's and T2S's extended leaves: no PREFETCHW, MONITORX or 1 GiB pages, no WBNOINVD.
const T2_EXTENDED: [CpuidBits; 3] = [
    id(0x8000_0001, 0, Ecx, 0x2000_0100, 0),
    id(0x8000_0001, 0, Edx, 0x0400_0000, 0),
    id(0x8000_0008, 0, Ebx, 0x0000_0200, 0),
];

/// C3: an Ivy Bridge-EP signature (family 6, model 0x3e, stepping 4) and that generation's
/// features: no FMA or MOVBE (besides T2's leaf 1 cuts, SMX, EIST and DCA excepted); leaf 7
/// down to FSGSBASE, SMEP and ERMS from the host (no AVX2, BMI1/2, HLE/RTM, INVPCID ...); no
/// LZCNT or PREFETCHW.
const C3: [CpuidBits; 10] = [
    id(0x1, 0, Eax, 0x0fff_3fff, 0x0003_06e4),
    id(0x1, 0, Ecx, 0x0040_dd3c, 0),
    id(0x1, 0, Edx, 0xa864_1080, 0x0000_1080),
    id(0x7, 0, Ebx, 0xffaf_dd3c, 0),
    id(0x7, 0, Ecx, 0x4041_481e, 0),
    id(0x7, 0, Edx, 0x0000_000c, 0),
    id(0xd, 0, Eax, 0x0000_02f8, 0),
    id(0xd, 1, Eax, 0x0000_000e, 0),
    id(0x8000_0001, 0, Ecx, 0x0000_0120, 0),
    id(0x8000_0001, 0, Edx, 0x0400_0000, 0),
];

/// T2CL's extended leaves: as T2's, and also no SSE4A or misaligned SSE (ECX 6, 7), no AMD
/// MMX extensions, MMX, FXSR or FFXSR (EDX 22..25).
const T2CL_EXTENDED: [CpuidBits; 3] = [
    id(0x8000_0001, 0, Ecx, 0x2000_01c0, 0),
    id(0x8000_0001, 0, Edx, 0x07c0_0000, 0),
    id(0x8000_0008, 0, Ebx, 0x0000_0200, 0),
];

/// T2A (AMD): as T2CL's but no SVM (ECX 2) and MMX/FXSR left as the host has them; leaf
/// 0x8000_0008 EBX without CLZERO and WBNOINVD, with RstrFpErrPtrs, IbrsPreferred,
/// IbrsSameMode and EferLmsleUnsupported set.
const T2A_EXTENDED: [CpuidBits; 3] = [
    id(0x8000_0001, 0, Ecx, 0x2000_01c4, 0),
    id(0x8000_0001, 0, Edx, 0x0640_0000, 0),
    id(0x8000_0008, 0, Ebx, 0x001c_0205, 0x001c_0004),
];

/// T2S: IA32_ARCH_CAPABILITIES fixed to what both Skylake and Cascade Lake (latest microcode)
/// can promise: IBRS_ALL, SKIP_L1DFL_VMENTRY, IF_PSCHANGE_MC_NO, MDS_NO off (Skylake lacks
/// them), RSBA and FB_CLEAR on, among others, so a snapshot moves between them safely.
const T2S_ARCH_CAPABILITIES: (u64, u64) = (u64::MAX, 0x0c0a_0c4c);

/// T2CL: IA32_ARCH_CAPABILITIES passes the host's mitigation bits through but clears every
/// bit not known when the template was made, and the control bits a guest cannot use.
const T2CL_ARCH_CAPABILITIES: (u64, u64) = (0xffff_ffff_e2f5_1e00, 0);

/// What a static template is: its CPUID and MSR bits and the host CPUs it is made for.
struct StaticTemplate {
    vendor: &'static [u8; 12],
    models: &'static [CpuModel],
    cpuid: Vec<&'static CpuidBits>,
    msrs: Vec<(u32, (u64, u64))>,
}

fn describe(template: CpuTemplate) -> Option<StaticTemplate> {
    const INTEL: &[u8; 12] = b"GenuineIntel";
    let t2_with = |extended: &'static [CpuidBits]| T2_CORE.iter().chain(extended).collect();
    let arch_caps = |bits| vec![(MSR_ARCH_CAPABILITIES, bits)];
    Some(match template {
        CpuTemplate::C3 => StaticTemplate {
            vendor: INTEL,
            models: &[SKYLAKE, CASCADE_LAKE, ICE_LAKE],
            cpuid: C3.iter().collect(),
            msrs: Vec::new(),
        },
        CpuTemplate::T2 => StaticTemplate {
            vendor: INTEL,
            models: &[SKYLAKE, CASCADE_LAKE, ICE_LAKE],
            cpuid: t2_with(&T2_EXTENDED),
            msrs: Vec::new(),
        },
        CpuTemplate::T2S => StaticTemplate {
            vendor: INTEL,
            models: &[SKYLAKE, CASCADE_LAKE],
            cpuid: t2_with(&T2_EXTENDED),
            msrs: arch_caps(T2S_ARCH_CAPABILITIES),
        },
        CpuTemplate::T2CL => StaticTemplate {
            vendor: INTEL,
            models: &[CASCADE_LAKE, ICE_LAKE],
            cpuid: t2_with(&T2CL_EXTENDED),
            msrs: arch_caps(T2CL_ARCH_CAPABILITIES),
        },
        CpuTemplate::T2A => StaticTemplate {
            vendor: b"AuthenticAMD",
            models: &[MILAN],
            cpuid: t2_with(&T2A_EXTENDED),
            msrs: Vec::new(),
        },
        // Arm's template: no x86 host fits it.
        CpuTemplate::V1N1 | CpuTemplate::None => return None,
    })
}

impl StaticTemplate {
    /// The template in custom-template form, one modifier per leaf as Firecracker writes it.
    fn to_custom(&self) -> CpuConfig {
        let mut cpuid_modifiers: Vec<CpuidLeafModifier> = Vec::new();
        for bits in &self.cpuid {
            let modifier = CpuidRegisterModifier {
                register: bits.register,
                bitmap: BitFilter {
                    mask: bits.mask.into(),
                    bits: bits.value.into(),
                }
                .to_bitmap(32),
            };
            let (leaf, subleaf) = (format!("{:#x}", bits.leaf), format!("{:#x}", bits.subleaf));
            match cpuid_modifiers
                .iter_mut()
                .find(|m| m.leaf == leaf && m.subleaf == subleaf)
            {
                Some(m) => m.modifiers.push(modifier),
                None => cpuid_modifiers.push(CpuidLeafModifier {
                    flags: if matches!(bits.leaf, 0x7 | 0xd) {
                        SUBLEAVES
                    } else {
                        0
                    },
                    leaf,
                    subleaf,
                    modifiers: vec![modifier],
                }),
            }
        }
        let msr_modifiers = self
            .msrs
            .iter()
            .map(|&(addr, (mask, bits))| MsrModifier {
                addr: format!("{addr:#x}"),
                bitmap: BitFilter { mask, bits }.to_bitmap(64),
            })
            .collect();
        CpuConfig {
            kvm_capabilities: Vec::new(),
            cpuid_modifiers,
            msr_modifiers,
        }
    }
}

fn template_path() -> JsonPath {
    JsonPath::keys(&["machine-config", "cpu_template"])
}

impl CpuTemplate {
    /// The template as a custom one, for a host whose CPUID leaf 0 names `vendor` and whose
    /// leaf 1 EAX is `signature`; `None` for no template. As Firecracker, a template runs only
    /// on the CPU vendor and models it was made for.
    pub fn for_host(
        self,
        vendor: &[u8; 12],
        signature: u32,
    ) -> Result<Option<CpuConfig>, ConfigError> {
        if self == CpuTemplate::None {
            return Ok(None);
        }
        let host = String::from_utf8_lossy(vendor);
        let Some(template) = describe(self) else {
            return Err(ConfigError::new(
                template_path(),
                format!("the {self:?} CPU template is for Arm CPUs; this host's CPU is {host}"),
            ));
        };
        if template.vendor != vendor {
            return Err(ConfigError::new(
                template_path(),
                format!(
                    "the {self:?} CPU template is for {} CPUs; this host's CPU is {host}",
                    String::from_utf8_lossy(template.vendor)
                ),
            ));
        }
        if !template
            .models
            .iter()
            .any(|m| m.signature == signature & SIGNATURE_MASK)
        {
            let models: Vec<&str> = template.models.iter().map(|m| m.name).collect();
            return Err(ConfigError::new(
                template_path(),
                format!(
                    "the {self:?} CPU template is for {}; this host's CPU is family {:#x} model {:#x} \
                     stepping {} (CPUID.1:EAX {signature:#x}); a custom template (cpu-config) \
                     can describe the same CPU here",
                    models.join(", "),
                    family(signature),
                    model(signature),
                    signature & 0xf,
                ),
            ));
        }
        Ok(Some(template.to_custom()))
    }
}

/// The displayed family: the extended family added for family 0xf.
fn family(signature: u32) -> u32 {
    let base = (signature >> 8) & 0xf;
    if base == 0xf {
        base + ((signature >> 20) & 0xff)
    } else {
        base
    }
}

/// The displayed model: the extended model in the high nibble for families 6 and 0xf.
fn model(signature: u32) -> u32 {
    let base = (signature >> 4) & 0xf;
    match (signature >> 8) & 0xf {
        0x6 | 0xf => ((signature >> 16) & 0xf) << 4 | base,
        _ => base,
    }
}

/// The templates in custom form whatever the host (tests compare them against Firecracker
/// through `cpu-config`, which runs on any host).
pub fn as_custom(template: CpuTemplate) -> Option<CpuConfig> {
    describe(template).map(|t| t.to_custom())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &[u8; 12] = b"GenuineIntel";
    const AMD: &[u8; 12] = b"AuthenticAMD";

    #[test]
    fn templates_run_on_their_vendor_and_models_only() {
        // Cascade Lake, with processor type bits set.
        let cascade = 0x0005_0657 | 0x3000;
        assert!(CpuTemplate::T2.for_host(INTEL, cascade).unwrap().is_some());
        assert!(CpuTemplate::T2CL
            .for_host(INTEL, cascade)
            .unwrap()
            .is_some());
        let skylake = 0x0005_0654;
        assert!(CpuTemplate::T2CL.for_host(INTEL, skylake).is_err());
        assert!(CpuTemplate::T2S.for_host(INTEL, skylake).unwrap().is_some());
        // An Emerald Rapids: Intel, but no template was made for it.
        let e = CpuTemplate::C3.for_host(INTEL, 0x000c_06f2).unwrap_err();
        assert!(
            e.message.contains("family 0x6 model 0xcf stepping 2"),
            "{}",
            e.message
        );
        assert!(e.message.contains("Intel Skylake"), "{}", e.message);
        let e = CpuTemplate::T2A.for_host(INTEL, cascade).unwrap_err();
        assert!(e.message.contains("AuthenticAMD"), "{}", e.message);
        assert!(CpuTemplate::T2A
            .for_host(AMD, 0x00a0_0f11)
            .unwrap()
            .is_some());
        assert!(CpuTemplate::T2.for_host(AMD, 0x00a0_0f11).is_err());
        assert!(CpuTemplate::V1N1.for_host(INTEL, cascade).is_err());
        assert_eq!(CpuTemplate::None.for_host(AMD, 0).unwrap(), None);
        assert_eq!((family(0x00a0_0f11), model(0x00a0_0f11)), (0x19, 0x1));
    }

    /// Firecracker's values for a few well-known bits, read back through the custom form.
    #[test]
    fn custom_forms_carry_firecrackers_bits() {
        let filter = |t: CpuTemplate, leaf: u32, subleaf: u32, reg: CpuidRegister| {
            let c = as_custom(t).unwrap();
            c.validate().unwrap();
            c.cpuid_filters()
                .into_iter()
                .find(|f| (f.0, f.1, f.3) == (leaf, subleaf, reg))
                .map(|f| f.4)
        };
        // T2 shows a Haswell and ERMS; C3 an Ivy Bridge without ERMS.
        let t2 = filter(CpuTemplate::T2, 1, 0, Eax).unwrap();
        assert_eq!(t2.apply(0x000c_06f2), 0x0003_06f2);
        assert_eq!(filter(CpuTemplate::T2, 7, 0, Ebx).unwrap().apply(0), 0x200);
        assert_eq!(
            filter(CpuTemplate::C3, 1, 0, Eax).unwrap().apply(0),
            0x0003_06e4
        );
        // C3 turns AVX2 (leaf 7 EBX 5) off, ERMS (9) comes from the host.
        assert_eq!(
            filter(CpuTemplate::C3, 7, 0, Ebx).unwrap().apply(0x220),
            0x200
        );
        assert!(filter(CpuTemplate::C3, 0x8000_0008, 0, Ebx).is_none());
        // T2A's speculation-control bits in 0x8000_0008 EBX.
        let t2a = filter(CpuTemplate::T2A, 0x8000_0008, 0, Ebx).unwrap();
        assert_eq!(t2a.apply(0xffff_ffff), 0xffe3_fdfa | 0x001c_0004);
        // Leaves 7 and 0xd have subleaves.
        let c = as_custom(CpuTemplate::T2).unwrap();
        let flags: Vec<(String, u32)> = c
            .cpuid_modifiers
            .iter()
            .map(|m| (m.leaf.clone(), m.flags))
            .collect();
        assert!(flags.contains(&("0x7".into(), 1)) && flags.contains(&("0x1".into(), 0)));
        // Only T2S and T2CL change IA32_ARCH_CAPABILITIES.
        let msrs = |t| as_custom(t).unwrap().msr_filters();
        assert_eq!(
            msrs(CpuTemplate::T2S),
            vec![(
                0x10a,
                BitFilter {
                    mask: u64::MAX,
                    bits: 0x0c0a_0c4c
                }
            )]
        );
        assert_eq!(msrs(CpuTemplate::T2CL)[0].1.apply(u64::MAX), 0x1d0a_e1ff);
        assert!(msrs(CpuTemplate::T2).is_empty() && msrs(CpuTemplate::C3).is_empty());
    }
}
