//! Token-bucket rate limiting for virtio queues, Firecracker's model: a bandwidth bucket (bytes)
//! and an ops bucket (requests), each with a size, an optional one-time burst and a refill time.
//!
//! A device asks [`RateLimiter::consume`] before serving a request. When a bucket is empty the
//! request waits and the limiter arms a timerfd for when enough tokens will be back; the device
//! watches that fd in the event loop and resumes its queue then. The limiter can be replaced
//! live ([`RateLimiter::update_buckets`]): the tokens already granted stay granted, so a request is
//! never lost or served twice across an update.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket as configured (Firecracker's `TokenBucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket completely.
    pub refill_time: u64,
}

/// Firecracker's `RateLimiter` config: either bucket may be absent (unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// Errors of building a limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("{0} bucket: size and refill_time must both be non-zero")]
    InvalidBucket(&'static str),
    #[error("cannot create the rate limiter timer: {0}")]
    Timer(std::io::Error),
}

/// A running bucket. Refill is computed from elapsed time at each use: no timer runs while
/// tokens are available.
#[derive(Debug, Clone)]
struct TokenBucket {
    size: u64,
    refill_time: Duration,
    budget: u64,
    one_time_burst: u64,
    last_update: Instant,
}

impl TokenBucket {
    fn new(cfg: &TokenBucketConfig, what: &'static str) -> Result<Self, RateLimiterError> {
        if cfg.size == 0 || cfg.refill_time == 0 {
            return Err(RateLimiterError::InvalidBucket(what));
        }
        Ok(Self {
            size: cfg.size,
            refill_time: Duration::from_millis(cfg.refill_time),
            budget: cfg.size,
            one_time_burst: cfg.one_time_burst.unwrap_or(0),
            last_update: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update);
        let refill_ns = self.refill_time.as_nanos();
        // Tokens earned so far, in exact integer arithmetic; keep the remainder's time.
        let earned = (elapsed.as_nanos() * u128::from(self.size) / refill_ns) as u64;
        if earned == 0 {
            return;
        }
        let used_ns = u128::from(earned) * refill_ns / u128::from(self.size);
        self.last_update += Duration::from_nanos(used_ns as u64);
        self.budget = self.budget.saturating_add(earned).min(self.size);
    }

    /// Takes `tokens` if they are there. A request larger than the whole bucket is let through
    /// when the bucket is full, so it cannot be starved forever.
    fn try_take(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let from_burst = tokens.min(self.one_time_burst);
        let rest = tokens - from_burst;
        if rest <= self.budget || (rest > self.size && self.budget == self.size) {
            self.one_time_burst -= from_burst;
            self.budget = self.budget.saturating_sub(rest);
            return true;
        }
        false
    }

    /// Time until `tokens` (capped at the bucket size) will be available.
    fn wait_for(&self, tokens: u64) -> Duration {
        let missing = tokens.min(self.size).saturating_sub(self.budget);
        let ns = u128::from(missing) * self.refill_time.as_nanos() / u128::from(self.size);
        Duration::from_nanos(ns as u64 + 1).max(Duration::from_micros(100))
    }
}

/// One token bucket on its own, for output that is dropped rather than delayed when over its
/// rate (the serial console's).
#[derive(Debug, Clone)]
pub struct DropBucket(TokenBucket);

impl DropBucket {
    pub fn new(config: &TokenBucketConfig) -> Result<Self, RateLimiterError> {
        TokenBucket::new(config, "bandwidth").map(Self)
    }

    /// Takes `tokens` if the bucket holds them.
    pub fn take(&mut self, tokens: u64) -> bool {
        self.0.try_take(tokens, Instant::now())
    }
}

/// What a request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub bytes: u64,
    pub ops: u64,
}

/// A bandwidth + ops limiter with the timer that ends a throttle.
pub struct RateLimiter {
    config: RateLimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    pub fn new(config: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Ok(Self {
            bandwidth: config
                .bandwidth
                .as_ref()
                .map(|c| TokenBucket::new(c, "bandwidth"))
                .transpose()?,
            ops: config
                .ops
                .as_ref()
                .map(|c| TokenBucket::new(c, "ops"))
                .transpose()?,
            config,
            timer: TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?,
            blocked: false,
        })
    }

    pub fn config(&self) -> RateLimiterConfig {
        self.config
    }

