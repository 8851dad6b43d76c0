//! The claim path (`POST /vms {"from_pool": NAME}`): the desk of warm VMs ready to hand out,
//! served on the host API's client threads apart from the supervisor's loop, and where each
//! claim's time went (for its answer).
//!
//! The loop owns every VM; the desk holds, per pool, what a claim needs of each ready warm VM
//! (its API connection, its record as handed out). A claim pops the oldest under the desk's
//! lock, then resumes it and writes its record with no lock held and without waiting for the
//! loop's window pass or the requests queued before it; the loop hears of it afterwards (the
//! VM is running, its connection comes back). A popped VM belongs to that claim alone: the loop
//! lets surplus warm VMs go by popping them too, so it never kills one being handed out. A warm
//! VM holds its floors as its grant from the moment it is made, and resuming changes no grant,
//! so the budget's accounting is the same whichever thread hands it out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::vms::{Files, Ready, VmError};

/// The warm VMs ready to hand out, per pool, oldest first; a pool is served here from its
/// definition to its removal.
#[derive(Clone, Default)]
pub struct Desk(Arc<Mutex<BTreeMap<String, VecDeque<Ready>>>>);

impl Desk {
    fn pools(&self) -> MutexGuard<'_, BTreeMap<String, VecDeque<Ready>>> {
        // Nothing under the lock can leave a queue half changed.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn open(&self, pool: &str) {
        self.pools().entry(pool.to_string()).or_default();
    }

    /// The pool is no longer served; returns its ready VMs.
    pub fn close(&self, pool: &str) -> VecDeque<Ready> {
        self.pools().remove(pool).unwrap_or_default()
    }

    /// A made VM, ready; false (and its connection dropped) if the pool is gone.
    pub fn push(&self, pool: &str, ready: Ready) -> bool {
        match self.pools().get_mut(pool) {
            Some(q) => {
                q.push_back(ready);
                true
            }
            None => false,
        }
    }

    /// The oldest ready VM of `pool`, now the caller's.
    pub fn take(&self, pool: &str) -> Option<Ready> {
        self.pools().get_mut(pool)?.pop_front()
    }

    /// The ready VMs' ids, oldest first.
    pub fn ids(&self, pool: &str) -> Vec<String> {
        self.pools()
            .get(pool)
            .map(|q| q.iter().map(|r| r.id.clone()).collect())
            .unwrap_or_default()
    }

    pub fn len(&self, pool: &str) -> usize {
        self.pools().get(pool).map_or(0, VecDeque::len)
    }

    /// Drops the ready VMs of `pool` that `keep` refuses (found dead by the loop).
    pub fn retain(&self, pool: &str, mut keep: impl FnMut(&str) -> bool) {
        if let Some(q) = self.pools().get_mut(pool) {
            q.retain(|r| keep(&r.id));
        }
    }

    /// Hands out the oldest ready VM of `pool`: resumed and recorded on the calling thread.
    /// Returns its description and the claim's times, with the VM (running, for the loop to
    /// take back); `failed` hears of each ready VM that would not resume (it is the caller's
    /// to let go). `None` when none is ready.
    pub fn claim(
        &self,
        pool: &str,
        files: &Files,
        mut times: ClaimTimes,
        mut failed: impl FnMut(Ready, VmError),
    ) -> Option<(serde_json::Value, Ready)> {
        loop {
            let mut ready = self.take(pool)?;
            match ready.resume(files) {
                Ok((mut described, api, record)) => {
                    times.resumed(api, record);
                    described["warm"] = true.into();
                    described["claim"] = times.to_json();
                    return Some((described, ready));
                }
                Err(e) => failed(ready, e),
            }
        }
    }
}

/// Stretches of the loop's recent work kept to account for a claim's wait.
const KEPT: usize = 256;

/// What the loop was busy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Window,
    Request,
}

/// The loop's recent work, newest last.
#[derive(Debug, Default)]
pub struct Timeline {
    busy: VecDeque<(Instant, Instant, Work)>,
}

impl Timeline {
    pub fn record(&mut self, from: Instant, to: Instant, work: Work) {
        if self.busy.len() == KEPT {
            self.busy.pop_front();
        }
        self.busy.push_back((from, to, work));
    }

    /// How much of `[from, to)` the loop spent on window passes and on requests.
    fn overlap(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        let (mut window, mut requests) = (Duration::ZERO, Duration::ZERO);
        for &(s, e, work) in self.busy.iter().rev() {
            if e <= from {
                break;
            }
            let d = e.min(to).saturating_duration_since(s.max(from));
            match work {
                Work::Window => window += d,
                Work::Request => requests += d,
            }
        }
        (window, requests)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A claim's times, in its answer as `"claim"` (milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct ClaimTimes {
    /// Who served it: `"desk"` (a client thread, a warm VM was ready) or `"loop"` (none was:
    /// the supervisor's loop looked again, then booted one cold).
    pub by: &'static str,
    /// From the host API's read of the request to the claim's start.
    pub queued_ms: f64,
    /// Of that wait, the loop's window passes (reap, `GET /predictor` and `PATCH /predictor`
    /// on every VM, warm pools tended) ...
    pub behind_window_ms: f64,
    /// ... and the other requests and events it served first (other claims included).
    pub behind_requests_ms: f64,
    /// `PATCH /vm {"state": "Resumed"}` on the warm VM's connected API socket, answered once
    /// its vCPUs acknowledged: the request's trip and the VMM's own resume.
    pub resume_ms: f64,
    /// The VM's record rewritten as handed out (so a restarted supervisor adopts it).
    pub record_ms: f64,
}

impl ClaimTimes {
    /// A claim the desk starts now, for a request read at `received`: it waits for no one.
    pub fn at_desk(received: Instant) -> Self {
        ClaimTimes {
            by: "desk",
            queued_ms: ms(received.elapsed()),
            behind_window_ms: 0.0,
            behind_requests_ms: 0.0,
            resume_ms: 0.0,
            record_ms: 0.0,
        }
    }

    /// A claim the loop starts now, for a request read at `received`.
    pub fn queued(received: Instant, timeline: &Timeline) -> Self {
        let now = Instant::now();
        let (window, requests) = timeline.overlap(received, now);
        ClaimTimes {
            by: "loop",
            queued_ms: ms(now.saturating_duration_since(received)),
            behind_window_ms: ms(window),
            behind_requests_ms: ms(requests),
            resume_ms: 0.0,
            record_ms: 0.0,
        }
    }

    pub fn resumed(&mut self, api: Duration, record: Duration) {
        self.resume_ms = ms(api);
        self.record_ms = ms(record);
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("times serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_split_between_windows_and_requests() {
        let t = Instant::now();
        let at = |m: u64| t + Duration::from_millis(m);
        let mut timeline = Timeline::default();
        timeline.record(at(0), at(10), Work::Request);
        timeline.record(at(10), at(40), Work::Window);
        timeline.record(at(45), at(50), Work::Request);
        timeline.record(at(50), at(52), Work::Request);
        // A request read at 5, started at 51: 30 ms of window, 5 + 6 ms of requests.
        let (window, requests) = timeline.overlap(at(5), at(51));
        assert_eq!(window, Duration::from_millis(30));
        assert_eq!(requests, Duration::from_millis(11));
        // Nothing before the request counts.
        assert_eq!(
            timeline.overlap(at(41), at(45)),
            (Duration::ZERO, Duration::ZERO)
        );
        for _ in 0..KEPT {
            timeline.record(at(60), at(61), Work::Window);
        }
        assert_eq!(timeline.busy.len(), KEPT);
    }
}
