//! Maps HTTP requests to VMM actions and VMM answers back to HTTP, with Firecracker's paths,
//! bodies and status codes.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Request, Response};
use crate::metrics::METRICS;
use crate::rpc::{ActionError, VmmAction, VmmData};
use crate::vmm_config::{
    DriveConfig, DriveUpdate, NetworkInterfaceConfig, NetworkInterfaceUpdate, PmemConfig,
    PmemUpdate,
};

/// The Firecracker API version whose request and response shapes prescient follows.
pub const FIRECRACKER_API_VERSION: &str = crate::FIRECRACKER_VERSION;

/// What a request turns into.
#[derive(Debug)]
pub enum Routed {
    /// Needs the VMM thread.
    Action(VmmAction),
    /// Answered on the API thread.
    Reply(Response),
}

/// `PUT /actions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceActionInfo {
    action_type: String,
}

/// `PATCH /vm` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: String,
}

/// `PUT /seccomp` body (prescient's own path: Firecracker cannot tighten its filters).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeccompStage {
    stage: crate::seccomp::Stage,
}

fn parse_body<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    if req.body.is_empty() {
        return Err(Response::fault(
            400,
            format!("{} {} needs a JSON body", req.method, req.path),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&req.body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        Response::fault(
            400,
            format!("invalid body for {} {}: {at}{inner}", req.method, req.path),
        )
    })
}

/// Any JSON document (the MMDS data store's bodies).
fn parse_json(req: &Request) -> Result<serde_json::Value, Response> {
    parse_body(req)
}

/// A body whose id field must equal the id in the path (`/drives/{id}`).
fn parse_with_id<T: DeserializeOwned>(
    req: &Request,
    path_id: &str,
    id_of: fn(&T) -> &str,
) -> Result<T, Response> {
    let body: T = parse_body(req)?;
    if id_of(&body) != path_id {
        return Err(Response::fault(
            400,
            format!(
                "the id in the path ({path_id:?}) and in the body ({:?}) differ",
                id_of(&body)
            ),
        ));
    }
    Ok(body)
}

/// `since=N` of `GET /predictor/decisions` (0 when absent).
fn since(query: &str) -> Result<u64, Response> {
    let mut since = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v.parse().map_err(|_| {
                    Response::fault(400, format!("since must be a whole number, got {v:?}"))
                })?;
            }
            _ => {
                return Err(Response::fault(
                    400,
                    format!("unknown query parameter {pair:?}; only since=N is accepted"),
                ))
            }
        }
    }
    Ok(since)
}

/// Firecracker answers a method a path does not take as it answers a path it does not know:
/// 400, naming both.
fn method_not_allowed(req: &Request, allowed: &str) -> Routed {
    Routed::Reply(Response::fault(
        400,
        format!(
            "Invalid request method and/or path: {} {} (it takes {allowed}).",
            req.method, req.path
        ),
    ))
}

