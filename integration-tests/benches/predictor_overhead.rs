//! The inline predictor's costs and benefits, in the same run:
//!
//! * exit round trip: the test guest makes `EXITS` port writes (one PIO exit each, to a port no
//!   device claims) and times them with its TSC; a VM with the predictor off and one with it
//!   on run side by side, pair after pair, and the median of the pairs' ratios is the result
//!   (target: < 2 % apart); then prescient (predictor off, its default) and Firecracker, one
//!   after the other, alternated;
//! * memory slack: a guest whose memory demand ramps up over 40 s runs with the predictor
//!   recording a trace; the trace's recorded policy is replayed and its memory allocation is
//!   compared with a static allocation of the peak (slack = mean over windows of
//!   (allocated - used) / allocated; target: < 15 %).
//!
//! `cargo bench -p integration-tests --bench predictor_overhead` (`PREDICTOR_BENCH_RUNS` sets
//! the runs per mode, 5 by default).

use std::time::Duration;

use integration_tests::bench::{alternate, env_or, guest_clock_arg, Kind, Table, VmSpec, Vmm};
use integration_tests::{guest_spec, line_field, median, run_spec, Scratch, TEST_GUEST_PVH};
use predictor_tools::eval::replay_recorded;
use serde_json::Value;

const EXITS: u64 = 100_000;
const DEADLINE: Duration = Duration::from_secs(180);

fn spec(args: &str, mem_mib: u64, predictor: Option<Value>) -> String {
    let mut spec: Value = serde_json::from_str(&guest_spec(TEST_GUEST_PVH, 1, mem_mib, args))
        .expect("guest_spec is JSON");
    if let Some(p) = predictor {
        spec["predictor"] = p;
    }
    spec.to_string()
}

/// Guest-timed ns per exit of one run.
fn exit_ns(scratch: &Scratch, predictor: bool) -> f64 {
    let args = format!(
        "cpu_ms=1 mem_mib=1 port_hammer={EXITS} {}",
        guest_clock_arg()
    );
    // The unknown port is an anomaly; alerts are only logged.
    let p = predictor.then(|| serde_json::json!({"window_ms": 100}));
    let out = run_spec(scratch, &spec(&args, 128, p), DEADLINE);
    out.assert_code(0);
    let us: f64 = out
        .field("guest: port_hammer done", "us")
        .expect("the guest timed its exits")
        .parse()
        .unwrap();
    us * 1000.0 / EXITS as f64
}

/// Slack and under-provisioned windows of `allocated` against `used`.
fn slack(used: &[f64], allocated: &[f64]) -> (f64, usize) {
    let s: f64 = used
        .iter()
        .zip(allocated)
        .map(|(u, a)| (a - u) / a)
        .sum::<f64>()
        / used.len() as f64;
    let under = used.iter().zip(allocated).filter(|(u, a)| u > a).count();
    (s, under)
}

