//! Scenario 3: virtio-net and virtio-vsock with Linux's own drivers. The guest reaches a TAP
//! peer on the host (and the host reaches the guest); the guest agent's reports arrive over
//! vsock at `<uds_path>_<port>`, and steps sent back over the same connection run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::agent::STEP_SLACK;
use integration_tests::nested::on_hardware_kvm;
use serde_json::json;

use crate::guest::{GuestSpec, READY};

const SCENARIO: Duration = Duration::from_secs(420);
const HOST_IP: &str = "172.16.0.1";
const GUEST_IP: &str = "172.16.0.2";

/// Runs `cmd` (a host network tool), which must succeed.
fn host(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{text}", out.status);
    text
}

#[test]
fn the_guest_pings_a_tap_peer_and_the_agent_reports_over_vsock() {
    on_hardware_kvm(SCENARIO, || {
        let tap = "pnet0";
        // Two vCPUs: should one stall inside a nested host's emulator, the other reports the
        // RCU stall that tells that breakage from a failed check (nested::on_hardware_kvm).
        let vm = GuestSpec::new("linux-net-vsock", 2, 256)
            .section(
                "network-interfaces",
                json!([{"iface_id": "eth0", "host_dev_name": tap,
                        "guest_mac": "06:00:ac:10:00:02"}]),
            )
            .with_agent_link()
            .arg(&format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"))
            .arg("prescient.agent.interval_ms=500")
            .start();
        // prescient made the TAP; the host end gets its address.
        let start = Instant::now();
        while !Path::new("/sys/class/net").join(tap).exists() {
            assert!(start.elapsed() < READY, "prescient made no TAP {tap}");
            std::thread::sleep(Duration::from_millis(20));
        }
        host(Command::new("ip").args(["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]));
        host(Command::new("ip").args(["link", "set", tap, "up"]));
        vm.ready();
        vm.console.expect("eth0 configured", READY, |l| {
            l.contains(&format!("rcS: eth0 {GUEST_IP}"))
        });

        // vsock, guest to host: the agent connected and its reports arrive there.
        let link = vm.link.as_ref().unwrap().stream(READY);
        let report = |timeout| {
            link.wait_line(timeout, |l| l.starts_with("agent: report {"))
                .unwrap_or_else(|e| panic!("no agent report over vsock: {e:?}\n{:?}", link.lines()))
        };
        let (_, first) = report(READY);
        let r: serde_json::Value =
            serde_json::from_str(&first["agent: report ".len()..]).expect("a JSON report");
        let total = r["mem_total_kib"].as_u64().expect("mem_total_kib");
        assert!(total > 200 * 1024 && total <= 256 * 1024, "{first}");
        // At the configured interval: 4 more within 4 s (with room for a loaded L1).
        std::thread::sleep(Duration::from_secs(3));
        let reports = link
            .lines()
            .iter()
            .filter(|l| l.starts_with("agent: report {"))
            .count();
        assert!(
            reports >= 4,
            "{reports} reports over vsock in 3 s at 500 ms:\n{:?}",
            link.lines()
        );

        // vsock, host to guest: a step sent on the connection runs; the guest pings the host.
        vm.run(&format!("ping:3:{HOST_IP}"));
        let done = vm.done(&format!("ping:3:{HOST_IP}"), 3);
        assert_eq!(done["exit_code"], 0, "{done}");
        let lines = vm.console.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("agent: [ping]") && l.contains(" 0% packet loss")),
            "the guest's pings were not all answered:\n{}",
            lines.join("\n")
        );
        // The same lines reached the host over vsock.
        link.wait_line(STEP_SLACK, |l| {
            l.starts_with("agent: workload-done ") && l.contains("\"step\":\"ping:3:")
        })
        .unwrap_or_else(|e| panic!("workload-done not over vsock: {e:?}"));
        // The host reaches the guest.
        let out = host(Command::new("ping").args(["-c", "3", "-W", "5", GUEST_IP]));
        assert!(out.contains(" 0% packet loss"), "{out}");

        let (status, stderr) = vm.poweroff();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    });
}
