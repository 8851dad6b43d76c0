//! prescient: a KVM microVM monitor whose resource predictor runs inside it.
//!
//! A [`vmm_config::VmConfig`] (from `--config-file`) is turned into a running
//! [`microvm::MicroVm`] by [`builder::build_microvm`]; [`runtime::Runtime::run`] serves the VMM
//! thread's event loop until the guest ends and says why ([`exit::ExitReason`]). The modules form
//! layers, each using only those below it; `docs/architecture.md` draws them and follows one
//! exit and one predictor window through the code.

pub mod acpi;
pub mod api;
pub mod arch;
pub mod autopilot;
pub mod boot;
pub mod builder;
pub mod cleanup;
pub mod cli;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod idle_trim;
pub mod live;
pub mod logger;
pub mod metrics;
pub mod microvm;
pub mod profile;
pub mod rpc;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod vcpus;
pub mod vmm_config;
pub mod vstate;

/// The Firecracker release whose API, flags and files prescient takes, as a literal for
/// `concat!` (the version lines of `--version`).
#[macro_export]
macro_rules! firecracker_version {
    () => {
        "1.17.0-dev"
    };
}

/// The Firecracker release whose API, flags and files prescient takes (checked against that
/// release's binary by `integration-tests/tests/conformance.rs`).
pub const FIRECRACKER_VERSION: &str = firecracker_version!();

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// `a::b::c` cut to its first `depth` segments.
    fn prefix(path: &[String], depth: usize) -> String {
        path[..depth.min(path.len())].join("::")
    }

    /// The module paths (`crate::x::y`, `super::z`) that `code` names, resolved from `module`.
    fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
        let ident = |s: &str| -> Vec<String> {
            let mut segs = Vec::new();
            let mut rest = s;
            loop {
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(rest.len());
                if end == 0 {
                    break;
                }
                segs.push(rest[..end].to_string());
                match rest[end..].strip_prefix("::") {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            segs
        };
        let mut out = Vec::new();
        for (i, _) in code.match_indices("crate::") {
            out.push(ident(&code[i + 7..]));
        }
        for (i, _) in code.match_indices("super::") {
            if code[..i].ends_with("super::") {
                continue;
            }
            let mut base = module.to_vec();
            let mut rest = &code[i..];
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            base.extend(ident(rest));
            out.push(base);
        }
        out
    }

    /// Whether the graph has a cycle, and one module on it.
    fn on_a_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
        fn visit(
            n: &str,
            edges: &BTreeMap<String, BTreeSet<String>>,
            state: &mut BTreeMap<String, u8>,
        ) -> Option<String> {
            match state.get(n) {
                Some(1) => return Some(n.to_string()),
                Some(_) => return None,
                None => {}
            }
            state.insert(n.to_string(), 1);
            for m in edges.get(n).into_iter().flatten() {
                if let Some(c) = visit(m, edges, state) {
                    return Some(c);
                }
            }
            state.insert(n.to_string(), 2);
            None
        }
        let mut state = BTreeMap::new();
        edges.keys().find_map(|n| visit(n, edges, &mut state))
    }

    /// Lower layers do not know the layers above them: neither the crate's modules nor the
    /// modules inside each of them import each other in a circle (tests aside).
    #[test]
    fn the_modules_import_each_other_without_a_circle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        for depth in [1, 2, 3] {
            let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for f in &files {
                let rel = f.strip_prefix(&src).unwrap().with_extension("");
                let mut module: Vec<String> = rel
                    .iter()
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect();
                if module.last().is_some_and(|m| m == "mod") {
                    module.pop();
                }
                if module == ["lib"] || module == ["main"] {
                    continue;
                }
                let text = std::fs::read_to_string(f).unwrap();
                let code: String = text
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap()
                    .lines()
                    .map(|l| l.split("//").next().unwrap())
                    .collect::<Vec<_>>()
                    .join("\n");
                let from = prefix(&module, depth);
                for r in references(&module, &code) {
                    let to = prefix(&r, depth);
                    if !to.is_empty() && to != from && !from.starts_with(&format!("{to}::")) {
                        edges.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
            assert!(edges.len() > 5, "{edges:?}");
            assert_eq!(
                on_a_cycle(&edges),
                None,
                "an import circle through modules {depth} deep: {edges:#?}"
            );
        }
    }
}
