//! The API bodies Firecracker 1.17 brought (MMDS data and config, CPU templates, the new drive,
//! interface, serial and metrics fields, the balloon's hinting) through the real router, then what the VMM thread does
//! with them: the data store (put, merge patch, reads in both renderings, size limit), the MMDS
//! config's checks, the CPU template's modifiers. Asserts the store never holds more than its
//! limit and that a config that validated has a link-local address.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmds::{Mmds, OutputFormat};
use vmm::api::http::Request;
use vmm::api::routes::{route, Routed};
use vmm::rpc::VmmAction;
use vmm::vmm_config::NetworkInterfaceConfig;

const PATHS: [(&str, &str); 12] = [
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
    ("PUT", "/cpu-config"),
    ("PUT", "/drives/rootfs"),
    ("PATCH", "/drives/rootfs"),
    ("PUT", "/network-interfaces/eth0"),
    ("PUT", "/serial"),
    ("PUT", "/metrics"),
    ("PUT", "/vsock/vsock0"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon/hinting/start"),
];

#[derive(Debug, Arbitrary)]
struct Input {
    requests: Vec<(u8, Vec<u8>)>,
    reads: Vec<(String, bool)>,
    limit: u16,
}

fuzz_target!(|input: Input| {
    let mut store = Mmds::new(usize::from(input.limit));
    let eth0: NetworkInterfaceConfig =
        serde_json::from_str(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#).unwrap();
    for (which, body) in input.requests.iter().take(64) {
        let (method, path) = PATHS[usize::from(*which) % PATHS.len()];
        let req = Request {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            body: body.clone(),
            keep_alive: true,
        };
        match route(&req) {
            Routed::Action(VmmAction::PutMmds(v)) => {
                let _ = store.put(v);
            }
            Routed::Action(VmmAction::PatchMmds(v)) => {
                let _ = store.patch(&v);
            }
            Routed::Action(VmmAction::PutMmdsConfig(c)) => {
                if c.validate(std::slice::from_ref(&eth0)).is_ok() {
                    let [a, b, c3, _] = c.address().octets();
                    assert!(a == 169 && b == 254 && (1..=254).contains(&c3));
                }
            }
            Routed::Action(VmmAction::PutCpuConfig(c)) => {
                if c.validate().is_ok() {
                    for (_, _, _, _, f) in c.cpuid_filters() {
                        assert_eq!(f.bits & !f.mask, 0);
                        let _ = f.apply(u64::from(u32::MAX));
                    }
                    let _ = c.msr_filters();
                }
            }
            Routed::Action(VmmAction::PutDrive(d)) => {
                let _ = d.validate(0);
            }
            Routed::Action(VmmAction::PutNetworkInterface(n)) => {
                let _ = n.validate(0);
            }
            Routed::Action(VmmAction::PutSerial(s)) => {
                let _ = s.validate();
            }
            Routed::Action(VmmAction::PutBalloon(b)) => {
                if b.validate(128).is_ok() {
                    let _ = b.options();
                }
            }
            _ => {}
        }
        let size = serde_json::to_vec(&store.document()).unwrap().len();
        assert!(size <= usize::from(input.limit).max(2), "{size} > {}", input.limit);
    }
    for (path, json) in input.reads.iter().take(32) {
        let format = if *json { OutputFormat::Json } else { OutputFormat::Imds };
        let _ = store.get(path, format);
    }
});
