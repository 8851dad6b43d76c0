//! `prescient host` for tests and benches: a supervisor with its API and state directory in a
//! scratch directory, and the test guest's VM requests. Dropping a [`Host`] kills the
//! supervisor and every VM recorded in its state directory (the VMs outlive a supervisor by
//! design, so a failing test must not leave them behind).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::api::client::{Client, ClientError};

use crate::{prescient_bin, TEST_GUEST_PVH};

/// A supervisor, and the VMs of its state directory.
pub struct Host {
    child: Option<Child>,
    pub sock: PathBuf,
    pub state: PathBuf,
    budget: String,
    window_ms: u64,
    client: Option<Client>,
}

impl Host {
    /// Starts `prescient host --budget BUDGET` in `dir`.
    pub fn start(dir: &Path, budget: &str, window_ms: u64) -> Host {
        let mut host = Host {
            child: None,
            sock: dir.join("host.sock"),
            state: dir.join("state"),
            budget: budget.to_string(),
            window_ms,
            client: None,
        };
        host.restart();
        host
    }

    /// Starts a supervisor again on the same socket and state directory (after [`Host::kill`]).
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.state.with_extension("log")).expect("host log");
        let child = Command::new(prescient_bin())
            .arg("host")
            .args(["--budget", &self.budget])
            .arg("--api-sock")
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--window-ms", &self.window_ms.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prescient host");
        self.child = Some(child);
        self.client = None;
        // Serving once a request is answered (a stale socket file may be there before).
        let start = Instant::now();
        loop {
            if let Ok(mut c) = Client::connect(&self.sock, Duration::from_secs(30)) {
                if c.request("GET", "/pool", None).is_ok() {
                    self.client = Some(c);
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the supervisor did not serve {}: {}",
                self.sock.display(),
                std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the supervisor alone (SIGKILL); its VMs keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.client = None;
    }

    /// One host API request: status and body as JSON (null when empty or not JSON).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let client = self.client.as_mut().expect("a running supervisor");
        let mut r = client.request(method, path, body);
        if matches!(r, Err(ClientError::Send(_) | ClientError::Closed)) {
            // The host API closes a connection left idle for a minute (a long bench): the
            // request never reached it, so it goes once more on a new connection.
            let mut c = Client::connect(&self.sock, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("host API {method} {path}: {e}"));
            r = c.request(method, path, body);
            self.client = Some(c);
        }
        let r = r.unwrap_or_else(|e| panic!("host API {method} {path}: {e}"));
        (
            r.status,
            serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `GET` that must answer 200.
    pub fn get(&mut self, path: &str) -> serde_json::Value {
        let (status, body) = self.request("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// `POST /vms` with `request`; the status and body.
    pub fn create(&mut self, request: &serde_json::Value) -> (u16, serde_json::Value) {
        self.request("POST", "/vms", Some(&request.to_string()))
    }

    /// The pids of the VMs recorded in the state directory.
    pub fn recorded_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(&self.state) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".vm.json"))
            .filter_map(|e| {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                v["pid"].as_u64().map(|p| p as u32)
            })
            .collect()
    }

    /// The console file of VM `id`.
    pub fn console(&self, id: &str) -> PathBuf {
        self.state.join(format!("{id}.console"))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        for pid in self.recorded_pids() {
            // SAFETY: kill(2) of a VMM this test's supervisor started (recorded by it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// A test guest VM request: 1 vCPU, `ram_mib` of RAM, a virtio-mem region above it and a
/// balloon reporting the guest's memory every 100 ms (the region in whole 128 MiB slots), the predictor's memory budget from
/// `floor_mib` to `ceiling_mib`; `args` are the guest's (e.g. a `vmem_follow_ms` ramp).
pub fn guest_request(
    id: &str,
    class: &str,
    ram_mib: u64,
    floor_mib: u64,
    ceiling_mib: u64,
    args: &str,
) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "class": class,
        "config": {
            "boot-source": {"kernel_image_path": TEST_GUEST_PVH, "boot_args": args},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": ram_mib},
            "memory-hotplug": {"total_size_mib": (ceiling_mib - ram_mib).div_ceil(128) * 128},
            "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_ms": 100},
            // Three windows ahead, as the predictor's own ramp test: the guest reports its
            // memory every 100 ms, so what the VMM sees is up to a window old.
            "predictor": {"window_ms": 100, "horizon": 3,
                          "budget": {"memory_mib": {"min": floor_mib, "max": ceiling_mib}}},
        },
    })
}

/// A guest that ramps its memory demand in virtio-mem memory: idle for `start_ms`, up to
/// `ramp_mib` over `ramp_ms`, down over as long, idle until `follow_ms`, then halted.
pub fn ramp_args(follow_ms: u64, start_ms: u64, ramp_mib: u64, ramp_ms: u64) -> String {
    format!(
        "cpu_ms=1 mem_mib=1 vmem_follow_ms={follow_ms} vmem_ramp_start_ms={start_ms} \
         vmem_ramp_mib={ramp_mib} vmem_ramp_ms={ramp_ms} exit=halt"
    )
}
