//! Resource predictor: telemetry windows, forecasters, allocation policy, scores and traces.
//!
//! Data flows one way: the vCPU threads count their exits through [`telemetry`] recorders and
//! the devices keep their own totals; the VMM thread closes a [`telemetry::Window`] every
//! window period and turns it into a [`sample::Sample`]; a [`policy::Policy`] feeds the
//! sample to its [`forecast`]ers and [`score`]s and returns a serialisable
//! [`policy::Decision`]; [`persist`] carries all of it across a VM snapshot. The same `Sample` is what [`trace`] files hold, so a recorded
//! run replays exactly as it ran live. The offline tools (evaluation, synthetic traces, plots,
//! training) are the `predictor-tools` crate, so the VMM links none of them.

pub mod bucket;
pub mod forecast;
pub mod math;
pub mod persist;
pub mod policy;
pub mod resource;
pub mod rng;
pub mod sample;
pub mod score;
pub mod spec;
pub mod telemetry;
pub mod trace;
