//! Scenario: a Linux guest reads its metadata from MMDS, served by prescient's virtio-net device
//! at 169.254.169.254 (`mmds-config` on eth0, metadata from `--metadata` before boot). The
//! agent's `mmds` step routes the address to eth0, asks for a session token with
//! `curl -X PUT .../latest/api/token` (curl comes with the workloads in the initrd) and fetches
//! with busybox `wget`, with and without `X-metadata-token`: under V2 only the token opens the store, under V1 a request
//! without one is answered too. One boot per version.

use std::time::Duration;

use integration_tests::nested::on_hardware_kvm;
use serde_json::{json, Value};

use crate::guest::GuestSpec;

const SCENARIO: Duration = Duration::from_secs(300);
const AMI: &str = "ami-87654321";
const GUEST_IP: &str = "172.16.0.2";

/// Boots a guest whose eth0 carries MMDS `version` and runs the `mmds` step: what each request
/// got (the step's JSON lines, in order).
fn fetch(version: &str) -> Vec<Value> {
    let name = format!("linux-mmds-{}", version.to_lowercase());
    let spec = GuestSpec::new(&name, 2, 256).with_workloads_in_the_initrd();
    let metadata = spec.scratch().write(
        "metadata.json",
        &json!({"latest": {"meta-data": {"ami-id": AMI, "placement": {"zone": "a"}}}}).to_string(),
    );
    let vm = spec
        .section(
            "network-interfaces",
            json!([{"iface_id": "eth0", "host_dev_name": format!("pmmds{}", &version[1..]),
                    "guest_mac": "06:00:ac:10:00:02"}]),
        )
        .section(
            "mmds-config",
            json!({"version": version, "network_interfaces": ["eth0"]}),
        )
        .vmm_arg("--metadata")
        .vmm_arg(metadata.to_str().unwrap())
        .arg(&format!("ip={GUEST_IP}:::255.255.255.0::eth0:off"))
        .steps(&["mmds:20", "poweroff"])
        .start();
    vm.ready();
    let done = vm.done("mmds:20", 20);
    assert_eq!(done["exit_code"], 0, "{done}");
    let lines: Vec<Value> = vm
        .console
        .lines()
        .iter()
        .filter_map(|l| l.split_once("agent: [mmds] ").map(|(_, json)| json))
        // A kernel message printed in the middle of a line leaves it unparsable; the request
        // it reported then shows as missing.
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let (status, stderr) = vm.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    lines
}

/// The step's line for `wget <path>` with `token` (`valid`, `none` or `forged`).
fn wget<'a>(lines: &'a [Value], path: &str, token: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["request"] == format!("wget {path}") && l["token"] == token)
        .unwrap_or_else(|| panic!("no wget {path} token={token} in {lines:#?}"))
}

/// The token `PUT /latest/api/token` returned (checked to be one).
fn token(lines: &[Value]) -> String {
    let put = lines
        .iter()
        .find(|l| l["request"] == "PUT /latest/api/token")
        .unwrap_or_else(|| panic!("no token request in {lines:#?}"));
    assert_eq!(put["status"], 200, "{put}");
    let token = put["body"].as_str().unwrap().to_string();
    assert_eq!(token.len(), mmds::token::TOKEN_LEN, "{put}");
    token
}

/// A wget that got `body` (200).
fn assert_got(line: &Value, body: &str) {
    assert_eq!(line["exit_code"], 0, "{line}");
    assert_eq!(line["stdout"].as_str().unwrap().trim_end(), body, "{line}");
}

#[test]
fn a_linux_guest_reads_mmds_v2_with_a_session_token_only() {
    on_hardware_kvm(SCENARIO, || {
        let lines = fetch("V2");
        token(&lines);
        assert_got(wget(&lines, "/", "valid"), "latest/");
        assert_got(wget(&lines, "/latest/meta-data/ami-id", "valid"), AMI);
        let refused = [
            ("/", "none"),
            ("/latest/meta-data/ami-id", "none"),
            ("/latest/meta-data/ami-id", "forged"),
        ];
        for (path, token) in refused {
            let line = wget(&lines, path, token);
            assert_ne!(line["exit_code"], 0, "{line}");
            assert!(
                line["stderr"]
                    .as_str()
                    .unwrap()
                    .contains("401 Unauthorized"),
                "no 401 with token {token} under V2: {line}"
            );
        }
    });
}

#[test]
fn a_linux_guest_reads_mmds_v1_without_a_token() {
    on_hardware_kvm(SCENARIO, || {
        let lines = fetch("V1");
        // As in Firecracker since 1.13 (its #5290): V1 hands out session tokens too, so guests
        // can move to V2, but answers a GET with no token or an invalid one.
        token(&lines);
        for token in ["none", "valid"] {
            assert_got(wget(&lines, "/", token), "latest/");
            assert_got(wget(&lines, "/latest/meta-data/ami-id", token), AMI);
        }
        assert_got(wget(&lines, "/latest/meta-data/ami-id", "forged"), AMI);
    });
}