    /// Whether a request must wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes the tokens `cost` needs, from both buckets or from neither. On false the caller
    /// keeps the request and retries when the timer fires.
    pub fn consume(&mut self, cost: Cost) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        // Check both before taking from either, so a refusal leaves the buckets untouched.
        let mut bandwidth = self.bandwidth.clone();
        let mut ops = self.ops.clone();
        let bytes_ok = bandwidth
            .as_mut()
            .is_none_or(|b| b.try_take(cost.bytes, now));
        let ops_ok = ops.as_mut().is_none_or(|b| b.try_take(cost.ops, now));
        if bytes_ok && ops_ok {
            self.bandwidth = bandwidth;
            self.ops = ops;
            return true;
        }
        // Wait times come from the refilled copies: the stored buckets were not refilled.
        let wait = [
            (!bytes_ok).then(|| bandwidth.as_ref().map(|b| b.wait_for(cost.bytes))),
            (!ops_ok).then(|| ops.as_ref().map(|b| b.wait_for(cost.ops))),
        ]
        .into_iter()
        .flatten()
        .flatten()
        .max()
        .unwrap_or(Duration::from_millis(1));
        self.block_for(wait);
        false
    }

    fn block_for(&mut self, wait: Duration) {
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would ever unblock the queue: let the request through.
            Err(e) => tracing::error!("rate limiter timer: {e}; not throttling"),
        }
    }

    /// Called when the timer fd is readable: the wait is over.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// Replaces the buckets (a live update). Buckets keep their current fill, capped at the new
    /// size, so an update neither grants a fresh burst nor takes tokens back.
    pub fn update_buckets(&mut self, config: RateLimiterConfig) -> Result<(), RateLimiterError> {
        let now = Instant::now();
        let carry = |old: &mut Option<TokenBucket>, new: &Option<TokenBucketConfig>, what| {
            let Some(cfg) = new else {
                return Ok(None);
            };
            let mut bucket = TokenBucket::new(cfg, what)?;
            if let Some(old) = old.as_mut() {
                old.refill(now);
                bucket.budget = old.budget.min(bucket.size);
                bucket.one_time_burst = 0;
            }
            Ok(Some(bucket))
        };
        let bandwidth = carry(&mut self.bandwidth, &config.bandwidth, "bandwidth")?;
        let ops = carry(&mut self.ops, &config.ops, "ops")?;
        self.bandwidth = bandwidth;
        self.ops = ops;
        self.config = config;
        // A waiting queue re-checks against the new buckets right away.
        if self.blocked {
            self.block_for(Duration::from_micros(100));
        }
        Ok(())
    }
}

/// A bucket's fill at save time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    pub budget: u64,
    pub one_time_burst: u64,
}

/// The limiter's buckets and whether a request was waiting (the configuration comes from the
/// VM's spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterState {
    pub bandwidth: Option<BucketState>,
    pub ops: Option<BucketState>,
    pub blocked: bool,
}

impl crate::persist::Persist for RateLimiter {
    type State = RateLimiterState;

    fn save(&mut self) -> RateLimiterState {
        let now = Instant::now();
        let fill = |b: &mut Option<TokenBucket>| {
            b.as_mut().map(|b| {
                b.refill(now);
                BucketState {
                    budget: b.budget,
                    one_time_burst: b.one_time_burst,
                }
            })
        };
        RateLimiterState {
            bandwidth: fill(&mut self.bandwidth),
            ops: fill(&mut self.ops),
            blocked: self.blocked,
        }
    }

