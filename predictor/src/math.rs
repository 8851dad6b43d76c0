//! The transcendental functions of the predictor and its tools, from the pure-Rust `libm`
//! crate rather than the C library.
//!
//! The VMM calls nothing else of the C library's libm, so with these the `prescient` binary
//! does not link it at all: loading glibc's libm maps ~320 KiB of it into every VMM process,
//! whatever the program calls (docs/memory.md). `clippy.toml` keeps the std methods that would
//! bring it back (`f64::exp` and the like) out of the workspace. The results agree with glibc's
//! within an ulp or two, and the predictor's forecasts with those it made on glibc within
//! float rounding (the tests below).

/// e^x.
#[inline]
pub fn exp(x: f64) -> f64 {
    libm::exp(x)
}

/// 2^x.
#[inline]
pub fn exp2(x: f64) -> f64 {
    libm::exp2(x)
}

/// The natural logarithm.
#[inline]
pub fn ln(x: f64) -> f64 {
    libm::log(x)
}

/// The base-2 logarithm.
#[inline]
pub fn log2(x: f64) -> f64 {
    libm::log2(x)
}

/// x^y.
#[inline]
pub fn powf(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// The sine of x radians.
#[inline]
pub fn sin(x: f64) -> f64 {
    libm::sin(x)
}

/// The cosine of x radians.
#[inline]
pub fn cos(x: f64) -> f64 {
    libm::cos(x)
}

/// e^x in single precision (the recurrent model's gates).
#[inline]
pub fn expf(x: f32) -> f32 {
    libm::expf(x)
}

/// The hyperbolic tangent in single precision (the recurrent model's cell).
#[inline]
pub fn tanhf(x: f32) -> f32 {
    libm::tanhf(x)
}

#[cfg(test)]
// The C library's functions are the reference here.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::forecast::{GruWeights, Horizon, Preset};
    use crate::policy::{Budget, Policy, PolicyConfig};
    use crate::resource::{PerResource, Usage};
    use crate::rng::Rng;
    use crate::sample::{Sample, Signals};
    use std::sync::Arc;

    /// Distance in representable doubles.
    fn ulps(a: f64, b: f64) -> u64 {
        let key = |x: f64| {
            let i = x.to_bits() as i64;
            if i < 0 {
                i64::MIN - i
            } else {
                i
            }
        };
        key(a).abs_diff(key(b))
    }

    fn ulps32(a: f32, b: f32) -> u32 {
        let key = |x: f32| {
            let i = x.to_bits() as i32;
            if i < 0 {
                i32::MIN - i
            } else {
                i
            }
        };
        key(a).abs_diff(key(b))
    }

    /// `n` values spread over [lo, hi], ends included, plus seeded random ones in between.
    fn inputs(lo: f64, hi: f64, n: usize) -> Vec<f64> {
        let mut rng = Rng::new(n as u64);
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f64 / n as f64)
            .chain((0..n).map(|_| rng.range(lo, hi)))
            .collect()
    }

    #[test]
    fn each_function_agrees_with_the_c_librarys_within_an_ulp_or_two() {
        type F64 = (&'static str, fn(f64) -> f64, fn(f64) -> f64, f64, f64, u64);
        // The ranges the callers pass (decay half-lives, loss differences, ratios of demands,
        // angles of the synthetic shapes), and wider.
        let cases: [F64; 6] = [
            ("exp", exp, f64::exp, -700.0, 700.0, 1),
            ("exp2", exp2, f64::exp2, -1000.0, 1000.0, 1),
            ("ln", ln, f64::ln, 1e-300, 1e300, 1),
            ("log2", log2, f64::log2, 1e-300, 1e300, 1),
            ("sin", sin, f64::sin, -1e4, 1e4, 1),
            ("cos", cos, f64::cos, -1e4, 1e4, 1),
        ];
        for (name, ours, c, lo, hi, max) in cases {
            for x in inputs(lo, hi, 20_000)
                .into_iter()
                .chain(inputs(-2.0, 2.0, 20_000))
            {
                if (name == "ln" || name == "log2") && x <= 0.0 {
                    continue;
                }
                let d = ulps(ours(x), c(x));
                assert!(
                    d <= max,
                    "{name}({x:e}): {} vs {} ({d} ulps)",
                    ours(x),
                    c(x)
                );
            }
        }
        for (x, y) in inputs(1e-12, 1e3, 2000)
            .into_iter()
            .zip(inputs(-4.0, 4.0, 2000).into_iter().rev())
        {
            let d = ulps(powf(x, y), x.powf(y));
            assert!(d <= 1, "pow({x:e}, {y}): {d} ulps");
        }
        for x in inputs(-90.0, 90.0, 20_000) {
            let x = x as f32;
            let d = ulps32(expf(x), x.exp());
            assert!(d <= 1, "expf({x:e}): {} vs {} ({d} ulps)", expf(x), x.exp());
            let d = ulps32(tanhf(x), x.tanh());
            assert!(
                d <= 2,
                "tanhf({x:e}): {} vs {} ({d} ulps)",
                tanhf(x),
                x.tanh()
            );
        }
    }

    /// Each function at points whose correctly rounded results are known (computed to 300 bits
    /// with mpmath and rounded to nearest): within 1 ulp of them (`tanhf` 2, as musl states),
    /// and exact where IEEE 754 and C99 Annex F fix the result (exact powers, zeros,
    /// infinities, overflow, NaN).
    #[test]
    fn each_function_is_within_its_stated_ulps_of_known_values() {
        type Golden = (&'static str, fn(f64) -> f64, &'static [(f64, f64)]);
        let cases: [Golden; 6] = [
            (
                "exp",
                exp,
                &[
                    (1.0, std::f64::consts::E),
                    (-1.0, 0.36787944117144233),
                    (0.5, 1.6487212707001282),
                    (10.0, 22026.465794806718),
                    (-3.25, 0.03877420783172201),
                    (0.001, 1.0010005001667084),
                    (1e-10, 1.0000000001),
                    (100.0, 2.6881171418161356e43),
                    (-700.0, 9.85967654375977e-305),
                    (709.5, 1.3549863193146328e308),
                ],
            ),
            (
                "exp2",
                exp2,
                &[
                    (0.5, std::f64::consts::SQRT_2),
                    (-0.5, std::f64::consts::FRAC_1_SQRT_2),
                    (1.0 / 3.0, 1.2599210498948732),
                    (10.25, 1217.7480857627863),
                    (100.1, 1.3586342730928144e30),
                    (3e-5, 1.0000207946316222),
                    (-1020.5, 6.293459255965435e-308),
                ],
            ),
            (
                "ln",
                ln,
                &[
                    (2.0, std::f64::consts::LN_2),
                    (10.0, std::f64::consts::LN_10),
                    (0.5, -std::f64::consts::LN_2),
                    (3.0, 1.0986122886681098),
                    (123.456, 4.815884817283264),
                    (1.0000001, 9.999999505838704e-8),
                    (1e-300, -690.7755278982137),
                    (1e300, 690.7755278982137),
                ],
            ),
            (
                "log2",
                log2,
                &[
                    (3.0, 1.584962500721156),
                    (10.0, std::f64::consts::LOG2_10),
                    (0.1, -std::f64::consts::LOG2_10),
                    (1.5, 0.5849625007211562),
                    (7.77, 2.957914598632985),
                    (1e-300, -996.5784284662087),
                    (1e300, 996.5784284662087),
                ],
            ),
            (
                "sin",
                sin,
                &[
                    (1.0, 0.8414709848078965),
                    (0.5, 0.479425538604203),
                    (-2.0, -0.9092974268256817),
                    (3.0, 0.1411200080598672),
                    (1e-8, 1e-8),
                    // fl(fl(pi) / 6) and fl(fl(pi) / 3): a hair from pi/6 and pi/3, so not 0.5.
                    (0.5235987755982988, 0.49999999999999994),
                    (100.0, -0.5063656411097588),
                    (1e4, -0.30561438888825215),
                ],
            ),
            (
                "cos",
                cos,
                &[
                    (1.0, 0.5403023058681398),
                    (0.5, 0.8775825618903728),
                    (-2.0, -0.4161468365471424),
                    (3.0, -0.9899924966004454),
                    (1e-8, 1.0),
                    (1.0471975511965976, 0.5000000000000001),
                    (100.0, 0.8623188722876839),
                    (1e4, -0.9521553682590148),
                ],
            ),
        ];
        for (name, f, points) in cases {
            for &(x, want) in points {
                let d = ulps(f(x), want);
                assert!(
                    d <= 1,
                    "{name}({x:e}) = {:e}, want {want:e} ({d} ulps)",
                    f(x)
                );
            }
        }
        for (x, y, want) in [
            (2.0, 0.5, std::f64::consts::SQRT_2),
            (10.0, -3.0, 0.001),
            (1.5, 2.5, 2.7556759606310752),
            (0.3, 1.2, 0.23580092567898683),
            (123.0, 0.01, 1.0492984977938107),
            (1e-12, -4.0, 1e48),
            (7.0, 1.0 / 3.0, 1.912931182772389),
        ] {
            let d = ulps(powf(x, y), want);
            assert!(d <= 1, "pow({x:e}, {y}) = {:e}, want {want:e}", powf(x, y));
        }
        for (x, want) in [
            (1.0, std::f32::consts::E),
            (-1.0, 0.36787945),
            (0.5, 1.6487212),
            (10.0, 22026.465),
            (-3.25, 0.038774207),
            (0.1, 1.105171),
            (80.0, 5.5406225e34),
            (-80.0, 1.8048513e-35),
        ] {
            let d = ulps32(expf(x), want);
            assert!(d <= 1, "expf({x:e}) = {:e}, want {want:e}", expf(x));
        }
        for (x, want) in [
            (0.5, 0.46211717),
            (-0.5, -0.46211717),
            (0.55, 0.5005202),
            (1.0, 0.7615942),
            (0.1, 0.099667996),
            (2.0, 0.9640276),
            (-3.0, -0.9950548),
            (0.001, 0.0009999997),
            (9.0, 0.99999994),
        ] {
            let d = ulps32(tanhf(x), want);
            assert!(d <= 2, "tanhf({x:e}) = {:e}, want {want:e}", tanhf(x));
        }

        // Exact by definition: IEEE 754 exact cases and C99 Annex F special values.
        let inf = f64::INFINITY;
        for (what, got, want) in [
            ("exp(0)", exp(0.0), 1.0),
            ("exp(-inf)", exp(-inf), 0.0),
            ("exp(inf)", exp(inf), inf),
            ("exp(710) overflows", exp(710.0), inf),
            ("exp(-746) underflows", exp(-746.0), 0.0),
            ("exp2(10)", exp2(10.0), 1024.0),
            ("exp2(-1074)", exp2(-1074.0), f64::from_bits(1)),
            ("exp2(1024) overflows", exp2(1024.0), inf),
            ("ln(1)", ln(1.0), 0.0),
            ("ln(0)", ln(0.0), -inf),
            ("ln(inf)", ln(inf), inf),
            ("log2(8)", log2(8.0), 3.0),
            ("log2(2^-1074)", log2(f64::from_bits(1)), -1074.0),
            ("pow(x, 0)", powf(123.4, 0.0), 1.0),
            ("pow(2, 10)", powf(2.0, 10.0), 1024.0),
            ("pow(0, -1)", powf(0.0, -1.0), inf),
            ("sin(0)", sin(0.0), 0.0),
            ("cos(0)", cos(0.0), 1.0),
        ] {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{what} = {got:e}, want {want:e}"
            );
        }
        assert!(
            sin(-0.0).is_sign_negative() && sin(-0.0) == 0.0,
            "sin(-0) is -0"
        );
        for (what, got) in [
            ("ln(-1)", ln(-1.0)),
            ("log2(-1)", log2(-1.0)),
            ("sin(inf)", sin(inf)),
            ("cos(inf)", cos(inf)),
            ("exp(NaN)", exp(f64::NAN)),
            ("pow(-8, 1/3)", powf(-8.0, 1.0 / 3.0)),
        ] {
            assert!(got.is_nan(), "{what} = {got}, want NaN");
        }
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(89.0), f32::INFINITY, "expf(89) overflows");
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(tanhf(f32::INFINITY), 1.0);
        assert_eq!(tanhf(f32::NEG_INFINITY), -1.0);
        assert!(
            tanhf(-0.0) == 0.0 && tanhf(-0.0).is_sign_negative(),
            "tanhf(-0) is -0"
        );
        assert!(tanhf(f32::NAN).is_nan() && expf(f32::NAN).is_nan());
    }

    /// The default ensemble, with the shipped recurrent model, over seeded series of every
    /// kind the forecasters treat differently (steady, periodic, bursty, ramping): the sums,
    /// per resource, of the upper forecasts and of the allocations.
    fn ensemble_run(seed: u64) -> [f64; 8] {
        let capacity = Usage {
            cpu: 4.0,
            mem: 4096.0,
            blk: 200.0,
            net: 400.0,
        };
        let gru = Arc::new(GruWeights::shipped().expect("the shipped model"));
        // The ensemble as it was when recorded, before the peak expert joined it.
        let Preset::Ensemble(experts) = Preset::ensemble(Some(gru)) else {
            unreachable!("Preset::ensemble builds an ensemble")
        };
        let experts = experts
            .into_iter()
            .filter(|p| !matches!(p, Preset::OnlyFor(_, only) if matches!(**only, Preset::Peak)))
            .collect();
        let forecasters = Preset::Ensemble(experts)
            .build_all(Horizon::new(5).expect("horizon"), &capacity)
            .expect("forecasters");
        // Recorded before the bandwidth buckets were modelled: without them, as then.
        let cfg = PolicyConfig {
            bucket_windows: PerResource::default(),
            ..PolicyConfig::default()
        };
        let mut policy =
            Policy::new(Budget::from_capacity(&capacity), cfg, forecasters).expect("policy");
        let mut rng = Rng::new(seed);
        let mut sums = [0.0; 8];
        for t in 0..1500u64 {
            let wave = 0.5 + 0.4 * cos(t as f64 / 40.0);
            let burst = if rng.unit() < 0.05 { 2.0 } else { 1.0 };
            let ramp = (t as f64 / 1500.0).min(1.0);
            let noisy = |v: f64, rng: &mut Rng| (v * (1.0 + 0.05 * rng.normal())).max(0.0);
            let usage = Usage {
                cpu: noisy(1.5 * wave * burst, &mut rng).min(4.0),
                mem: noisy(512.0 + 2800.0 * ramp, &mut rng).min(4096.0),
                blk: noisy(60.0 * burst, &mut rng).min(200.0),
                net: noisy(300.0 * powf(wave, 1.2), &mut rng).min(400.0),
            };
            let d = policy.decide(&Sample {
                t_ms: t * 100,
                usage,
                signals: Signals {
                    io_ops: (usage.blk * 10.0) as u64,
                    devices: 0b11,
                    faults: (usage.mem / 8.0) as u64,
                    ..Signals::default()
                },
            });
            for (i, (_, f)) in d.forecast.iter().enumerate() {
                sums[i] += f.upper;
            }
            for (i, (_, a)) in d.allocation.iter().enumerate() {
                sums[4 + i] += a;
            }
        }
        sums
    }

    #[test]
    fn the_ensembles_forecasts_are_those_it_made_on_the_c_librarys_math() {
        // Recorded with the predictor on glibc 2.36's libm (std's f64 and f32 methods) before
        // it moved to the libm crate.
        let want: [[f64; 8]; 2] = [
            [
                2320.880059083128,
                3137282.021875066,
                185645.97388163643,
                234476.1284376099,
                2456.8499999999985,
                3322552.0,
                195527.0,
                240954.0,
            ],
            [
                2472.1675926860757,
                3168892.0538154393,
                189519.94081596544,
                236304.35786333578,
                2608.830000000006,
                3366156.0,
                199786.0,
                242825.0,
            ],
        ];
        for (seed, want) in [7, 8].into_iter().zip(want) {
            let got = ensemble_run(seed);
            // An ulp here and there, carried through 1500 windows of forecaster state, moves
            // the forecasts' sums by about 1e-9 of their size; the allocations, whole steps,
            // stay the same.
            let close = got[..4]
                .iter()
                .zip(&want[..4])
                .all(|(g, w)| (g - w).abs() <= 1e-8 * w.abs());
            assert!(
                close && got[4..] == want[4..],
                "seed {seed}: {got:?}\nwant {want:?}"
            );
        }
    }
}
