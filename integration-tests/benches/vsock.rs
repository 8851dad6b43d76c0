//! virtio-vsock throughput: prescient and Firecracker, the same test guest and the same host side
//! (Firecracker's Unix-socket convention, which prescient follows), alternated run by run.
//!
//! - host -> guest: the host connects (`CONNECT <port>`), streams `VSOCK_BENCH_MIB` MiB, the
//!   guest echoes every byte; timed on the host from the first byte sent to the last byte back,
//!   then the host closes.
//! - guest -> host: the guest connects to host port P (`<uds_path>_P`), sends as much, the host
//!   echoes it; timed on the host from the accept to the guest's close.
//!
//! MiB/s are bytes echoed per second (each byte crossed the device twice). QEMU has no column:
//! its vsock is vhost-vsock, whose host side is AF_VSOCK in the host kernel.
//! `cargo bench -p integration-tests --bench vsock` (`VSOCK_BENCH_RUNS`, default 5).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::bench::{alternate, env_or, Kind, Table, VmSpec, Vmm};
use integration_tests::{vsock_connect, Scratch};

const PORT: u32 = 1234;
const DEADLINE: Duration = Duration::from_secs(120);

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Opens guest port `PORT` through the VMM's socket.
fn connect(uds: &Path) -> UnixStream {
    let (s, reply) = vsock_connect(uds, PORT);
    assert!(reply.starts_with("OK "), "reply {reply:?}");
    s
}

/// host -> guest echo: MiB/s.
fn host_to_guest(vmm: &Vmm, dir: &Path, bytes: usize) -> f64 {
    let uds = dir.join(format!("{}-h.sock", vmm.name().replace(' ', "-")));
    let _ = std::fs::remove_file(&uds);
    let mut spec = VmSpec::test_guest(
        1,
        128,
        &format!("cpu_ms=1 mem_mib=1 virtio_timeout_ms=30000 vsock_echo_listen={PORT}"),
    );
    spec.vsock_uds = Some(uds.clone());
    let vm = vmm.spawn(Some(&spec), dir, None).unwrap();
    let s = connect(&uds);
    let data = pattern(bytes);
    let mut w = s.try_clone().unwrap();
    let start = Instant::now();
    let writer = std::thread::spawn(move || w.write_all(&data).unwrap());
    let mut back = vec![0u8; bytes];
    let mut r = s;
    r.read_exact(&mut back).unwrap();
    let secs = start.elapsed().as_secs_f64();
    writer.join().unwrap();
    assert!(back == pattern(bytes), "{}: echo differs", vmm.name());
    // A whole close once everything is back: Firecracker does not pass a half-close on.
    drop(r);
    let (_, line) = vm.expect_prefix("guest: vsock0 echo port=", DEADLINE);
    assert!(line.ends_with(" ok"), "{}: {line}", vmm.name());
    vm.wait_exit(DEADLINE);
    bytes as f64 / secs / (1 << 20) as f64
}

/// guest -> host echo: MiB/s.
fn guest_to_host(vmm: &Vmm, dir: &Path, bytes: usize) -> f64 {
    let uds = dir.join(format!("{}-g.sock", vmm.name().replace(' ', "-")));
    let _ = std::fs::remove_file(&uds);
    let port_path = format!("{}_{PORT}", uds.display());
    let _ = std::fs::remove_file(&port_path);
    let listener = UnixListener::bind(&port_path).unwrap();
    let mut spec = VmSpec::test_guest(
        1,
        128,
        &format!(
            "cpu_ms=1 mem_mib=1 virtio_timeout_ms=30000 vsock_connect={PORT} vsock_send={bytes}"
        ),
    );
    spec.vsock_uds = Some(uds.clone());
    let vm = vmm.spawn(Some(&spec), dir, None).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    let start = Instant::now();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut echoed = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
        echoed += n;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(echoed, bytes, "{}: bytes the guest sent", vmm.name());
    let (_, line) = vm.expect_prefix("guest: vsock0 connect port=", DEADLINE);
    assert!(line.ends_with(" ok"), "{}: {line}", vmm.name());
    vm.wait_exit(DEADLINE);
    let _ = std::fs::remove_file(&port_path);
    bytes as f64 / secs / (1 << 20) as f64
}

fn main() {
    let runs = env_or("VSOCK_BENCH_RUNS", 5);
    let mib = env_or("VSOCK_BENCH_MIB", 16);
    let scratch = Scratch::new("vsock-bench");
    let vmms = Vmm::with(&[Kind::Firecracker]);
    let bytes = mib << 20;
    let mut t = Table::new(
        format!(
            "virtio-vsock echo of {mib} MiB, test guest (1 vCPU, polling driver), Firecracker's Unix-socket \
             host side, {runs} alternated runs, MiB/s echoed (host shared)"
        ),
        &vmms,
    );
    let h = alternate(&vmms, runs, |v| host_to_guest(v, scratch.path(), bytes));
    t.row_of("host -> guest -> host", &h);
    let g = alternate(&vmms, runs, |v| guest_to_host(v, scratch.path(), bytes));
    t.row_of("guest -> host -> guest", &g);
    t.note(
        "qemu: not run: its vsock is vhost-vsock, whose host side is AF_VSOCK in the host kernel, \
         not this Unix-socket protocol",
    );
    t.print();
}
