//! API latency under load: 8 clients, each on its own keep-alive connection, alternating
//! `GET /` and `PATCH /machine-config`; p50 and p99 per request kind.
//!
//! References, alternated round by round in the same run: Firecracker's API on the same kind of
//! socket (both before any VM is configured), and a trivial HTTP responder on a Unix socket (one
//! thread per client, answers every request with 204 at once): the floor that socket I/O and
//! scheduling set on this host. `cargo bench -p integration-tests --bench api_latency`
//! (`API_BENCH_REQUESTS` requests per client, default 2000, over `API_BENCH_ROUNDS` rounds,
//! default 4).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::bench::{env_or, Kind, Stat, Table, Vmm};
use integration_tests::console::Console;
use integration_tests::{ApiClient, Scratch};

const CLIENTS: usize = 8;

/// Answers each request (headers, no body) with an empty 204, like the cheapest possible server.
fn reference_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end]).to_string();
                        let body_len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if pending.len() < end + 4 + body_len {
                            break;
                        }
                        pending.drain(..end + 4 + body_len);
                        let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
                    }
                }
            });
        }
    });
}

/// Latencies of GET and PATCH requests from `CLIENTS` concurrent clients.
fn load(socket: &Path, per_client: usize) -> (Vec<Duration>, Vec<Duration>) {
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                let mut api = ApiClient::connect(&socket);
                let (mut get, mut patch) = (Vec::new(), Vec::new());
                for i in 0..per_client {
                    let (req, into) = if i % 2 == 0 {
                        ("GET / HTTP/1.1\r\n\r\n".to_string(), &mut get)
                    } else {
                        let body = format!("{{\"mem_size_mib\": {}}}", 128 + c * 1000 + i);
                        (
                            format!(
                                "PATCH /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            ),
                            &mut patch,
                        )
                    };
                    let start = Instant::now();
                    api.send_raw(req.as_bytes());
                    let r = api.read_response().expect("response");
                    into.push(start.elapsed());
                    assert!(r.status == 200 || r.status == 204, "status {}", r.status);
                }
                (get, patch)
            })
        })
        .collect();
    let (mut get, mut patch) = (Vec::new(), Vec::new());
    for t in threads {
        let (g, p) = t.join().unwrap();
        get.extend(g);
        patch.extend(p);
    }
    (get, patch)
}

fn pct(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1e6
}

/// Per round: (GET p50, GET p99, PATCH p50, PATCH p99) in microseconds.
type Percentiles = [f64; 4];

fn percentiles(socket: &Path, per_client: usize) -> Percentiles {
    let (mut get, mut patch) = load(socket, per_client);
    [
        pct(&mut get, 0.5),
        pct(&mut get, 0.99),
        pct(&mut patch, 0.5),
        pct(&mut patch, 0.99),
    ]
}

fn main() {
    let per_client: usize = env_or("API_BENCH_REQUESTS", 2000);
    let rounds: usize = env_or("API_BENCH_ROUNDS", 4);
    let scratch = Scratch::new("api-bench");
    let reference = scratch.path().join("reference.sock");
    reference_server(&reference);
    ApiClient::connect(&reference);
    let vmms = Vmm::with(&[Kind::Firecracker]);
    // Each VMM serves its API before any VM is configured, as an orchestrator finds it.
    let servers: Vec<(Console, PathBuf)> = vmms
        .iter()
        .map(|vmm| {
            let socket = scratch.path().join(format!("{}.sock", vmm.name()));
            let console = vmm.spawn(None, scratch.path(), Some(&socket)).unwrap();
            ApiClient::connect(&socket);
            (console, socket)
        })
        .collect();

    // Warm every server up, then measure them in turn, round after round.
    for (_, socket) in &servers {
        load(socket, 100);
    }
    load(&reference, 100);
    let mut ours: Vec<Vec<Percentiles>> = vmms.iter().map(|_| Vec::new()).collect();
    let mut floor = Vec::new();
    for _ in 0..rounds {
        for ((_, socket), out) in servers.iter().zip(&mut ours) {
            out.push(percentiles(socket, per_client / rounds));
        }
        floor.push(percentiles(&reference, per_client / rounds));
    }
    drop(servers);

    let mut t = Table::new(
        format!(
            "API latency, {CLIENTS} concurrent keep-alive clients, {per_client} requests each \
             (half GET, half PATCH) in {rounds} alternated rounds, microseconds (host shared)"
        ),
        &vmms,
    );
    let names = [
        "GET / p50",
        "GET / p99",
        "PATCH /machine-config p50",
        "PATCH /machine-config p99",
    ];
    for (i, name) in names.iter().enumerate() {
        let per_vmm: Vec<Vec<f64>> = ours
            .iter()
            .map(|rounds| rounds.iter().map(|r| r[i]).collect())
            .collect();
        t.row_of(*name, &per_vmm);
    }
    let floor_of = |i: usize| Stat::of(&floor.iter().map(|r| r[i]).collect::<Vec<_>>()).median;
    t.note(format!(
        "floor in the same rounds, a trivial responder (one thread per client, 204 at once): \
         GET p50 {:.0} p99 {:.0}, PATCH p50 {:.0} p99 {:.0}",
        floor_of(0),
        floor_of(1),
        floor_of(2),
        floor_of(3)
    ));
    t.note(
        "qemu: not run: its control plane is QMP (JSON lines, one client per monitor socket), \
         no like-for-like HTTP request",
    );
    t.print();
}
