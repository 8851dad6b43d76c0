//! The predictor's CPU actuator on a VM that can plug vCPUs: whole vCPUs from the allocation,
//! the cgroup quota for the fraction. The test guest follows the hot-plug controller and runs a
//! CPU demand that starts idle, steps up to three busy CPUs and goes idle again; the VMM plugs
//! vCPUs while the demand is up, unplugs them one at a time once the allocation has stayed low
//! for the configured time, never flaps, and logs every change. A second VM has its allocation
//! moved by budget alone (`PATCH /predictor`), which makes the timing exact whatever the host's
//! load.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::TEST_GUEST_PVH;
use integration_tests::{
    guest_spec, start_with_console_args, vcpu_changes, wait_for_console_line, ApiClient,
    RunningVmm, Scratch,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(90);

/// A VM of the test guest with 1 of `max` vCPUs, `args`, a predictor that unplugs after
/// `unplug_after_ms`, its console in the scratch dir, its API on `api.sock`, id `id`.
fn spawn(
    scratch: &Scratch,
    id: &str,
    max: u8,
    args: &str,
    unplug_after_ms: u64,
) -> (RunningVmm, ApiClient, std::path::PathBuf) {
    let mut spec: Value = serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 1, 128, args)).unwrap();
    spec["machine-config"]["max_vcpus"] = max.into();
    // An anomaly alarm is not what this is about: only logged, and only far out.
    spec["predictor"] = serde_json::json!({
        "vcpus": {"unplug_after_ms": unplug_after_ms},
        "anomaly": {"threshold": 2.5, "action": "log"},
    });
    start_with_console_args(scratch, spec, &["--id", id])
}

