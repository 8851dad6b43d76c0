//! Cold start under bursty arrivals: request -> guest running, booted cold vs handed out from
//! a warm pool, and the warm pool's idle memory against an oracle that knew the arrivals.
//!
//! The trace: bursts of 1-4 requests (10 ms apart) arriving as a Poisson process whose rate
//! changes in phases (quiet 0.2 bursts/s, busy 1.5 bursts/s, quiet), seeded, the same for both
//! runs. Each request runs on its own thread at its arrival time, through one `prescient host`:
//!
//! - cold: `POST /vms` with the test guest's config; running = the guest's first console line
//!   (`prescient-test-guest: hello`), ready = its `guest: kbd waiting for ctrl-alt-del` line
//!   (booted and polling: the point the warm pool's snapshot was taken at);
//! - warm: `POST /vms {"from_pool": "fn"}` (a VM restored from a snapshot of that guest, paused);
//!   running and ready = the answer (the VM resumed: its vCPUs run the guest where the
//!   snapshot left it); answered = its `guest: ctrl-alt-del` line after a `SendCtrlAltDel`
//!   (proof from the guest itself, including its 1 ms keyboard poll and console lines, both
//!   emulated CPL0 code on this host's software KVM).
//!
//! Before the measured warm run the pool sees another trace of the same kind, half as long
//! (another seed): the history a pool in service would have. Times are from the request's
//! arrival (queueing in a burst included). Idle memory: the mean
//! number of warm VMs ready (sampled every pool window) times a warm VM's resident memory,
//! against the oracle's: at each moment the requests that arrive within the time a warm VM
//! takes to make (they cannot be served by one made later), the fewest any pool could keep.
//!
//! `cargo bench -p integration-tests --bench cold_start` (`COLD_START_SECONDS`, default 40;
//! `COLD_START_SEED`, default 7).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::bench::{env_or, guest_clock_arg, Footprint, Stat};
use integration_tests::host::Host;
use integration_tests::{Scratch, TEST_GUEST_PVH};
use vmm::api::client::Client;

const WINDOW_MS: u64 = 100;
/// The test guest's configured memory.
const GUEST_MIB: f64 = 64.0;
const DEADLINE: Duration = Duration::from_secs(30);

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545f4914f6cdd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Arrival times (ms from the start) of the bursty trace.
fn trace(seconds: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed.max(1));
    let rate = |t: f64| {
        let f = t / seconds;
        if (0.3..0.65).contains(&f) {
            1.5
        } else {
            0.2
        }
    };
    let (mut t, mut out) = (0.0, Vec::new());
    // Thinning: candidate bursts at the highest rate, each kept with rate(t)/max.
    loop {
        t += -predictor::math::ln(1.0 - rng.next()) / 1.5;
        if t >= seconds {
            return out;
        }
        if rng.next() < rate(t) / 1.5 {
            let size = 1 + (rng.next() * 4.0) as usize;
            for i in 0..size {
                out.push(t * 1000.0 + 10.0 * i as f64);
            }
        }
    }
}

fn config() -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH,
                        "boot_args": format!("cpu_ms=1 mem_mib=1 exit=kbd {}", guest_clock_arg())},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": GUEST_MIB as u64},
    })
}

/// `POST /vms`: the answer, and when the connection was made.
fn post(sock: &Path, body: &serde_json::Value) -> (serde_json::Value, Instant) {
    let mut c = Client::connect(sock, DEADLINE).expect("host API");
    let connected = Instant::now();
    let r = c
        .request("POST", "/vms", Some(&body.to_string()))
        .expect("POST /vms");
    assert_eq!(r.status, 201, "{body}: {}", r.body);
    (serde_json::from_str(&r.body).expect("JSON"), connected)
}

fn wait_line(console: &Path, line: &str) {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(console).is_ok_and(|t| t.contains(line)) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no {line:?} in {}",
            console.display()
        );
        std::thread::sleep(Duration::from_micros(300));
    }
}

fn ctrl_alt_del(sock: &str) {
    if let Ok(mut c) = Client::connect(Path::new(sock), DEADLINE) {
        let _ = c.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        );
    }
}

/// One request's times from its arrival (ms): running, ready, answered (warm only); whether it
/// was served warm, and where the host says its claim's time went.
#[derive(Debug, Clone, Copy)]
struct Times {
    running: f64,
    ready: f64,
    answered: f64,
    warm: bool,
    claim: Claim,
}

