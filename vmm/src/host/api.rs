//! The host API: HTTP/1.1 on a Unix socket, served by the VMM's own HTTP layer. Client threads
//! parse and route, and answer each request with the function the supervisor gives (which
//! serves warm claims on the client thread and hands everything else to its loop).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::http::{Connection, ReadError, Request, Response};

/// A client silent for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of starting the host API.
#[derive(Debug, thiserror::Error)]
pub enum HostApiError {
    #[error("the host API socket {0} is in use by a running supervisor")]
    InUse(PathBuf),
    #[error("cannot bind the host API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the host API thread: {0}")]
    Thread(std::io::Error),
}

/// What a request asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRequest {
    ListVms,
    CreateVm(Vec<u8>),
    GetVm(String),
    StopVm(String),
    Pool,
    Decisions { since: u64 },
    Metrics,
    ListPools,
    PutPool(String, Vec<u8>),
    DeletePool(String),
}

/// What answers a routed request, read at the instant given (on the client's thread).
pub type Answer = dyn Fn(HostRequest, Instant) -> Response + Send + Sync;

fn not_allowed(allow: &str) -> Response {
    let mut r = Response::fault(405, format!("method not allowed here; use {allow}"));
    r.headers.push(format!("Allow: {allow}"));
    r
}

/// Routes a parsed request; paths the host does not serve are answered here.
pub fn route(req: &Request) -> Result<HostRequest, Response> {
    let method = req.method.as_str();
    match req.path.as_str() {
        "/vms" => match method {
            "GET" => Ok(HostRequest::ListVms),
            "POST" => Ok(HostRequest::CreateVm(req.body.clone())),
            _ => Err(not_allowed("GET, POST")),
        },
        "/pool" => match method {
            "GET" => Ok(HostRequest::Pool),
            _ => Err(not_allowed("GET")),
        },
        "/pool/decisions" => match method {
            "GET" => {
                let since = req
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("since="))
                    .map(|v| {
                        v.parse::<u64>().map_err(|_| {
                            Response::fault(400, format!("since={v}: not a window number"))
                        })
                    })
                    .transpose()?
                    .unwrap_or(0);
                Ok(HostRequest::Decisions { since })
            }
            _ => Err(not_allowed("GET")),
        },
        "/pools" => match method {
            "GET" => Ok(HostRequest::ListPools),
            _ => Err(not_allowed("GET")),
        },
        "/metrics" => match method {
            "GET" => Ok(HostRequest::Metrics),
            _ => Err(not_allowed("GET")),
        },
        path => {
            let tail = |prefix| {
                path.strip_prefix(prefix)
                    .filter(|t: &&str| !t.is_empty() && !t.contains('/'))
            };
            if let Some(id) = tail("/vms/") {
                match method {
                    "GET" => Ok(HostRequest::GetVm(id.to_string())),
                    "DELETE" => Ok(HostRequest::StopVm(id.to_string())),
                    _ => Err(not_allowed("GET, DELETE")),
                }
            } else if let Some(name) = tail("/pools/") {
                match method {
                    "PUT" => Ok(HostRequest::PutPool(name.to_string(), req.body.clone())),
                    "DELETE" => Ok(HostRequest::DeletePool(name.to_string())),
                    _ => Err(not_allowed("PUT, DELETE")),
                }
            } else {
                Err(Response::fault(
                    404,
                    format!(
                        "no such path {path}; the host serves /vms, /vms/ID, /pool, \
                         /pool/decisions, /pools, /pools/NAME, /metrics"
                    ),
                ))
            }
        }
    }
}

/// The bound socket; dropping it removes the file.
pub struct HostApi {
    path: PathBuf,
}

impl Drop for HostApi {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (taking over a socket no one serves any more, as a crashed supervisor leaves)
/// and serves it, each request answered by `answer`.
pub fn start(path: &Path, answer: Arc<Answer>) -> Result<HostApi, HostApiError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(HostApiError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| HostApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::Builder::new()
        .name("host-api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let answer = answer.clone();
                let spawned = std::thread::Builder::new()
                    .name("host-api-client".into())
                    .spawn(move || serve(stream, &*answer));
                if let Err(e) = spawned {
                    tracing::warn!("host API: cannot start a client thread: {e}");
                }
            }
        })
        .map_err(HostApiError::Thread)?;
    Ok(HostApi {
        path: path.to_path_buf(),
    })
}

fn serve(stream: UnixStream, answer: &Answer) {
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
        return;
    }
    let mut conn = Connection::new(stream);
    loop {
        let req = match conn.read_request() {
            Ok(r) => r,
            Err(e) => {
                if let Some(status) = e.status() {
                    let _ = conn.write_response(&Response::fault(status, &e), false);
                } else if !matches!(e, ReadError::Closed) {
                    tracing::debug!("host API: client dropped: {e}");
                }
                return;
            }
        };
        let received = Instant::now();
        let response = match route(&req) {
            Err(r) => r,
            Ok(request) => answer(request, received),
        };
        if conn.write_response(&response, req.keep_alive).is_err() || !req.keep_alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            body: b"{}".to_vec(),
            keep_alive: true,
        }
    }

    #[test]
    fn routes_each_path_and_refuses_the_rest_by_name() {
        assert_eq!(route(&req("GET", "/vms")), Ok(HostRequest::ListVms));
        assert_eq!(
            route(&req("POST", "/vms")),
            Ok(HostRequest::CreateVm(b"{}".to_vec()))
        );
        assert_eq!(
            route(&req("DELETE", "/vms/web-1")),
            Ok(HostRequest::StopVm("web-1".into()))
        );
        assert_eq!(
            route(&req("GET", "/pool/decisions?since=7")),
            Ok(HostRequest::Decisions { since: 7 })
        );
        assert_eq!(route(&req("GET", "/metrics")), Ok(HostRequest::Metrics));
        assert_eq!(
            route(&req("PUT", "/pools/fn")),
            Ok(HostRequest::PutPool("fn".into(), b"{}".to_vec()))
        );
        assert_eq!(route(&req("GET", "/pools")), Ok(HostRequest::ListPools));
        let status = |m, p| route(&req(m, p)).unwrap_err().status;
        assert_eq!(status("PUT", "/vms"), 405);
        assert_eq!(status("POST", "/vms/a"), 405);
        assert_eq!(status("GET", "/vms/a/b"), 404);
        assert_eq!(status("GET", "/machine-config"), 404);
        let e = route(&req("GET", "/pool/decisions?since=x")).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.contains("since=x"), "{}", e.body);
    }
}
