//! API latency under load: 8 clients, each on its own keep-alive connection, alternating
//! `GET /` and `PATCH /machine-config`; p50 and p99 per request kind.
//!
//! Reference, in the same run: a trivial HTTP responder on a Unix socket (one thread per client,
//! answers every request with 204 at once): the floor that socket I/O and scheduling set on this
//! host. The ratio shows what prescient's path adds (parsing, routing, the round trip through the
//! VMM thread's event loop). `cargo bench -p integration-tests --bench api_latency`
//! (`API_BENCH_REQUESTS` requests per client, default 2000).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{prescient_bin, ApiClient, Scratch};

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

fn main() {
    let per_client: usize = std::env::var("API_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let scratch = Scratch::new("api-bench");
    let reference = scratch.path().join("reference.sock");
    reference_server(&reference);
    let socket = scratch.path().join("api.sock");
    let mut vmm = Command::new(prescient_bin())
        .arg("--api-sock")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ApiClient::connect(&socket);
    ApiClient::connect(&reference);

    // Warm both up, then measure them alternately twice to even out host noise.
    load(&socket, 100);
    load(&reference, 100);
    let (mut pg, mut pp, mut rg, mut rp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let (g, p) = load(&socket, per_client / 2);
        pg.extend(g);
        pp.extend(p);
        let (g, p) = load(&reference, per_client / 2);
        rg.extend(g);
        rp.extend(p);
    }
    let _ = vmm.kill();
    let _ = vmm.wait();
    std::thread::sleep(Duration::from_millis(10));

    println!("API latency, {CLIENTS} concurrent clients, {per_client} requests each (half GET, half PATCH), microseconds");
    println!(
        "{:<40} {:>10} {:>10} {:>14} {:>14}",
        "request", "p50", "p99", "p50 / ref", "p99 / ref"
    );
    let rows = [
        ("GET / (prescient)", &mut pg, &mut rg),
        ("PATCH /machine-config (prescient)", &mut pp, &mut rp),
    ];
    for (name, ours, reference) in rows {
        let (p50, p99) = (pct(ours, 0.5), pct(ours, 0.99));
        let (r50, r99) = (pct(reference, 0.5), pct(reference, 0.99));
        println!(
            "{name:<40} {p50:>10.1} {p99:>10.1} {:>14.2} {:>14.2}",
            p50 / r50,
            p99 / r99
        );
        println!(
            "{:<40} {r50:>10.1} {r99:>10.1}",
            "  reference (trivial responder)"
        );
    }
}
