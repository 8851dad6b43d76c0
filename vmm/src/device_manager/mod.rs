//! Creates the VM's devices and attaches them to the buses and interrupt lines, registering each
//! one as it goes (`registry`).

pub mod acpi;
pub mod boot_timer;
pub mod legacy;
pub mod mmio;
pub mod registry;

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    use devices::virtio::balloon::{Balloon, BalloonOptions};
    use devices::virtio::rng::Rng;
    use event_manager::EventManager;
    use kvm_ioctls::Kvm;

    use super::mmio::MmioDeviceManager;
    use super::registry::DeviceRegistry;
    use crate::event_loop::Subscriber;
    use crate::exit::ExitSignal;
    use crate::vstate::vm::Vm;

    /// The DSDT of a VM with every kind of device the registry can hold, made by the same
    /// attach paths a VM is built with, disassembles with ACPICA's `iasl -d` without an error
    /// or a warning, and the listing names every device with its hardware id (iasl drops a
    /// name's trailing underscores: `GED_` is listed as `GED`).
    #[test]
    fn the_dsdt_of_every_attached_device_disassembles_cleanly() {
        let kvm = Kvm::new().unwrap();
        let mem = crate::vstate::memory::create_guest_memory(
            64 << 20,
            crate::vmm_config::HugePages::None,
        )
        .unwrap();
        let vm = Vm::new(&kvm, false, &mem).unwrap();
        let mut registry = DeviceRegistry::default();
        let mut events = EventManager::<Subscriber>::new().unwrap();
        let mut mmio = MmioDeviceManager::default();
        let rng = Arc::new(Mutex::new(Rng::new(Default::default()).unwrap()));
        let opts = BalloonOptions {
            target_pages: 0,
            deflate_on_oom: false,
            stats_interval: std::time::Duration::ZERO,
            free_page_hinting: false,
            free_page_reporting: false,
        };
        let balloon = Arc::new(Mutex::new(Balloon::new(opts).unwrap()));
        mmio.attach(
            vm.fd(),
            &mem,
            &mut registry,
            &mut events,
            "entropy".into(),
            rng,
        )
        .unwrap();
        mmio.attach(
            vm.fd(),
            &mem,
            &mut registry,
            &mut events,
            "balloon".into(),
            balloon,
        )
        .unwrap();
        let irq = mmio.take_irq().unwrap();
        super::acpi::attach(vm.fd(), &mut registry, irq, 1, 3).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        super::legacy::attach(vm.fd(), &mut registry, Box::new(std::io::sink()), exit).unwrap();
        let dsdt = crate::acpi::dsdt(&registry.aml());

        let dir = std::env::temp_dir().join(format!("prescient-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, &dsdt).unwrap();
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run iasl (Debian: apt-get install acpica-tools): {e}")
            });
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d failed: {log}");
        for bad in ["Error", "Warning", "Unresolved", "Unknown"] {
            assert!(!log.contains(bad), "iasl says {bad}: {log}");
        }
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            !dsl.contains("External ("),
            "everything it names is defined:\n{dsl}"
        );
        for (device, id) in [
            ("Device (COM1)", "EisaId (\"PNP0501\")"),
            ("Device (PS2)", "EisaId (\"PNP0303\")"),
            ("Device (VR00)", "\"LNRO0005\""),
            ("Device (VR01)", "\"LNRO0005\""),
            ("Device (GED)", "\"ACPI0013\""),
            ("Device (CPHP)", "EisaId (\"PNP0A06\")"),
            ("Device (CPUS)", "\"ACPI0010\""),
            ("Device (C000)", "\"ACPI0007\""),
            ("Device (C002)", "\"ACPI0007\""),
        ] {
            let at = dsl
                .find(device)
                .unwrap_or_else(|| panic!("{device} missing from:\n{dsl}"));
            let body = &dsl[at..];
            let hid = body.find("_HID").expect("a hardware id");
            assert!(
                body[hid..].starts_with(&format!("_HID, {id}")),
                "{device}: {}",
                &body[hid..hid + 40]
            );
        }
        assert!(!dsl.contains("Device (C003)"));
        // The methods the GED and the processors run, and the virtio windows' resources.
        for needle in [
            "Method (_EVT, 1, Serialized)",
            "\\_SB.CPUS.CSCN ()",
            "Method (CSCN, 0, Serialized)",
            "Method (_EJ0, 1, NotSerialized)",
            "Memory32Fixed (ReadWrite,",
            "0xC0001000,         // Address Base",
        ] {
            assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
        }
    }
}
