//! Linux guests: the images resources/guest/build-guest-images.sh makes, what kind of KVM this
//! host has, kernel command lines, QEMU's microvm as a reference, and a VMM console that can be
//! waited on line by line. Shared by the Linux guest tests and benchmarks, here and in L1 (see
//! `nested`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `<root>/integration-tests`).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// What /dev/kvm is on this host, from the loaded KVM modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// kvm_intel or kvm_amd: hardware virtualization; a full Linux boot takes about a second.
    Hardware(&'static str),
    /// kvm_pvm without a hardware module: guest kernel code is emulated instruction by
    /// instruction, so only the early boot is quick (see resources/guest/README.md).
    Software,
    /// No KVM module this code knows.
    Unknown,
}

impl HostKvm {
    pub fn detect() -> HostKvm {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if let Some(m) = ["kvm_intel", "kvm_amd"].into_iter().find(|m| loaded(m)) {
            HostKvm::Hardware(m)
        } else if loaded("kvm_pvm") {
            HostKvm::Software
        } else {
            HostKvm::Unknown
        }
    }

    /// The image variant build-guest-images.sh makes for this host.
    pub fn variant(self) -> &'static str {
        match self {
            HostKvm::Software => "software-kvm",
            HostKvm::Hardware(_) | HostKvm::Unknown => "plain",
        }
    }

    /// Why the full-boot tests do not run here, if they do not.
    pub fn why_no_full_boot(self) -> Option<String> {
        match self {
            HostKvm::Hardware(_) => None,
            HostKvm::Software => Some(
                "this host's /dev/kvm is kvm_pvm (software KVM): guest kernel code is emulated, a \
                 full Linux boot takes many minutes; run on a host with kvm_intel or kvm_amd"
                    .into(),
            ),
            HostKvm::Unknown => Some(
                "no kvm_intel or kvm_amd module loaded: the full-boot tests need hardware \
                 virtualization"
                    .into(),
            ),
        }
    }
}

/// The images build-guest-images.sh produced (its manifest).
#[derive(Debug)]
pub struct Images {
    pub variant: String,
    pub kernel_release: String,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub workloads: PathBuf,
    pub rootfs: PathBuf,
}

/// A first build compiles a kernel: about 8 minutes on 2 idle cores, far more on a busy one.
const IMAGE_BUILD_DEADLINE: Duration = Duration::from_secs(60 * 60);

/// Names a manifest file to use instead of building images (L1 hosts carry theirs, see `nested`).
pub const IMAGES_ENV: &str = "PRESCIENT_GUEST_IMAGES";

/// The guest images for this host: those `PRESCIENT_GUEST_IMAGES` names, else built (once, under
/// the script's lock) if not cached.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| match std::env::var_os(IMAGES_ENV) {
        Some(manifest) => {
            let text = std::fs::read_to_string(&manifest)
                .unwrap_or_else(|e| panic!("{IMAGES_ENV}={}: {e}", Path::new(&manifest).display()));
            parse_manifest(&text)
        }
        None => build_images(HostKvm::detect().variant()),
    })
}

/// Runs build-guest-images.sh for `variant` (instant when cached) and reads its manifest.
fn build_images(variant: &str) -> Images {
    let (status, manifest) = images_manifest(variant);
    assert!(
        status.success(),
        "build-guest-images.sh --variant {variant} failed ({status}); its messages are above"
    );
    parse_manifest(&manifest)
}

/// build-guest-images.sh's status and manifest text for `variant`.
pub fn images_manifest(variant: &str) -> (ExitStatus, String) {
    let script = repo_root().join("resources/guest/build-guest-images.sh");
    eprintln!(
        "guest images: {} --variant {variant} --print-paths (instant when cached)",
        script.display()
    );
    let child = Command::new(&script)
        .args(["--variant", variant, "--print-paths"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Progress goes straight to the test's stderr, so a long first build shows.
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    wait_output(child, IMAGE_BUILD_DEADLINE).unwrap_or_else(|e| panic!("{}: {e}", script.display()))
}

/// Reads a manifest of build-guest-images.sh; every path it names must be a file.
pub fn parse_manifest(text: &str) -> Images {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("manifest has no {key}=:\n{text}"))
            .to_string()
    };
    let path = |key: &str| {
        let p = PathBuf::from(get(key));
        assert!(
            p.is_file(),
            "manifest names {} but it is not a file",
            p.display()
        );
        p
    };
    Images {
        variant: get("variant"),
        kernel_release: get("kernel_release"),
        vmlinux: path("vmlinux"),
        initramfs: path("initramfs"),
        workloads: path("workloads"),
        rootfs: path("rootfs"),
    }
}

