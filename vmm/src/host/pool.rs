//! The pool: each window, every VM's want (its predictor's forecast, upper band) is turned into
//! a grant so that the grants of each resource never add up to more than the host's budget.
//!
//! The contention rule (docs/pool.md): every VM keeps its floor, reserved at admission. What is
//! left goes class by class, guaranteed first, then burstable, then best-effort; a class whose
//! wants above their floors all fit gets them in full, and the first class that does not fit
//! shares what is left in proportion to those wants (each VM of it is short by the same
//! fraction), so the classes after it get their floors only. A class is thus squeezed only
//! after every class below it is down to its floors.

use std::collections::VecDeque;

use predictor::resource::{PerResource, Resource};
use serde::Serialize;

use super::budget::HostBudget;
use super::spec::{Class, Span};

/// Windows the log keeps.
const LOG_WINDOWS: usize = 1200;

/// Errors of the pool's bookkeeping.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "the host budget cannot reserve this VM's {resource} floor of {floor} {unit}: \
         {reserved} of {budget} {unit} are reserved already"
    )]
    NoRoom {
        resource: &'static str,
        unit: &'static str,
        floor: f64,
        reserved: f64,
        budget: f64,
    },
}

/// One VM as the pool sees it in a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    pub class: Class,
    pub span: Span,
    /// What its forecast asks for (before the span bounds it).
    pub want: f64,
}

/// The grants of one resource: `claims` in, one grant each out, in their order. Every grant is
/// within its span, a floor plus a multiple of its step, and the grants add up to at most
/// `total` whenever the floors do.
pub fn divide(total: f64, claims: &[Claim]) -> Vec<f64> {
    let mut grants: Vec<f64> = claims.iter().map(|c| c.span.floor).collect();
    let mut left = total - grants.iter().sum::<f64>();
    let extra = |c: &Claim| (c.want.min(c.span.ceiling) - c.span.floor).max(0.0);
    for class in Class::ALL {
        if left <= 0.0 {
            break;
        }
        let asked: f64 = claims
            .iter()
            .filter(|c| c.class == class)
            .map(extra)
            .sum();
        if asked <= 0.0 {
            continue;
        }
        let share = (left / asked).min(1.0);
        for (g, c) in grants.iter_mut().zip(claims) {
            if c.class == class {
                // Whole steps only, rounded down so the sum stays within the total.
                let steps = (extra(c) * share / c.span.step + 1e-9).floor();
                *g = c.span.floor + steps * c.span.step;
            }
        }
        left -= asked * share;
    }
    grants
}

/// How a grant changed, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrantChange {
    pub vm: String,
    pub resource: &'static str,
    pub class: Class,
    pub want: f64,
    pub from: f64,
    pub to: f64,
    pub reason: String,
}

/// One window of the pool: the totals after it and what changed in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolWindow {
    pub seq: u64,
    /// Milliseconds since the supervisor started.
    pub t_ms: u64,
    pub budget: PerResource<f64>,
    pub granted: PerResource<f64>,
    /// What the VMs' forecasts asked for, each within its span.
    pub wanted: PerResource<f64>,
    pub vms: usize,
    /// VMs of each class whose memory grant was below their want.
    pub short: PerResource<u64>,
    pub changes: Vec<GrantChange>,
}

/// The windows of the pool, newest last, and the counters its metrics report.
#[derive(Debug, Default)]
pub struct PoolLog {
    windows: VecDeque<PoolWindow>,
    pub decisions: u64,
    pub changes: u64,
    pub returned: u64,
    /// Windows in which a guaranteed VM's grant was below its want, per resource.
    pub guaranteed_short: PerResource<u64>,
    /// Time spent deciding (reading forecasts, dividing, patching), microseconds.
    pub busy_us: u64,
}

impl PoolLog {
    pub fn push(&mut self, window: PoolWindow) {
        self.changes += window.changes.len() as u64;
        if self.windows.len() == LOG_WINDOWS {
            self.windows.pop_front();
        }
        self.windows.push_back(window);
    }

    pub fn last(&self) -> Option<&PoolWindow> {
        self.windows.back()
    }

    /// Windows after `seq`.
    pub fn since(&self, seq: u64) -> Vec<&PoolWindow> {
        self.windows.iter().filter(|w| w.seq > seq).collect()
    }
}

/// Sum of `floor` of each resource over `spans`.
pub fn reserved<'a>(spans: impl Iterator<Item = &'a PerResource<Span>>) -> PerResource<f64> {
    let mut sum = PerResource::default();
    for s in spans {
        for r in Resource::ALL {
            sum[r] += s[r].floor;
        }
    }
    sum
}

