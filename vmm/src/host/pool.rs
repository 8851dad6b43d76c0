//! The pool: each window, every VM's want (its predictor's forecast, upper band) is turned into
//! a grant so that the grants of each resource never add up to more than the host's budget.
//!
//! The contention rule (docs/pool.md): every VM keeps its floor, reserved at admission. What is
//! left is handed out in tiers, each a class and how much of its forecast it covers:
//!
//! 1. guaranteed VMs, up to their forecast's upper band;
//! 2. burstable VMs, up to their expected demand (the forecast's point);
//! 3. best-effort VMs, up to their expected demand;
//! 4. burstable VMs whose forecast is rising, up to their upper band;
//! 5. best-effort VMs whose forecast is rising, up to their upper band;
//! 6. the other burstable VMs, up to their upper band;
//! 7. the other best-effort VMs, up to their upper band;
//! 8. guaranteed VMs that are ramping, up to their ceiling, *held*;
//! 9. burstable VMs that are ramping, up to their ceiling, held.
//!
//! Ramping: the forecast's upper band rose by a step or more within the windows the pool
//! grants ahead. Tiers 8 and 9 spend only slack, what is left once every VM has its whole
//! band. A VM that gets any of it is held at its grant (its predictor's budget minimum is
//! raised to it, so the resource is plugged now, ahead of a forecast that lags the ramp). The
//! division starts from the floors every window, so a hold is the first thing another VM's
//! band takes back.
//!
//! A miss below the expected demand is likely (about even odds) and one above it is the band's
//! tail; that tail is reached mostly on the way up (a forecaster lags a rise, and a band stays
//! wide for a while after one), so every VM's expected demand is covered before any
//! non-guaranteed band, and rising VMs' bands before the others': the largest expected miss
//! costs go first. A tier whose asks all fit gets them in full; the first tier that does not
//! fit shares what is left in proportion to its asks (each VM of it short by the same
//! fraction), and the tiers after it get nothing more. Best-effort VMs are thus squeezed
//! first, and a guaranteed VM is short only when the guaranteed VMs' bands alone exceed what
//! the floors leave.

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
    /// Its expected demand (before the span bounds it).
    pub need: f64,
    /// What its forecast's upper band asks for (before the span bounds it).
    pub want: f64,
    /// Whether its forecast rose since the window before.
    pub rising: bool,
    /// Whether its forecast rose by a step or more within the windows the pool grants ahead:
    /// a ramp under way, which slack may be held for.
    pub ramping: bool,
}

/// How much of a VM's forecast a tier covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    Expected,
    /// The upper band of VMs whose forecast rises.
    RisingBand,
    Band,
    /// The ceiling of VMs whose forecast rises: slack, held.
    RisingCeiling,
}

/// The tiers, in the order they are served.
const TIERS: [(Class, Cover); 9] = [
    (Class::Guaranteed, Cover::Band),
    (Class::Burstable, Cover::Expected),
    (Class::BestEffort, Cover::Expected),
    (Class::Burstable, Cover::RisingBand),
    (Class::BestEffort, Cover::RisingBand),
    (Class::Burstable, Cover::Band),
    (Class::BestEffort, Cover::Band),
    (Class::Guaranteed, Cover::RisingCeiling),
    (Class::Burstable, Cover::RisingCeiling),
];

/// One VM's share of a resource for a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// What it may hold at most (its predictor's budget maximum); these add up to at most the
    /// total.
    pub max: f64,
    /// What it must hold (its predictor's budget minimum): its floor, or its whole grant when
    /// the grant includes slack.
    pub hold: f64,
}

