//! Builds the freestanding x86-64 test guest (integration-tests/guest/) with
//! the system C toolchain and exports the two ELF variants' paths:
//!
//! * `PRESCIENT_TEST_GUEST_PVH`     - `test-guest.elf`, with the Xen PVH note
//! * `PRESCIENT_TEST_GUEST_LINUX64` - `test-guest-linux64.elf`, no note
//!   (the VMM falls back to the Linux 64-bit boot protocol at `e_entry`)
//!
//! Every `guest/*.c` and `guest/*.S` is compiled; `guest/guest.ld` is run
//! through the C preprocessor once per variant (`-DPVH` for the PVH one).
//! `PRESCIENT_GUEST_CC` overrides the compiler (default `gcc`), which also
//! drives the link. A compile or link error fails the build with the
//! compiler's own message.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Freestanding, no SSE or red zone: CPL0 code is emulated instruction by instruction on
/// software-KVM hosts, and the emulator cannot run SSE.
const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-O2",
    "-fno-stack-protector",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-g0",
];

const LDFLAGS: &[&str] = &[
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
];

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("test guest: cannot run {what} ({cmd:?}): {e}"));
    if !out.status.success() {
        panic!(
            "test guest: {what} failed ({})\n{cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Surface warnings without failing.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning=test guest: {line}");
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("test-guest");
    let obj_dir = out.join("obj");
    fs::create_dir_all(&obj_dir).unwrap();

    let cc = env::var("PRESCIENT_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    println!("cargo:rerun-if-env-changed=PRESCIENT_GUEST_CC");
    println!("cargo:rerun-if-changed={}", guest.display());

    let mut sources: Vec<PathBuf> = fs::read_dir(&guest)
        .unwrap_or_else(|e| panic!("test guest: cannot read {}: {e}", guest.display()))
        .map(|e| e.unwrap().path())
        .collect();
    sources.sort();
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let mut objects = Vec::new();
    for src in sources.iter().filter(|p| matches!(ext(p), "c" | "S")) {
        let obj = obj_dir.join(format!("{}.o", src.file_name().unwrap().to_string_lossy()));
        run(
            Command::new(&cc)
                .args(CFLAGS)
                .arg("-I")
                .arg(&guest)
                .arg("-c")
                .arg(src)
                .arg("-o")
                .arg(&obj),
            &format!("compiling {}", src.display()),
        );
        objects.push(obj);
    }
    assert!(
        !objects.is_empty(),
        "test guest: no sources in {}",
        guest.display()
    );

    for (name, define, var) in [
        ("test-guest.elf", Some("-DPVH"), "PRESCIENT_TEST_GUEST_PVH"),
        (
            "test-guest-linux64.elf",
            None,
            "PRESCIENT_TEST_GUEST_LINUX64",
        ),
    ] {
        let script = out.join(format!("{name}.ld"));
        let mut pp = Command::new(&cc);
        pp.args(["-E", "-P", "-x", "c"]);
        if let Some(d) = define {
            pp.arg(d);
        }
        pp.arg(guest.join("guest.ld")).arg("-o").arg(&script);
        run(&mut pp, "preprocessing guest.ld");

        let elf = out.join(name);
        run(
            Command::new(&cc)
                .args(LDFLAGS)
                .arg("-T")
                .arg(&script)
                .arg("-o")
                .arg(&elf)
                .args(&objects),
            &format!("linking {name}"),
        );
        println!("cargo:rustc-env={var}={}", elf.display());
    }
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or("")
}