/// Turns `req` into an action, or answers it.
pub fn route(req: &Request) -> Routed {
    let action = |r: Result<VmmAction, Response>| match r {
        Ok(a) => Routed::Action(a),
        Err(resp) => Routed::Reply(resp),
    };
    match (req.path.as_str(), req.method.as_str()) {
        ("/", "GET") => Routed::Action(VmmAction::GetInstanceInfo),
        ("/", _) => method_not_allowed(req, "GET"),
        ("/version", "GET") => Routed::Reply(Response::json(
            200,
            serde_json::json!({
                "firecracker_version": FIRECRACKER_API_VERSION,
                "prescient_version": env!("CARGO_PKG_VERSION"),
            })
            .to_string(),
        )),
        ("/version", _) => method_not_allowed(req, "GET"),
        ("/boot-source", "PUT") => action(parse_body(req).map(VmmAction::PutBootSource)),
        ("/boot-source", _) => method_not_allowed(req, "PUT"),
        ("/machine-config", "GET") => Routed::Action(VmmAction::GetMachineConfig),
        ("/machine-config", "PUT") => action(parse_body(req).map(VmmAction::PutMachineConfig)),
        ("/machine-config", "PATCH") => action(parse_body(req).map(VmmAction::PatchMachineConfig)),
        ("/machine-config", _) => method_not_allowed(req, "GET, PUT, PATCH"),
        ("/serial", "PUT") => action(parse_body(req).map(VmmAction::PutSerial)),
        ("/serial", _) => method_not_allowed(req, "PUT"),
        ("/vm/config", "GET") => Routed::Action(VmmAction::GetVmConfig),
        ("/vm/config", _) => method_not_allowed(req, "GET"),
        ("/actions", "PUT") => {
            action(parse_body::<InstanceActionInfo>(req).and_then(
                |a| match a.action_type.as_str() {
                    "InstanceStart" => Ok(VmmAction::StartInstance),
                    "FlushMetrics" => Ok(VmmAction::FlushMetrics),
                    "SendCtrlAltDel" => Ok(VmmAction::SendCtrlAltDel),
                    other => Err(Response::fault(
                        400,
                        format!(
                            "action_type {other:?} is not supported; \
                             supported: InstanceStart, SendCtrlAltDel, FlushMetrics"
                        ),
                    )),
                },
            ))
        }
        ("/actions", _) => method_not_allowed(req, "PUT"),
        ("/vm", "PATCH") => action(parse_body::<VmState>(req).and_then(
            |s| match s.state.as_str() {
                "Paused" => Ok(VmmAction::Pause),
                "Resumed" => Ok(VmmAction::Resume),
                other => Err(Response::fault(
                    400,
                    format!("state {other:?} is not one of \"Paused\", \"Resumed\""),
                )),
            },
        )),
        ("/vm", _) => method_not_allowed(req, "PATCH"),
        ("/metrics", "GET") => Routed::Reply(Response {
            content_type: "text/plain; version=0.0.4",
            ..Response::json(200, METRICS.prometheus())
        }),
        ("/metrics", "PUT") => action(parse_body(req).map(VmmAction::PutMetrics)),
        ("/metrics", _) => method_not_allowed(req, "GET, PUT"),
        ("/seccomp", "PUT") => {
            action(parse_body::<SeccompStage>(req).map(|s| VmmAction::SetSeccompStage(s.stage)))
        }
        ("/seccomp", _) => method_not_allowed(req, "PUT"),
        ("/logger", "PUT") => action(parse_body(req).map(VmmAction::PutLogger)),
        ("/logger", _) => method_not_allowed(req, "PUT"),
        ("/entropy", "PUT") => action(parse_body(req).map(VmmAction::PutEntropy)),
        ("/entropy", _) => method_not_allowed(req, "PUT"),
        // Firecracker reads only the first segment here: `/vsock/vsock0` (the old
        // vsock_id form) is the same resource.
        (p, "PUT") if p == "/vsock" || p.starts_with("/vsock/") => {
            action(parse_body(req).map(VmmAction::PutVsock))
        }
        (p, _) if p == "/vsock" || p.starts_with("/vsock/") => method_not_allowed(req, "PUT"),
        ("/mmds", "GET") => Routed::Action(VmmAction::GetMmds),
        ("/mmds", "PUT") => action(parse_json(req).map(VmmAction::PutMmds)),
        ("/mmds", "PATCH") => action(parse_json(req).map(VmmAction::PatchMmds)),
        ("/mmds", _) => method_not_allowed(req, "GET, PUT, PATCH"),
        ("/mmds/config", "PUT") => action(parse_body(req).map(VmmAction::PutMmdsConfig)),
        ("/mmds/config", _) => method_not_allowed(req, "PUT"),
        ("/cpu-config", "PUT") => action(parse_body(req).map(VmmAction::PutCpuConfig)),
        ("/cpu-config", _) => method_not_allowed(req, "PUT"),
        ("/balloon", "GET") => Routed::Action(VmmAction::GetBalloon),
        ("/balloon", "PUT") => action(parse_body(req).map(VmmAction::PutBalloon)),
        ("/balloon", "PATCH") => action(parse_body(req).map(VmmAction::PatchBalloon)),
        ("/balloon", _) => method_not_allowed(req, "GET, PUT, PATCH"),
        ("/balloon/statistics", "GET") => Routed::Action(VmmAction::GetBalloonStats),
        ("/balloon/statistics", "PATCH") => {
            action(parse_body(req).map(VmmAction::PatchBalloonStats))
        }
        ("/balloon/statistics", _) => method_not_allowed(req, "GET, PATCH"),
        ("/balloon/hinting/start", "PATCH") if req.body.is_empty() => Routed::Action(
            VmmAction::StartBalloonHinting(crate::vmm_config::HintingStart::default()),
        ),
        ("/balloon/hinting/start", "PATCH") => {
            action(parse_body(req).map(VmmAction::StartBalloonHinting))
        }
        ("/balloon/hinting/status", "GET") => Routed::Action(VmmAction::GetBalloonHinting),
        ("/balloon/hinting/stop", "PATCH") => Routed::Action(VmmAction::StopBalloonHinting),
        ("/balloon/hinting/start" | "/balloon/hinting/stop", _) => method_not_allowed(req, "PATCH"),
        ("/balloon/hinting/status", _) => method_not_allowed(req, "GET"),
        ("/hotplug/memory", "GET") => Routed::Action(VmmAction::GetMemoryHotplug),
        ("/hotplug/memory", "PUT") => action(parse_body(req).map(VmmAction::PutMemoryHotplug)),
        ("/hotplug/memory", "PATCH") => action(parse_body(req).map(VmmAction::PatchMemoryHotplug)),
        ("/hotplug/memory", _) => method_not_allowed(req, "GET, PUT, PATCH"),
        ("/hotplug/vcpus", "GET") => Routed::Action(VmmAction::GetVcpus),
        ("/hotplug/vcpus", _) => method_not_allowed(req, "GET"),
        ("/predictor", "GET") => Routed::Action(VmmAction::GetPredictor),
        ("/predictor", "PATCH") => action(parse_body(req).map(VmmAction::PatchPredictor)),
        ("/predictor", _) => method_not_allowed(req, "GET, PATCH"),
        ("/predictor/decisions", "GET") => {
            action(since(&req.query).map(|since| VmmAction::GetPredictorDecisions { since }))
        }
        ("/predictor/decisions", _) => method_not_allowed(req, "GET"),
        ("/snapshot/create", "PUT") => action(parse_body(req).map(VmmAction::CreateSnapshot)),
        ("/snapshot/create", _) => method_not_allowed(req, "PUT"),
        ("/snapshot/load", "PUT") => action(parse_body(req).map(VmmAction::LoadSnapshot)),
        ("/snapshot/load", _) => method_not_allowed(req, "PUT"),
        (path, method) if path.starts_with("/network-interfaces/") => {
            let id = &path["/network-interfaces/".len()..];
            match method {
                "PUT" => action(
                    parse_with_id(req, id, |n: &NetworkInterfaceConfig| &n.iface_id)
                        .map(VmmAction::PutNetworkInterface),
                ),
                "PATCH" => action(
                    parse_with_id(req, id, |n: &NetworkInterfaceUpdate| &n.iface_id)
                        .map(VmmAction::PatchNetworkInterface),
                ),
                _ => method_not_allowed(req, "PUT, PATCH"),
            }
        }
        (path, method) if path.starts_with("/pmem/") => {
            let id = &path["/pmem/".len()..];
            match method {
                "PUT" => {
                    action(parse_with_id(req, id, |p: &PmemConfig| &p.id).map(VmmAction::PutPmem))
                }
                "PATCH" => {
                    action(parse_with_id(req, id, |p: &PmemUpdate| &p.id).map(VmmAction::PatchPmem))
                }
                _ => method_not_allowed(req, "PUT, PATCH"),
            }
        }
        (path, method) if path.starts_with("/drives/") => {
            let id = &path["/drives/".len()..];
            match method {
                "PUT" => action(
                    parse_with_id(req, id, |d: &DriveConfig| &d.drive_id).map(VmmAction::PutDrive),
                ),
                "PATCH" => action(
                    parse_with_id(req, id, |d: &DriveUpdate| &d.drive_id)
                        .map(VmmAction::PatchDrive),
                ),
                _ => method_not_allowed(req, "PUT, PATCH"),
            }
        }
        (path, _) => Routed::Reply(Response::fault(
            400,
            format!("Invalid request method and/or path: {} {path}.", req.method),
        )),
    }
}

