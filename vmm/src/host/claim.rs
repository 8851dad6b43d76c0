//! Where a warm claim's time goes (`POST /vms {"from_pool": ...}`), for its answer: waiting for
//! the supervisor's loop (behind its window passes, behind other requests), the resume round
//! trip on the VM's API socket, and the VM's record written as handed out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

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
    /// From the host API's read of the request to the claim's start.
    pub queued_ms: f64,
    /// Of that wait, the loop's window passes (reap, `GET /predictor` and `PATCH /predictor`
    /// on every VM, warm pools tended) ...
    pub behind_window_ms: f64,
    /// ... and the other requests it served first (other claims included).
    pub behind_requests_ms: f64,
    /// `PATCH /vm {"state": "Resumed"}` on the warm VM's connected API socket, answered once
    /// its vCPUs acknowledged: the request's trip and the VMM's own resume.
    pub resume_ms: f64,
    /// The VM's record rewritten as handed out (so a restarted supervisor adopts it).
    pub record_ms: f64,
}

impl ClaimTimes {
    /// A claim the loop starts now, for a request read at `received`.
    pub fn queued(received: Instant, timeline: &Timeline) -> Self {
        let now = Instant::now();
        let (window, requests) = timeline.overlap(received, now);
        ClaimTimes {
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
