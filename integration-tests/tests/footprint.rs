//! What the VMM process loads besides itself. Every shared library it maps costs each VMM the
//! library's resident pages; glibc's libm costs ~320 KiB just by being loaded (its IFUNC
//! resolvers run at start), so prescient does its math without it (predictor::math,
//! docs/memory.md).

use std::process::Command;
use std::time::Duration;

use integration_tests::bench::{VmSpec, Vmm};
use integration_tests::{prescient_bin, Scratch};

/// The shared libraries a running prescient process has mapped.
fn mapped_libraries(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains(".so"))
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

#[test]
fn the_vmm_neither_links_nor_loads_libm() {
    let out = Command::new("readelf")
        .arg("-dW")
        .arg(prescient_bin())
        .output()
        .expect("run readelf");
    assert!(out.status.success());
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        needed.iter().any(|l| l.contains("libc.so")),
        "readelf found no NEEDED entries:\n{dynamic}"
    );
    assert!(
        !needed.iter().any(|l| l.contains("libm.so")),
        "prescient links libm: {needed:#?}"
    );

    // Nor does anything load it later, with a VM running.
    let scratch = Scratch::new("footprint-libs");
    let spec = VmSpec::test_guest(1, 128, "cpu_ms=1 mem_mib=1 exit=halt");
    let vm = Vmm::prescient()
        .spawn(Some(&spec), scratch.path(), None)
        .unwrap();
    vm.expect_prefix("prescient-test-guest: done", Duration::from_secs(60));
    let libs = mapped_libraries(vm.pid());
    vm.terminate(Duration::from_secs(10));
    assert!(
        libs.iter().any(|l| l.starts_with("libc.so")),
        "no libc among {libs:?}"
    );
    assert!(
        !libs.iter().any(|l| l.starts_with("libm.so")),
        "libm is loaded: {libs:?}"
    );
}

/// Addresses of the binary's function symbols, by demangled name.
fn function_addresses(bin: &std::path::Path) -> Vec<(u64, String)> {
    let out = Command::new("nm")
        .args(["-C", "--defined-only"])
        .arg(bin)
        .output()
        .expect("run nm");
    assert!(out.status.success(), "nm failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let name = f.next()?;
            matches!(kind, "t" | "T").then(|| (addr, name.to_string()))
        })
        .collect()
}

/// resources/startup-text/order.ld puts the functions start-up and an idle VM run first in the
/// text, so that they are resident as a few fault-around windows rather than as most of the
/// binary (docs/memory.md). The linker places the C runtime's `_start` right after them, where
/// it would otherwise come first.
#[test]
fn start_up_code_comes_first_in_the_text() {
    let syms = function_addresses(prescient_bin());
    let at = |name: &str| {
        syms.iter()
            .find(|(_, n)| n == name)
            .map(|(a, _)| *a)
            .unwrap_or_else(|| panic!("prescient has no function {name}"))
    };
    let start = at("_start");
    let launch = at("vmm::runtime::Runtime::launch");
    let snapshot = at("vmm::snapshot::AtomicFile::create");
    assert!(
        launch < start,
        "start-up code (Runtime::launch at {launch:#x}) is not before the ordered part's end \
         (_start at {start:#x}): is vmm/build.rs still linking with order.ld?"
    );
    assert!(
        start < snapshot,
        "code an idle VM never runs (AtomicFile::create at {snapshot:#x}) is among the \
         start-up code (before _start at {start:#x})"
    );
}
