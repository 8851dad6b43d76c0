//! `entropy`: the virtio-rng device.

use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

use super::drives::validate_rate_limiter;
use super::{ConfigError, JsonPath};

/// Firecracker's entropy device section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_rate_limiter(
            JsonPath::keys(&["entropy", "rate_limiter"]),
            &self.rate_limiter,
        )
    }
}