fn wait_changes(api: &mut ApiClient, n: usize) -> Vec<(u64, u64, bool, String)> {
    let start = Instant::now();
    loop {
        let c = vcpu_changes(api);
        if c.len() >= n {
            return c;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} of {n} vCPU changes: {c:#?}",
            c.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cgroup the predictor made for VM `id` holds the thread `tid`.
fn in_cgroup(id: &str, tid: u64) -> bool {
    let tasks = Path::new("/sys/fs/cgroup/cpu/prescient")
        .join(id)
        .join("tasks");
    std::fs::read_to_string(tasks)
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim().parse() == Ok(tid))
}

#[test]
fn the_predictor_plugs_vcpus_for_a_cpu_step_and_unplugs_them_after() {
    let scratch = Scratch::new("predictor-vcpus-load");
    let id = format!("vcpus-load-{}", std::process::id());
    // Idle 3 s (the forecasters warm up), three busy CPUs for 6 s, idle again.
    let (vmm, mut api, console) = spawn(
        &scratch,
        &id,
        3,
        "cpu_ms=1 mem_mib=1 cpuhp_ms=24000 cpu_load=0:3000,3:6000,0:15000",
        1500,
    );
    // Until the guest has read from the hot-plug controller, the predictor plugs nothing
    // (whatever its forecast wants while the guest boots).
    let start = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("guest: cpuhp first scan")
    {
        let vcpus = api.request("GET", "/hotplug/vcpus", None).json();
        if vcpus["guest_uses_hotplug"] == false {
            assert_eq!(
                vcpus["online"], 1,
                "plugged before the guest could see it: {vcpus}"
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the guest never scanned the controller"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...so the guest's first look finds no insert it missed.
    let text = wait_for_console_line(&console, "guest: cpuhp first scan", DEADLINE);
    assert!(text.ends_with("events=0"), "{text}");
    wait_for_console_line(&console, "guest: cpu_load step 1 workers=3", DEADLINE);
    // The demand is up: at least one vCPU is plugged, logged with why, and its thread is born in
    // the VM's CPU cgroup (the quota holds it).
    let plugged = wait_changes(&mut api, 1);
    assert!(plugged[0].3.starts_with("plugged vCPU [1]"), "{plugged:#?}");
    wait_for_console_line(&console, "guest: cpu 1 apic=1 up", DEADLINE);
    let vcpus = api.request("GET", "/hotplug/vcpus", None).json();
    let tid = vcpus["vcpus"][1]["tid"].as_u64().expect("vCPU 1 runs");
    // On cgroup v1 the VMM groups the vCPU threads alone (on v2 the whole process, where a new
    // thread is anyway).
    if Path::new("/sys/fs/cgroup/cpu/prescient").join(&id).exists() {
        assert!(
            in_cgroup(&id, tid),
            "vCPU 1's thread {tid} is in the VM's cgroup"
        );
    }
    let status = api.request("GET", "/predictor", None).json();
    let cpu = status["actuators"]["cpu_quota"].as_str().unwrap();
    assert!(cpu.contains("whole vCPUs by hot-plug"), "{cpu}");
    assert!(cpu.contains("last change: plugged vCPU"), "{cpu}");

    // Once the demand has gone, every plugged vCPU is unplugged again, one at a time, and
    // not before the allocation has been low for the configured time.
    let text = wait_for_console_line(&console, "guest: cpuhp done", DEADLINE);
    let out = vmm.wait(DEADLINE);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let console_text = std::fs::read_to_string(&console).unwrap();
    let plugs = console_text.matches(" inserted").count();
    let ejects = console_text.matches(" ejected").count();
    assert!((1..=2).contains(&plugs), "{console_text}");
    assert_eq!(
        plugs, ejects,
        "every plugged vCPU went again:\n{console_text}"
    );
    assert!(text.ends_with("present=1"), "{text}");
    // No flapping: each vCPU came once and went once.
    for cpu in 1..=plugs {
        assert_eq!(
            console_text
                .matches(&format!("guest: cpuhp cpu {cpu} inserted"))
                .count(),
            1,
            "{console_text}"
        );
    }
}

#[test]
fn vcpus_follow_the_allocation_a_budget_sets_with_the_unplug_delay_and_no_flapping() {
    let scratch = Scratch::new("predictor-vcpus-budget");
    let id = format!("vcpus-budget-{}", std::process::id());
    // An idle guest that follows the controller for longer than the test needs (its plugged
    // vCPUs park: no demand); the allocation is what the budget makes of it.
    let (vmm, mut api, console) = spawn(
        &scratch,
        &id,
        3,
        "cpu_ms=1 mem_mib=1 cpuhp_ms=80000 cpu_load=0:80000",
        1000,
    );
    wait_for_console_line(&console, "guest: cpuhp following", DEADLINE);
    let budget = |api: &mut ApiClient, min: f64, max: f64| {
        let body = format!(r#"{{"budget": {{"cpu_cores": {{"min": {min}, "max": {max}}}}}}}"#);
        let r = api.request("PATCH", "/predictor", Some(&body));
        assert_eq!(r.status, 204, "{}", r.body);
    };
    // Beyond max_vcpus: refused, nothing changes.
    let r = api.request(
        "PATCH",
        "/predictor",
        Some(r#"{"budget": {"cpu_cores": {"min": 1, "max": 4}}}"#),
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("max_vcpus"), "{}", r.body);

    budget(&mut api, 2.5, 3.0);
    let changes = wait_changes(&mut api, 1);
    assert!(
        changes[0].2
            && changes[0]
                .3
                .starts_with("plugged vCPU [1, 2]: 2.50 cores need 3"),
        "{changes:#?}"
    );
    wait_for_console_line(&console, "guest: cpuhp cpu 2 inserted", DEADLINE);
    let lowered = Instant::now();
    budget(&mut api, 0.05, 3.0);
    let changes = wait_changes(&mut api, 3);
    let held = lowered.elapsed();
    // The allocation walks down (the policy's shrink limit) and then stays low 1 s per vCPU.
    assert!(
        held >= Duration::from_millis(2000),
        "both unplugs after {held:?}"
    );
    let unplugs: Vec<&String> = changes[1..].iter().map(|c| &c.3).collect();
    assert!(
        unplugs[0].starts_with("asked the guest to unplug vCPU [2]"),
        "{unplugs:?}"
    );
    assert!(
        unplugs[1].starts_with("asked the guest to unplug vCPU [1]"),
        "{unplugs:?}"
    );
    assert!(
        changes[2].1 >= changes[1].1 + 1000,
        "one vCPU at a time, each after the delay: {changes:#?}"
    );
    // The guest ejected both (its consent), and their threads are gone.
    wait_for_console_line(&console, "guest: cpuhp cpu 1 ejected", DEADLINE);
    let start = Instant::now();
    loop {
        let vcpus = api.request("GET", "/hotplug/vcpus", None).json();
        let running: Vec<&Value> = vcpus["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| !v["tid"].is_null())
            .collect();
        if vcpus["online"] == 1 && running.len() == 1 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{vcpus}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing more: the allocation stays low and one vCPU is the least there is (twice the
    // unplug delay with no change).
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        vcpu_changes(&mut api).len(),
        3,
        "{:#?}",
        vcpu_changes(&mut api)
    );
    let cfg = api.request("GET", "/machine-config", None).json();
    assert_eq!(cfg["vcpu_count"], 1);
    let text = std::fs::read_to_string(&console).unwrap();
    assert_eq!(text.matches(" inserted").count(), 2, "{text}");
    assert_eq!(text.matches(" ejected").count(), 2, "{text}");
    vmm.terminate(DEADLINE).assert_code(143);
}

#[test]
fn plugs_wait_for_a_guest_that_never_reads_the_controller_and_an_unread_event_is_raised_again() {
    let scratch = Scratch::new("predictor-vcpus-unread");
    let id = format!("vcpus-unread-{}", std::process::id());
    // A guest busy for 8 s that never looks at the hot-plug controller.
    let (vmm, mut api, console) = spawn(&scratch, &id, 3, "cpu_ms=8000 mem_mib=1", 1000);
    let r = api.request(
        "PATCH",
        "/predictor",
        Some(r#"{"budget": {"cpu_cores": {"min": 2.5, "max": 3}}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    // The allocation wants 3 vCPUs; the actuator holds them and says why.
    let held = wait_changes(&mut api, 1);
    assert!(
        held[0].3.contains("plug held")
            && held[0]
                .3
                .contains("the guest has not taken the CPU hot-plug controller into use yet"),
        "{held:#?}"
    );
    let status = api.request("GET", "/predictor", None).json();
    let cpu = status["actuators"]["cpu_quota"].as_str().unwrap();
    assert!(cpu.contains("plugs held: the guest has not taken"), "{cpu}");
    let vcpus = api.request("GET", "/hotplug/vcpus", None).json();
    assert_eq!(vcpus["online"], 1, "{vcpus}");
    assert_eq!(vcpus["guest_uses_hotplug"], false, "{vcpus}");

    // An operator's plug is not held; the guest never reads its event, which the VMM raises
    // again (an interrupt raised before a guest's handler is there is lost).
    let r = api.request("PATCH", "/machine-config", Some(r#"{"vcpu_count": 2}"#));
    assert_eq!(r.status, 204, "{}", r.body);
    let start = Instant::now();
    loop {
        let changes = vcpu_changes(&mut api);
        if changes
            .iter()
            .any(|c| c.3.starts_with("raised the CPU hot-plug event again"))
        {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{changes:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Less and less often: after 1, 2, 4, 8 windows more (20 windows at most in 2 s).
    std::thread::sleep(Duration::from_secs(2));
    let raised = vcpu_changes(&mut api)
        .into_iter()
        .filter(|c| c.3.starts_with("raised the CPU hot-plug event again"))
        .count();
    assert!((1..=5).contains(&raised), "raised {raised} times");
    let vcpus = api.request("GET", "/hotplug/vcpus", None).json();
    assert_eq!(vcpus["vcpus"][1]["state"], "plugged", "{vcpus}");
    assert!(
        !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("cpu_phase done"),
        "all of it within the guest's busy phase"
    );
    // The plugged vCPU the guest never started does not keep the VM from ending.
    let out = vmm.wait(DEADLINE);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}
