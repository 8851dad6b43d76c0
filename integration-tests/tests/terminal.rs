//! prescient at a terminal (a real pseudo-terminal, the VMM's controlling terminal, seccomp
//! filters on): the terminal is in raw mode while the VM runs, typed keys reach the guest, and
//! every way the VM ends puts the terminal's mode back exactly as it was. Issue 25: the restore
//! read the mode first (TCGETS), which the VMM thread's filter refused, so every run at a
//! terminal died by SIGSYS after the guest finished.

use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::pty::{Mode, Pty, PtySession};
use integration_tests::{guest_spec, prescient_bin, Outcome, Scratch, TEST_GUEST_PVH};

const DEADLINE: Duration = Duration::from_secs(60);
/// What the test guest prints once it polls the console for input (`exit=serial`).
const WAITING: &str = "guest: serial waiting for input";

/// A spec for the test guest with `args`, its console on stdout (the terminal).
fn spec(scratch: &Scratch, vcpus: u8, args: &str) -> PathBuf {
    scratch.write("vm.json", &guest_spec(TEST_GUEST_PVH, vcpus, 64, args))
}

fn prescient(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(prescient_bin());
    cmd.args(args).arg("--config-file").arg(config);
    cmd
}

/// Waits for the guest to poll its console, and checks the terminal is raw meanwhile.
fn wait_until_guest_reads(vmm: &mut PtySession<'_>, pty: &Pty) {
    vmm.wait_for_line(WAITING, DEADLINE);
    let mode = pty.mode();
    assert!(mode.is_raw(), "not in raw mode while the VM runs: {mode:?}");
}

fn assert_restored(pty: &Pty, before: &Mode, out: &Outcome) {
    assert_eq!(
        pty.mode(),
        *before,
        "the terminal's mode was not restored\n--- terminal ---\n{}\n--- stderr ---\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn a_run_at_a_terminal_exits_0_and_leaves_the_terminal_as_it_found_it() {
    let scratch = Scratch::new("tty-run");
    let pty = Pty::open();
    let before = pty.mode();
    let config = spec(&scratch, 2, "cpu_ms=20 mem_mib=4");
    let out = pty.spawn(&mut prescient(&[], &config)).wait(DEADLINE);
    out.assert_code(0).assert_line("prescient-test-guest: done");
    assert_restored(&pty, &before, &out);
    assert!(!out.stderr.contains("terminal"), "{}", out.stderr);
}

#[test]
fn keys_typed_at_the_terminal_reach_the_guest_ctrl_c_and_a_long_paste_included() {
    let scratch = Scratch::new("tty-input");
    let pty = Pty::open();
    let before = pty.mode();
    let config = spec(&scratch, 1, "cpu_ms=1 mem_mib=1 exit=serial");
    let mut vmm = pty.spawn(&mut prescient(&[], &config));
    wait_until_guest_reads(&mut vmm, &pty);

    // Raw mode has no signal keys (as in Firecracker): a typed Ctrl-C is the guest's byte,
    // and the VM runs on.
    vmm.type_bytes(b"\x03");
    vmm.wait_for_line("guest: serial byte 0x3", DEADLINE);
    assert!(vmm.running(), "a typed Ctrl-C ended the VMM");

    // More than the UART's 64-byte FIFO at once (a paste) arrives whole and in order; Enter
    // sends CR, which the terminal hands over as LF (ICRNL is kept, as in Firecracker).
    let text: String = (0..100u8).map(|i| char::from(b'a' + i % 26)).collect();
    vmm.type_bytes(format!("{text}\r").as_bytes());
    let out = vmm.wait(DEADLINE);
    out.assert_code(0)
        .assert_line(&format!("guest: serial line \"\u{3}{text}\""))
        .assert_line("guest: serial byte 0xa");
    assert_restored(&pty, &before, &out);
}

#[test]
fn ctrl_c_as_sigint_and_the_other_termination_signals_end_the_vm_and_restore_the_terminal() {
    let scratch = Scratch::new("tty-signals");
    let config = spec(&scratch, 1, "cpu_ms=1 mem_mib=1 exit=serial");
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let pty = Pty::open();
        // A mode that a restore which only switches canonical mode, echo and signals back on
        // would not give back.
        let before = pty.set_unusual_mode();
        let mut vmm = pty.spawn(&mut prescient(&[], &config));
        wait_until_guest_reads(&mut vmm, &pty);
        vmm.signal(signal);
        let out = vmm.wait(DEADLINE);
        out.assert_code(128 + signal);
        assert_restored(&pty, &before, &out);
    }
}

