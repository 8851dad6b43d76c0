//! `balloon`: the virtio balloon, with Firecracker's fields (and bodies of `/balloon`).

use std::time::Duration;

use devices::virtio::balloon::{BalloonOptions, PAGES_PER_MIB};
use serde::{Deserialize, Serialize};

use super::{ConfigError, JsonPath};

/// The balloon section and `PUT /balloon` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Memory the guest is asked to give back, MiB.
    pub amount_mib: u32,
    /// Lets the guest take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables the statistics queue.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// prescient: the statistics period in milliseconds, for the predictor's sub-second windows;
    /// takes precedence over `stats_polling_interval_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_ms: Option<u32>,
    /// Free page hinting: the guest lists its free memory when the host starts a run
    /// (`PATCH /balloon/hinting/start`), and the host discards it.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// The guest reports pages it freed, and the host discards them.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/hinting/start` body (may be empty). Like Firecracker, unknown fields are
/// ignored here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingStart {
    /// The run ends as soon as the guest has listed its free memory; otherwise at
    /// `PATCH /balloon/hinting/stop`.
    #[serde(default = "yes")]
    pub acknowledge_on_stop: bool,
}

fn yes() -> bool {
    true
}

impl Default for HintingStart {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: true,
        }
    }
}

/// `PATCH /balloon/statistics` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_ms: Option<u32>,
}

impl BalloonStatsUpdate {
    pub fn interval(&self) -> Duration {
        stats_interval(
            self.stats_polling_interval_s,
            self.stats_polling_interval_ms,
        )
    }
}

fn stats_interval(seconds: u16, millis: Option<u32>) -> Duration {
    match millis {
        Some(ms) => Duration::from_millis(u64::from(ms)),
        None => Duration::from_secs(u64::from(seconds)),
    }
}

fn field(name: &'static str) -> JsonPath {
    JsonPath::keys(&["balloon", name])
}

impl BalloonConfig {
    /// Checks the section against the VM's memory size.
    pub fn validate(&self, mem_size_mib: u64) -> Result<(), ConfigError> {
        if u64::from(self.amount_mib) > mem_size_mib {
            return Err(ConfigError::new(
                field("amount_mib"),
                format!(
                    "{} MiB is more than the VM's memory ({mem_size_mib} MiB)",
                    self.amount_mib
                ),
            ));
        }
        Ok(())
    }

    pub fn stats_interval(&self) -> Duration {
        stats_interval(
            self.stats_polling_interval_s,
            self.stats_polling_interval_ms,
        )
    }

    /// What the device is created with.
    pub fn options(&self) -> BalloonOptions {
        BalloonOptions {
            target_pages: self.amount_mib * PAGES_PER_MIB,
            deflate_on_oom: self.deflate_on_oom,
            stats_interval: self.stats_interval(),
            free_page_hinting: self.free_page_hinting,
            free_page_reporting: self.free_page_reporting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_bodies_parse_and_bad_values_name_their_field() {
        let b: BalloonConfig = serde_json::from_str(
            r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
        )
        .unwrap();
        assert_eq!(b.stats_interval(), Duration::from_secs(1));
        assert_eq!(b.options().target_pages, 64 * 256);
        b.validate(128).unwrap();
        let e = b.validate(32).unwrap_err();
        assert_eq!(e.path.to_string(), "balloon.amount_mib");
        assert!(e.message.contains("more than the VM's memory"), "{e}");

        let ms: BalloonConfig = serde_json::from_str(
            r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_ms": 250}"#,
        )
        .unwrap();
        assert_eq!(ms.stats_interval(), Duration::from_millis(250));
        let hint: BalloonConfig = serde_json::from_str(
            r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#,
        )
        .unwrap();
        hint.validate(128).unwrap();
        assert!(hint.options().free_page_hinting);
        assert!(serde_json::from_str::<BalloonConfig>(r#"{"amount_mib": 1}"#).is_err());
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mib": 1, "x": 2}"#).is_err());
    }
}
