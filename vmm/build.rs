//! Compiles the seccomp filters of resources/seccomp/x86_64.json to BPF, so that the binary
//! carries them as bytes and never parses JSON at run time.

use std::path::PathBuf;

/// Every filter the VMM installs: `<thread kind>_<stage>`.
const FILTERS: [&str; 12] = [
    "vmm_boot",
    "vmm_steady",
    "vmm_quarantine",
    "api_boot",
    "api_steady",
    "api_quarantine",
    "vcpu_boot",
    "vcpu_steady",
    "vcpu_quarantine",
    "vcpu_spawner_boot",
    "vcpu_spawner_steady",
    "vcpu_spawner_quarantine",
];

fn main() {
    // Read at run time: `env!` would bake in the directory the build script was compiled in,
    // and cargo reuses that binary for a checkout at another path sharing the target dir.
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = PathBuf::from(&manifest_dir).join("../resources/startup-text/order.ld");
    println!("cargo:rerun-if-changed={}", order.display());
    // The functions start-up and an idle VM run, first in the text and together: they are then
    // resident as a few 64 KiB fault-around windows rather than as most of the binary
    // (resources/startup-text/record.py). An INSERT script only adds to the linker's own layout.
    println!(
        "cargo:rustc-link-arg-bin=prescient=-Wl,-T,{}",
        order.display()
    );
    let json = PathBuf::from(manifest_dir).join("../resources/seccomp/x86_64.json");
    println!("cargo:rerun-if-changed={}", json.display());
    let file = std::fs::File::open(&json)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", json.display()));
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("seccomp");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/seccomp");
    for name in FILTERS {
        let program = filters
            .get(name)
            .unwrap_or_else(|| panic!("{} has no filter {name:?}", json.display()));
        let bytes: Vec<u8> = program
            .iter()
            .flat_map(|i| {
                let mut b = [0u8; 8];
                b[..2].copy_from_slice(&i.code.to_le_bytes());
                b[2] = i.jt;
                b[3] = i.jf;
                b[4..].copy_from_slice(&i.k.to_le_bytes());
                b
            })
            .collect();
        std::fs::write(out.join(format!("{name}.bpf")), bytes).expect("write a compiled filter");
    }
    let unknown: Vec<&String> = filters
        .keys()
        .filter(|k| !FILTERS.contains(&k.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{}: filters nothing installs: {unknown:?}",
        json.display()
    );
}
