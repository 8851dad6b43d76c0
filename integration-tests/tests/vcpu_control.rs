//! Pausing, resuming and kicking vCPUs that run guest code, through the VMM library.
//!
//! The guest's CPU phase runs at CPL3 inside KVM_RUN; only the kick signal gets a vCPU out of it,
//! so CPU time that stops growing while paused shows that kick, pause and resume work.

use std::path::Path;
use std::time::Duration;

use integration_tests::{guest_spec, vcpu_ticks, Scratch, TEST_GUEST_PVH};
use vmm::exit::ExitReason;
use vmm::rpc::{InstanceState, VmmAction, VmmData};
use vmm::runtime::Runtime;
use vmm::vmm_config::VmConfig;

#[test]
fn paused_vcpus_stop_burning_cpu_and_resume_where_they_were() {
    let scratch = Scratch::new("vcpu-control");
    let console = scratch.path().join("console.log");
    let mut spec: serde_json::Value =
        serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 2, 64, "cpu_ms=20000 mem_mib=1")).unwrap();
    spec["serial"] = serde_json::json!({ "serial_out_path": console });
    let config = VmConfig::parse(&spec.to_string()).unwrap();
    let mut vm = Runtime::new("vcpu-control".into(), config).unwrap();
    vm.start().expect("start the microVM");
    let state = |vm: &mut Runtime| match vm.handle(VmmAction::GetInstanceInfo) {
        Ok(VmmData::InstanceInfo(info)) => info.state,
        other => panic!("unexpected answer {other:?}"),
    };
    assert_eq!(state(&mut vm), InstanceState::Running);

    // Wait until both vCPUs are in their CPU phase (the APs start it after "cpus online").
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("guest: cpus online=2")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "guest never reached its CPU phase"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let window = Duration::from_millis(500);
    // 100 Hz ticks. Running vCPUs must get at least 100 ms of CPU per window even on a loaded
    // 2-core CI host; paused ones at most a tick or two of stragglers.
    let running_min = 10;
    let paused_max = 2;

    let before = vcpu_ticks(Path::new("/proc/self/task"));
    std::thread::sleep(window);
    let running = vcpu_ticks(Path::new("/proc/self/task")) - before;
    assert!(
        running >= running_min,
        "2 busy vCPUs burned only {running} ticks in {window:?}"
    );

    vm.handle(VmmAction::Pause).expect("pause");
    assert_eq!(state(&mut vm), InstanceState::Paused);
    let before = vcpu_ticks(Path::new("/proc/self/task"));
    std::thread::sleep(window);
    let paused = vcpu_ticks(Path::new("/proc/self/task")) - before;
    assert!(
        paused <= paused_max,
        "paused vCPUs burned {paused} ticks in {window:?}"
    );

    vm.handle(VmmAction::Resume).expect("resume");
    assert_eq!(state(&mut vm), InstanceState::Running);
    let before = vcpu_ticks(Path::new("/proc/self/task"));
    std::thread::sleep(window);
    let resumed = vcpu_ticks(Path::new("/proc/self/task")) - before;
    assert!(
        resumed >= running_min,
        "resumed vCPUs burned only {resumed} ticks"
    );

    // Ending the VM from outside stops the vCPUs mid-phase and joins them.
    let reason = ExitReason::VmmError("test over".into());
    vm.exit_signal().request(reason.clone());
    assert_eq!(vm.run(), reason);
    let console = std::fs::read_to_string(&console).unwrap();
    assert!(
        !console.contains("cpu_phase done"),
        "the 20 s phase cannot have finished:\n{console}"
    );
}
