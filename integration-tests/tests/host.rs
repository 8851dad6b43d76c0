//! `prescient host` end to end: a supervisor, real VMMs booting the test guest, and the pool
//! between them over the real APIs.

use std::time::{Duration, Instant};

use integration_tests::bench::guest_clock_arg;
use integration_tests::host::{guest_request, ramp_args, Host};
use integration_tests::{line_field, wait_for_console_line, Scratch, TEST_GUEST_PVH};
use serde_json::Value;
use vmm::api::client::Client;

const DEADLINE: Duration = Duration::from_secs(120);
const WINDOW_MS: u64 = 100;

fn field(line: &str, key: &str) -> u64 {
    line_field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {line:?}"))
}

fn created(host: &mut Host, request: Value) -> Value {
    let (status, body) = host.create(&request);
    assert_eq!(status, 201, "POST /vms {request}: {body}");
    body
}

/// Three VMs whose memory demand ramps one after the other to more than the pool holds
/// together: every window, the grants of every resource add up to at most the host's budget
/// (the supervisor's window log, checked window by window with none missing); the guaranteed
/// VM is never short; the grants follow the ramps up and back down.
#[test]
fn grants_stay_within_the_host_budget_in_every_window() {
    let scratch = Scratch::new("host-budget");
    // Floors 3 x 192 MiB; the ramps would take 3 x ~400 MiB at once.
    let mut host = Host::start(
        scratch.path(),
        "mem=1024,cpu=2,blk=100M,net=100M",
        WINDOW_MS,
    );
    let vms = [
        // The ramps start after the predictors' 20-window warm-up, as in the predictor's
        // own ramp test: a cold predictor's band is not calibrated yet.
        ("g", "guaranteed", 4000),
        ("b", "burstable", 4500),
        ("e", "best-effort", 5000),
    ];
    for (id, class, start) in vms {
        created(
            &mut host,
            guest_request(
                id,
                class,
                128,
                192,
                640,
                &ramp_args(16_000, start, 256, 3000),
            ),
        );
    }
    let mut done = Vec::new();
    for (id, ..) in vms {
        done.push(wait_for_console_line(
            &host.console(id),
            "guest: vmem0 follow done",
            DEADLINE,
        ));
    }
    let windows = host.get("/pool/decisions?since=0");
    let windows = windows.as_array().expect("a list of windows");
    assert!(windows.len() > 100, "{} windows", windows.len());
    assert_eq!(windows[0]["seq"], 1, "the log starts at the first window");
    let mut peak = 0.0f64;
    let (mut grew, mut shrank) = (false, false);
    for (seq, w) in (1u64..).zip(windows) {
        assert_eq!(w["seq"].as_u64().unwrap(), seq, "no window missing");
        for r in ["cpu", "mem", "blk", "net"] {
            let (granted, budget) = (
                w["granted"][r].as_f64().unwrap(),
                w["budget"][r].as_f64().unwrap(),
            );
            assert!(
                granted <= budget + 1e-6,
                "window {}: {r} granted {granted} > {budget}",
                w["seq"]
            );
        }
        peak = peak.max(w["granted"]["mem"].as_f64().unwrap());
        for c in w["changes"].as_array().unwrap() {
            if c["resource"] == "mem" {
                let (from, to) = (c["from"].as_f64().unwrap(), c["to"].as_f64().unwrap());
                // Slack lent to a ramping VM is held within its grant, never above it.
                assert!(c["hold"].as_f64().unwrap() <= to, "{c}");
                grew |= to > from;
                shrank |= to < from;
            }
        }
    }
    assert!(grew && shrank, "memory grants moved both ways");
    assert!(
        peak > 1024.0 * 0.9,
        "the ramps pressed on the budget: peak {peak} MiB"
    );
    let pool = host.get("/pool");
    assert_eq!(pool["guaranteed_short_windows"]["mem"], 0, "{pool}");
    // The guaranteed guest was served first: its own predictor's tolerance (as in the
    // predictor's ramp test), no more.
    assert!(field(&done[0], "failures") <= 40, "guaranteed: {}", done[0]);
    assert!(
        field(&done[0], "peak_plugged_mib") >= field(&done[0], "max_demand_mib"),
        "{}",
        done[0]
    );
    let scrape = host.request("GET", "/metrics", None);
    assert_eq!(scrape.0, 200);
    for vm in host.get("/vms").as_array().unwrap() {
        assert_eq!(vm["state"], "running", "{vm}");
    }
}

