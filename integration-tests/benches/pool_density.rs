//! Pool density: how many demand-following microVMs one host memory budget holds when each is
//! sized statically at its peak, and when `prescient host` grants memory ahead of forecasts.
//!
//! Every VM boots the test guest in its demand-follow mode: idle, then a memory demand that
//! ramps up to `RAMP` MiB and back down in virtio-mem memory (failing each millisecond it
//! outruns what is plugged), its balloon reporting the demand to the VM's predictor. The VMs'
//! ramps are staggered, as requests to different services are.
//!
//! - Static: a VM sized at its peak (RAM + ramp, floor = ceiling) is admitted by the
//!   supervisor until the budget refuses one: K VMs.
//! - Pool: 2K of the same VMs (two of them guaranteed) with their floor at RAM + 64 MiB, the
//!   supervisor granting each its forecast every window. Printed: VMs run, allocation failures
//!   summed over every guest, windows in which a guaranteed VM was granted less than its
//!   forecast, the pool's slack (and what of it was lent to ramping VMs, held above their
//!   floors), and the pool's decisions per second.
//!
//! `cargo bench -p integration-tests --bench pool_density` (`POOL_BUDGET_MIB`, default 2048;
//! `POOL_RAMP_MIB`, default 448; `POOL_RAMP_MS` (up, and as long down), default 4000;
//! `POOL_STAGGER_MS`, default the ramp time; `POOL_LOG=PATH` writes the pool's window log
//! there).

use std::time::{Duration, Instant};

use integration_tests::bench::{env_or, guest_clock_arg};
use integration_tests::host::{guest_request, ramp_args, Host};
use integration_tests::{line_field, Scratch};

const RAM_MIB: u64 = 64;
const HEADROOM_MIB: u64 = 64;
const WINDOW_MS: u64 = 100;
/// When the first guest's demand starts to rise: after its predictor's 20-window warm-up (2 s
/// at 100 ms), as in the predictor's own ramp test.
const FIRST_RAMP_MS: u64 = 4000;
const DEADLINE: Duration = Duration::from_secs(300);

/// The host budget: memory is what is measured. The test guest busy-polls while it follows
/// its demand (a real guest would idle), so each VM gets a whole core of CPU budget: a quota
/// would only stall the guest's plugging between its CFS periods.
fn budget(mem_mib: u64, vms: u64) -> String {
    format!("mem={mem_mib},cpu={},blk=1000,net=1000", vms.max(1))
}

/// Static sizing: peak-sized VMs admitted until the budget is full.
fn static_fit(dir: &std::path::Path, mem_mib: u64, peak_mib: u64) -> u64 {
    let mut host = Host::start(dir, &budget(mem_mib, 1), WINDOW_MS);
    let mut k = 0;
    loop {
        let id = format!("static-{k}");
        let req = guest_request(
            &id,
            "guaranteed",
            RAM_MIB,
            peak_mib,
            peak_mib,
            "cpu_ms=1 mem_mib=1 exit=halt",
        );
        match host.create(&req) {
            (201, _) => k += 1,
            (409, body) => {
                eprintln!("static VM {} refused: {}", k + 1, body["fault_message"]);
                break;
            }
            (status, body) => panic!("static VM {id}: {status} {body}"),
        }
    }
    for i in 0..k {
        host.request("DELETE", &format!("/vms/static-{i}"), None);
    }
    k
}

/// The guest's last line, or None (said why) if its VMM ended first.
fn wait_done(host: &mut Host, id: &str) -> Option<String> {
    let start = Instant::now();
    let console = host.console(id);
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("guest: vmem0 follow done"))
        {
            return Some(line.to_string());
        }
        let vm = host.get(&format!("/vms/{id}"));
        if vm["state"] == "exited" {
            eprintln!(
                "{id}: its VMM ended before the guest was done: {}",
                vm["reason"]
            );
            return None;
        }
        assert!(start.elapsed() < DEADLINE, "{id}: no last line");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct PoolRun {
    vms: u64,
    died: u64,
    failures: u64,
    guaranteed_failures: u64,
    guaranteed_short: u64,
    peak_granted: f64,
    mean_slack: f64,
    min_slack: f64,
    mean_held: f64,
    held_windows: usize,
    decisions_per_s: f64,
    window_cpu_us: f64,
    wall: Duration,
}

