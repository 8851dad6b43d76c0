//! The API socket: HTTP/1.1 over a Unix socket, Firecracker's paths.
//!
//! An accept thread hands each client to its own thread (at most [`MAX_CLIENTS`] at once). A
//! request that needs the VM goes to the VMM thread as an [`ActionRequest`] on a channel, with an
//! eventfd write to wake its event loop; the client thread blocks on the answer, so the VMM loop
//! itself never waits on a client.

pub mod client;
pub mod http;
pub mod routes;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::metrics::METRICS;
use crate::rpc::ActionRequest;
use crate::seccomp::{self, SeccompError, ThreadKind};
use http::{Connection, ReadError, Response};
use routes::{respond, route, Routed};

/// Clients served at once; more are answered 503 and closed.
pub const MAX_CLIENTS: usize = 64;
/// A client silent for this long is disconnected, so idle clients cannot pin threads.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {0} already exists; remove it or choose another path")]
    SocketExists(PathBuf),
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// The running server; dropping it removes the socket file.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the server hands actions to the VMM thread.
#[derive(Clone)]
struct VmmLink {
    requests: Sender<ActionRequest>,
    wake: Arc<EventFd>,
}

impl VmmLink {
    /// Runs `routed` to a response, asking the VMM thread if needed.
    fn answer(&self, routed: Routed) -> Response {
        let action = match routed {
            Routed::Reply(r) => return r,
            Routed::Action(a) => a,
        };
        let (reply, answer) = channel();
        let gone = || Response::fault(503, "the VMM is shutting down");
        if self.requests.send(ActionRequest { action, reply }).is_err() {
            return gone();
        }
        if let Err(e) = self.wake.write(1) {
            return Response::fault(500, format!("cannot wake the VMM thread: {e}"));
        }
        answer.recv().map(respond).unwrap_or_else(|_| gone())
    }
}

/// Binds `path` and serves it; actions arrive on the returned receiver, with `wake` written.
pub fn start(
    path: &Path,
) -> Result<(ApiServer, std::sync::mpsc::Receiver<ActionRequest>, EventFd), ApiError> {
    if path.exists() {
        return Err(ApiError::SocketExists(path.to_path_buf()));
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let server = ApiServer {
        path: path.to_path_buf(),
    };
    let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(ApiError::Thread)?;
    let (requests, receiver) = channel();
    let link = VmmLink {
        requests,
        wake: Arc::new(wake.try_clone().map_err(ApiError::Thread)?),
    };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || accept_loop(listener, link))
        .map_err(ApiError::Thread)?;
    Ok((server, receiver, wake))
}

/// Installs the API thread's seccomp filters, or reports why it could not; an API thread
/// without its filter must not serve.
fn filter_api_thread(step: fn(ThreadKind) -> Result<(), SeccompError>) -> bool {
    match step(ThreadKind::Api) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("API: {e}; closing the API");
            false
        }
    }
}

fn accept_loop(listener: UnixListener, link: VmmLink) {
    if !filter_api_thread(seccomp::install) {
        return;
    }
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        // New client threads start with the filters this thread has.
        if !filter_api_thread(seccomp::catch_up) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("API: accept failed: {e}");
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let mut conn = Connection::new(stream);
            let busy =
                Response::fault(503, format!("too many API clients (at most {MAX_CLIENTS})"));
            let _ = conn.write_response(&busy, false);
            continue;
        }
        let (link, clients) = (link.clone(), clients.clone());
        let filters = seccomp::installed();
        let spawned = std::thread::Builder::new()
            .name("api-client".into())
            .spawn(move || {
                seccomp::inherited(ThreadKind::Api, filters);
                serve_client(stream, &link);
                clients.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            tracing::warn!("API: cannot start a client thread: {e}");
        }
    }
}

/// Counts one answered request by its status class.
fn count(status: u16) {
    let api = &METRICS.api;
    api.requests.fetch_add(1, Ordering::Relaxed);
    match status {
        400..=499 => api.client_errors.fetch_add(1, Ordering::Relaxed),
        500..=599 => api.server_errors.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
}

fn serve_client(stream: UnixStream, link: &VmmLink) {
    if let Err(e) = stream.set_read_timeout(Some(IDLE_TIMEOUT)) {
        tracing::warn!("API: cannot set a client timeout: {e}");
        return;
    }
    serve_connection(stream, |routed| link.answer(routed));
}

/// Serves the requests of one client until it closes, errs or asks to close; `answer` turns a
/// routed request into its response. Generic over the stream so the fuzz targets drive it.
pub fn serve_connection<S: std::io::Read + std::io::Write>(
    stream: S,
    mut answer: impl FnMut(Routed) -> Response,
) {
    let mut conn = Connection::new(stream);
    loop {
        match conn.read_request() {
            Ok(req) => {
                if !filter_api_thread(seccomp::catch_up) {
                    return;
                }
                tracing::debug!("API: {} {}", req.method, req.path);
                let response = answer(route(&req));
                count(response.status);
                if conn.write_response(&response, req.keep_alive).is_err() || !req.keep_alive {
                    return;
                }
            }
            Err(e) => {
                if let Some(status) = e.status() {
                    count(status);
                    let _ = conn.write_response(&Response::fault(status, &e), false);
                } else if !matches!(e, ReadError::Closed) {
                    tracing::debug!("API: client dropped: {e}");
                }
                return;
            }
        }
    }
}