/// The HTTP form of the VMM's answer.
pub fn respond(result: Result<VmmData, ActionError>) -> Response {
    let json = |v: serde_json::Result<String>| match v {
        Ok(body) => Response::json(200, body),
        Err(e) => Response::fault(500, format!("cannot serialise the answer: {e}")),
    };
    match result {
        Ok(VmmData::Empty) => Response::no_content(),
        Ok(VmmData::InstanceInfo(info)) => json(serde_json::to_string(&info)),
        Ok(VmmData::MachineConfig(m)) => json(serde_json::to_string(&m)),
        Ok(VmmData::VmConfig(c)) => json(serde_json::to_string(&c)),
        Ok(VmmData::Balloon(b)) => json(serde_json::to_string(&b)),
        Ok(VmmData::BalloonStats(s)) => json(serde_json::to_string(&s)),
        Ok(VmmData::MemoryHotplug(m)) => json(serde_json::to_string(&m)),
        Ok(VmmData::Predictor(p)) => json(serde_json::to_string(&p)),
        Ok(VmmData::PredictorDecisions(d)) => json(serde_json::to_string(&d)),
        Ok(VmmData::Mmds(v)) => json(serde_json::to_string(&v)),
        Ok(VmmData::BalloonHinting(h)) => json(serde_json::to_string(&h)),
        Ok(VmmData::Vcpus(v)) => json(serde_json::to_string(&v)),
        // Firecracker's status for a data store over its limit.
        Err(e @ ActionError::MmdsStore(mmds::StoreError::TooLarge)) => Response::fault(413, e),
        Err(e) if e.is_conflict() => Response::fault(409, e),
        Err(e) => Response::fault(400, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn reply(r: Routed) -> Response {
        match r {
            Routed::Reply(resp) => resp,
            Routed::Action(a) => panic!("expected a reply, got {a:?}"),
        }
    }

    #[test]
    fn firecracker_paths_map_to_actions() {
        assert!(matches!(
            route(&req("GET", "/", "")),
            Routed::Action(VmmAction::GetInstanceInfo)
        ));
        assert!(matches!(
            route(&req("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#)),
            Routed::Action(VmmAction::PatchMachineConfig(u)) if u.vcpu_count == Some(2)
        ));
        assert!(matches!(
            route(&req(
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#
            )),
            Routed::Action(VmmAction::StartInstance)
        ));
        assert!(matches!(
            route(&req("PATCH", "/vm", r#"{"state": "Paused"}"#)),
            Routed::Action(VmmAction::Pause)
        ));
        let v = reply(route(&req("GET", "/version", "")));
        assert_eq!(v.status, 200);
        assert!(v.body.contains("firecracker_version"));
    }

    #[test]
    fn bad_requests_get_their_status_and_a_fault_message() {
        // Firecracker's 400 for unknown paths and for methods a path does not take.
        let r = reply(route(&req("GET", "/nope", "")));
        assert_eq!(r.status, 400);
        assert!(
            r.body.contains("Invalid request method and/or path"),
            "{}",
            r.body
        );
        let r = reply(route(&req("DELETE", "/machine-config", "")));
        assert_eq!(r.status, 400);
        assert!(r.body.contains("GET, PUT, PATCH"), "{}", r.body);
        let r = reply(route(&req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "x"}"#,
        )));
        assert_eq!(r.status, 400);
        assert!(r.body.contains("vcpu_count: invalid type"), "{}", r.body);
        let r = reply(route(&req("PUT", "/boot-source", "")));
        assert!(r.body.contains("needs a JSON body"));
        let r = reply(route(&req("PUT", "/boot-source", r#"{"kernel": "x"}"#)));
        assert!(r.body.contains("unknown field `kernel`"), "{}", r.body);
        let r = reply(route(&req(
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#,
        )));
        assert!(r.body.contains("not supported"));
        let r = reply(route(&req("PUT", "/balloon", "{}")));
        assert_eq!(r.status, 400);
        assert!(r.body.contains("missing field `amount_mib`"), "{}", r.body);
        let r = reply(route(&req("PUT", "/snapshot/create", "{}")));
        assert!(
            r.body.contains("missing field `snapshot_path`"),
            "{}",
            r.body
        );
        let r = reply(route(&req(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Disk", "backend_path": "m"}}"#,
        )));
        assert!(r.body.contains("mem_backend.backend_type"), "{}", r.body);
        let r = reply(route(&req("DELETE", "/hotplug/memory", "")));
        assert_eq!(r.status, 400);
        let r = reply(route(&req(
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size_mib": -1}"#,
        )));
        assert!(r.body.contains("requested_size_mib"), "{}", r.body);
        let r = reply(route(&req("PUT", "/vsock", r#"{"guest_cid": 3}"#)));
        assert_eq!(r.status, 400);
        assert!(r.body.contains("missing field `uds_path`"), "{}", r.body);
        let r = reply(route(&req("GET", "/vsock", "")));
        assert_eq!(r.status, 400);
        let body = r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": false}"#;
        let r = reply(route(&req("PUT", "/drives/rootfs", body)));
        assert!(r.body.contains("differ"), "{}", r.body);
        let r = reply(route(&req("PATCH", "/vm", r#"{"state": "Sleeping"}"#)));
        assert_eq!(r.status, 400);
    }

    #[test]
    fn predictor_paths_and_the_since_query() {
        assert!(matches!(
            route(&req("GET", "/predictor", "")),
            Routed::Action(VmmAction::GetPredictor)
        ));
        let mut r = req("GET", "/predictor/decisions", "");
        assert!(matches!(
            route(&r),
            Routed::Action(VmmAction::GetPredictorDecisions { since: 0 })
        ));
        r.query = "since=42".into();
        assert!(matches!(
            route(&r),
            Routed::Action(VmmAction::GetPredictorDecisions { since: 42 })
        ));
        r.query = "since=-1".into();
        assert!(reply(route(&r))
            .body
            .contains("since must be a whole number"));
        r.query = "from=3".into();
        assert!(reply(route(&r)).body.contains("unknown query parameter"));
        assert!(matches!(
            route(&req("PATCH", "/predictor", r#"{"enabled": false}"#)),
            Routed::Action(VmmAction::PatchPredictor(u)) if u.enabled == Some(false)
        ));
        let e = reply(route(&req("PATCH", "/predictor", r#"{"horizon": 3}"#)));
        assert!(e.body.contains("unknown field `horizon`"), "{}", e.body);
        assert_eq!(reply(route(&req("PUT", "/predictor", "{}"))).status, 400);
    }

    #[test]
    fn answers_become_json_or_204_and_errors_400() {
        assert_eq!(respond(Ok(VmmData::Empty)).status, 204);
        let r = respond(Err(ActionError::NotAllowedAfterBoot));
        assert_eq!(r.status, 400);
        assert!(r.body.contains("not supported after starting"));
    }
}
