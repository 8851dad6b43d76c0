//! prescient: a KVM microVM monitor whose resource predictor runs inside it.
//!
//! A [`vmm_config::VmConfig`] (from `--config-file`) is turned into a running
//! [`microvm::MicroVm`] by [`builder::build_microvm`]; [`microvm::MicroVm::run`] serves the VMM
//! thread's event loop until the guest ends and says why ([`exit::ExitReason`]).

pub mod api;
pub mod arch;
pub mod autopilot;
pub mod boot;
pub mod builder;
pub mod cleanup;
pub mod console;
pub mod device_manager;
pub mod exit;
pub mod idle_trim;
pub mod logger;
pub mod metrics;
pub mod microvm;
pub mod profile;
pub mod rpc;
pub mod runtime;
pub mod seccomp;
pub mod vmm_config;
pub mod vstate;
