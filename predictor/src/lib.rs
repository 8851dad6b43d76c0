//! Resource predictor: telemetry windows, forecasters, allocation policy, scores and evaluation.
//!
//! Data flows one way: the vCPU threads count their exits through [`telemetry`] recorders and
//! the devices keep their own totals; the VMM thread closes a [`telemetry::Window`] every
//! window period and turns it into a [`sample::Sample`]; a [`policy::Policy`] feeds the
//! sample to its [`forecast`]ers and [`score`]s and returns a serialisable
//! [`policy::Decision`]. The same `Sample` is what [`trace`] files hold, so a recorded
//! run replays through [`eval`] exactly as it ran live.

pub mod eval;
pub mod forecast;
pub mod plot;
pub mod policy;
pub mod report;
pub mod resource;
pub mod sample;
pub mod score;
pub mod spec;
pub mod synthetic;
pub mod telemetry;
pub mod trace;
#[cfg(feature = "torch")]
pub mod train;
