//! CPU templates against Firecracker itself: the test guest boots under the Firecracker
//! reference binary and under prescient with the same spec, prints (at CPL0, `cpuinfo=1`) the
//! CPUID leaves the templates change and IA32_ARCH_CAPABILITIES, and the two must agree.
//!
//! Firecracker runs a static template (`machine-config.cpu_template`) only on the CPU vendor
//! and models it was made for, so on most hosts both VMMs refuse most of them; the static
//! templates' bits are then compared through their custom form (`cpu-config`), which runs
//! anywhere: prescient's static templates are that custom form, applied by the same code.
//!
//! What a guest can see of the template depends on the host's KVM: on kvm_pvm (this project's
//! development hosts) CPL0 CPUID shows what the VMM set for leaves 0x1, 0x80000001 and
//! 0x80000008 but reports leaves 0x7 and 0xd as KVM has them whatever is set (in both VMMs).

use std::path::Path;
use std::time::Duration;

use integration_tests::bench::firecracker_path;
use integration_tests::{prescient_bin, run_binary, Scratch, TEST_GUEST_PVH};
use serde_json::{json, Value};
use vmm::vmm_config::static_cpu_templates::as_custom;
use vmm::vmm_config::CpuTemplate;

const TEMPLATES: [CpuTemplate; 5] = [
    CpuTemplate::C3,
    CpuTemplate::T2,
    CpuTemplate::T2S,
    CpuTemplate::T2CL,
    CpuTemplate::T2A,
];

/// How one VMM ran a spec: the guest's cpuinfo lines, or why it did not boot.
#[derive(Debug)]
enum Run {
    Booted(Vec<String>),
    Refused { code: Option<i32>, stderr: String },
}

fn spec(scratch: &Scratch, name: &str, machine_extra: Value, cpu_config: Option<Value>) -> String {
    let mut machine = json!({"vcpu_count": 1, "mem_size_mib": 64});
    if let (Some(m), Some(extra)) = (machine.as_object_mut(), machine_extra.as_object()) {
        m.extend(extra.clone());
    }
    let mut spec = json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH, "boot_args": "console=ttyS0 cpu_ms=1 mem_mib=1 cpuinfo=1"},
        "machine-config": machine,
        // Firecracker's config file must list its drives, even none.
        "drives": [],
    });
    if let Some(cpu) = cpu_config {
        spec["cpu-config"] = cpu;
    }
    scratch
        .write(&format!("{name}.json"), &spec.to_string())
        .to_str()
        .unwrap()
        .to_string()
}

fn run(bin: &Path, spec: &str) -> Run {
    let args = ["--no-api", "--config-file", spec, "--level", "Error"];
    let out = run_binary(bin, &args, Duration::from_secs(120));
    let lines: Vec<String> = out
        .stdout
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("guest: cpuid ") || l.starts_with("guest: msr "))
        .map(String::from)
        .collect();
    if out.code() == Some(0) && out.stdout.contains("guest: cpuinfo done") {
        assert!(
            out.stdout.contains("prescient-test-guest: done"),
            "{} booted but the guest failed:\n{}",
            bin.display(),
            out.stdout
        );
        Run::Booted(lines)
    } else {
        Run::Refused {
            code: out.code(),
            stderr: format!("{}{}", out.stdout, out.stderr),
        }
    }
}

fn both(scratch: &Scratch, name: &str, machine: Value, cpu: Option<Value>) -> (Run, Run) {
    let fc = firecracker_path().unwrap_or_else(|why| {
        panic!("the CPU template comparison cannot run without the Firecracker reference: {why}")
    });
    let spec = spec(scratch, name, machine, cpu);
    (run(&fc, &spec), run(prescient_bin(), &spec))
}

