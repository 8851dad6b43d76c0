//! The claim path (`POST /vms {"from_pool": NAME}`): the desk of warm VMs ready to hand out,
//! served on the host API's client threads apart from the supervisor's loop, and where each
//! claim's time went (for its answer).
//!
//! The loop owns every VM; the desk holds, per pool, what a claim needs of each ready warm VM
//! (its API connection, its record as handed out). A claim pops the oldest under the desk's
//! lock, then raises its grant, resumes it and writes its record with no lock held and without
//! waiting for the loop's window pass or the requests queued before it; the loop hears of it
//! afterwards (the VM is running, its connection comes back). A popped VM belongs to that
//! claim alone: the loop lets surplus warm VMs go by popping them too, so it never kills one
//! being handed out.
//!
//! A warm VM holds its floors as its grant from the moment it is made. A claim raises it to
//! the VM's start grant ([`pool::start_grant`]) before the resume, out of an allowance the
//! loop offers the desk after each division (the slack it left) and withdraws before the next;
//! what claims took and the loop has not yet heard of is counted as granted, so the grants
//! stay within the budget whichever thread hands a VM out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use predictor::resource::{PerResource, Resource};
use serde::Serialize;

use super::pool;
use super::vms::{Files, Ready, Took, VmError};

/// What the desk's lock guards.
#[derive(Default)]
struct Counter {
    /// The warm VMs ready to hand out, per pool, oldest first; a pool is served here from its
    /// definition to its removal.
    pools: BTreeMap<String, VecDeque<Ready>>,
    /// Slack the loop offered for start grants, until it withdraws it.
    allowance: PerResource<f64>,
    /// Start grants above the floors that claims took and the loop has not settled yet.
    out: PerResource<f64>,
}

/// The warm VMs ready to hand out and the allowance their claims' start grants come from.
#[derive(Clone, Default)]
pub struct Desk(Arc<Mutex<Counter>>);