fn pool(
    dir: &std::path::Path,
    mem_mib: u64,
    vms: u64,
    (ramp_mib, ramp_ms, stagger_ms): (u64, u64, u64),
) -> PoolRun {
    let mut host = Host::start(dir, &budget(mem_mib, vms), WINDOW_MS);
    let floor = RAM_MIB + HEADROOM_MIB;
    let ceiling = RAM_MIB + ramp_mib + HEADROOM_MIB;
    let last_start = FIRST_RAMP_MS + stagger_ms * vms;
    let follow_ms = last_start + 2 * ramp_ms + 2000;
    let started = Instant::now();
    let classes = ["burstable", "best-effort"];
    let mut ids = Vec::new();
    for i in 0..vms {
        let id = format!("pool-{i}");
        // The i-th guest boots about when the one before it did plus its launch: its ramp
        // starts `stagger_ms` after the one before.
        let start = FIRST_RAMP_MS + stagger_ms * i
            - (started.elapsed().as_millis() as u64).min(stagger_ms * i);
        let class = if i < 2 {
            "guaranteed"
        } else {
            classes[i as usize % 2]
        };
        let args = format!(
            "{} {}",
            ramp_args(follow_ms, start, ramp_mib, ramp_ms),
            guest_clock_arg()
        );
        let (status, body) =
            host.create(&guest_request(&id, class, RAM_MIB, floor, ceiling, &args));
        assert_eq!(status, 201, "{id}: {body}");
        ids.push((id, class));
    }
    let (mut failures, mut guaranteed_failures, mut died) = (0, 0, 0);
    for (id, class) in &ids {
        let Some(done) = wait_done(&mut host, id) else {
            died += 1;
            continue;
        };
        let f: u64 = line_field(&done, "failures")
            .and_then(|v| v.parse().ok())
            .expect("failures=");
        eprintln!("{id} ({class}): {done}");
        failures += f;
        if *class == "guaranteed" {
            guaranteed_failures += f;
        }
    }
    let wall = started.elapsed();
    let windows = host.get("/pool/decisions?since=0");
    if let Ok(path) = std::env::var("POOL_LOG") {
        std::fs::write(&path, windows.to_string()).expect("POOL_LOG");
    }
    let windows = windows.as_array().expect("windows");
    let slack: Vec<f64> = windows
        .iter()
        .filter(|w| w["vms"].as_u64() == Some(vms))
        .map(|w| w["budget"]["mem"].as_f64().unwrap() - w["granted"]["mem"].as_f64().unwrap())
        .collect();
    let held: Vec<f64> = windows
        .iter()
        .filter(|w| w["vms"].as_u64() == Some(vms))
        .map(|w| w["held"]["mem"].as_f64().unwrap())
        .collect();
    let peak_granted = windows
        .iter()
        .map(|w| w["granted"]["mem"].as_f64().unwrap())
        .fold(0.0, f64::max);
    for w in windows {
        for r in ["cpu", "mem", "blk", "net"] {
            assert!(
                w["granted"][r].as_f64().unwrap() <= w["budget"][r].as_f64().unwrap() + 1e-6,
                "{w}"
            );
        }
    }
    let state = host.get("/pool");
    let secs = state["window"].as_f64().unwrap() * WINDOW_MS as f64 / 1000.0;
    PoolRun {
        vms,
        died,
        failures,
        guaranteed_failures,
        guaranteed_short: state["guaranteed_short_windows"]["mem"].as_u64().unwrap(),
        peak_granted,
        mean_slack: slack.iter().sum::<f64>() / slack.len().max(1) as f64,
        min_slack: slack.iter().copied().fold(f64::MAX, f64::min),
        mean_held: held.iter().sum::<f64>() / held.len().max(1) as f64,
        held_windows: held.iter().filter(|h| **h > 0.0).count(),
        decisions_per_s: state["decisions"].as_f64().unwrap() / secs,
        window_cpu_us: state["busy_us"].as_f64().unwrap() / state["window"].as_f64().unwrap(),
        wall,
    }
}

fn main() {
    let mem_mib: u64 = env_or("POOL_BUDGET_MIB", 2048);
    let ramp_mib: u64 = env_or("POOL_RAMP_MIB", 448);
    let ramp_ms: u64 = env_or("POOL_RAMP_MS", 4000);
    let stagger_ms: u64 = env_or("POOL_STAGGER_MS", ramp_ms);
    let peak = RAM_MIB + ramp_mib;
    let scratch = Scratch::new("pool-density");
    let static_dir = scratch.path().join("static");
    let pool_dir = scratch.path().join("pool");
    std::fs::create_dir_all(&static_dir).unwrap();
    std::fs::create_dir_all(&pool_dir).unwrap();
    let k = static_fit(&static_dir, mem_mib, peak);
    let run = pool(&pool_dir, mem_mib, 2 * k, (ramp_mib, ramp_ms, stagger_ms));
    println!(
        "pool density: host memory budget {mem_mib} MiB; test guest {RAM_MIB} MiB RAM + demand \
         ramp to {ramp_mib} MiB over {ramp_ms} ms and back, ramps {stagger_ms} ms apart; pool \
         window {WINDOW_MS} ms"
    );
    let rows = [
        (
            "static sizing at peak (RAM + ramp) fits K",
            format!("{k} VMs of {peak} MiB"),
        ),
        (
            "prescient host ran",
            format!("{} VMs ({:.1}x K)", run.vms, run.vms as f64 / k as f64),
        ),
        (
            "VMMs that ended before their guest was done",
            run.died.to_string(),
        ),
        (
            "allocation failures, all guests (ms short)",
            run.failures.to_string(),
        ),
        (
            "  of which guaranteed VMs",
            run.guaranteed_failures.to_string(),
        ),
        (
            "windows a guaranteed VM was granted < forecast",
            run.guaranteed_short.to_string(),
        ),
        (
            "peak memory granted",
            format!("{:.0} MiB of {mem_mib}", run.peak_granted),
        ),
        (
            "pool slack, mean / min (all VMs up)",
            format!("{:.0} / {:.0} MiB", run.mean_slack, run.min_slack),
        ),
        (
            "slack lent ahead of ramps, mean (windows held)",
            format!("{:.0} MiB ({})", run.mean_held, run.held_windows),
        ),
        (
            "pool decisions per second (VMs x resources)",
            format!("{:.0}", run.decisions_per_s),
        ),
        (
            "supervisor time per window",
            format!("{:.0} us", run.window_cpu_us),
        ),
        (
            "wall time of the pool run",
            format!("{:.1} s", run.wall.as_secs_f64()),
        ),
    ];
    for (label, value) in rows {
        println!("| {label:<48} | {value:>22} |");
    }
}