/// Waits for `child` (stdout piped) within `deadline`: its status and stdout; kills it after.
pub fn wait_output(mut child: Child, deadline: Duration) -> Result<(ExitStatus, String), String> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok((status, reader.join().unwrap_or_default()));
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {deadline:?}; killed"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kernel command line every test and the benchmark start from.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// What this host's early boot needs on the command line: resources/guest/software-kvm/cmdline
/// on a software-KVM host, nothing elsewhere.
pub fn host_cmdline_additions() -> String {
    if HostKvm::detect() != HostKvm::Software {
        return String::new();
    }
    let path = repo_root().join("resources/guest/software-kvm/cmdline");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `BASE_CMDLINE`, this host's additions, then `extra`.
pub fn cmdline(extra: &str) -> String {
    [BASE_CMDLINE, &host_cmdline_additions(), extra]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A prescient VM spec booting `kernel` with an optional initrd.
pub fn prescient_spec(
    kernel: &Path,
    initrd: Option<&Path>,
    vcpus: u8,
    mem_mib: u64,
    boot_args: &str,
) -> String {
    let mut boot = serde_json::json!({"kernel_image_path": kernel, "boot_args": boot_args});
    if let Some(initrd) = initrd {
        boot["initrd_path"] = serde_json::json!(initrd);
    }
    serde_json::json!({
        "boot-source": boot,
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
    .to_string()
}

/// QEMU's microvm machine with the reset port (`-device i8042`) and the console on stdout.
/// `accel` is `kvm` or `tcg`; with kvm the default CPU model, because `-cpu host` aborts on hosts
/// whose KVM refuses MSR 0x10a; with tcg the richest model (`max`).
pub fn qemu_microvm(
    accel: &str,
    vcpus: u8,
    mem_mib: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off,x-option-roms=off,rtc=off"])
        .args(["-accel", accel])
        .args(["-smp", &vcpus.to_string(), "-m", &mem_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-no-reboot", "-device", "i8042"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", cmdline]);
    if accel == "tcg" {
        c.args(["-cpu", "max"]);
    }
    if let Some(initrd) = initrd {
        c.arg("-initrd").arg(initrd);
    }
    c
}

/// Adds `image` as a virtio-blk disk (/dev/vda) that the guest may write without changing it.
pub fn qemu_disk(c: &mut Command, image: &Path) {
    c.arg("-drive")
        .arg(format!(
            "id=vda,file={},format=raw,if=none,snapshot=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=vda"]);
}

pub fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[derive(Default)]
struct Lines {
    /// Each line with the time it arrived, measured from the start.
    lines: Vec<(Duration, String)>,
    closed: bool,
}

/// Lines read from a byte stream (a VMM's stdout, a socket) as they arrive, by a thread of their
/// own, with the time each arrived; a test waits on them with a timeout.
#[derive(Clone)]
pub struct LineStream {
    start: Instant,
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

/// Why a wait for a line ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The stream closed (the process exited, the peer hung up).
    Closed,
    TimedOut,
}

impl LineStream {
    /// Reads `from` until it closes; with `tee`, each line also goes to stderr after that prefix.
    /// Times count from `start`.
    pub fn read(from: impl Read + Send + 'static, start: Instant, tee: Option<String>) -> Self {
        let stream = Self {
            start,
            lines: Arc::default(),
        };
        let shared = stream.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = r.read_until(b'\n', &mut buf).unwrap_or(0);
                let (lock, cv) = &*shared.lines;
                let mut l = lock.lock().unwrap();
                if n == 0 {
                    l.closed = true;
                    cv.notify_all();
                    return;
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches(['\r', '\n']).to_string();
                if let Some(prefix) = &tee {
                    eprintln!("{prefix}{line}");
                }
                l.lines.push((shared.start.elapsed(), line));
                cv.notify_all();
            }
        });
        stream
    }

    /// Waits until a line satisfies `pred`, at most `timeout` from now: the first such line and
    /// when it arrived (from the start), or why none came.
    pub fn wait_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), WaitEnd> {
        self.wait_line_from(0, timeout, pred)
            .map(|(_, t, line)| (t, line))
    }

    /// Like `wait_line`, looking only at lines from index `from` on: the line's index too.
    pub fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Duration, String), WaitEnd> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut l = lock.lock().unwrap();
        loop {
            let found = l
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, (_, line))| pred(line));
            if let Some((i, (t, line))) = found {
                return Ok((i, *t, line.clone()));
            }
            let now = Instant::now();
            if l.closed {
                return Err(WaitEnd::Closed);
            }
            if now >= deadline {
                return Err(WaitEnd::TimedOut);
            }
            l = cv.wait_timeout(l, deadline - now).unwrap().0;
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        let l = self.lines.0.lock().unwrap();
        l.lines.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Every line so far with the time it arrived (from the start).
    pub fn timed_lines(&self) -> Vec<(Duration, String)> {
        self.lines.0.lock().unwrap().lines.clone()
    }

    /// Time since the stream was opened.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A running VMM whose console (stdout) is read line by line as it arrives.