/// The grants of one resource: `claims` in, one grant each out, in their order. Every grant is
/// within its span, a floor plus a multiple of its step, and the grants add up to at most
/// `total` whenever the floors do.
pub fn divide(total: f64, claims: &[Claim]) -> Vec<Grant> {
    let mut grants: Vec<f64> = claims.iter().map(|c| c.span.floor).collect();
    let mut held = vec![false; claims.len()];
    let mut left = total - grants.iter().sum::<f64>();
    let level = |c: &Claim, cover: Cover| {
        let ask = match cover {
            Cover::Expected => c.need,
            Cover::RisingBand if !c.rising => c.need,
            Cover::RisingCeiling if !c.ramping => c.want.max(c.need),
            Cover::RisingCeiling => c.span.ceiling,
            _ => c.want.max(c.need),
        };
        ask.clamp(c.span.floor, c.span.ceiling)
    };
    for (class, cover) in TIERS {
        if left <= 0.0 {
            break;
        }
        let ask = |(g, c): (&f64, &Claim)| (level(c, cover) - g).max(0.0);
        let asked: f64 = grants
            .iter()
            .zip(claims)
            .filter(|(_, c)| c.class == class)
            .map(ask)
            .sum();
        if asked <= 0.0 {
            continue;
        }
        let share = (left / asked).min(1.0);
        let mut given = 0.0;
        for ((g, c), h) in grants.iter_mut().zip(claims).zip(held.iter_mut()) {
            if c.class != class {
                continue;
            }
            let more = ask((g, c)) * share;
            // Whole steps above the floor, rounded down so the sum stays within the total.
            let steps = ((*g + more - c.span.floor) / c.span.step + 1e-9).floor();
            let next = (c.span.floor + steps * c.span.step).max(*g);
            given += next - *g;
            *h |= cover == Cover::RisingCeiling && next > *g;
            *g = next;
        }
        left -= given;
        if share < 1.0 {
            break;
        }
    }
    grants
        .into_iter()
        .zip(claims)
        .zip(held)
        .map(|((max, c), held)| Grant {
            max,
            hold: if held { max } else { c.span.floor },
        })
        .collect()
}

