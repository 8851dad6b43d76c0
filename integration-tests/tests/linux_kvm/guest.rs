//! One Linux guest under the real `prescient` binary, as the scenarios drive it: a spec built
//! from the guest images, the console, the API socket, and the guest agent's vsock link (its
//! reports arrive there, and steps can be sent to it while it runs).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::agent::{self, STEP_SLACK};
use integration_tests::console::{Console, LineStream, WaitEnd};
use integration_tests::linux::{cmdline, images};
use integration_tests::{prescient_bin, try_rss_bytes, ApiClient, Scratch};
use serde_json::{json, Value};

/// Boot to `agent: ready` under a real KVM, with room for a loaded L1 (everything in L1 runs
/// in an emulator; on the shared development machine Debian's kernel took 160 s to its init).
pub const READY: Duration = Duration::from_secs(240);
/// From the agent's poweroff (or a reset) to the VMM's exit.
pub const EXIT: Duration = Duration::from_secs(60);
/// How long a guest may take from `agent: poweroff` to its VMM's exit before the wait ends as
/// a stall: past the nested harness's silent-stall threshold (120 s), so that such a stall is
/// recognised; a healthy guest exits within seconds.
const EXIT_STALL: Duration = Duration::from_secs(150);
/// The port the agent connects to on the host side.
pub const AGENT_PORT: u32 = 52;
pub const MIB: u64 = 1 << 20;

/// A guest about to be started.
pub struct GuestSpec {
    scratch: Scratch,
    spec: Value,
    args: Vec<String>,
    agent_link: bool,
    /// The VMM's own arguments beyond the spec and the API socket.
    vmm_args: Vec<String>,
    /// `PUT /logger` as soon as the API answers.
    logger: Option<Value>,
}

impl GuestSpec {
    /// The image kernel with the initramfs (busybox and the agent), `vcpus` and `mem_mib`.
    pub fn new(name: &str, vcpus: u8, mem_mib: u64) -> Self {
        let img = images();
        Self {
            scratch: Scratch::new(name),
            spec: json!({
                "boot-source": {
                    "kernel_image_path": img.vmlinux,
                    "initrd_path": img.initramfs,
                },
                "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
            }),
            args: vec![cmdline("")],
            agent_link: false,
            vmm_args: Vec::new(),
            logger: None,
        }
    }

    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// Boots `kernel` instead of the image's vmlinux.
    pub fn kernel(mut self, kernel: &Path) -> Self {
        self.spec["boot-source"]["kernel_image_path"] = json!(kernel);
        self
    }

    /// The initramfs followed by the workloads archive (stress-ng and fio without a disk).
    pub fn with_workloads_in_the_initrd(mut self) -> Self {
        let initrd = agent::initrd_with_workloads(&self.scratch);
        self.spec["boot-source"]["initrd_path"] = json!(initrd);
        self
    }

    /// `archive` (a gzipped cpio, such as `nested::L1_KERNEL_GUEST_MODULES`) appended to the initrd
    /// (Linux unpacks concatenated archives in order).
    pub fn append_to_initrd(mut self, archive: &Path) -> Self {
        let initrd = PathBuf::from(
            self.spec["boot-source"]["initrd_path"]
                .as_str()
                .expect("an initrd"),
        );
        let mut bytes = std::fs::read(&initrd).expect("read the initrd");
        bytes.extend(
            std::fs::read(archive).unwrap_or_else(|e| panic!("read {}: {e}", archive.display())),
        );
        let path = self.scratch.path().join("initrd-appended.cpio.gz");
        std::fs::write(&path, bytes).expect("write the initrd");
        self.spec["boot-source"]["initrd_path"] = json!(path);
        self
    }

    /// A writable copy of the rootfs image as the root device (`/dev/vda`).
    pub fn with_rootfs(mut self) -> Self {
        let copy = self.scratch.path().join("rootfs.ext4");
        std::fs::copy(&images().rootfs, &copy).expect("copy the rootfs image");
        self.spec["drives"] = json!([{
            "drive_id": "rootfs", "path_on_host": copy,
            "is_root_device": true, "is_read_only": false,
        }]);
        self
    }