#[test]
fn closing_the_terminal_hangs_the_vm_up_cleanly() {
    let scratch = Scratch::new("tty-hangup");
    let config = spec(&scratch, 1, "cpu_ms=1 mem_mib=1 exit=serial");
    let pty = Pty::open();
    let mut vmm = pty.spawn(&mut prescient(&[], &config));
    wait_until_guest_reads(&mut vmm, &pty);
    pty.hang_up();
    // SIGHUP from the kernel; the mode has nothing left to go back to, and that is no crash.
    vmm.wait(DEADLINE).assert_code(128 + libc::SIGHUP);
}

#[test]
fn a_guest_crash_and_the_predictors_kill_restore_the_terminal_too() {
    let scratch = Scratch::new("tty-ends");
    let id = format!("tty-kill-{}", std::process::id());
    // An unknown port hammered after 2.5 s of CPU (the forecasters are warm by then) passes the
    // anomaly threshold: the predictor ends the VM (exit 4) from the VMM thread's loop.
    let mut kill_spec: serde_json::Value = serde_json::from_str(&guest_spec(
        TEST_GUEST_PVH,
        1,
        64,
        "cpu_ms=2500 mem_mib=1 port_hammer=100000 exit=halt",
    ))
    .unwrap();
    kill_spec["predictor"] = serde_json::json!({"anomaly": {"threshold": 2.5, "action": "kill"}});
    let cases = [
        (
            "triple fault",
            scratch.write(
                "triple.json",
                &guest_spec(TEST_GUEST_PVH, 1, 64, "mode=triple"),
            ),
            3,
        ),
        (
            "predictor kill",
            scratch.write("kill.json", &kill_spec.to_string()),
            4,
        ),
    ];
    for (what, config, code) in cases {
        let pty = Pty::open();
        let before = pty.set_unusual_mode();
        let out = pty
            .spawn(&mut prescient(&["--id", &id], &config))
            .wait(DEADLINE);
        out.assert_code(code);
        assert!(
            pty.mode() == before,
            "{what}: mode not restored: {:?}",
            pty.mode()
        );
    }
}

/// Every thread kind's panic path runs under its seccomp filter: the panic hook restores the
/// terminal, reports the panic without a backtrace (the test environment sets RUST_BACKTRACE=1,
/// whose backtrace the filters would refuse) and aborts (SIGABRT), in a debug build as in a
/// release one, never dying by SIGSYS on the way.
#[test]
fn a_thread_that_panics_restores_the_terminal_under_its_seccomp_filter() {
    for kind in ["vmm", "vcpu", "api"] {
        let scratch = Scratch::new(&format!("tty-panic-{kind}"));
        let config = spec(&scratch, 1, "cpu_ms=1 mem_mib=1 exit=serial");
        let socket = scratch.path().join("api.sock");
        let pty = Pty::open();
        let before = pty.set_unusual_mode();
        let socket_arg = socket.to_str().unwrap();
        let args = ["--test-panic", kind, "--api-sock", socket_arg];
        let mut vmm = pty.spawn(&mut prescient(&args, &config));
        if kind == "api" {
            // The API thread's first safe point is its first connection.
            wait_until_guest_reads(&mut vmm, &pty);
            let _client = UnixStream::connect(&socket).expect("connect to the API");
        }
        let out = vmm.wait(DEADLINE);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{kind}: {:?}\n--- stderr ---\n{}",
            out.status,
            out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("test hook: the {kind} thread panics")),
            "{kind}: {}",
            out.stderr
        );
        assert_restored(&pty, &before, &out);
        // Only the VMM thread's filter may remove the API socket.
        assert_eq!(socket.exists(), kind != "vmm", "{kind}: API socket");
    }
}