/// The value `guest: cpuid leaf=<leaf> sub=<sub> ... <reg>=0x..` printed.
fn register(lines: &[String], leaf: u32, sub: u32, reg: &str) -> Option<u32> {
    let head = format!("guest: cpuid leaf={leaf:#x} sub={sub} ");
    let line = lines.iter().find(|l| l.starts_with(&head))?;
    let field = line
        .split(' ')
        .find_map(|f| f.strip_prefix(&format!("{reg}=0x")))?;
    u32::from_str_radix(field, 16).ok()
}

fn host_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("vendor_id")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

fn booted(run: &Run, what: &str) -> Vec<String> {
    match run {
        Run::Booted(lines) => lines.clone(),
        Run::Refused { code, stderr } => panic!("{what} did not boot (exit {code:?}):\n{stderr}"),
    }
}

/// Each static template (and None): both VMMs boot it and show the guest the same leaves, or
/// both refuse it; one made for the other CPU vendor is refused by both.
#[test]
fn static_templates_boot_or_are_refused_as_by_firecracker() {
    let scratch = Scratch::new("cpu-templates-static");
    let (fc, pr) = both(&scratch, "none", json!({"cpu_template": "None"}), None);
    let plain = booted(&fc, "Firecracker without a template");
    assert_eq!(booted(&pr, "prescient without a template"), plain);
    assert!(register(&plain, 1, 0, "eax").is_some(), "{plain:?}");

    let vendor = host_vendor();
    for template in TEMPLATES {
        let name = format!("{template:?}");
        let (fc, pr) = both(&scratch, &name, json!({"cpu_template": name}), None);
        match (&fc, &pr) {
            (Run::Booted(a), Run::Booted(b)) => {
                assert_eq!(a, b, "{name}: the guest's CPUID and MSRs differ");
                // The template's CPU signature reached the guest.
                let custom = as_custom(template).unwrap();
                let (.., eax) = custom
                    .cpuid_filters()
                    .into_iter()
                    .find(|f| f.0 == 1 && f.3 == vmm::vmm_config::cpu_config::CpuidRegister::Eax)
                    .unwrap();
                let host_eax = register(&plain, 1, 0, "eax").unwrap();
                if cpuid_shown(&plain, a) {
                    assert_eq!(
                        register(a, 1, 0, "eax"),
                        Some(eax.apply(host_eax.into()) as u32)
                    );
                }
                eprintln!("{name}: booted under both, the same leaves");
            }
            (Run::Refused { stderr: a, .. }, Run::Refused { stderr: b, .. }) => {
                assert!(
                    b.contains("cpu_template") && b.contains(&format!("the {name} CPU template")),
                    "{name}: prescient's refusal does not say why:\n{b}"
                );
                eprintln!(
                    "{name}: refused by both\n  firecracker: {}\n  prescient:   {}",
                    a.lines().find(|l| l.contains("Error")).unwrap_or(a),
                    b.lines().last().unwrap_or(b)
                );
            }
            _ => panic!("{name}: Firecracker {fc:?}\nprescient {pr:?}"),
        }
        let for_other_vendor = if template == CpuTemplate::T2A {
            vendor != "AuthenticAMD"
        } else {
            vendor != "GenuineIntel"
        };
        if for_other_vendor {
            assert!(
                matches!(pr, Run::Refused { ref stderr, .. } if stderr.contains(&vendor)),
                "{name} on a {vendor} host: {pr:?}"
            );
        }
    }
}