/// The host's account of a claim (its answer's `"claim"`, ms), the client's own (how late its
/// thread woke for the arrival, its connect), and what is left of the request's time outside
/// the host: the host API's accept and thread, HTTP.
#[derive(Debug, Clone, Copy, Default)]
struct Claim {
    late: f64,
    connect: f64,
    queued: f64,
    behind_window: f64,
    behind_requests: f64,
    grant: f64,
    resume: f64,
    record: f64,
}

impl Claim {
    fn of(answer: &serde_json::Value, late: f64, connect: f64) -> Claim {
        let f = |k: &str| answer["claim"][k].as_f64().unwrap_or(f64::NAN);
        Claim {
            late,
            connect,
            queued: f("queued_ms"),
            behind_window: f("behind_window_ms"),
            behind_requests: f("behind_requests_ms"),
            // A host that sets no start grant says nothing of it.
            grant: answer["claim"]["grant_ms"].as_f64().unwrap_or(0.0),
            resume: f("resume_ms"),
            record: f("record_ms"),
        }
    }

    /// Queued for the loop, but not behind its windows or requests (its wake-up, the channel).
    fn queued_other(&self) -> f64 {
        self.queued - self.behind_window - self.behind_requests
    }

    /// The request's time outside the host's claim: from its arrival to the host reading it,
    /// and from the host's answer to the client reading it.
    fn outside(&self, total: f64) -> f64 {
        total - self.queued - self.grant - self.resume - self.record
    }
}

/// The warm pool at one moment: how many warm VMs were ready, and a few of their footprints.
struct Sample {
    ready: f64,
    footprints: Vec<Footprint>,
}