pub struct Console {
    child: Child,
    what: String,
    out: LineStream,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Console {
    /// Starts `cmd`; `what` names it in failure messages. Inside an L1 host every line is also
    /// copied to stderr after [`crate::nested::L2_PREFIX`], so the harness outside sees the
    /// guests' consoles (see `nested`).
    pub fn spawn(what: &str, cmd: &mut Command) -> Console {
        let tee = crate::nested::in_l1().then(|| crate::nested::L2_PREFIX.to_string());
        Self::spawn_with_tee(what, cmd, tee)
    }

    /// Like `spawn`; with `tee`, each line also goes to stderr after that prefix as it arrives.
    pub fn spawn_with_tee(what: &str, cmd: &mut Command, tee: Option<String>) -> Console {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let out = LineStream::read(child.stdout.take().expect("piped stdout"), start, tee);
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Console {
            child,
            what: what.to_string(),
            out,
            stderr: Some(stderr),
        }
    }

    /// The console's lines.
    pub fn stream(&self) -> &LineStream {
        &self.out
    }

    /// See [`LineStream::wait_line`].
    pub fn wait_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), WaitEnd> {
        self.out.wait_line(timeout, pred)
    }

    /// Like `wait_line`; fails with the console so far and what was awaited.
    pub fn wait_for(
        &self,
        awaited: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), String> {
        self.wait_line(timeout, pred).map_err(|end| {
            let why = match end {
                WaitEnd::Closed => "the console closed (the VMM exited)".to_string(),
                WaitEnd::TimedOut => format!("not within {timeout:?}"),
            };
            let tail = self.lines();
            format!(
                "{}: waited for {awaited}: {why} ({:.1}s after start)\n--- console ({} lines, last 80) ---\n{}",
                self.what,
                self.out.elapsed().as_secs_f64(),
                tail.len(),
                tail[tail.len().saturating_sub(80)..].join("\n")
            )
        })
    }

    /// Like `wait_for`, panicking with its message.
    pub fn expect(&self, awaited: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for(awaited, timeout, pred)
            .unwrap_or_else(|e| panic!("{e}"))
            .1
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.lines()
    }

    /// Every console line so far with the time it arrived (from the start).
    pub fn timed_lines(&self) -> Vec<(Duration, String)> {
        self.out.timed_lines()
    }

    /// The process id of the VMM.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the VMM was started.
    pub fn elapsed(&self) -> Duration {
        self.out.elapsed()
    }

    /// Waits up to `timeout` for the VMM to exit by itself: its status and stderr; else kills it
    /// and gives its stderr.
    pub fn exit_within(mut self, timeout: Duration) -> Result<(ExitStatus, String), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the VMM") {
                return Ok((status, self.take_stderr()));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(self.take_stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the VMM now: its stderr.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.take_stderr()
    }

    /// Waits for the VMM to exit by itself within `timeout`: its status and stderr.
    pub fn wait_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let what = self.what.clone();
        let out = self.out.clone();
        self.exit_within(timeout).unwrap_or_else(|stderr| {
            let console = out.lines();
            panic!(
                "{what} did not exit within {timeout:?} (killed)\n--- console (last 40) ---\n{}\n--- stderr ---\n{stderr}",
                console[console.len().saturating_sub(40)..].join("\n"),
            )
        })
    }

    /// Stops the VMM with SIGTERM (as an orchestrator would) and waits for it.
    pub fn terminate(self, timeout: Duration) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet (we own the Child).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM: {}", std::io::Error::last_os_error());
        self.wait_exit(timeout)
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // A failed assertion must not leave a VM running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