    /// The buckets go on from their saved fill; time spent saved earns no tokens.
    fn restore(&mut self, state: RateLimiterState) -> Result<(), crate::persist::PersistError> {
        let now = Instant::now();
        let put = |b: &mut Option<TokenBucket>, s: Option<BucketState>| {
            if let (Some(b), Some(s)) = (b.as_mut(), s) {
                b.budget = s.budget.min(b.size);
                b.one_time_burst = s.one_time_burst;
                b.last_update = now;
            }
        };
        put(&mut self.bandwidth, state.bandwidth);
        put(&mut self.ops, state.ops);
        if state.blocked {
            // A queue that waited looks again once the timer fires.
            self.block_for(Duration::from_micros(100));
        }
        Ok(())
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    #[test]
    fn a_restored_limiter_keeps_its_buckets_fill() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: Some(50),
                refill_time: 100_000,
            }),
            ops: None,
        };
        let mut a = RateLimiter::new(cfg).unwrap();
        assert!(a.consume(Cost { bytes: 850, ops: 1 }));
        let saved = a.save();
        assert_eq!(
            saved.bandwidth,
            Some(BucketState {
                budget: 200,
                one_time_burst: 0
            })
        );
        let mut b = RateLimiter::new(cfg).unwrap();
        b.restore(saved).unwrap();
        assert!(!b.consume(Cost { bytes: 300, ops: 1 }), "only 200 left");
        let mut c = RateLimiter::new(cfg).unwrap();
        c.restore(saved).unwrap();
        assert!(c.consume(Cost { bytes: 200, ops: 1 }));
    }

    fn bucket(size: u64, refill_ms: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: refill_ms,
        })
    }

    #[test]
    fn bucket_refills_proportionally_to_time() {
        let mut b = TokenBucket::new(&bucket(1000, 1000).unwrap(), "t").unwrap();
        let t0 = b.last_update;
        assert!(b.try_take(1000, t0));
        assert!(!b.try_take(1, t0));
        assert!(!b.try_take(300, t0 + Duration::from_millis(299)));
        assert!(b.try_take(300, t0 + Duration::from_millis(300)));
        assert_eq!(b.budget, 0);
        // Never more than full.
        b.refill(t0 + Duration::from_secs(100));
        assert_eq!(b.budget, 1000);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_only_once() {
        let cfg = TokenBucketConfig {
            size: 100,
            one_time_burst: Some(500),
            refill_time: 1000,
        };
        let mut b = TokenBucket::new(&cfg, "t").unwrap();
        let t0 = b.last_update;
        assert!(b.try_take(550, t0), "500 burst + 50 budget");
        assert_eq!((b.one_time_burst, b.budget), (0, 50));
        assert!(!b.try_take(51, t0));
    }

    #[test]
    fn oversized_requests_pass_on_a_full_bucket_instead_of_starving() {
        let mut b = TokenBucket::new(&bucket(100, 1000).unwrap(), "t").unwrap();
        let t0 = b.last_update;
        assert!(b.try_take(1000, t0));
        assert!(!b.try_take(1000, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn a_refused_request_takes_nothing_and_arms_the_timer() {
        let mut rl = RateLimiter::new(RateLimiterConfig {
            bandwidth: bucket(1000, 100),
            ops: bucket(2, 100),
        })
        .unwrap();
        let cost = Cost { bytes: 400, ops: 1 };
        assert!(rl.consume(cost));
        assert!(rl.consume(cost));
        assert!(!rl.consume(cost), "ops bucket empty");
        assert!(rl.is_blocked());
        assert_eq!(
            rl.bandwidth.as_ref().unwrap().budget,
            200,
            "bandwidth untouched by the refusal"
        );
        assert!(
            !rl.consume(Cost { bytes: 1, ops: 0 }),
            "blocked until the timer fires"
        );
        std::thread::sleep(Duration::from_millis(60));
        rl.on_timer();
        assert!(rl.consume(cost));
    }

    #[test]
    fn live_update_keeps_the_fill_and_rejects_bad_buckets() {
        let mut rl = RateLimiter::new(RateLimiterConfig {
            bandwidth: bucket(1000, 1000),
            ops: None,
        })
        .unwrap();
        assert!(rl.consume(Cost { bytes: 900, ops: 1 }));
        rl.update_buckets(RateLimiterConfig {
            bandwidth: bucket(10_000, 1000),
            ops: None,
        })
        .unwrap();
        let budget = rl.bandwidth.as_ref().unwrap().budget;
        assert!(
            (100..200).contains(&budget),
            "no fresh burst on update: {budget}"
        );
        assert!(rl
            .update_buckets(RateLimiterConfig {
                bandwidth: bucket(0, 1000),
                ops: None
            })
            .is_err());
        rl.update_buckets(RateLimiterConfig::default()).unwrap();
        assert!(
            rl.consume(Cost {
                bytes: u64::MAX,
                ops: u64::MAX
            }),
            "no buckets: unlimited"
        );
    }

    #[test]
    fn firecracker_json_shape_parses() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "one_time_burst": 0, "refill_time": 100},
                "ops": {"size": 100, "refill_time": 1000}}"#,
        )
        .unwrap();
        assert_eq!(c.ops.unwrap().size, 100);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw": {}}"#).is_err());
    }
}
