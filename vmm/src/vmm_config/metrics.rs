//! `PUT /metrics` and the config file's `metrics` section: where flushed metrics go (the sink
//! itself is `crate::metrics`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /metrics`: where flushed metrics go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
    /// Each line carries the instance id as `id` (Firecracker 1.17).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emit_id: bool,
    /// Operator-defined pairs each line carries under `properties`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

impl MetricsConfig {
    /// Metrics to `path` with nothing added to the lines.
    pub fn at(path: PathBuf) -> Self {
        Self {
            metrics_path: path,
            emit_id: false,
            properties: None,
        }
    }
}