/// A claimed warm VM's grant from its resume until the loop's next division: its CPU ceiling
/// (every vCPU's worth), as much of it as `allowance` (the slack the loop left after its last
/// division, shared by the claims until the next) has in whole steps above the floor, taken
/// from it; every other resource its floor.
///
/// A warm VM holds only its floors while paused, and its predictor's allocation is its
/// snapshot's (0.05 cores for a template that booted at its floor): resumed so, its vCPU
/// threads would wait out most of each CFS period, so the grant goes up before the resume.
/// CPU alone, because a quota takes effect at once and is what a resume and a guest's first
/// steps wait for; memory would be a plug the guest has to take (slow, and a warm VM's floor
/// already holds what it cannot give back), bandwidth is idle until the guest does I/O.
/// Slack only: no VM's band is taken for it, so every class gets the same rule, and from the
/// next window on the VM is divided like any other.
pub fn start_grant(
    spans: &PerResource<Span>,
    allowance: &mut PerResource<f64>,
) -> PerResource<f64> {
    let mut grant = spans.map(|_, s| s.floor);
    let cpu = spans[Resource::Cpu];
    let room = allowance.cpu.min(cpu.ceiling - cpu.floor).max(0.0);
    let steps = (room / cpu.step + 1e-9).floor();
    grant.cpu = cpu.floor + steps * cpu.step;
    allowance.cpu -= grant.cpu - cpu.floor;
    grant
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
    /// What it must hold after the change (its predictor's budget minimum).
    pub hold: f64,
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
    /// What the VMs must hold above their floors: slack lent ahead of ramps.
    pub held: PerResource<f64>,
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
            need: want,
            want,
            rising: false,
            ramping: false,
        }
    }

    /// The grants' maxima, checking that no VM is held above its floor.
    fn maxima(total: f64, claims: &[Claim]) -> Vec<f64> {
        let g = divide(total, claims);
        for (g, c) in g.iter().zip(claims) {
            assert_eq!(g.hold, c.span.floor, "{claims:?} {g:?}");
        }
        g.iter().map(|g| g.max).collect()
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
        assert_eq!(maxima(4096.0, &claims), vec![100.0, 512.0, 64.0]);
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
        let g = maxima(1000.0, &claims);
        assert_eq!(g[0], 64.0);
        assert_eq!(g[1], 512.0);
        assert_eq!((g[2], g[3]), (64.0 + 98.0, 64.0 + 196.0));
        assert!(g.iter().sum::<f64>() <= 1000.0);
    }

    #[test]
    fn expected_demand_is_covered_before_any_burstable_band() {
        let banded = |class, need, want| Claim {
            need,
            want,
            ..claim(class, 100.0, 1000.0, 0.0)
        };
        let rising = |class, need, want| Claim {
            rising: true,
            ..banded(class, need, want)
        };
        // A burstable VM past its peak (a wide band over a small expected demand), one
        // ramping (both high), and a best-effort VM: 300 floors, 500 to share.
        let claims = [
            banded(Class::Burstable, 150.0, 600.0),
            banded(Class::Burstable, 400.0, 450.0),
            banded(Class::BestEffort, 200.0, 300.0),
        ];
        let g = maxima(800.0, &claims);
        // Expected demands first (50 + 300 + 100 = 450), then 50 left for the burstable
        // bands (450 + 50 asked): shared 10 to 1.
        assert_eq!(g, vec![150.0 + 44.0, 400.0 + 4.0, 200.0]);
        // The same, the second one rising: its band comes before the falling one's, and
        // then a rising best-effort band before it too.
        let claims = [claims[0], rising(Class::Burstable, 400.0, 450.0), claims[2]];
        assert_eq!(maxima(800.0, &claims), vec![150.0, 450.0, 200.0]);
        let claims = [
            claims[0],
            claims[1],
            rising(Class::BestEffort, 200.0, 300.0),
        ];
        assert_eq!(maxima(850.0, &claims), vec![150.0, 450.0, 250.0]);
    }

    #[test]
    fn slack_is_held_for_ramping_vms_and_taken_back_first() {
        let vm = |class, want, ramping| Claim {
            ramping,
            ..claim(class, 100.0, 600.0, want)
        };
        let g = vm(Class::Guaranteed, 200.0, true);
        let b = vm(Class::Burstable, 200.0, true);
        let steady = vm(Class::Burstable, 200.0, false);
        let be = vm(Class::BestEffort, 200.0, true);
        let grants = |total, claims: &[Claim]| -> Vec<(f64, f64)> {
            divide(total, claims)
                .iter()
                .map(|g| (g.max, g.hold))
                .collect()
        };
        // Floors 400, bands 400 more: the 400 left go to the ramping guaranteed VM up to its
        // ceiling, held there; the others keep their bands and their floors as holds.
        let claims = [g, b, steady, be];
        let bands = [(200.0, 100.0); 3];
        assert_eq!(
            grants(1200.0, &claims),
            [(600.0, 600.0), bands[0], bands[1], bands[2]]
        );
        // Less slack: the guaranteed VM gets what there is; more: the ramping burstable VM
        // gets what the guaranteed one's ceiling leaves. Best-effort VMs are never held.
        assert_eq!(
            grants(1000.0, &claims),
            [(400.0, 400.0), bands[0], bands[1], bands[2]]
        );
        assert_eq!(
            grants(1400.0, &claims),
            [(600.0, 600.0), (400.0, 400.0), bands[1], bands[2]]
        );
        // The next window the steady VM's demand jumps: its band comes out of the hold, and
        // with the slack gone so is the hold.
        let jumped = [g, b, vm(Class::Burstable, 500.0, false), be];
        assert_eq!(
            grants(1200.0, &jumped),
            [(300.0, 300.0), bands[0], (500.0, 100.0), bands[2]]
        );
        let jumped = [g, b, vm(Class::Burstable, 600.0, false), be];
        assert_eq!(
            grants(1200.0, &jumped),
            [(200.0, 100.0), bands[0], (600.0, 100.0), bands[2]]
        );
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
        let mut held = 0;
        for _ in 0..2000 {
            let n = 1 + next(20) as usize;
            let claims: Vec<Claim> = (0..n)
                .map(|_| {
                    let floor = 1.0 + next(100) as f64;
                    let need = next(1500) as f64;
                    Claim {
                        class: Class::ALL[next(3) as usize],
                        span: Span {
                            floor,
                            ceiling: floor + next(1000) as f64,
                            step: [0.01, 1.0, 2.0][next(3) as usize],
                        },
                        need,
                        want: need + next(500) as f64,
                        rising: next(2) == 1,
                        ramping: next(2) == 1,
                    }
                })
                .collect();
            let floors: f64 = claims.iter().map(|c| c.span.floor).sum();
            let total = floors + next(3000) as f64;
            let grants = divide(total, &claims);
            let g: Vec<f64> = grants.iter().map(|g| g.max).collect();
            assert!(g.iter().sum::<f64>() <= total + 1e-6, "{claims:?} {total}");
            for (g, c) in grants.iter().zip(&claims) {
                assert!(g.max >= c.span.floor && g.max <= c.span.ceiling + 1e-9);
                assert!(g.hold >= c.span.floor && g.hold <= g.max, "{c:?} {g:?}");
            }
            // Slack is held only for ramping guaranteed and burstable VMs, only once every VM
            // has its whole band, and for a burstable VM only once every ramping guaranteed
            // VM is held up to its ceiling (each within a step of rounding).
            let band = |d: &Claim| d.want.max(d.need).clamp(d.span.floor, d.span.ceiling);
            for (h, c) in grants.iter().zip(&claims) {
                if h.hold == c.span.floor {
                    continue;
                }
                assert!(c.ramping && c.class != Class::BestEffort, "{c:?} {h:?}");
                assert_eq!(h.hold, h.max);
                held += 1;
                for (j, d) in claims.iter().enumerate() {
                    assert!(g[j] + d.span.step > band(d) - 1e-6, "{claims:?} {g:?}");
                    if c.class == Class::Burstable && d.class == Class::Guaranteed && d.ramping {
                        assert!(
                            g[j] + d.span.step > d.span.ceiling - 1e-6,
                            "{claims:?} {g:?}"
                        );
                    }
                }
            }
            // A VM gets more than its expected demand only once every guaranteed VM has its
            // band and every other VM its expected demand (within a step of rounding).
            let covered = |d: &Claim, level: f64| level.clamp(d.span.floor, d.span.ceiling);
            for (i, c) in claims.iter().enumerate() {
                if g[i] > covered(c, c.need) + 1e-9 && c.class != Class::Guaranteed {
                    for (j, d) in claims.iter().enumerate() {
                        let due = match d.class {
                            Class::Guaranteed => covered(d, d.want.max(d.need)),
                            _ => covered(d, d.need),
                        };
                        assert!(g[j] + d.span.step > due - 1e-6, "{claims:?} {g:?}");
                    }
                }
            }
        }
        // The generator makes pools with slack: the rule above was exercised.
        assert!(held >= 50, "{held} holds");
    }

    #[test]
    fn a_claim_starts_at_its_cpu_ceiling_while_the_allowance_lasts() {
        let span = |floor, ceiling, step| Span {
            floor,
            ceiling,
            step,
        };
        let spans = PerResource {
            cpu: span(0.05, 1.0, 0.01),
            mem: span(64.0, 256.0, 2.0),
            blk: span(1.0, 1024.0, 1.0),
            net: span(1.0, 1024.0, 1.0),
        };
        let mut allowance = PerResource {
            cpu: 2.0,
            mem: 1000.0,
            blk: 1000.0,
            net: 1000.0,
        };
        let first = start_grant(&spans, &mut allowance);
        assert_eq!(
            (first.cpu, first.mem, first.blk, first.net),
            (1.0, 64.0, 1.0, 1.0)
        );
        // The second takes what is left in whole steps; the third finds none and keeps its
        // floor; the other resources are never lent.
        let second = start_grant(&spans, &mut allowance);
        assert!((second.cpu - 1.0).abs() < 1e-9, "{second:?}");
        assert!((allowance.cpu - 0.1).abs() < 1e-9, "{allowance:?}");
        allowance.cpu = 0.034;
        let third = start_grant(&spans, &mut allowance);
        assert!((third.cpu - 0.08).abs() < 1e-9, "{third:?}");
        assert!(
            allowance.cpu >= 0.0 && allowance.cpu < 0.01,
            "{allowance:?}"
        );
        let fourth = start_grant(&spans, &mut allowance);
        assert_eq!(fourth.cpu, 0.05);
        assert_eq!(allowance.mem, 1000.0);
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
