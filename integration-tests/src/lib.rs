//! End-to-end tests of the prescient binary under real KVM, and the test guest they boot.
//!
//! This library is the harness the tests in `tests/` share: it finds (building if needed) the
//! real `prescient` binary, knows where the build script put the test guest, writes VM specs,
//! and runs the VMM with a deadline so that a hang fails a test instead of stalling CI.

pub mod agent;
pub mod bench;
pub mod console;
pub mod host;
pub mod linux;
pub mod nested;
pub mod openapi;
pub mod pty;
pub mod vhost_user;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The test guest with a PVH note (the default boot path).
pub const TEST_GUEST_PVH: &str = env!("PRESCIENT_TEST_GUEST_PVH");
/// The same guest without the note: booted through the Linux 64-bit protocol.
pub const TEST_GUEST_LINUX64: &str = env!("PRESCIENT_TEST_GUEST_LINUX64");

/// The target directory this test binary was built in (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executables live in <target>/<profile>/deps")
        .to_path_buf()
}

/// The `prescient` binary of this build profile, built on first use so that `cargo test` alone
/// is enough (cargo does not build other packages' binaries for a package's tests).
pub fn prescient_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PRESCIENT_BIN") {
            return PathBuf::from(p);
        }
        let dir = profile_dir();
        let target_dir = dir
            .parent()
            .expect("profile dir has a parent")
            .to_path_buf();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "vmm",
            "--bin",
            "prescient",
            "--target-dir",
        ])
        .arg(&target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("cannot run cargo to build prescient");
        assert!(status.success(), "building prescient failed: {status}");
        dir.join("prescient")
    })
}

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("prescient-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A file of `bytes` zero bytes (allocated, not sparse) named `name`.
    pub fn zeroed_file(&self, name: &str, bytes: usize) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, vec![0u8; bytes]).expect("write scratch file");
        p
    }

    /// Writes `contents` to `name` in the scratch dir and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM spec for the test guest.
pub fn guest_spec(kernel: &str, vcpus: u8, mem_mib: u64, boot_args: &str) -> String {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
    .to_string()
}

/// A spec for the test guest (1 vCPU, 128 MiB) with `args` after a short CPU and memory phase,
/// the `drives` given, and an entropy device if `entropy` is set.
pub fn guest_spec_devices(
    args: &str,
    drives: serde_json::Value,
    entropy: Option<serde_json::Value>,
) -> String {
    let mut spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        1,
        128,
        &format!("cpu_ms=1 mem_mib=1 {args}"),
    ))
    .expect("guest_spec is JSON");
    spec["drives"] = drives;
    if let Some(e) = entropy {
        spec["entropy"] = e;
    }
    spec.to_string()
}

/// Bytes of `path` that hold data (not holes): what a sparse snapshot memory file stores.
pub fn file_data_bytes(path: &Path) -> u64 {
    let file = std::fs::File::open(path).expect("open a file to measure");
    let len = file.metadata().expect("its length").len();
    vmm::snapshot::memory::data_extents(&file, 0, len)
        .expect("SEEK_DATA/SEEK_HOLE")
        .iter()
        .map(|(start, end)| end - start)
        .sum()
}

/// FNV-1a 64, as the test guest's `blk_read` and `pmem_read` report what they read.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A `drives[]` entry that is not the root device.
pub fn drive_json(id: &str, path: &Path, read_only: bool) -> serde_json::Value {
    serde_json::json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": read_only})
}

/// The value of counter `name` in a Prometheus text scrape.
pub fn prometheus_value(scrape: &str, name: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from the scrape"))
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a number: {e}"))
}

/// What a finished VMM run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Asserts the run ended with `code`, showing both streams if not.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts the guest console printed `line` as a whole line.
    pub fn assert_line(&self, line: &str) -> &Self {
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == line),
            "missing line {line:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The value of `key=` in the first console line starting with `prefix`.
    pub fn field(&self, prefix: &str, key: &str) -> Option<String> {
        let line = self.stdout.lines().find(|l| l.starts_with(prefix))?;
        line_field(line, key)
    }
}

/// The vCPU threads under `tasks` (`/proc/<pid>/task`, or `/proc/self/task` for a VMM running
/// in the test process) by index (`fc_vcpu <N>`), each with its CPU time (utime + stime, in
/// clock ticks); none when the process is gone.
pub fn vcpu_thread_ticks(tasks: &Path) -> BTreeMap<u8, u64> {
    let Ok(dir) = std::fs::read_dir(tasks) else {
        return BTreeMap::new();
    };
    dir.filter_map(|task| {
        // A thread that ends while this reads is simply not listed.
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        let index = comm
            .trim()
            .strip_prefix(vmm::vstate::vcpu::THREAD_NAME_PREFIX)?
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the parenthesised name: utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((index, ticks))
    })
    .collect()
}