/// Bad requests change nothing; a VMM that stops answering holds up the others' reads and
/// grants by at most a window; a VMM killed under the supervisor is reported and its grant
/// is back in the pool within two windows; a supervisor killed and started again lists the
/// same VMs (same processes), and can still stop them.
#[test]
fn a_dead_vmm_is_reported_and_a_restarted_supervisor_finds_its_vms() {
    let scratch = Scratch::new("host-restart");
    let mut host = Host::start(
        scratch.path(),
        "mem=1024,cpu=2,blk=100M,net=100M",
        WINDOW_MS,
    );
    let idle = "cpu_ms=1 mem_mib=1 exit=halt";
    created(
        &mut host,
        guest_request("keep", "guaranteed", 128, 192, 512, idle),
    );
    created(
        &mut host,
        guest_request("doomed", "burstable", 128, 192, 512, idle),
    );
    let before = host.get("/vms");

    // Each malformed or impossible request is refused by name.
    let bad: [(&str, u16, &str); 6] = [
        ("{not json", 400, "not a VM request"),
        (
            r#"{"id": "x", "config": {"machine-config": {"vcpu_count": "two"}}}"#,
            400,
            "config.machine-config.vcpu_count",
        ),
        (
            r#"{"id": "x", "config": {"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}}"#,
            400,
            "boot-source.kernel_image_path",
        ),
        (
            r#"{"id": "x", "class": "vip", "config": {}}"#,
            400,
            "unknown variant `vip`",
        ),
        (r#"{"id": "x", "from_pool": "none"}"#, 404, "no warm pool"),
        (r#"{"id": "x/y"}"#, 400, "give one of config"),
    ];
    for (body, status, says) in bad {
        let (s, b) = host.request("POST", "/vms", Some(body));
        assert_eq!(s, status, "{body}: {b}");
        assert!(
            b["fault_message"].as_str().unwrap().contains(says),
            "{body}: {b}"
        );
    }
    let (s, b) = host.create(&guest_request("keep", "burstable", 128, 192, 512, idle));
    assert_eq!(s, 409, "{b}");
    // Floors of 192 + 192 + 700 MiB do not fit in 1024.
    let (s, b) = host.create(&guest_request("big", "best-effort", 128, 700, 1024, idle));
    assert_eq!(s, 409, "{b}");
    assert!(
        b["fault_message"]
            .as_str()
            .unwrap()
            .contains("mem floor of 700 MiB"),
        "{b}"
    );
    assert_eq!(host.request("GET", "/vms/nothing", None).0, 404);
    assert_eq!(host.request("DELETE", "/vms/nothing", None).0, 404);
    let after = host.get("/vms");
    let ids = |v: &Value| -> Vec<(String, u64, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                (
                    vm["id"].as_str().unwrap().to_string(),
                    vm["pid"].as_u64().unwrap(),
                    vm["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(ids(&before), ids(&after), "bad requests touched no VM");

    // Stop one VMM (SIGSTOP: alive, its API silent): the others are still read and granted
    // every pass, a pass waiting for it at most a window, and it is read again once it runs.
    let stopped = host.get("/vms/doomed")["pid"].as_u64().unwrap() as libc::pid_t;
    // SAFETY: kill(2) of the VMM the supervisor reported for this VM.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    let (w0, k0) = (
        host.get("/pool")["window"].as_u64().unwrap(),
        host.get("/vms/keep")["windows"].as_u64().unwrap(),
    );
    std::thread::sleep(Duration::from_millis(20 * WINDOW_MS));
    let (w1, keep) = (
        host.get("/pool")["window"].as_u64().unwrap(),
        host.get("/vms/keep"),
    );
    let silent = host.get("/vms/doomed");
    // SAFETY: as above.
    unsafe { libc::kill(stopped, libc::SIGCONT) };
    // A pass at most every two windows (a window's wait, a window's interval) and a little
    // scheduling: before, each waited five windows for the silent VMM.
    assert!(
        w1 - w0 >= 6,
        "{} pool windows in 20 window periods",
        w1 - w0
    );
    assert!(
        keep["windows"].as_u64().unwrap() >= k0 + 5 && keep.get("api_error").is_none(),
        "the other VM was read: {keep}"
    );
    assert!(silent["api_error"].is_string(), "{silent}");
    let start = Instant::now();
    while host.get("/vms/doomed").get("api_error").is_some() {
        assert!(start.elapsed() < DEADLINE, "{}", host.get("/vms/doomed"));
        std::thread::sleep(Duration::from_millis(20));
    }

    // Kill one VMM: reported, and its grant back within two windows.
    let doomed = host.get("/vms/doomed");
    let grant = doomed["grant"]["mem"].as_f64().unwrap();
    assert!(grant >= 192.0, "{doomed}");
    let killed_after = host.get("/pool")["window"].as_u64().unwrap();
    // SAFETY: kill(2) of the VMM the supervisor reported for this VM.
    unsafe {
        libc::kill(
            doomed["pid"].as_u64().unwrap() as libc::pid_t,
            libc::SIGKILL,
        )
    };
    let start = Instant::now();
    let exited = loop {
        let vm = host.get("/vms/doomed");
        if vm["state"] == "exited" {
            break vm;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{vm}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        exited["reason"].as_str().unwrap().contains("signal: 9"),
        "{exited}"
    );
    let windows = host.get(&format!("/pool/decisions?since={killed_after}"));
    let returned = windows
        .as_array()
        .unwrap()
        .iter()
        .find(|w| {
            w["changes"].as_array().unwrap().iter().any(|c| {
                c["vm"] == "doomed"
                    && c["resource"] == "mem"
                    && c["to"] == 0.0
                    && c["reason"].as_str().unwrap().starts_with("returned")
            })
        })
        .unwrap_or_else(|| panic!("no window returned the grant: {windows}"));
    let at = returned["seq"].as_u64().unwrap();
    assert!(
        at <= killed_after + 2,
        "killed after window {killed_after}, returned in {at}"
    );
    let keep = host.get("/vms/keep")["grant"]["mem"].as_f64().unwrap();
    let pool = host.get("/pool");
    assert_eq!(pool["granted"]["mem"].as_f64().unwrap(), keep, "{pool}");
    assert_eq!(pool["returned"], 1, "{pool}");

    // Restart the supervisor: the same VMs, the same processes.
    let listed = ids(&host.get("/vms"));
    host.kill();
    host.restart();
    assert_eq!(ids(&host.get("/vms")), listed);
    let w0 = host.get("/pool")["window"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(5 * WINDOW_MS));
    let pool = host.get("/pool");
    assert!(
        pool["window"].as_u64().unwrap() > w0,
        "the pool runs: {pool}"
    );
    assert_eq!(pool["running"], 1, "{pool}");
    let keep = host.get("/vms/keep");
    assert!(
        keep["grant"]["mem"].as_f64().unwrap() >= 192.0,
        "its grant read back: {keep}"
    );
    assert_eq!(pool["granted"]["mem"], keep["grant"]["mem"], "{pool}");
    let scrape = host.request("GET", "/metrics", None);
    assert_eq!(scrape.0, 200);

    // Stopping works on an adopted VM too.
    let pid = keep["pid"].as_u64().unwrap() as u32;
    assert_eq!(host.request("DELETE", "/vms/keep", None).0, 204);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
    assert_eq!(host.request("DELETE", "/vms/doomed", None).0, 204);
    assert_eq!(host.get("/vms"), Value::Array(Vec::new()));
}

/// A VM the request asks to jail runs as the jailer made it (its user, its chroot), and the
/// supervisor watches and grants it through the API socket inside the chroot.
#[test]
fn a_jailed_vm_is_launched_watched_and_stopped() {
    const UID: u32 = 40125;
    let scratch = Scratch::new("host-jail");
    let mut host = Host::start(
        scratch.path(),
        "mem=1024,cpu=2,blk=100M,net=100M",
        WINDOW_MS,
    );
    let base = scratch.path().join("jail");
    let mut request = guest_request(
        "jailed",
        "burstable",
        128,
        192,
        512,
        "cpu_ms=1 mem_mib=1 exit=halt",
    );
    request["jailer"] = serde_json::json!({"uid": UID, "gid": UID, "chroot_base_dir": base});
    let vm = created(&mut host, request);
    let pid = vm["pid"].as_u64().unwrap();
    let sock = vm["api_sock"].as_str().unwrap();
    assert!(
        sock.starts_with(base.to_str().unwrap()) && sock.ends_with("/root/run/api.sock"),
        "{vm}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().nth(1) == Some(&UID.to_string()),
        "{uid}"
    );
    // In a mount namespace of its own, where its root holds the API socket.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    assert!(std::path::Path::new(&format!("/proc/{pid}/root/run/api.sock")).exists());
    // Watched: its predictor's windows are read every pool window.
    let start = Instant::now();
    loop {
        let vm = host.get("/vms/jailed");
        if vm["windows"].as_u64().unwrap_or(0) > 3 && vm["want"]["mem"].is_number() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{vm}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(host.request("DELETE", "/vms/jailed", None).0, 204);
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the jailed VMM is still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Warm claims are served on the host API's threads: four at once get four different warm
/// VMs, each raised to its start grant before its resume (its CPU quota, in its own and the
/// pool's logs) and resumed (its guest answers), listed running from the pool; the grants stay
/// within the budget; a supervisor restarted then adopts the VMs handed out (their records were
/// written by the claims) and lets the still-warm ones go.
#[test]
fn warm_claims_at_once_get_distinct_running_vms_that_a_restart_adopts() {
    let scratch = Scratch::new("host-warm");
    let mut host = Host::start(
        scratch.path(),
        "mem=1024,cpu=4,blk=100M,net=100M",
        WINDOW_MS,
    );
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH,
                        "boot_args": format!("cpu_ms=1 mem_mib=1 exit=kbd {}", guest_clock_arg())},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    let pool = serde_json::json!({"config": config, "snapshot_after_ms": 300, "min": 5, "max": 5});
    let (status, body) = host.request("PUT", "/pools/fn", Some(&pool.to_string()));
    assert_eq!(status, 201, "{body}");
    let start = Instant::now();
    while host.get("/pools")[0]["ready"] != 5 {
        assert!(start.elapsed() < DEADLINE, "{}", host.get("/pools"));
        std::thread::sleep(Duration::from_millis(20));
    }

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let (sock, barrier) = (host.sock.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock, DEADLINE).unwrap();
                barrier.wait();
                let r = c
                    .request("POST", "/vms", Some(r#"{"from_pool": "fn"}"#))
                    .unwrap();
                assert_eq!(r.status, 201, "{}", r.body);
                serde_json::from_str::<Value>(&r.body).unwrap()
            })
        })
        .collect();
    let claims: Vec<Value> = claims.into_iter().map(|t| t.join().unwrap()).collect();
    let mut ids: Vec<String> = claims
        .iter()
        .map(|c| {
            assert_eq!(c["warm"], true, "{c}");
            assert_eq!(c["claim"]["by"], "desk", "{c}");
            c["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four different VMs: {claims:?}");
    for id in &ids {
        let vm = host.get(&format!("/vms/{id}"));
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["origin"], "from_pool:fn", "{vm}");
    }
    // Each was raised to its start grant before its resume: its CPU ceiling (1 core) out of
    // the slack (4 cores less 5 floors of 0.05 and the first claims' raises), written to its
    // cgroup by its own predictor (its decision log) and in the pool's log.
    let mut raised = 0.0;
    for c in &claims {
        let cpu = c["grant"]["cpu"].as_f64().unwrap();
        assert!(cpu > 0.7 && cpu <= 1.0, "{c}");
        raised += cpu - 0.05;
        let mut api = Client::connect(
            std::path::Path::new(c["api_sock"].as_str().unwrap()),
            DEADLINE,
        )
        .unwrap();
        let page = api.request("GET", "/predictor/decisions", None).unwrap();
        let page: Value = serde_json::from_str(&page.body).unwrap();
        let quota = format!("cpu quota {} us", (cpu * 100_000.0).round());
        let patched = page["decisions"].as_array().unwrap().iter().any(|d| {
            d["reason"]
                .as_str()
                .unwrap()
                .starts_with("PATCH /predictor")
                && d["applied"].as_array().unwrap().iter().any(|a| {
                    a["applied"] == true && a["detail"].as_str().unwrap().starts_with(&quota)
                })
        });
        assert!(patched, "no {quota:?} in {}'s log: {page}", c["id"]);
    }
    // The loop logs a start grant with the first window after it heard of the claim.
    let logged = |log: &Value, c: &Value| {
        log.as_array().unwrap().iter().any(|w| {
            w["changes"].as_array().unwrap().iter().any(|ch| {
                ch["vm"] == c["id"]
                    && ch["resource"] == "cpu"
                    && ch["to"] == c["grant"]["cpu"]
                    && ch["reason"]
                        .as_str()
                        .unwrap()
                        .starts_with("claimed from warm pool fn")
            })
        })
    };
    let start = Instant::now();
    loop {
        let log = host.get("/pool/decisions?since=0");
        if claims.iter().all(|c| logged(&log, c)) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{claims:?}: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        raised <= 4.0 - 5.0 * 0.05 + 1e-9,
        "{raised} lent: {claims:?}"
    );
    // The guest of one runs: it answers Ctrl-Alt-Del.
    let answered = &claims[0];
    let mut c = Client::connect(
        std::path::Path::new(answered["api_sock"].as_str().unwrap()),
        DEADLINE,
    )
    .unwrap();
    let r = c
        .request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    wait_for_console_line(
        &host.console(answered["id"].as_str().unwrap()),
        "guest: ctrl-alt-del",
        DEADLINE,
    );
    let pools = host.get("/pools");
    assert_eq!(pools[0]["handed_out"], 4, "{pools}");
    assert_eq!(pools[0]["cold"], 0, "{pools}");
    let pool = host.get("/pool");
    assert!(
        pool["granted"]["mem"].as_f64().unwrap() <= 1024.0,
        "within the budget: {pool}"
    );

    // Restart: the VMs handed out and still running are adopted, the warm ones let go.
    let running: Vec<(String, u64)> = ids[..]
        .iter()
        .filter(|id| **id != answered["id"])
        .map(|id| {
            (
                id.clone(),
                host.get(&format!("/vms/{id}"))["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    host.kill();
    host.restart();
    let listed = host.get("/vms");
    for (id, pid) in &running {
        let vm = host.get(&format!("/vms/{id}"));
        assert_eq!(
            (&vm["state"], vm["pid"].as_u64()),
            (&"running".into(), Some(*pid)),
            "{vm}"
        );
    }
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|vm| vm["state"] != "warm"),
        "{listed}"
    );
}