impl Desk {
    fn counter(&self) -> MutexGuard<'_, Counter> {
        // Nothing under the lock can leave a queue or a sum half changed.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn open(&self, pool: &str) {
        self.counter().pools.entry(pool.to_string()).or_default();
    }

    /// The pool is no longer served; returns its ready VMs.
    pub fn close(&self, pool: &str) -> VecDeque<Ready> {
        self.counter().pools.remove(pool).unwrap_or_default()
    }

    /// A made VM, ready; false (and its connection dropped) if the pool is gone.
    pub fn push(&self, pool: &str, ready: Ready) -> bool {
        match self.counter().pools.get_mut(pool) {
            Some(q) => {
                q.push_back(ready);
                true
            }
            None => false,
        }
    }

    /// The oldest ready VM of `pool`, now the caller's.
    pub fn take(&self, pool: &str) -> Option<Ready> {
        self.counter().pools.get_mut(pool)?.pop_front()
    }

    /// The ready VMs' ids, oldest first.
    pub fn ids(&self, pool: &str) -> Vec<String> {
        self.counter()
            .pools
            .get(pool)
            .map(|q| q.iter().map(|r| r.id.clone()).collect())
            .unwrap_or_default()
    }

    pub fn len(&self, pool: &str) -> usize {
        self.counter().pools.get(pool).map_or(0, VecDeque::len)
    }

    /// Drops the ready VMs of `pool` that `keep` refuses (found dead by the loop).
    pub fn retain(&self, pool: &str, mut keep: impl FnMut(&str) -> bool) {
        if let Some(q) = self.counter().pools.get_mut(pool) {
            q.retain(|r| keep(&r.id));
        }
    }

    /// Runs the loop's division under the desk's lock: `division` gets the start grants that
    /// claims hold unsettled (to leave aside) and returns the slack it leaves, offered for
    /// start grants until the next division.
    pub fn redivide(&self, division: impl FnOnce(PerResource<f64>) -> PerResource<f64>) {
        let mut c = self.counter();
        let slack = division(c.out);
        c.allowance = slack.map(|_, &s| s.max(0.0));
    }

    /// Takes `amount` out of what is left of the offer (floors granted between divisions).
    pub fn spend(&self, amount: PerResource<f64>) {
        let mut c = self.counter();
        for r in Resource::ALL {
            c.allowance[r] = (c.allowance[r] - amount[r]).max(0.0);
        }
    }

    /// The start grants above the floors that claims hold and the loop has not settled.
    pub fn out(&self) -> PerResource<f64> {
        self.counter().out
    }

    /// What is left of the offer.
    pub fn allowance(&self) -> PerResource<f64> {
        self.counter().allowance
    }

    /// The loop heard of a claim whose start grant lent `lent` above the floors: it is the
    /// VM's grant now (or back, if the VM was let go).
    pub fn settle(&self, lent: PerResource<f64>) {
        let mut c = self.counter();
        for r in Resource::ALL {
            c.out[r] = (c.out[r] - lent[r]).max(0.0);
        }
    }

    /// The start grant of `ready` out of the allowance, counted out until settled.
    fn lend(&self, ready: &Ready) -> PerResource<f64> {
        let mut c = self.counter();
        let spans = ready.spans();
        let start = pool::start_grant(spans, &mut c.allowance);
        for r in Resource::ALL {
            c.out[r] += start[r] - spans[r].floor;
        }
        start
    }

    /// Hands out the oldest ready VM of `pool`: its grant raised to its start grant, resumed
    /// and recorded on the calling thread. Returns its description and the claim's times, with
    /// the VM (running, for the loop to take back); `failed` hears of each ready VM that would
    /// not take its grant or resume (it is the caller's to let go, and its start grant to
    /// settle). `None` when none is ready.
    pub fn claim(
        &self,
        pool: &str,
        files: &Files,
        mut times: ClaimTimes,
        mut failed: impl FnMut(Ready, VmError),
    ) -> Option<(serde_json::Value, Ready)> {
        loop {
            let mut ready = self.take(pool)?;
            let start = self.lend(&ready);
            let lent = PerResource::from_fn(|r| start[r] - ready.spans()[r].floor);
            let resumed = ready.resume(files, start);
            // What the VM did not take is not out any more; the loop settles the rest.
            self.settle(PerResource::from_fn(|r| lent[r] - ready.lent()[r]));
            match resumed {
                Ok((mut described, took)) => {
                    times.resumed(took);
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
    /// `PATCH /predictor` raising the warm VM's grant to its start grant, before the resume.
    pub grant_ms: f64,
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
            grant_ms: 0.0,
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
            grant_ms: 0.0,
            resume_ms: 0.0,
            record_ms: 0.0,
        }
    }

    pub fn resumed(&mut self, took: Took) {
        self.grant_ms = ms(took.grant);
        self.resume_ms = ms(took.resume);
        self.record_ms = ms(took.record);
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("times serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::vms::tests::{fake_ready, fake_vm};

    #[test]
    fn claims_share_the_offered_slack_and_the_loop_settles_it() {
        let dir = std::env::temp_dir().join(format!("host-desk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files { dir: dir.clone() };
        let desk = Desk::default();
        desk.open("fn");
        for id in ["a", "b", "c"] {
            assert!(desk.push("fn", fake_ready(&dir, id).0));
        }
        let cpu = |cpu| PerResource {
            cpu,
            ..PerResource::default()
        };
        // Before any offer a claim starts at its floors.
        let times = || ClaimTimes::at_desk(Instant::now());
        let no_failure = |r: Ready, e| panic!("{}: {e}", r.id);
        let (first, a) = desk.claim("fn", &files, times(), no_failure).unwrap();
        assert_eq!(first["grant"]["cpu"], 0.05);
        assert_eq!(desk.out().cpu, 0.0);
        // The division sees nothing lent yet, and offers 1.5 cores: the next claim takes its
        // ceiling, the one after what is left, and both count as granted until settled.
        desk.redivide(|lent| {
            assert_eq!(lent, PerResource::default());
            cpu(1.5)
        });
        let (_, b) = desk.claim("fn", &files, times(), no_failure).unwrap();
        let (third, c) = desk.claim("fn", &files, times(), no_failure).unwrap();
        assert!(
            (third["grant"]["cpu"].as_f64().unwrap() - 0.6).abs() < 1e-9,
            "{third}"
        );
        assert!((desk.out().cpu - 1.5).abs() < 1e-9);
        assert!(desk.allowance().cpu < 1e-9);
        assert!(desk.claim("fn", &files, times(), no_failure).is_none());
        // A division before the loop heard of them leaves their start grants aside.
        desk.redivide(|lent| {
            assert!((lent.cpu - 1.5).abs() < 1e-9);
            cpu(0.0)
        });
        for ready in [a, b, c] {
            desk.settle(ready.lent());
        }
        assert!(desk.out().cpu.abs() < 1e-9);
        // A VM that refuses its start grant is handed out at its floors, and what it was lent
        // is not out.
        let refusing = fake_vm(&dir, "d", |head| match head {
            "PATCH /predictor" => (400, "{}"),
            _ => (204, ""),
        });
        assert!(desk.push("fn", refusing.0));
        desk.redivide(|_| cpu(1.0));
        let (fourth, d) = desk.claim("fn", &files, times(), no_failure).unwrap();
        assert_eq!(fourth["grant"]["cpu"], 0.05);
        assert_eq!(d.lent().cpu, 0.0);
        assert!(desk.out().cpu.abs() < 1e-9);
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