/// Every vCPU plug and unplug the predictor's CPU actuator logged (`GET
/// /predictor/decisions`): (seq, t_ms, applied, detail).
pub fn vcpu_changes(api: &mut ApiClient) -> Vec<(u64, u64, bool, String)> {
    let page = api
        .request("GET", "/predictor/decisions?since=0", None)
        .json();
    page["decisions"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .flat_map(|d| {
            d["applied"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["what"] == "cpu")
                .map(|a| {
                    (
                        d["seq"].as_u64().unwrap(),
                        d["t_ms"].as_u64().unwrap(),
                        a["applied"].as_bool().unwrap(),
                        a["detail"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .filter(|(.., detail)| detail.contains("plug"))
        .collect()
}

/// CPU time (utime + stime, in clock ticks) of all the vCPU threads under `tasks`.
pub fn vcpu_ticks(tasks: &Path) -> u64 {
    vcpu_thread_ticks(tasks).values().sum()
}

/// The middle value of a benchmark's runs.
pub fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| {
        a.partial_cmp(b)
            .expect("benchmark values are ordered (no NaN)")
    });
    v[v.len() / 2]
}

/// A VMM for `spec` with its console in `<scratch>/console.txt` and its API on
/// `<scratch>/api.sock` (both replaced if a previous run left them).
pub fn start_with_console(
    scratch: &Scratch,
    spec: serde_json::Value,
) -> (RunningVmm, ApiClient, PathBuf) {
    start_with_console_args(scratch, spec, &[])
}

/// [`start_with_console`] with more command-line arguments (`--id ...`).
pub fn start_with_console_args(
    scratch: &Scratch,
    mut spec: serde_json::Value,
    args: &[&str],
) -> (RunningVmm, ApiClient, PathBuf) {
    let console = scratch.path().join("console.txt");
    let socket = scratch.path().join("api.sock");
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&socket);
    spec["serial"] = serde_json::json!({ "serial_out_path": console });
    let spec_path = scratch.write("vm.json", &spec.to_string());
    let mut all = vec![
        std::ffi::OsStr::new("--api-sock"),
        socket.as_os_str(),
        std::ffi::OsStr::new("--config-file"),
        spec_path.as_os_str(),
    ];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let vmm = RunningVmm::spawn(all);
    let api = ApiClient::connect(&socket);
    (vmm, api, console)
}

/// The value of `key=` in a console line.
pub fn line_field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// Waits until the console file `path` has a whole line starting with `prefix`, and returns it.
pub fn wait_for_console_line(path: &Path, prefix: &str, deadline: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only newline-terminated lines: the last one may still be being written.
        if let Some(line) = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .find(|l| l.starts_with(prefix))
        {
            return line.trim_end().to_string();
        }
        assert!(
            start.elapsed() < deadline,
            "no console line starting with {prefix:?} after {deadline:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Seccomp filters installed on `pid`'s thread named `comm`.
pub fn seccomp_filters(pid: u32, comm: &str) -> u32 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            != comm
        {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        return status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Seccomp_filters in status");
    }
    panic!("no thread {comm} in {pid}");
}

/// Resident memory of process `pid`, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> u64 {
    try_rss_bytes(pid).expect("VmRSS in /proc/<pid>/status")
}

/// Resident memory of process `pid`, in bytes, while it lives (a process that exited has no
/// VmRSS, even before it is reaped).
pub fn try_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kib << 10)
}

/// A `prescient` that runs alongside the test; killed when dropped, so a failing test never
/// leaves a VM running.
pub struct RunningVmm(Option<Child>);

impl RunningVmm {
    /// Starts `prescient` with `args` (stdin closed, stdout and stderr captured).
    pub fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::from_command(Command::new(prescient_bin()).args(args))
    }

    /// Starts `cmd` (a prescient, possibly wrapped, e.g. in `ip netns exec`).
    pub fn from_command(cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prescient");
        Self(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Waits for the VMM to end by itself.
    pub fn wait(mut self, deadline: Duration) -> Outcome {
        wait_with_deadline(self.0.take().expect("not yet waited for"), deadline)
    }

    /// Sends SIGTERM and waits for the clean stop that follows.
    pub fn terminate(self, deadline: Duration) -> Outcome {
        self.signal(libc::SIGTERM, deadline)
    }

    /// Sends `signal` and waits for the VMM to end.
    pub fn signal(self, signal: libc::c_int, deadline: Duration) -> Outcome {
        // SAFETY: kill(2) of our own child, which has not been reaped (we still own it).
        unsafe { libc::kill(self.id() as libc::pid_t, signal) };
        self.wait(deadline)
    }
}

impl Drop for RunningVmm {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            // A VMM that ended on its own before the test let go of it is usually why the test
            // failed (a refused request on a closed socket says little): show how it ended.
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    use std::io::Read;
                    let _ = stderr.read_to_string(&mut err);
                }
                eprintln!("prescient (pid {}) had ended: {status}\n{err}", child.id());
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `prescient` with `args`; kills it and panics if it is still running after `deadline`.
pub fn run_prescient(args: &[&str], deadline: Duration) -> Outcome {
    run_binary(prescient_bin(), args, deadline)
}

/// Runs `bin` (prescient, or a reference VMM) with `args` to its end, or kills it at `deadline`.
pub fn run_binary(bin: &Path, args: &[&str], deadline: Duration) -> Outcome {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    wait_with_deadline(child, deadline)
}

/// Replays the recorded traces in `trace_dir` with `prescient predictor eval` (decisions to
/// `out`): the replayed decisions, and the `live` ones (`GET /predictor/decisions`) without the
/// fields only a live run has (`seq`, `applied`), to be compared.
pub fn replay_beside_live(
    trace_dir: &Path,
    out: &Path,
    live: &[serde_json::Value],
    deadline: Duration,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let (traces, out_arg) = (trace_dir.to_str().unwrap(), out.to_str().unwrap());
    run_prescient(
        &[
            "predictor",
            "eval",
            "--traces",
            traces,
            "--decisions-out",
            out_arg,
        ],
        deadline,
    )
    .assert_code(0);
    let replayed = std::fs::read_to_string(out)
        .unwrap_or_else(|e| panic!("{}: {e}", out.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a replayed decision"))
        .collect();
    let live = live
        .iter()
        .map(|d| {
            let mut d = d.clone();
            let o = d.as_object_mut().expect("a decision object");
            o.remove("seq");
            o.remove("applied");
            d
        })
        .collect();
    (replayed, live)
}

/// Runs the VM described by `spec` (written to the scratch dir).
pub fn run_spec(scratch: &Scratch, spec: &str, deadline: Duration) -> Outcome {
    let path = scratch.write("vm.json", spec);
    run_prescient(&["--config-file", path.to_str().unwrap()], deadline)
}

/// Collects a child's output, enforcing the deadline.
pub fn wait_with_deadline(mut child: Child, deadline: Duration) -> Outcome {
    let start = Instant::now();
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for prescient") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("reap prescient");
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "prescient still running after {deadline:?} (killed: {status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    Outcome {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed,
    }
}

/// A client for the API socket (the VMM's own, [`vmm::api::client::Client`]), one keep-alive
/// connection, whose responses are checked against the OpenAPI document.
pub struct ApiClient {
    inner: vmm::api::client::Client,
}

/// A response from the API: status and body.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

impl From<vmm::api::client::ClientResponse> for ApiResponse {
    fn from(r: vmm::api::client::ClientResponse) -> Self {
        Self {
            status: r.status,
            body: r.body,
        }
    }
}

impl ApiClient {
    /// Connects to `socket`, waiting up to 10 s for the server to create it.
    pub fn connect(socket: &Path) -> Self {
        let start = Instant::now();
        loop {
            match vmm::api::client::Client::connect(socket, Duration::from_secs(30)) {
                Ok(inner) => return Self { inner },
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Sends raw bytes, for malformed-request tests.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.inner.send_raw(bytes).expect("write to API socket");
    }

    /// Reads one response; None if the server closed the connection first.
    pub fn read_response(&mut self) -> Option<ApiResponse> {
        self.inner.read_response().ok().map(ApiResponse::from)
    }

    /// One request on the kept-alive connection; the response is checked against the OpenAPI
    /// document.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
        let response: ApiResponse = self
            .inner
            .request(method, path, body)
            .unwrap_or_else(|e| panic!("no response to {method} {path}: {e}"))
            .into();
        openapi::check_response(method, path, response.status, &response.body);
        response
    }
}

/// A network namespace with a TAP in it (the host's own interfaces are never touched), deleted
/// on drop.
pub struct Netns(String);

impl Netns {
    pub fn with_tap(name: String, tap: &str) -> Self {
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["-n", &ns.0, "link", "set", tap, "up"]);
        ns
    }

    /// `program` run inside the namespace (stdin closed, output captured).
    pub fn exec(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A Unix socket at `path` that accepts one connection (within `deadline`) and echoes what it
/// reads until the peer shuts down its side; the thread returns the bytes echoed.
pub fn unix_echo_server(
    path: &Path,
    deadline: Duration,
) -> std::thread::JoinHandle<Result<usize, String>> {
    use std::io::Write;
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind the echo socket");
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        let (mut s, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(_) if start.elapsed() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (mut total, mut buf) = (0usize, vec![0u8; 8192]);
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                    total += n;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
}

/// Connects to a VMM's vsock socket `uds` (waiting for it to appear) and asks for guest `port`
/// (Firecracker's `CONNECT <port>`); returns the stream and the reply line ("" if the VMM closed
/// the connection instead).
pub fn vsock_connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let start = Instant::now();
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(30), "{uds:?}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => line.push(b[0]),
            Err(e) => panic!("reading the CONNECT reply: {e}"),
        }
    }
    (s, String::from_utf8(line).unwrap())
}
