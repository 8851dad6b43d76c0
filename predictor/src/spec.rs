//! Everything needed to rebuild a live policy. A trace the VMM records carries one in its
//! header, so a replay of the trace makes the decisions the VMM made.

use crate::forecast::{GruWeights, Preset, RecurrentError};
use crate::policy::{Budget, Policy, PolicyConfig, PolicyError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("the gru forecaster needs model_path (safetensors weights from `prescient train`)")]
    MissingModel,
    #[error("loading the recurrent model: {0}")]
    Model(#[from] RecurrentError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// The forecaster family a policy runs (one per resource), by its spec name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForecasterKind {
    Last,
    Ewma,
    Holt,
    Histogram,
    Peak,
    Indicator,
    Gru,
    /// Every forecaster side by side, following the ones with the lowest recent quantile
    /// loss; the shipped recurrent model joins them for memory, or the one at `model_path`
    /// for every resource.
    #[default]
    Ensemble,
}

/// A policy's recipe: forecaster, budget and configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub forecaster: ForecasterKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_path: Option<PathBuf>,
    pub budget: Budget,
    pub config: PolicyConfig,
}

impl PolicySpec {
    /// A fresh policy; the budget maximum is the capacity the recurrent model scales by.
    pub fn build(&self) -> Result<Policy, SpecError> {
        let preset = match self.forecaster {
            ForecasterKind::Last => Preset::Last,
            ForecasterKind::Ewma => Preset::Ewma,
            ForecasterKind::Holt => Preset::Holt,
            ForecasterKind::Histogram => Preset::Histogram,
            ForecasterKind::Peak => Preset::Peak,
            ForecasterKind::Indicator => Preset::Indicator,
            ForecasterKind::Gru => {
                let path = self.model_path.as_ref().ok_or(SpecError::MissingModel)?;
                Preset::Recurrent(Arc::new(GruWeights::load(path)?))
            }
            ForecasterKind::Ensemble => match &self.model_path {
                Some(path) => Preset::ensemble(Some(Arc::new(GruWeights::load(path)?))),
                None => Preset::default_ensemble()?,
            },
        };
        let forecasters = preset.build_all(self.config.horizon, &self.budget.max())?;
        Ok(Policy::new(self.budget, self.config, forecasters)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Usage;

    fn spec(forecaster: ForecasterKind) -> PolicySpec {
        PolicySpec {
            forecaster,
            model_path: None,
            budget: Budget::from_capacity(&Usage {
                cpu: 2.0,
                mem: 512.0,
                blk: 50.0,
                net: 50.0,
            }),
            config: PolicyConfig::default(),
        }
    }

    #[test]
    fn builds_classical_forecasters_and_round_trips() {
        for k in [
            ForecasterKind::Last,
            ForecasterKind::Ewma,
            ForecasterKind::Holt,
            ForecasterKind::Histogram,
            ForecasterKind::Peak,
            ForecasterKind::Indicator,
            ForecasterKind::Ensemble,
        ] {
            let s = spec(k);
            assert_eq!(s.build().unwrap().allocation().mem, 512.0);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<PolicySpec>(&json).unwrap(), s);
        }
    }

    #[test]
    fn gru_needs_a_readable_model() {
        let mut s = spec(ForecasterKind::Gru);
        assert!(matches!(s.build(), Err(SpecError::MissingModel)));
        s.model_path = Some("/nonexistent/model.safetensors".into());
        assert!(matches!(s.build(), Err(SpecError::Model(_))));
        s.model_path = Some(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gru-real.safetensors"),
        );
        assert!(s.build().is_ok());
    }
}