/// Runs the trace; returns each request's times.
fn run(
    host: &Host,
    arrivals: &[f64],
    warm: bool,
    samples: Option<&Mutex<Vec<Sample>>>,
) -> Vec<Times> {
    let start = Instant::now();
    let results = Arc::new(Mutex::new(Vec::new()));
    let state: PathBuf = host.state.clone();
    let sock = host.sock.clone();
    let threads: Vec<_> = arrivals
        .iter()
        .map(|&at| {
            let (results, state, sock) = (results.clone(), state.clone(), sock.clone());
            std::thread::spawn(move || {
                let due = start + Duration::from_secs_f64(at / 1000.0);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let woke = Instant::now();
                let body = if warm {
                    serde_json::json!({"from_pool": "fn"})
                } else {
                    serde_json::json!({"config": config()})
                };
                let (vm, connected) = post(&sock, &body);
                let since = |t: Instant| (t - due).as_secs_f64() * 1000.0;
                let answer = Instant::now();
                let id = vm["id"].as_str().unwrap().to_string();
                let api = vm["api_sock"].as_str().unwrap().to_string();
                let console = state.join(format!("{id}.console"));
                let was_warm = vm["warm"].as_bool().unwrap_or(false);
                let connect = (connected - woke).as_secs_f64() * 1000.0;
                let claim = Claim::of(&vm, since(woke), connect);
                let times = if was_warm {
                    ctrl_alt_del(&api);
                    wait_line(&console, "guest: ctrl-alt-del");
                    Times {
                        running: since(answer),
                        ready: since(answer),
                        answered: since(Instant::now()),
                        warm: true,
                        claim,
                    }
                } else {
                    wait_line(&console, "prescient-test-guest: hello");
                    let running = since(Instant::now());
                    wait_line(&console, "guest: kbd waiting for ctrl-alt-del");
                    let ready = since(Instant::now());
                    ctrl_alt_del(&api);
                    Times {
                        running,
                        ready,
                        answered: f64::NAN,
                        warm: false,
                        claim,
                    }
                };
                results.lock().unwrap().push(times);
            })
        })
        .collect();
    // Sample the warm pool while the trace runs: warm VMs ready, and the footprint of a few.
    if let Some(samples) = samples {
        let mut c = Client::connect(&host.sock, DEADLINE).expect("host API");
        let end =
            start + Duration::from_secs_f64(arrivals.last().copied().unwrap_or(0.0) / 1000.0 + 1.0);
        while Instant::now() < end {
            let r = c.request("GET", "/pools", None).expect("GET /pools");
            let pools: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            let ids = pools[0]["ready_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut footprints = Vec::new();
            for id in ids.iter().take(3) {
                let path = format!("/vms/{}", id.as_str().unwrap());
                let vm: serde_json::Value =
                    serde_json::from_str(&c.request("GET", &path, None).unwrap().body).unwrap();
                // A warm VM handed out since may be gone: it is not sampled.
                if let Some(Ok(f)) = vm["pid"].as_u64().map(|pid| Footprint::try_of(pid as u32)) {
                    footprints.push(f);
                }
            }
            samples.lock().unwrap().push(Sample {
                ready: ids.len() as f64,
                footprints,
            });
            std::thread::sleep(Duration::from_millis(WINDOW_MS));
        }
    }
    for t in threads {
        t.join().expect("a request thread");
    }
    let r = results.lock().unwrap().clone();
    r
}

/// The oracle's mean warm count: at each ms, the arrivals in [t, t + make_ms).
fn oracle_mean(arrivals: &[f64], make_ms: f64, end_ms: f64) -> f64 {
    let mut total = 0.0;
    let steps = end_ms as usize;
    for t in 0..steps {
        let t = t as f64;
        total += arrivals
            .iter()
            .filter(|&&a| a >= t && a < t + make_ms)
            .count() as f64;
    }
    total / steps.max(1) as f64
}

/// `v` at each quantile of `qs`.
fn quantiles<const N: usize>(v: &[f64], qs: [f64; N]) -> [f64; N] {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    qs.map(|q| s[((s.len() - 1) as f64 * q).round() as usize])
}

fn percentiles(v: &[f64]) -> (f64, f64) {
    let [p50, p99] = quantiles(v, [0.5, 0.99]);
    (p50, p99)
}

/// Where the warm requests' time went: each part's mean and quantiles over the requests served
/// warm, and the slowest requests part by part.
fn breakdown(runs: &[Times]) {
    let warm: Vec<&Times> = runs.iter().filter(|t| t.warm).collect();
    if warm.is_empty() {
        return;
    }
    type Part = fn(&Times) -> f64;
    let parts: [(&str, Part); 10] = [
        ("request -> answer (total)", |t| t.running),
        ("  outside the host's claim (connect, HTTP)", |t| {
            t.claim.outside(t.running)
        }),
        ("    the bench's thread woke late", |t| t.claim.late),
        ("    its connect to the host API", |t| t.claim.connect),
        ("  queued for the supervisor's loop", |t| t.claim.queued),
        ("    behind its window passes", |t| t.claim.behind_window),
        ("    behind other requests", |t| t.claim.behind_requests),
        ("  start grant round trip (PATCH /predictor)", |t| {
            t.claim.grant
        }),
        ("  resume round trip (PATCH /vm)", |t| t.claim.resume),
        ("  record written", |t| t.claim.record),
    ];
    println!(
        "where a warm claim's time goes (ms), over {} requests:",
        warm.len()
    );
    let heads = ["mean", "p50", "p90", "p99", "max"];
    println!(
        "| {:<44} | {:>6} | {:>6} | {:>6} | {:>6} | {:>6} |",
        "part", heads[0], heads[1], heads[2], heads[3], heads[4]
    );
    for (label, part) in parts {
        let v: Vec<f64> = warm.iter().map(|t| part(t)).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let [p50, p90, p99, max] = quantiles(&v, [0.5, 0.9, 0.99, 1.0]);
        println!(
            "| {label:<44} | {mean:>6.2} | {p50:>6.2} | {p90:>6.2} | {p99:>6.2} | {max:>6.2} |"
        );
    }
    let mut slow = warm.clone();
    slow.sort_by(|a, b| b.running.partial_cmp(&a.running).unwrap());
    println!(
        "the slowest: total = outside (woke late, connect) + queued (window, requests, other) \
         + grant + resume + record"
    );
    for t in slow.iter().take(3) {
        let c = &t.claim;
        println!(
            "  {:.1} = {:.1} ({:.1}, {:.1}) + {:.1} ({:.1}, {:.1}, {:.1}) + {:.1} + {:.1} + {:.1}",
            t.running,
            c.outside(t.running),
            c.late,
            c.connect,
            c.queued,
            c.behind_window,
            c.behind_requests,
            c.queued_other(),
            c.grant,
            c.resume,
            c.record
        );
    }
}

fn main() {
    let seconds: f64 = env_or("COLD_START_SECONDS", 40.0);
    let seed: u64 = env_or("COLD_START_SEED", 7);
    let arrivals = trace(seconds, seed);
    let scratch = Scratch::new("cold-start");
    let mut host = Host::start(
        scratch.path(),
        "mem=16G,cpu=16,blk=1000,net=1000",
        WINDOW_MS,
    );
    let pool = serde_json::json!({"class": "burstable", "config": config(),
                                  "snapshot_after_ms": 300, "min": 0, "max": 16});
    let (status, body) = host.request("PUT", "/pools/fn", Some(&pool.to_string()));
    assert_eq!(status, 201, "{body}");
    // The pool's forecaster first sees half as long of another trace of the same kind (its
    // history of this workload; the measured trace is new to it).
    let history = trace(seconds / 2.0, seed + 1000);
    run(&host, &history, true, None);
    let samples = Mutex::new(Vec::new());
    let warm = run(&host, &arrivals, true, Some(&samples));
    let pools = host.get("/pools");
    let make_ms = pools[0]["make_ms"].as_f64().unwrap();
    let calibration = format!(
        "{} / {} (target {}), band x{:.2}",
        pools[0]["missed_windows"],
        pools[0]["scored_windows"],
        pools[0]["miss_rate"],
        pools[0]["band_width"].as_f64().unwrap_or(f64::NAN)
    );
    let cold = run(&host, &arrivals, false, None);

    let served_warm = warm.iter().filter(|t| t.warm).count();
    let fallback = warm.len() - served_warm;
    let of = |runs: &[Times], f: fn(&Times) -> f64| -> (f64, f64) {
        let v: Vec<f64> = runs.iter().map(f).filter(|v| v.is_finite()).collect();
        if v.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            percentiles(&v)
        }
    };
    let (c50, c99) = of(&cold, |t| t.running);
    let (cr50, cr99) = of(&cold, |t| t.ready);
    // A request the pool served cold counts with its cold times.
    let (w50, w99) = of(&warm, |t| t.running);
    let (wr50, wr99) = of(&warm, |t| t.ready);
    let (wa50, wa99) = of(&warm, |t| t.answered);
    let samples = samples.into_inner().unwrap();
    let mean_ready = samples.iter().map(|s| s.ready).sum::<f64>() / samples.len().max(1) as f64;
    let per_vm = |f: fn(&Footprint) -> u64| -> f64 {
        let v: Vec<f64> = samples
            .iter()
            .flat_map(|s| s.footprints.iter().map(|p| f(p) as f64 / 1024.0))
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            Stat::of(&v).median
        }
    };
    let (rss, pss, anon) = (
        per_vm(|f| f.rss_kib),
        per_vm(|f| f.pss_kib),
        per_vm(|f| f.anon_kib),
    );
    let end_ms = arrivals.last().copied().unwrap_or(0.0) + 1000.0;
    let oracle = oracle_mean(&arrivals, make_ms, end_ms);
    println!(
        "cold start under Poisson bursts: {} requests in {seconds} s (seed {seed}), test guest \
         1 vCPU {GUEST_MIB} MiB; warm pool window {WINDOW_MS} ms, a warm VM made in {make_ms:.1} ms",
        arrivals.len()
    );
    let idle = |label: &str, mib: f64| {
        (
            format!("warm idle memory at {label}, pool / oracle"),
            format!(
                "{:.1} / {:.2} MiB = {:.0}x",
                mean_ready * mib,
                oracle * mib,
                mean_ready / oracle
            ),
        )
    };
    let rows = [
        (
            "cold: request -> guest running, p50 / p99".to_string(),
            format!("{c50:.1} / {c99:.1} ms"),
        ),
        (
            "cold: request -> guest ready, p50 / p99".into(),
            format!("{cr50:.1} / {cr99:.1} ms"),
        ),
        (
            "warm: request -> guest running = ready, p50 / p99".into(),
            format!("{w50:.1} / {w99:.1} ms ({wr50:.1} / {wr99:.1})"),
        ),
        (
            "warm: request -> guest answered Ctrl-Alt-Del".into(),
            format!("{wa50:.1} / {wa99:.1} ms"),
        ),
        (
            "  requests served warm / booted cold".into(),
            format!("{served_warm} / {fallback}"),
        ),
        (
            "  pool windows with requests: missed / all".into(),
            calibration,
        ),
        (
            "p99 ready: cold / warm".into(),
            format!("{:.1}x", cr99 / wr99),
        ),
        (
            "p50 ready: cold / warm".into(),
            format!("{:.1}x", cr50 / wr50),
        ),
        (
            "warm VMs ready, mean (pool / oracle)".into(),
            format!("{mean_ready:.2} / {oracle:.3}"),
        ),
        (
            "a warm VM (paused, restored): RSS / PSS / anon".into(),
            format!("{rss:.1} / {pss:.1} / {anon:.1} MiB"),
        ),
        idle(&format!("configured size ({GUEST_MIB} MiB)"), GUEST_MIB),
        idle("resident size (RSS)", rss),
        idle("proportional size (PSS)", pss),
    ];
    for (label, value) in rows {
        println!("| {label:<50} | {value:>28} |");
    }
    breakdown(&warm);
    // Every VM of the runs has ended (reset on Ctrl-Alt-Del); the warm ones go with the host.
    let _ = host.request("DELETE", "/pools/fn", None);
}
