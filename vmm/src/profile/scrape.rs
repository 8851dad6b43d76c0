//! Per-drive I/O of the probe VM: its `GET /metrics` (Prometheus text on the API socket) read
//! every period, since the trace only carries the block devices' total.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Percentiles;

/// How long one scrape may take before the period goes without.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

/// Cumulative counters of one drive at one time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    at: Instant,
    requests: u64,
    bytes: u64,
}

/// One drive's rates while it was busy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriveRates {
    pub mib_per_s: Percentiles,
    pub ops_per_s: Percentiles,
}

pub struct DriveScraper {
    socket: PathBuf,
    drives: Vec<String>,
    series: HashMap<String, Vec<Point>>,
}

/// The value of counter `name` in a Prometheus text body.
fn counter(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

/// `GET /metrics` over the API socket: the body, or None if the VM is not (or no longer) there.
fn scrape(socket: &PathBuf) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end].lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })?;
        if got.len() >= end + 4 + length {
            return Some(text[end + 4..end + 4 + length].to_string());
        }
    }
}

impl DriveScraper {
    pub fn new(socket: PathBuf, drives: Vec<String>) -> Self {
        Self {
            socket,
            drives,
            series: HashMap::new(),
        }
    }

    /// Reads the counters once.
    pub fn tick(&mut self) {
        if self.drives.is_empty() {
            return;
        }
        let Some(body) = scrape(&self.socket) else {
            return;
        };
        let at = Instant::now();
        for id in &self.drives {
            let c = |what: &str| counter(&body, &format!("prescient_block_{id}_{what}_total"));
            if let (Some(requests), Some(to), Some(from)) =
                (c("requests"), c("bytes_to_guest"), c("bytes_from_guest"))
            {
                self.series.entry(id.clone()).or_default().push(Point {
                    at,
                    requests,
                    bytes: to + from,
                });
            }
        }
    }

    /// Each drive's rates over the periods it transferred anything; None for a drive scraped
    /// fewer than twice (a probe that ended at once).
    pub fn rates(&self, id: &str) -> Option<DriveRates> {
        let points = self.series.get(id).filter(|p| p.len() >= 2)?;
        let (mut mib, mut ops) = (Vec::new(), Vec::new());
        for w in points.windows(2) {
            let dt = w[1].at.duration_since(w[0].at).as_secs_f64();
            let bytes = w[1].bytes.saturating_sub(w[0].bytes);
            if dt > 0.0 && bytes > 0 {
                mib.push(bytes as f64 / (1024.0 * 1024.0) / dt);
                ops.push(w[1].requests.saturating_sub(w[0].requests) as f64 / dt);
            }
        }
        Some(DriveRates {
            mib_per_s: Percentiles::of(&mib),
            ops_per_s: Percentiles::of(&ops),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_and_rates_over_busy_periods() {
        let body = "# TYPE x counter\nprescient_block_d_requests_total 12\nprescient_block_d_requests_total_x 1\n";
        assert_eq!(counter(body, "prescient_block_d_requests_total"), Some(12));
        assert_eq!(counter(body, "prescient_block_e_requests_total"), None);

        let mut s = DriveScraper::new("/nonexistent.sock".into(), vec!["d".into()]);
        s.tick();
        assert!(
            s.rates("d").is_none(),
            "nothing scraped from a missing socket"
        );
        let t0 = Instant::now();
        let p = |ms: u64, requests: u64, mib: u64| Point {
            at: t0 + Duration::from_millis(ms),
            requests,
            bytes: mib << 20,
        };
        // Busy at 20 MiB/s and 320 ops/s for a second, then idle for a second.
        s.series.insert(
            "d".into(),
            vec![
                p(0, 0, 0),
                p(500, 160, 10),
                p(1000, 320, 20),
                p(2000, 320, 20),
            ],
        );
        let r = s.rates("d").unwrap();
        assert_eq!(
            r.mib_per_s,
            Percentiles {
                p50: 20.0,
                p95: 20.0
            }
        );
        assert_eq!(r.ops_per_s.p50, 320.0);
    }
}
