//! `prescient --config-file vm.json --profile profile.json`: checks the profile against the
//! workload, sizes the VM from it and picks the model store entry the predictor starts from.

use std::path::{Path, PathBuf};

use super::sizing;
use super::store::{ModelStore, WarmStart};
use super::{Profile, ProfileError, Verdict};
use crate::seccomp::Stage;
use crate::vmm_config::VmConfig;

/// What the launch does beyond the changed spec.
#[derive(Debug, Default)]
pub struct Launch {
    /// The seccomp stage to request once the VM is built.
    pub seccomp: Option<Stage>,
    pub warm: Option<WarmStart>,
}

/// Applies the profile at `path` to `config`. A malformed profile or another workload's is an
/// error; a stale one is reported and the launch goes on without it.
pub fn prepare(
    config: &mut VmConfig,
    path: &Path,
    store_root: Option<PathBuf>,
) -> Result<Launch, ProfileError> {
    let profile = match Profile::load(path)?.check(path, config)? {
        Verdict::Trusted(p) => p,
        Verdict::Stale(why) => {
            tracing::warn!("{why}; booting the spec as written");
            return Ok(Launch::default());
        }
    };
    let sized = sizing::apply(&profile, config);
    for change in &sized.changes {
        tracing::info!("profile {}: {change}", path.display());
    }
    if sized.changes.is_empty() {
        tracing::info!("profile {}: the spec already fits", path.display());
    }
    let warm = match (&mut config.predictor, store_root) {
        (Some(predictor), Some(root)) => {
            let store = ModelStore::new(root);
            let mut skipped = Vec::new();
            let warm = store.find(
                &profile.fingerprint,
                &profile.kernel_sha256,
                predictor.window_ms,
                &mut skipped,
            );
            for s in skipped {
                tracing::warn!("model store: skipped {s}");
            }
            match &warm {
                Some(w) => tracing::info!("predictor starts warm from {}", w.source),
                None => tracing::info!("predictor starts cold: no model store entry fits"),
            }
            if predictor.trace_path.is_some() {
                tracing::warn!(
                    "model store: the spec's predictor.trace_path records this run; the store keeps no trace of it"
                );
            } else {
                match store.new_trace(&profile.fingerprint, &profile.kernel_sha256) {
                    Ok(t) => predictor.trace_path = Some(t),
                    Err(e) => tracing::warn!("{e}; this run is not kept"),
                }
            }
            warm
        }
        _ => None,
    };
    Ok(Launch {
        seccomp: sized.seccomp,
        warm,
    })
}