/// The cgroup directories the jailer made (its default controllers), removed (once empty)
/// when dropped.
struct CgroupDirs(Vec<PathBuf>);

impl CgroupDirs {
    fn of(id: &str) -> Self {
        Self(
            ["cpu", "cpuacct", "memory", "pids"]
                .iter()
                .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/prescient/{id}")))
                .collect(),
        )
    }
}

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn under_prescient_jail_typed_keys_reach_the_guest_and_ctrl_c_ends_it_cleanly() {
    let scratch = Scratch::new("tty-jail");
    let config = spec(&scratch, 1, "cpu_ms=1 mem_mib=1 exit=serial");
    for new_pid_ns in [false, true] {
        let id = format!("tty-{}-{}", std::process::id(), u8::from(new_pid_ns));
        let _cgroups = CgroupDirs::of(&id);
        let pty = Pty::open();
        let before = pty.set_unusual_mode();
        let mut jail = Command::new(prescient_bin());
        jail.args(["jail", "--id", &id, "--uid", "40125", "--gid", "40126"])
            .arg("--chroot-base-dir")
            .arg(scratch.path().join("jail"));
        if new_pid_ns {
            jail.arg("--new-pid-ns");
        }
        jail.arg("--").arg("--config-file").arg(&config);
        let mut vmm = pty.spawn(&mut jail);
        wait_until_guest_reads(&mut vmm, &pty);
        let out = if new_pid_ns {
            // The user's Ctrl-C as a signal reaches the jailer they started, which waits for the
            // VMM in its pid namespace and passes it on.
            vmm.signal(libc::SIGINT);
            let out = vmm.wait(DEADLINE);
            out.assert_code(128 + libc::SIGINT);
            out
        } else {
            vmm.type_bytes(b"jailed\r");
            let out = vmm.wait(DEADLINE);
            out.assert_code(0)
                .assert_line("guest: serial line \"jailed\"");
            out
        };
        assert_restored(&pty, &before, &out);
    }
}

/// The README's first command, `./resources/boot-default-vm.sh`, in a terminal made by
/// `script`, built with this test's cargo profile instead of release.
#[test]
fn the_readmes_first_command_run_in_a_terminal_exits_0_and_leaves_it_as_found() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // This test's own build (target/<profile>/deps/terminal-*), whatever PRESCIENT_BIN says.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory above {}", exe.display()),
    };
    let start = Instant::now();
    let out = Command::new("script")
        .args([
            "-qec",
            "stty -g; ./resources/boot-default-vm.sh; echo \"boot-default-vm exit=$?\"; stty -g",
            "/dev/null",
        ])
        .current_dir(repo)
        .env("PRESCIENT_CARGO_PROFILE", profile)
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .stdin(Stdio::null())
        .output()
        .expect("run script(1) (util-linux)");
    let shown = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let context = format!(
        "after {:?}\n--- terminal ---\n{shown}\n--- stderr ---\n{}",
        start.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "script failed: {context}");
    let lines: Vec<&str> = shown.lines().collect();
    assert!(
        lines.contains(&"boot-default-vm exit=0"),
        "not exit 0: {context}"
    );
    assert!(
        lines.contains(&"prescient-test-guest: done"),
        "the guest did not finish: {context}"
    );
    // `stty -g` before and after: the first and last lines.
    let (first, last) = (lines.first().unwrap(), lines.last().unwrap());
    assert!(first.contains(':'), "no stty -g line first: {context}");
    assert_eq!(first, last, "the terminal's mode changed: {context}");
}
