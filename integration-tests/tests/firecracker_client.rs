//! An existing Firecracker client, the `firecracker-python` package from PyPI, drives a prescient
//! VM through its documented calls, unchanged (see clients/firecracker_python.py).
//!
//! The client and its dependencies are installed once into a virtual environment under
//! `$PRESCIENT_CACHE_DIR` (default `~/.cache/prescient`); that needs PyPI the first time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{wait_with_deadline, RunningVmm, Scratch, TEST_GUEST_PVH};

const CLIENT: &str = "firecracker-python==0.0.5";

fn cache_dir() -> PathBuf {
    std::env::var_os("PRESCIENT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/prescient"))
}

/// The venv's python, creating the venv on first use.
fn client_python() -> PathBuf {
    let venv = cache_dir().join("firecracker-python-0.0.5");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        std::fs::create_dir_all(cache_dir()).unwrap();
        let run = |cmd: &mut Command, what: &str| {
            let status = cmd.status().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                status.success(),
                "{what} failed ({status}); PyPI must be reachable once"
            );
        };
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
        run(
            Command::new(venv.join("bin/pip")).args(["install", "-q", CLIENT]),
            "pip install firecracker-python",
        );
        std::fs::write(&ready, CLIENT).unwrap();
    }
    python
}

#[test]
fn firecracker_python_drives_a_prescient_vm() {
    let python = client_python();
    let scratch = Scratch::new("fc-python");
    let socket = scratch.path().join("api.sock");
    let console = scratch.path().join("console.log");
    let vmm = RunningVmm::spawn([std::ffi::OsStr::new("--api-sock"), socket.as_os_str()]);
    // The client's first call races the socket's creation; give it the socket first.
    integration_tests::ApiClient::connect(&socket);

    let client = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/firecracker_python.py"
        ))
        .args([&socket, &PathBuf::from(TEST_GUEST_PVH), &console])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_deadline(client, Duration::from_secs(120));
    let vmm = vmm.terminate(Duration::from_secs(30));
    assert!(
        out.stdout.contains("client: ok"),
        "client failed ({:?})\n{}\n{}\n--- prescient stderr ---\n{}",
        out.status,
        out.stdout,
        out.stderr,
        vmm.stderr
    );
    vmm.assert_code(143);
}