fn main() {
    let runs: usize = env_or("PREDICTOR_BENCH_RUNS", 5);
    let scratch = Scratch::new("predictor-bench");
    let scratch_on = Scratch::new("predictor-bench-on");
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        // Both modes at once (one vCPU each on the 2 cores), so that they share whatever else
        // the host is doing; the pair's ratio is the measurement.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| exit_ns(&scratch, false));
            let b = s.spawn(|| exit_ns(&scratch_on, true));
            (a.join().unwrap(), b.join().unwrap())
        });
        off.push(a);
        on.push(b);
        ratios.push(b / a);
    }
    let (off_m, on_m) = (median(off.clone()), median(on.clone()));
    println!("PIO exit round trip, {EXITS} exits per run, {runs} runs of both modes side by side");
    println!("| predictor | ns per exit | runs (ns) |");
    println!("|-----------|-------------|-----------|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("| off       | {off_m:>11.0} | {} |", list(&off));
    println!("| on        | {on_m:>11.0} | {} |", list(&on));
    let ratio = median(ratios.clone());
    println!(
        "median of the pairs' on / off = {ratio:.4} ({:+.2} %); pairs: {}\n",
        (ratio - 1.0) * 100.0,
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    exits_against_firecracker(&scratch, runs);

    // 2 s of CPU, then 160 MiB of demand over 40 s, then the guest resets.
    let trace_dir = scratch.path().join("traces");
    std::fs::create_dir_all(&trace_dir).unwrap();
    let trace = trace_dir.join("ramp.jsonl");
    let p = serde_json::json!({
        "window_ms": 100,
        "horizon": 1,
        "forecaster": "holt",
        "budget": {"memory_mib": {"min": 8, "max": 256}},
        "trace_path": trace,
    });
    let args = "cpu_ms=2000 mem_mib=1 mem_ramp_mib=160 mem_ramp_ms=40000";
    let out = run_spec(&scratch, &spec(args, 256, Some(p)), DEADLINE);
    out.assert_code(0);
    assert!(
        out.field("guest: mem_ramp mib=160", "ms").is_some(),
        "the ramp did not run:\n{}",
        out.stdout
    );
    let t = predictor::trace::read(&trace).expect("the recorded trace");
    let decisions = replay_recorded(&t)
        .expect("replay")
        .expect("the trace names its policy");
    let used: Vec<f64> = t.samples.iter().map(|s| s.usage.mem).collect();
    let allocated: Vec<f64> = decisions.iter().map(|d| d.allocation.mem).collect();
    let peak = used.iter().copied().fold(0.0, f64::max);
    let (p_slack, p_under) = slack(&used, &allocated);
    let (s_slack, _) = slack(&used, &vec![peak; used.len()]);
    // The policy holds its initial allocation (the budget maximum) until the forecaster has
    // seen `min_errors` windows.
    let warm = 20.min(used.len() - 1);
    let (p_warm, _) = slack(&used[warm..], &allocated[warm..]);
    let (s_warm, _) = slack(&used[warm..], &vec![peak; used.len() - warm]);
    println!(
        "memory over a {}-window ramp to {peak:.0} MiB (resident guest memory; 100 ms windows)",
        used.len()
    );
    println!("| allocation        | slack % | after warm-up % | windows under |");
    println!("|-------------------|---------|-----------------|---------------|");
    println!(
        "| predictor (holt)  | {:>7.1} | {:>15.1} | {p_under:>13} |",
        p_slack * 100.0,
        p_warm * 100.0
    );
    println!(
        "| static peak       | {:>7.1} | {:>15.1} | {:>13} |",
        s_slack * 100.0,
        s_warm * 100.0,
        0
    );
    println!(
        "(Firecracker sizes a VM once and leaves resizing to an operator: its allocation is the \
         static row.)"
    );
}

/// The same exit round trip under prescient (predictor off, its default) and Firecracker, run
/// one after the other, alternated.
fn exits_against_firecracker(scratch: &Scratch, runs: usize) {
    let vmms = Vmm::with(&[Kind::Firecracker]);
    let spec = VmSpec::test_guest(1, 128, &format!("cpu_ms=1 mem_mib=1 port_hammer={EXITS}"));
    let per_vmm = alternate(&vmms, runs, |vmm| {
        let vm = vmm.spawn(Some(&spec), scratch.path(), None).unwrap();
        let (_, line) = vm.expect_prefix("guest: port_hammer done", DEADLINE);
        vm.wait_exit(DEADLINE);
        let us: f64 = line_field(&line, "us")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: no us= in {line}", vmm.name()));
        us * 1000.0 / EXITS as f64
    });
    let mut t = Table::new(
        format!(
            "PIO exit round trip (guest-timed, {EXITS} writes to a port no device claims), {runs} \
             alternated runs (host shared)"
        ),
        &vmms,
    );
    t.row_of("ns per exit", &per_vmm);
    t.print();
}
