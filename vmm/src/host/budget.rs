//! The host's budget: how much CPU, memory and block and network bandwidth the pool may grant
//! in all (`--budget mem=24G,cpu=2,blk=800M,net=1G`).

use predictor::resource::{PerResource, Resource};

/// Errors of a `--budget` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("--budget {0:?}: expected RESOURCE=AMOUNT (cpu, mem, blk, net), e.g. mem=24G")]
    Syntax(String),
    #[error("--budget: unknown resource {0:?} (cpu, mem, blk, net)")]
    UnknownResource(String),
    #[error("--budget {name}={value}: {why}")]
    Amount {
        name: String,
        value: String,
        why: &'static str,
    },
    #[error("--budget: {0} given twice")]
    Twice(&'static str),
    #[error("--budget: {0} is missing (every resource needs an amount: cpu, mem, blk, net)")]
    Missing(&'static str),
}

/// Per resource, the pool's total, in the predictor's units: cores, MiB, MiB/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostBudget(pub PerResource<f64>);

/// `24G`, `800M`, `512K` or a plain number, in MiB (memory) or MiB/s (bandwidth).
fn parse_mib(value: &str) -> Option<f64> {
    let (number, scale) = match value.as_bytes().last()? {
        b'G' | b'g' => (&value[..value.len() - 1], 1024.0),
        b'M' | b'm' => (&value[..value.len() - 1], 1.0),
        b'K' | b'k' => (&value[..value.len() - 1], 1.0 / 1024.0),
        _ => (value, 1.0),
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// `mem=24G,cpu=2,blk=800M,net=1G`; every resource must be given once.
impl std::str::FromStr for HostBudget {
    type Err = BudgetError;

    fn from_str(text: &str) -> Result<Self, BudgetError> {
        let mut given: PerResource<Option<f64>> = PerResource::default();
        for item in text.split(',') {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| BudgetError::Syntax(item.to_string()))?;
            let resource = Resource::ALL
                .into_iter()
                .find(|r| r.name() == name.trim())
                .ok_or_else(|| BudgetError::UnknownResource(name.to_string()))?;
            let value = value.trim();
            let amount = match resource {
                Resource::Cpu => value.parse::<f64>().ok(),
                _ => parse_mib(value),
            };
            let bad = |why| BudgetError::Amount {
                name: name.to_string(),
                value: value.to_string(),
                why,
            };
            let amount = amount.ok_or_else(|| bad("not a number (suffixes: K, M, G)"))?;
            if !(amount.is_finite() && amount > 0.0) {
                return Err(bad("must be positive"));
            }
            if given[resource].replace(amount).is_some() {
                return Err(BudgetError::Twice(resource.name()));
            }
        }
        let mut budget = PerResource::default();
        for r in Resource::ALL {
            budget[r] = given[r].ok_or(BudgetError::Missing(r.name()))?;
        }
        Ok(HostBudget(budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostBudget, BudgetError> {
        text.parse()
    }

    #[test]
    fn parses_the_issue_example_and_names_each_mistake() {
        let b: HostBudget = parse("mem=24G,cpu=2,blk=800M,net=1G").unwrap();
        assert_eq!(
            (b.0.cpu, b.0.mem, b.0.blk, b.0.net),
            (2.0, 24576.0, 800.0, 1024.0)
        );
        let b: HostBudget = parse("cpu=0.5, mem=512, blk=100m, net=2048k").unwrap();
        assert_eq!(
            (b.0.cpu, b.0.mem, b.0.blk, b.0.net),
            (0.5, 512.0, 100.0, 2.0)
        );
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert!(err("mem").contains("expected RESOURCE=AMOUNT"));
        assert!(err("gpu=1,mem=1,cpu=1,blk=1,net=1").contains("unknown resource \"gpu\""));
        assert!(err("mem=lots,cpu=1,blk=1,net=1").contains("mem=lots: not a number"));
        assert!(err("mem=-1,cpu=1,blk=1,net=1").contains("must be positive"));
        assert!(err("mem=1,mem=2,cpu=1,blk=1,net=1").contains("mem given twice"));
        assert!(err("mem=1G,cpu=1,blk=1").contains("net is missing"));
    }
}
