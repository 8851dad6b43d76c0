//! The test guest images themselves: their boot notes, and no instructions the software KVM's
//! CPL0 emulator cannot run (SSE/AVX registers, popcnt, int3).

use std::process::Command;

use integration_tests::{TEST_GUEST_LINUX64, TEST_GUEST_PVH};

fn program_headers(elf: &str) -> String {
    let out = Command::new("readelf")
        .args(["-lW", elf])
        .output()
        .expect("run readelf");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn only_the_pvh_image_carries_the_pvh_note() {
    assert!(program_headers(TEST_GUEST_PVH).contains(" NOTE "));
    assert!(!program_headers(TEST_GUEST_LINUX64).contains(" NOTE "));
}

#[test]
fn no_instruction_the_cpl0_emulator_cannot_run() {
    for elf in [TEST_GUEST_PVH, TEST_GUEST_LINUX64] {
        let out = Command::new("objdump")
            .args(["-d", elf])
            .output()
            .expect("run objdump");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("%xmm")
                    || l.contains("%ymm")
                    || l.contains("popcnt")
                    || l.contains("int3")
            })
            .collect();
        assert!(bad.is_empty(), "{elf}:\n{}", bad.join("\n"));
        // The scan means something only if objdump really decoded the code.
        let instructions = text.lines().filter(|l| l.contains(":\t")).count();
        assert!(
            instructions > 500,
            "{elf}: only {instructions} instructions decoded"
        );
    }
}