    /// Adds `arg` to the kernel command line.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// The steps the agent runs from the command line (`prescient.workload=`).
    pub fn steps(self, steps: &[&str]) -> Self {
        let arg = format!("prescient.workload={}", steps.join(","));
        self.arg(&arg)
    }

    /// Adds `arg` to the VMM's command line (`start`).
    pub fn vmm_arg(mut self, arg: &str) -> Self {
        self.vmm_args.push(arg.to_string());
        self
    }

    /// Configures the VMM's logger (`PUT /logger`) once its API answers: what it logs shows
    /// when the test fails.
    pub fn logger(mut self, config: Value) -> Self {
        self.logger = Some(config);
        self
    }

    /// Sets the spec's `key` section.
    pub fn section(mut self, key: &str, value: Value) -> Self {
        self.spec[key] = value;
        self
    }

    /// A vsock device and the agent's link to the host over it.
    pub fn with_agent_link(mut self) -> Self {
        let uds = vsock_uds(&self.scratch);
        self.spec["vsock"] = json!({"guest_cid": 3, "uds_path": uds});
        self.agent_link = true;
        self.arg(&format!("prescient.agent.vsock_port={AGENT_PORT}"))
    }

    /// The spec as it will be written.
    pub fn spec(&self) -> Value {
        let mut spec = self.spec.clone();
        spec["boot-source"]["boot_args"] = json!(self.args.join(" "));
        spec
    }

    /// Writes the spec and starts prescient (its console on a pipe, its API on a socket).
    pub fn start(self) -> Guest {
        let spec_path = self.scratch.write("vm.json", &self.spec().to_string());
        let socket = self.scratch.path().join("api.sock");
        let args = self.vmm_args.clone();
        self.start_with(
            Command::new(prescient_bin())
                .arg("--api-sock")
                .arg(&socket)
                .arg("--config-file")
                .arg(&spec_path)
                .args(args),
            &socket,
        )
    }

    /// Starts the VMM with `cmd` (which must use this spec) and connects to the API at
    /// `socket`.
    pub fn start_with(self, cmd: &mut Command, socket: &Path) -> Guest {
        let logger = self.logger.clone();
        let mut vm = self.spawn(cmd);
        vm.connect_api(socket);
        if let Some(config) = logger {
            vm.send("PUT", "/logger", config);
        }
        vm
    }

    /// Starts the VMM with `cmd` (which must use this spec); the caller connects the API.
    pub fn spawn(self, cmd: &mut Command) -> Guest {
        let link = self.agent_link.then(|| {
            let uds = self.scratch.path().join(format!("vsock.sock_{AGENT_PORT}"));
            AgentLink::listen(&uds)
        });
        let console = Console::spawn("prescient", cmd);
        Guest {
            console,
            api_socket: None,
            link,
            _scratch: self.scratch,
        }
    }

    /// Writes the spec (for a VMM started another way): its path.
    pub fn write_spec(&self) -> PathBuf {
        self.scratch.write("vm.json", &self.spec().to_string())
    }
}

/// The vsock device's socket (`uds_path`) in `scratch`.
fn vsock_uds(scratch: &Scratch) -> PathBuf {
    scratch.path().join("vsock.sock")
}

/// The host side of the agent's vsock link: the lines it sends, and a way to send it steps.
pub struct AgentLink {
    lines: Arc<Mutex<Option<LineStream>>>,
    writer: Arc<Mutex<Option<UnixStream>>>,
}

