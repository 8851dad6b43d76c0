//! Linux guests under the real `prescient` binary and a real KVM: the scenarios of a full boot
//! (agent, workloads, devices with Linux's own drivers, the predictor, the jailer, snapshots).
//!
//! Each test needs a hardware KVM (`nested::on_hardware_kvm`): on a host with kvm_intel or
//! kvm_amd it runs right there; anywhere else (the software-KVM development and CI machines) it
//! runs inside a nested KVM host that QEMU's emulator provides (one L1 boot for the whole
//! binary, its tests one at a time), and passes only if it passed there. See integration-tests/src/nested.rs and resources/nested/.
//!
//! `cargo test -p integration-tests --test linux_kvm` (add `-- --nocapture` and
//! `PRESCIENT_NESTED_LIVE=1` to watch L1's stream).

mod boot;
mod devices;
mod guest;
mod hotplug;
mod jailer;
mod memory;
mod mmds;
mod predictor;
mod snapshot;
