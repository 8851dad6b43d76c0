//! The decision log: every window whose decision acted, with what was applied and why, kept to
//! a bound and served by `GET /predictor/decisions?since=`.

use std::collections::VecDeque;

use predictor::policy::Decision;
use serde::Serialize;

/// Decisions kept (at 100 ms windows and an action every window, the last 400 s).
pub const CAPACITY: usize = 4096;

/// One change the VMM made, or could not make, for a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Applied {
    /// `cpu`, `mem`, `blk`, `net` or the anomaly action (`alert`, `pause`...).
    pub what: String,
    pub applied: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedDecision {
    pub seq: u64,
    #[serde(flatten)]
    pub decision: Decision,
    pub applied: Vec<Applied>,
}

/// `GET /predictor/decisions` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionPage {
    pub decisions: Vec<LoggedDecision>,
    /// Pass as `since` to get only what follows.
    pub next: u64,
    /// Decisions older than the log's bound that `since` asked for but are gone.
    pub dropped: u64,
}

pub struct DecisionLog {
    entries: VecDeque<LoggedDecision>,
    next_seq: u64,
    capacity: usize,
}

impl Default for DecisionLog {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl DecisionLog {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(capacity),
            next_seq: 0,
            capacity,
        }
    }

    pub fn push(&mut self, decision: Decision, applied: Vec<Applied>) -> u64 {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(LoggedDecision {
            seq,
            decision,
            applied,
        });
        seq
    }

    /// The sequence number the next decision gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Numbers the next decision `seq` (a restored VM's log goes on from its snapshot's).
    pub fn continue_from(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// Decisions with `seq >= since`.
    pub fn since(&self, since: u64) -> DecisionPage {
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        DecisionPage {
            decisions: self
                .entries
                .iter()
                .filter(|e| e.seq >= since)
                .cloned()
                .collect(),
            next: self.next_seq,
            dropped: first.saturating_sub(since),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(t_ms: u64) -> Decision {
        Decision {
            t_ms,
            inputs: Default::default(),
            forecast: Default::default(),
            allocation: Default::default(),
            resized: Default::default(),
            band: Default::default(),
            behaviour: 0.0,
            anomaly: Default::default(),
            action: predictor::policy::Action::Resize,
            reason: "r".into(),
        }
    }

    #[test]
    fn pages_from_since_and_counts_what_fell_off() {
        let mut log = DecisionLog::with_capacity(3);
        for t in 0..5 {
            log.push(decision(t * 100), vec![]);
        }
        let all = log.since(0);
        assert_eq!(
            all.decisions.iter().map(|d| d.seq).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!((all.next, all.dropped), (5, 2));
        let tail = log.since(4);
        assert_eq!(tail.decisions.len(), 1);
        assert_eq!(tail.dropped, 0);
        assert!(log.since(5).decisions.is_empty());
        let json = serde_json::to_value(&tail).unwrap();
        assert_eq!(json["decisions"][0]["t_ms"], 400);
        assert_eq!(json["decisions"][0]["action"], "resize");
        assert_eq!(json["decisions"][0]["seq"], 4);
    }
}
