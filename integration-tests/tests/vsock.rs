//! virtio-vsock between the test guest and host Unix sockets, Firecracker's convention: host
//! clients connect to `uds_path` and write `CONNECT <port>\n`; guest connections to host port P
//! reach `<uds_path>_<P>`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use std::time::Duration;

use integration_tests::{vsock_connect, Outcome, RunningVmm, Scratch, TEST_GUEST_PVH};

const DEADLINE: Duration = Duration::from_secs(120);

/// Starts the VM with a vsock device at `<scratch>/v.sock`; returns it and the socket path.
fn start_vm(scratch: &Scratch, boot_args: &str) -> (RunningVmm, PathBuf) {
    let uds = scratch.path().join("v.sock");
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH,
                        "boot_args": format!("cpu_ms=1 mem_mib=1 virtio_timeout_ms=30000 {boot_args}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": uds},
    });
    let spec = scratch.write("vm.json", &spec.to_string());
    let vm = RunningVmm::spawn(["--config-file", spec.to_str().unwrap()]);
    (vm, uds)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Sends `data` (from another thread, then half-closes) and reads until the VMM closes.
fn echo_through(s: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut r = s;
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

fn finish(vm: RunningVmm) -> Outcome {
    let out = vm.wait(DEADLINE);
    out.assert_code(0).assert_line("guest: vsock0 cid=3");
    out
}

#[test]
fn host_initiated_connections_echo_through_the_guest() {
    let scratch = Scratch::new("vsock-host");
    let (vm, uds) = start_vm(&scratch, "vsock_echo_listen=1234");
    let (s, reply) = vsock_connect(&uds, 1234);
    let port: u32 = reply
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("reply {reply:?}"));
    assert!(port >= 1 << 30, "host ports are ephemeral: {port}");
    let data = pattern(64 * 1024);
    let back = echo_through(s, data.clone());
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs");
    finish(vm)
        .assert_line("guest: vsock0 echo port=1234 bytes=65536 ok")
        .assert_line("prescient-test-guest: done");
}

#[test]
fn guest_initiated_connections_reach_the_port_socket() {
    let scratch = Scratch::new("vsock-guest");
    let echo = integration_tests::unix_echo_server(&scratch.path().join("v.sock_5678"), DEADLINE);
    let (vm, _) = start_vm(&scratch, "vsock_connect=5678 vsock_send=65536");
    let out = finish(vm);
    out.assert_line("guest: vsock0 connect port=5678 bytes=65536 ok")
        .assert_line("prescient-test-guest: done");
    assert_eq!(echo.join().unwrap(), Ok(65536));
}

#[test]
fn a_guest_port_nobody_listens_on_closes_the_client_and_the_vm_goes_on() {
    let scratch = Scratch::new("vsock-rst");
    let (vm, uds) = start_vm(&scratch, "vsock_echo_listen=1234");
    let (mut s, reply) = vsock_connect(&uds, 4321);
    assert_eq!(reply, "", "the guest answered RST: no OK line");
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed");
    // A malformed CONNECT line is closed too, and the device still serves the next client.
    let mut bad = UnixStream::connect(&uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    bad.write_all(b"CONNECT nope\n").unwrap();
    rest.clear();
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0, "closed: {rest:?}");
    let (s, reply) = vsock_connect(&uds, 1234);
    assert!(reply.starts_with("OK "), "{reply:?}");
    let data = pattern(1000);
    assert_eq!(echo_through(s, data.clone()), data);
    finish(vm).assert_line("guest: vsock0 echo port=1234 bytes=1000 ok");
}

#[test]
fn an_existing_uds_path_is_a_spec_error() {
    let scratch = Scratch::new("vsock-exists");
    let uds = scratch.path().join("v.sock");
    std::fs::write(&uds, "").unwrap();
    let spec = serde_json::json!({
        "boot-source": {"kernel_image_path": TEST_GUEST_PVH},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let out = integration_tests::run_spec(&scratch, &spec.to_string(), Duration::from_secs(30));
    out.assert_code(2);
    assert!(out.stderr.contains("vsock.uds_path"), "{}", out.stderr);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
}
