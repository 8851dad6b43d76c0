//! The model store: what the predictor learned about a workload, kept per fingerprint so that
//! the next launch of the same (or a similar) workload starts warm.
//!
//! Layout of the store directory (default `~/.cache/prescient/models`):
//!
//! ```text
//! <fingerprint>/meta.json                  {"fingerprint": "...", "kernel_sha256": "..."}
//! <fingerprint>/trace-<unix ms, 20 digits>.jsonl   one per launch, the predictor's trace
//! ```
//!
//! The predictor's state is the trace: the policy is deterministic (a recorded trace replays to
//! the same decisions, `prescient predictor eval`), so replaying the latest trace through a new
//! policy with the same settings rebuilds exactly the forecasters, band and scores the last
//! run ended with. A "similar" workload is one with the same kernel (same `kernel_sha256`).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use predictor::sample::Sample;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a launch's predictor starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmStart {
    /// The trace it came from and how it matched, for `GET /predictor`.
    pub source: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    fingerprint: String,
    kernel_sha256: String,
}

pub struct ModelStore {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ModelStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// `$HOME/.cache/prescient/models`.
    pub fn default_root() -> Option<PathBuf> {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/prescient/models"))
    }

    /// The newest trace of `dir`, if any.
    fn latest_trace(dir: &Path) -> Option<PathBuf> {
        let mut traces: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("trace-") && n.ends_with(".jsonl"))
            })
            .collect();
        traces.sort();
        traces.pop()
    }

    /// The entry to start from: this fingerprint's newest trace, else the newest trace of an
    /// entry with the same kernel. Traces recorded with another window length, or that do not
    /// parse (a VM killed mid-line), are skipped with the reason in `skipped`.
    pub fn find(
        &self,
        fingerprint: &str,
        kernel_sha256: &str,
        window_ms: u64,
        skipped: &mut Vec<String>,
    ) -> Option<WarmStart> {
        let mut candidates: Vec<(PathBuf, &str)> = Vec::new();
        if let Some(t) = Self::latest_trace(&self.root.join(fingerprint)) {
            candidates.push((t, "same fingerprint"));
        }
        let mut similar: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|dir| dir.file_name().and_then(|n| n.to_str()) != Some(fingerprint))
            .filter(|dir| {
                std::fs::read_to_string(dir.join("meta.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<Meta>(&t).ok())
                    .is_some_and(|m| m.kernel_sha256 == kernel_sha256)
            })
            .filter_map(|dir| Self::latest_trace(&dir))
            .collect();
        // Newest first: the file names carry the time.
        similar.sort_by_key(|p| std::cmp::Reverse(p.file_name().map(|n| n.to_owned())));
        candidates.extend(similar.into_iter().map(|t| (t, "same kernel")));
        for (trace, how) in candidates {
            match predictor::trace::read(&trace) {
                Ok(t) if t.header.window_ms != window_ms => skipped.push(format!(
                    "{}: recorded with {} ms windows, this VM uses {window_ms}",
                    trace.display(),
                    t.header.window_ms
                )),
                Ok(t) if t.samples.is_empty() => {
                    skipped.push(format!("{}: no windows", trace.display()))
                }
                Ok(t) => {
                    return Some(WarmStart {
                        source: format!("{} ({how})", trace.display()),
                        samples: t.samples,
                    })
                }
                Err(e) => skipped.push(format!("{}: {e}", trace.display())),
            }
        }
        None
    }

    /// Makes this fingerprint's entry and names the trace this launch records into it.
    pub fn new_trace(&self, fingerprint: &str, kernel_sha256: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join(fingerprint);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let meta = dir.join("meta.json");
        let text = serde_json::to_string(&Meta {
            fingerprint: fingerprint.into(),
            kernel_sha256: kernel_sha256.into(),
        })
        .expect("meta serialises");
        std::fs::write(&meta, text).map_err(io(&meta))?;
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Ok(dir.join(format!("trace-{ms:020}.jsonl")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use predictor::resource::Usage;
    use predictor::trace::{Header, Trace};

    fn trace(window_ms: u64, n: u64) -> Trace {
        Trace {
            header: Header::new("t", window_ms, Usage::default()),
            samples: (0..n)
                .map(|i| Sample {
                    t_ms: i * window_ms,
                    ..Sample::default()
                })
                .collect(),
        }
    }

    #[test]
    fn finds_the_exact_entry_then_a_similar_one_and_skips_bad_traces() {
        let root = std::env::temp_dir().join(format!("prescient-store-{}", std::process::id()));
        let store = ModelStore::new(root.clone());
        let mut skipped = Vec::new();
        assert!(store.find("fp", "k", 100, &mut skipped).is_none());

        let p = store.new_trace("other", "k").unwrap();
        predictor::trace::write(&p, &trace(100, 3)).unwrap();
        let w = store.find("fp", "k", 100, &mut skipped).unwrap();
        assert!(w.source.contains("other") && w.source.ends_with("(same kernel)"));
        assert_eq!(w.samples.len(), 3);
        assert!(store
            .find("fp", "another kernel", 100, &mut skipped)
            .is_none());

        let p = store.new_trace("fp", "k").unwrap();
        predictor::trace::write(&p, &trace(100, 5)).unwrap();
        let w = store.find("fp", "k", 100, &mut skipped).unwrap();
        assert!(w.source.ends_with("(same fingerprint)"), "{}", w.source);
        assert_eq!(w.samples.len(), 5);

        assert!(skipped.is_empty(), "{skipped:?}");
        assert!(store.find("fp", "k", 50, &mut skipped).is_none());
        assert!(skipped[0].contains("100 ms windows"), "{skipped:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
