//! The predictor's offline tools, behind the `prescient` binary's subcommands: [`eval`]
//! replays traces through every forecaster and the baselines, [`synthetic`] generates the
//! synthetic workload set, [`record`] samples a real program's process tree into a trace,
//! [`plot`] and [`report`] draw SVGs, and [`train`] (feature `torch`) fits the recurrent
//! forecaster with libtorch.
//!
//! Kept out of the `predictor` crate so the VMM, which links only that core (telemetry,
//! forecasters, policy, scores, trace format), carries no CLI, plotting or training code.

pub mod eval;
pub mod plot;
pub mod record;
pub mod report;
pub mod synthetic;
#[cfg(feature = "torch")]
pub mod train;
