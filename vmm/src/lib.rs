//! prescient: a KVM microVM monitor whose resource predictor runs inside it.
//!
//! A [`vmm_config::VmConfig`] (from `--config-file`) is turned into a running
//! [`microvm::MicroVm`] by [`builder::build_microvm`]; [`runtime::Runtime::run`] serves the VMM
//! thread's event loop until the guest ends and says why ([`exit::ExitReason`]). The modules form
//! layers, each using only those below it; `docs/architecture.md` draws them and follows one
//! exit and one predictor window through the code.

pub mod api;
pub mod arch;
pub mod autopilot;
pub mod boot;
pub mod builder;
pub mod cleanup;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod live;
pub mod logger;
pub mod metrics;
pub mod microvm;
pub mod profile;
pub mod rpc;
pub mod runtime;
pub mod seccomp;
pub mod vmm_config;
pub mod vstate;
