//! The client side of an API socket: one kept-alive HTTP/1.1 connection over a Unix socket. The
//! host supervisor drives its VMs' APIs with it and the integration tests drive the VMM's.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Errors of one request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot send the request: {0}")]
    Send(std::io::Error),
    #[error("cannot read the response: {0}")]
    Receive(std::io::Error),
    #[error("the server closed the connection before answering")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub body: String,
}

/// One connection; bytes read past a response wait in `buf` for the next one.
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to `socket`; each read waits at most `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(connect_err)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// From now on each read waits at most `timeout`.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Receive)
    }

    /// Sends raw bytes (a request written by hand, or a malformed one).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(ClientError::Send)
    }

    /// One request on the connection and its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<ClientResponse, ClientError> {
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send_raw(req.as_bytes())?;
        self.read_response()
    }

    fn fill(&mut self) -> Result<(), ClientError> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Receive(e)),
            }
        }
    }

    /// Reads the next response (a `100 Continue` is skipped).
    pub fn read_response(&mut self) -> Result<ClientResponse, ClientError> {
        loop {
            let (head_len, status, length) = loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let status = resp.code.unwrap_or(0);
                        let length = resp
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .map(|h| {
                                std::str::from_utf8(h.value)
                                    .ok()
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .ok_or_else(|| {
                                        ClientError::Malformed("bad Content-Length".into())
                                    })
                            })
                            .transpose()?
                            .unwrap_or(0);
                        break (n, status, length);
                    }
                    Ok(httparse::Status::Partial) => self.fill()?,
                    Err(e) => return Err(ClientError::Malformed(e.to_string())),
                }
            };
            while self.buf.len() < head_len + length {
                self.fill()?;
            }
            let body = self.buf[head_len..head_len + length].to_vec();
            self.buf.drain(..head_len + length);
            if status == 100 {
                continue;
            }
            let body = String::from_utf8(body)
                .map_err(|_| ClientError::Malformed("the body is not UTF-8".into()))?;
            return Ok(ClientResponse { status, body });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pipelined_responses_and_skips_continue() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut client = Client {
            stream: a,
            buf: Vec::new(),
        };
        b.write_all(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 204 No Content\r\n\r\n",
        )
        .unwrap();
        let r = client.read_response().unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        let r = client.read_response().unwrap();
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        drop(b);
        assert!(matches!(client.read_response(), Err(ClientError::Closed)));
    }
}
