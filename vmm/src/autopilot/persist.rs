//! The autopilot across a snapshot: its policy (forecasters, bands, scores, allocation), the
//! window clock, its counters and what its responder holds, so that a restored VM keeps its
//! foresight instead of learning again from cold. The budget comes back with the configuration.

use predictor::policy::{Decision, PolicyState};
use serde::{Deserialize, Serialize};

use super::Autopilot;
use crate::vmm_config::MachineConfig;

/// Why a snapshot's predictor state was not taken back.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot save the predictor's state: {0}")]
    Save(String),
    #[error("the snapshot's predictor state does not decode: {0}")]
    Decode(String),
    #[error("the snapshot's predictor state does not fit this predictor: {0}")]
    Policy(String),
}

#[derive(Serialize, Deserialize)]
struct AutopilotState {
    policy: PolicyState,
    /// The window clock when the snapshot was taken.
    clock_ns: u64,
    windows: u64,
    /// The last decision as `GET /predictor` shows it (JSON: its sample is flattened, which
    /// the snapshot's binary encoding cannot hold).
    last: Option<String>,
    /// The decision log's next sequence number: the log restarts empty, its numbers go on, so
    /// that a client paging with `since` misses nothing new.
    next_seq: u64,
    throttled: bool,
}

impl Autopilot {
    /// Everything the predictor has learned, at host time `now_ns`, as bytes for a snapshot.
    pub fn save_state(&self, now_ns: u64) -> Result<Vec<u8>, PersistError> {
        let state = AutopilotState {
            policy: self
                .policy
                .save_state()
                .map_err(|e| PersistError::Save(e.to_string()))?,
            clock_ns: self.collector.clock_ns(now_ns),
            windows: self.windows,
            last: self
                .last
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| PersistError::Save(e.to_string()))?,
            next_seq: self.log.next_seq(),
            throttled: self.responder.throttled(),
        };
        predictor::persist::encode(&state).map_err(|e| PersistError::Save(e.to_string()))
    }

    /// Takes back a snapshot's predictor state before [`Autopilot::attach`], which then sets
    /// the devices to the restored allocation. The policy it restores into is built afresh
    /// from this predictor's configuration and replaces the current one only once whole; on
    /// error the predictor stays as it was, and `GET /predictor` says why it started cold.
    pub fn restore_state(
        &mut self,
        bytes: &[u8],
        machine: &MachineConfig,
        now_ns: u64,
    ) -> Result<(), PersistError> {
        let restored = self.restore(bytes, machine, now_ns);
        if let Err(e) = &restored {
            self.notes.model = format!("cold start: {e}");
        }
        restored
    }

    fn restore(
        &mut self,
        bytes: &[u8],
        machine: &MachineConfig,
        now_ns: u64,
    ) -> Result<(), PersistError> {
        let decode = |e: &dyn std::fmt::Display| PersistError::Decode(e.to_string());
        let state: AutopilotState = predictor::persist::decode(bytes).map_err(|e| decode(&e))?;
        let last: Option<Decision> = state
            .last
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| decode(&e))?;
        let mut policy = self
            .config
            .policy_spec(machine)
            .and_then(|spec| {
                spec.build().map_err(|e| {
                    crate::vmm_config::ConfigError::new(
                        crate::vmm_config::JsonPath::keys(&["predictor"]),
                        e.to_string(),
                    )
                })
            })
            .map_err(|e| PersistError::Policy(e.to_string()))?;
        policy
            .restore_state(state.policy)
            .map_err(|e| PersistError::Policy(e.to_string()))?;
        self.policy = policy;
        self.collector.resume_clock(state.clock_ns, now_ns);
        self.windows = state.windows;
        self.last = last;
        self.log.continue_from(state.next_seq);
        self.responder.restore(state.throttled);
        self.notes.model = format!("restored from a snapshot after {} windows", state.windows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm_config::PredictorConfig;
    use predictor::resource::Usage;
    use predictor::sample::Sample;

    fn sample(t: u64) -> Sample {
        let noise = ((t * 7919) % 13) as f64;
        Sample {
            t_ms: t * 100,
            usage: Usage {
                cpu: 0.3 + 0.02 * noise,
                mem: 200.0 + 5.0 * noise,
                blk: 0.0,
                net: 0.0,
            },
            ..Sample::default()
        }
    }

    #[test]
    fn a_restored_autopilot_goes_on_where_the_saved_one_was() {
        let machine = MachineConfig {
            mem_size_mib: 1024,
            ..MachineConfig::default()
        };
        let config = PredictorConfig::default();
        let mut saved = Autopilot::new(&config, &machine, "t", 1_000_000_000).unwrap();
        for t in 0..80 {
            saved.last = Some(saved.policy.decide(&sample(t)));
            saved.windows += 1;
        }
        saved.log.continue_from(17);
        let bytes = saved.save_state(9_000_000_000).unwrap();

        let mut restored = Autopilot::new(&config, &machine, "t", 50_000_000).unwrap();
        restored
            .restore_state(&bytes, &machine, 50_000_000)
            .unwrap();
        let (a, b) = (saved.status(), restored.status());
        assert_eq!(
            (b.windows, b.allocation, b.last),
            (a.windows, a.allocation, a.last)
        );
        assert!(b.allocation.unwrap().mem < 1024.0, "{:?}", b.allocation);
        assert_eq!(restored.collector.clock_ns(50_000_000), 9_000_000_000);
        assert_eq!(restored.log.next_seq(), 17);
        assert_eq!(
            b.actuators.unwrap().model,
            "restored from a snapshot after 80 windows"
        );
        for t in 80..120 {
            assert_eq!(
                restored.policy.decide(&sample(t)),
                saved.policy.decide(&sample(t))
            );
        }

        // Garbage is refused and changes nothing.
        let mut cold = Autopilot::new(&config, &machine, "t", 0).unwrap();
        let e = cold
            .restore_state(&bytes[..bytes.len() / 2], &machine, 0)
            .unwrap_err();
        assert!(e.to_string().contains("does not decode"), "{e}");
        assert_eq!(cold.policy.allocation().mem, 1024.0);
        assert!(cold
            .status()
            .actuators
            .unwrap()
            .model
            .starts_with("cold start: "));
    }
}