/// Admission: a VM is taken only if its floors fit beside those reserved already.
pub fn admit(
    budget: &HostBudget,
    reserved: &PerResource<f64>,
    spans: &PerResource<Span>,
) -> Result<(), PoolError> {
    for r in Resource::ALL {
        if reserved[r] + spans[r].floor > budget.0[r] + 1e-9 {
            return Err(PoolError::NoRoom {
                resource: r.name(),
                unit: r.unit(),
                floor: spans[r].floor,
                reserved: reserved[r],
                budget: budget.0[r],
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(class: Class, floor: f64, ceiling: f64, want: f64) -> Claim {
        Claim {
            class,
            span: Span {
                floor,
                ceiling,
                step: 2.0,
            },
            want,
        }
    }

    #[test]
    fn wants_that_fit_are_granted_in_whole_steps() {
        let claims = [
            claim(Class::Burstable, 64.0, 512.0, 101.0),
            claim(Class::BestEffort, 64.0, 512.0, 2000.0),
            claim(Class::Guaranteed, 64.0, 512.0, 10.0),
        ];
        // 101 rounds down to the step; 2000 stops at the ceiling; a want under the floor
        // keeps the floor.
        assert_eq!(divide(4096.0, &claims), vec![100.0, 512.0, 64.0]);
    }

    #[test]
    fn contention_squeezes_best_effort_first_then_shares_by_want() {
        let claims = [
            claim(Class::BestEffort, 64.0, 1024.0, 512.0),
            claim(Class::Guaranteed, 64.0, 1024.0, 512.0),
            claim(Class::Burstable, 64.0, 1024.0, 264.0),
            claim(Class::Burstable, 64.0, 1024.0, 464.0),
        ];
        // Floors 256, guaranteed +448 -> 704 of 1000; burstable asks 200 + 400 for 296 left:
        // each gets the same fraction (296/600) of its extra; best-effort keeps its floor.
        let g = divide(1000.0, &claims);
        assert_eq!(g[0], 64.0);
        assert_eq!(g[1], 512.0);
        assert_eq!((g[2], g[3]), (64.0 + 98.0, 64.0 + 196.0));
        assert!(g.iter().sum::<f64>() <= 1000.0);
    }

    #[test]
    fn grants_never_exceed_the_total_whatever_the_wants() {
        // A small deterministic generator: many random pools, the invariant each time.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..2000 {
            let n = 1 + next(20) as usize;
            let claims: Vec<Claim> = (0..n)
                .map(|_| {
                    let floor = 1.0 + next(100) as f64;
                    Claim {
                        class: Class::ALL[next(3) as usize],
                        span: Span {
                            floor,
                            ceiling: floor + next(1000) as f64,
                            step: [0.01, 1.0, 2.0][next(3) as usize],
                        },
                        want: next(1500) as f64,
                    }
                })
                .collect();
            let floors: f64 = claims.iter().map(|c| c.span.floor).sum();
            let total = floors + next(3000) as f64;
            let g = divide(total, &claims);
            assert!(g.iter().sum::<f64>() <= total + 1e-6, "{claims:?} {total}");
            for (g, c) in g.iter().zip(&claims) {
                assert!(*g >= c.span.floor && *g <= c.span.ceiling + 1e-9);
            }
            // A class only gets above its floors once every class before it has its wants.
            for (i, c) in claims.iter().enumerate() {
                if g[i] > c.span.floor + 1e-9 {
                    for (j, d) in claims.iter().enumerate() {
                        if d.class < c.class {
                            let full = d.want.min(d.span.ceiling).max(d.span.floor);
                            assert!(g[j] + d.span.step > full - 1e-6, "{claims:?} {g:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn admission_names_the_resource_that_does_not_fit() {
        let budget = HostBudget(PerResource {
            cpu: 2.0,
            mem: 256.0,
            blk: 100.0,
            net: 100.0,
        });
        let span = |floor| Span {
            floor,
            ceiling: floor * 2.0,
            step: 1.0,
        };
        let spans = PerResource {
            cpu: span(0.5),
            mem: span(128.0),
            blk: span(1.0),
            net: span(1.0),
        };
        let r = reserved([spans, spans].iter());
        assert_eq!(r.mem, 256.0);
        assert!(admit(&budget, &reserved([spans].iter()), &spans).is_ok());
        let e = admit(&budget, &r, &spans).unwrap_err().to_string();
        assert!(e.contains("mem floor of 128 MiB: 256 of 256 MiB"), "{e}");
    }
}
