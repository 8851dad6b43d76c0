//! What an allocation lets through in a window when the actuator enforces it with a token
//! bucket: the rate, plus the tokens the bucket saved while demand was below it.
//!
//! The block and network actuators set each device's bandwidth bucket to the allocated rate
//! with room for `burst` windows of it (the VMM's buckets refill in 100 ms, one default
//! window); a live update keeps the bucket's fill, capped at the new size, and a new bucket
//! starts full. A window's demand is served while the bucket lasts, so demand above the rate
//! is under-provisioned only when it is more than the rate plus what the bucket held at the
//! window's start. At window granularity this is exact for demand spread evenly over the
//! window (or front-loaded); a burst packed into a window's last instant would find the bucket
//! full and get less. Unserved demand is not carried into the next window: a trace's demand is
//! what the workload asked for, and a guest held back would ask again.

use serde::{Deserialize, Serialize};

/// The fill of one resource's token bucket, in windows' worth of the resource's unit (MiB/s
/// held for one window is 1 MiB/s of fill).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    level: f64,
}

impl Bucket {
    /// A new bucket for `rate` holding `burst` windows of it: full, as the VMM creates one.
    pub fn full(rate: f64, burst: f64) -> Self {
        Bucket {
            level: (rate * burst).max(0.0),
        }
    }

    /// The most demand a window at `rate` can be served, the bucket holding at most `burst`
    /// windows of `rate` (an allocation changed since the last window caps the fill).
    pub fn capacity(&self, rate: f64, burst: f64) -> f64 {
        rate + self.level.min(rate * burst).max(0.0)
    }

    /// Whether a window of demand `used` at `rate` ran the bucket dry (beyond float noise).
    pub fn short(&self, used: f64, rate: f64, burst: f64) -> bool {
        used > self.capacity(rate, burst) * (1.0 + 1e-9)
    }

    /// After a window at `rate` in which `used` was asked for: the bucket saved what the window
    /// did not use of its rate, lost what it lent beyond, and holds at most `burst` windows.
    pub fn drain(&mut self, used: f64, rate: f64, burst: f64) {
        let size = (rate * burst).max(0.0);
        let level = self.level.min(size);
        let served = used.min(rate + level);
        self.level = (level + rate - served).clamp(0.0, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_burst_the_capacity_is_the_rate() {
        let mut b = Bucket::full(10.0, 0.0);
        for used in [0.0, 5.0, 30.0] {
            assert_eq!(b.capacity(10.0, 0.0), 10.0);
            assert_eq!(b.short(used, 10.0, 0.0), used > 10.0);
            b.drain(used, 10.0, 0.0);
        }
    }

    #[test]
    fn a_burst_spends_what_idle_windows_saved() {
        // One window of burst at 10/s: a full bucket serves 20 in one window, then is empty.
        let mut b = Bucket::full(10.0, 1.0);
        assert_eq!(b.capacity(10.0, 1.0), 20.0);
        assert!(!b.short(20.0, 10.0, 1.0));
        assert!(b.short(20.1, 10.0, 1.0));
        b.drain(20.0, 10.0, 1.0);
        assert_eq!(b.capacity(10.0, 1.0), 10.0);
        assert!(b.short(12.0, 10.0, 1.0));
        // A window at 4 saves 6 of its 10.
        b.drain(4.0, 10.0, 1.0);
        assert_eq!(b.capacity(10.0, 1.0), 16.0);
        // Demand beyond what the bucket could give leaves it empty, not negative.
        b.drain(50.0, 10.0, 1.0);
        assert_eq!(b.capacity(10.0, 1.0), 10.0);
    }

    #[test]
    fn a_smaller_allocation_caps_the_fill() {
        let b = Bucket::full(10.0, 1.0);
        // Resized to 2: the bucket holds at most one window of 2.
        assert_eq!(b.capacity(2.0, 1.0), 4.0);
        let mut b = b;
        b.drain(0.0, 2.0, 1.0);
        assert_eq!(b.capacity(10.0, 1.0), 12.0);
    }
}