impl AgentLink {
    /// Listens at `uds` (`<uds_path>_<port>`) and accepts the agent's connections, newest first.
    fn listen(uds: &Path) -> Self {
        let listener =
            UnixListener::bind(uds).unwrap_or_else(|e| panic!("listen on {}: {e}", uds.display()));
        let lines: Arc<Mutex<Option<LineStream>>> = Arc::default();
        let writer: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let (l, w) = (lines.clone(), writer.clone());
        let start = Instant::now();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let read = stream.try_clone().expect("clone the agent's connection");
                *l.lock().unwrap() = Some(LineStream::read(read, start, None));
                *w.lock().unwrap() = Some(stream);
            }
        });
        Self { lines, writer }
    }

    /// The connection's lines, once the agent has connected (waits up to `timeout`).
    pub fn stream(&self, timeout: Duration) -> LineStream {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.lines.lock().unwrap().clone() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not connect over vsock within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Drops the current connection (its VMM is gone): `stream` and `send` wait for the agent's
    /// next one.
    fn forget(&self) {
        *self.lines.lock().unwrap() = None;
        *self.writer.lock().unwrap() = None;
    }

    /// Sends `line` to the agent (after waiting up to `timeout` for it to connect).
    pub fn send(&self, line: &str, timeout: Duration) {
        use std::io::Write;
        self.stream(timeout);
        let mut w = self.writer.lock().unwrap();
        let w = w.as_mut().expect("connected");
        w.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("send {line:?} to the agent: {e}"));
    }
}

/// A running guest.
pub struct Guest {
    pub console: Console,
    /// The API socket, once connected.
    api_socket: Option<PathBuf>,
    pub link: Option<AgentLink>,
    /// Holds the spec, the disk copy and the sockets until the guest is gone.
    _scratch: Scratch,
}

impl Guest {
    /// Waits for the API socket at `socket` (up to 10 s) and uses it from now on.
    pub fn connect_api(&mut self, socket: &Path) {
        drop(ApiClient::connect(socket));
        self.api_socket = Some(socket.to_path_buf());
    }

    /// A fresh API connection (the server closes idle keep-alive connections after 30 s, and
    /// scenarios wait longer than that between requests).
    pub fn api(&mut self) -> ApiClient {
        ApiClient::connect(self.api_socket.as_ref().expect("the API is not connected"))
    }

    /// Waits for `agent: ready` on the console.
    pub fn ready(&self) {
        self.console
            .expect("agent: ready", READY, |l| l.contains("agent: ready"));
    }

    /// Waits for step `step` (which runs for `secs`) to succeed: its `workload-done` JSON.
    pub fn done(&self, step: &str, secs: u64) -> Value {
        agent::expect_workload_done(&self.console, step, secs)
    }

    /// Asks the agent over vsock to run `steps` (comma separated).
    pub fn run(&self, steps: &str) {
        self.link
            .as_ref()
            .expect("the guest has no agent link (with_agent_link)")
            .send(&format!("run {steps}"), READY);
    }

    /// The agent's reports so far, from the console.
    pub fn reports(&self) -> Vec<Value> {
        agent::reports(&self.console.lines())
    }