/// Each static template's bits, as prescient has them, given to both VMMs as a custom
/// template: the guest sees the same CPUID leaves and IA32_ARCH_CAPABILITIES under both, and
/// the template's CPU signature and MSR value where this host's KVM shows them.
#[test]
fn static_template_bits_reach_the_guest_as_under_firecracker() {
    let scratch = Scratch::new("cpu-templates-custom");
    let (fc, pr) = both(&scratch, "plain", json!({}), None);
    let plain = booted(&fc, "Firecracker without a template");
    assert_eq!(booted(&pr, "prescient without a template"), plain);
    let host_eax = register(&plain, 1, 0, "eax").unwrap();

    let mut differs_from_plain = 0;
    for template in TEMPLATES {
        let name = format!("{template:?}");
        let custom = as_custom(template).unwrap();
        let (fc, pr) = both(
            &scratch,
            &format!("custom-{name}"),
            json!({}),
            Some(serde_json::to_value(&custom).unwrap()),
        );
        let a = booted(&fc, &format!("Firecracker with {name}'s bits"));
        let b = booted(&pr, &format!("prescient with {name}'s bits"));
        assert_eq!(a, b, "{name}'s bits: the guest's CPUID and MSRs differ");
        if !cpuid_shown(&plain, &a) {
            continue;
        }
        let eax = custom
            .cpuid_filters()
            .into_iter()
            .find(|f| f.0 == 1 && f.3 == vmm::vmm_config::cpu_config::CpuidRegister::Eax)
            .unwrap()
            .4;
        assert_eq!(
            register(&a, 1, 0, "eax"),
            Some(eax.apply(host_eax.into()) as u32),
            "{name}"
        );
        for (addr, filter) in custom.msr_filters() {
            let shown = a
                .iter()
                .find_map(|l| l.strip_prefix(&format!("guest: msr {addr:#x}=0x")))
                .and_then(|v| u64::from_str_radix(v, 16).ok());
            let before = plain
                .iter()
                .find_map(|l| l.strip_prefix(&format!("guest: msr {addr:#x}=0x")))
                .and_then(|v| u64::from_str_radix(v, 16).ok());
            if let Some(before) = before {
                assert_eq!(shown, Some(filter.apply(before)), "{name}: MSR {addr:#x}");
            }
        }
        if a != plain {
            differs_from_plain += 1;
        }
        eprintln!("{name}'s bits: the same under both");
    }
    // Every template changes leaf 1's signature: where the host shows one, it shows them all.
    assert!(
        differs_from_plain == 0 || differs_from_plain == TEMPLATES.len(),
        "{differs_from_plain} of {} templates reached the guest",
        TEMPLATES.len()
    );
    if differs_from_plain == 0 {
        // Seen on the AMD kvm_pvm hosts of ../shared/notes/host-kvm.md: only the two VMMs'
        // agreement was checked there, not the bits themselves.
        eprintln!(
            "this host's KVM shows the guest the host's CPUID whatever either VMM sets: the \
             templates' bits themselves could not be checked here"
        );
    }
}

/// Whether this host's KVM shows the guest the CPU signature a VMM set: Firecracker's guest
/// with a template that changes leaf 1's EAX sees another value than without one. On kvm_pvm
/// (Intel) CPL0 CPUID shows it; on AMD kvm_pvm hosts CPUID is not intercepted at all.
fn cpuid_shown(plain: &[String], templated: &[String]) -> bool {
    register(plain, 1, 0, "eax") != register(templated, 1, 0, "eax")
}

/// A custom template that changes a CPUID leaf the host's KVM does not offer is refused by
/// both, prescient naming the leaf.
#[test]
fn a_template_on_a_leaf_kvm_lacks_is_refused_by_both() {
    let scratch = Scratch::new("cpu-templates-missing-leaf");
    let cpu = json!({"cpuid_modifiers": [{"leaf": "0x3fff", "subleaf": "0x0", "flags": 0,
        "modifiers": [{"register": "eax", "bitmap": format!("0b{}", "0".repeat(32))}]}]});
    let (fc, pr) = both(&scratch, "missing-leaf", json!({}), Some(cpu));
    assert!(matches!(fc, Run::Refused { .. }), "Firecracker: {fc:?}");
    assert!(
        matches!(pr, Run::Refused { code: Some(c), ref stderr } if c != 0
            && stderr.contains("cpu-config.cpuid_modifiers")
            && stderr.contains("leaf 0x3fff subleaf 0x0")),
        "prescient: {pr:?}"
    );
}