    /// Waits up to `timeout` for a report (taken after now) that satisfies `pred`.
    pub fn wait_report(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let seen = self.reports().len();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.reports().into_iter().skip(seen).find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no agent report with {what} within {timeout:?}; last: {:?}",
                self.reports().last()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The VMM's resident memory.
    pub fn rss(&self) -> u64 {
        try_rss_bytes(self.console.pid()).unwrap_or_else(|| {
            // The VMM has exited: the failure says why it ended (its stderr), which is what
            // tells a guest broken by the nested emulator from a failed check.
            let why = self
                .console
                .wait_for("the VMM to run (its RSS)", Duration::from_secs(2), |_| {
                    false
                })
                .unwrap_err();
            panic!("{why}")
        })
    }

    /// `GET path` as JSON.
    pub fn get(&mut self, path: &str) -> Value {
        let r = self.api().request("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// `method path body`, which must succeed (204).
    pub fn send(&mut self, method: &str, path: &str, body: Value) {
        let r = self.api().request(method, path, Some(&body.to_string()));
        assert_eq!(r.status, 204, "{method} {path} {body}: {}", r.body);
    }

    /// Pauses the VM and writes a `kind` (`Full` or `Diff`) snapshot named `name` into the
    /// guest's scratch directory: its files, and how long `PUT /snapshot/create` took.
    pub fn snapshot(&mut self, kind: &str, name: &str) -> (SnapshotFiles, Duration) {
        self.send("PATCH", "/vm", json!({"state": "Paused"}));
        let scratch = self._scratch.path();
        let files = SnapshotFiles {
            state: scratch.join(format!("{name}.state")),
            mem: scratch.join(format!("{name}.mem")),
        };
        let start = Instant::now();
        self.send(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": kind, "snapshot_path": files.state,
                   "mem_file_path": files.mem}),
        );
        (files, start.elapsed())
    }

    /// Resumes a paused VM.
    pub fn resume(&mut self) {
        self.send("PATCH", "/vm", json!({"state": "Resumed"}));
    }

    /// Kills the VMM (as a host does once its VM is saved); the guest's scratch directory (its
    /// disk, snapshots and sockets) and the agent's link stay for a restore.
    pub fn stop(self) -> Stopped {
        drop(self.console.kill());
        if let Some(link) = &self.link {
            link.forget();
        }
        Stopped {
            scratch: self._scratch,
            link: self.link,
        }
    }

    /// Asks the agent to power off and waits for the VMM's exit: status and stderr.
    pub fn poweroff(self) -> (ExitStatus, String) {
        self.run("poweroff");
        self.wait_exit()
    }

    /// Waits for the VMM to exit (after a poweroff step).
    pub fn wait_exit(self) -> (ExitStatus, String) {
        self.console.expect("agent: poweroff", STEP_SLACK, |l| {
            l.contains("agent: poweroff")
        });
        // A guest that never gets to power off fails with its VMM's threads and how long its
        // console was silent, as any stalled wait does (the nested harness retries one whose
        // vCPU spun silently in the guest), rather than with a bare kill.
        let closed = self
            .console
            .stream()
            .wait_line_from(usize::MAX, EXIT_STALL, |_| false);
        if closed != Err(WaitEnd::Closed) {
            let why = self
                .console
                .wait_for("the VMM to exit after poweroff", Duration::ZERO, |_| false)
                .unwrap_err();
            panic!("{why}");
        }
        self.console.wait_exit(EXIT)
    }
}

/// A snapshot's two files.
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub mem: PathBuf,
}

/// A guest whose VMM was stopped after a snapshot: what a restore goes on with.
pub struct Stopped {
    scratch: Scratch,
    link: Option<AgentLink>,
}

impl Stopped {
    /// Loads the snapshot `state` with the memory file `mem` in a fresh `prescient --api-sock`
    /// and resumes it: the running guest, and how long `PUT /snapshot/load` took.
    pub fn restore(self, state: &Path, mem: &Path, track_dirty_pages: bool) -> (Guest, Duration) {
        // Each VMM its own API socket (a killed one leaves its socket behind).
        let socket = (1..)
            .map(|n| self.scratch.path().join(format!("api-restore{n}.sock")))
            .find(|p| !p.exists())
            .expect("a free name");
        // The stopped VMM could not remove its vsock socket; the device listens there again
        // (Firecracker's users remove it too, or name another with `vsock_override`).
        let _ = std::fs::remove_file(vsock_uds(&self.scratch));
        let console = Console::spawn(
            "prescient (restored)",
            Command::new(prescient_bin()).arg("--api-sock").arg(&socket),
        );
        let mut vm = Guest {
            console,
            api_socket: None,
            link: self.link,
            _scratch: self.scratch,
        };
        vm.connect_api(&socket);
        let start = Instant::now();
        vm.send(
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": state,
                   "mem_backend": {"backend_type": "File", "backend_path": mem},
                   "track_dirty_pages": track_dirty_pages, "resume_vm": true}),
        );
        let took = start.elapsed();
        assert_eq!(vm.get("/")["state"], "Running");
        (vm, took)
    }
}
