//! HTTP/1.1 requests and responses on a byte stream, with the limits an API socket needs: bounded
//! headers and bodies, keep-alive and pipelining, no chunked bodies.

use std::io::{ErrorKind, Read, Write};

/// Larger header blocks are refused (431) rather than buffered.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// Firecracker's default API payload limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 51_200;
/// The payload limit in force (`--http-api-max-payload-size`), set before the API starts.
static MAX_BODY_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_BODY_BYTES);

/// Sets the largest request body the API accepts.
pub fn set_max_body_bytes(limit: usize) {
    MAX_BODY_BYTES.store(limit, std::sync::atomic::Ordering::Relaxed);
}

pub fn max_body_bytes() -> usize {
    MAX_BODY_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Method, path and query of a request.
type RequestLine = (String, String, String);

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// What follows `?` in the target, without it; empty when there is none.
    pub query: String,
    pub body: Vec<u8>,
    /// False when the client asked to close after this request (or spoke HTTP/1.0).
    pub keep_alive: bool,
}

/// Why no request could be read; the ones with a status are answered before closing.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("connection timed out")]
    TimedOut,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request headers exceed {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    #[error("request body of {0} bytes exceeds the {1} byte limit")]
    BodyTooLarge(usize, usize),
    #[error("{0}")]
    Unsupported(String),
}

impl ReadError {
    /// The status to answer with, if the client is still there to read one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::TimedOut | ReadError::Io(_) => None,
            ReadError::Malformed(_) => Some(400),
            ReadError::HeadersTooLarge => Some(431),
            // Firecracker's HTTP layer answers 400 here.
            ReadError::BodyTooLarge(..) => Some(400),
            ReadError::Unsupported(_) => Some(501),
        }
    }
}

/// A response; bodies are JSON unless `content_type` says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
    /// Extra header lines (without CRLF), e.g. `Allow: GET`.
    pub headers: Vec<String>,
}

impl Response {
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            body,
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    pub fn no_content() -> Self {
        Self::json(204, String::new())
    }

    /// Firecracker's error body.
    pub fn fault(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(
            status,
            serde_json::json!({ "fault_message": message.to_string() }).to_string(),
        )
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A client connection: a stream plus the bytes read past the last request.
pub struct Connection<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes into the buffer; false at end of stream.
    fn fill(&mut self) -> Result<bool, ReadError> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ReadError::TimedOut)
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Reads the next request.
    pub fn read_request(&mut self) -> Result<Request, ReadError> {
        let (head_len, (method, path, query), content_length, keep_alive, expect_continue) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let parsed = Self::interpret(&req)?;
                    break (len, parsed.0, parsed.1, parsed.2, parsed.3);
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_HEADER_BYTES {
                        return Err(ReadError::HeadersTooLarge);
                    }
                }
                Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadersTooLarge),
                Err(e) => return Err(ReadError::Malformed(e.to_string())),
            }
            if !self.fill()? {
                return Err(if self.buf.is_empty() {
                    ReadError::Closed
                } else {
                    ReadError::Malformed("connection closed inside the request headers".into())
                });
            }
        };
        if head_len > MAX_HEADER_BYTES {
            return Err(ReadError::HeadersTooLarge);
        }
        if content_length > max_body_bytes() {
            return Err(ReadError::BodyTooLarge(content_length, max_body_bytes()));
        }
        if expect_continue && self.buf.len() < head_len + content_length {
            self.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(ReadError::Io)?;
        }
        while self.buf.len() < head_len + content_length {
            if !self.fill()? {
                return Err(ReadError::Closed);
            }
        }
        let body = self.buf[head_len..head_len + content_length].to_vec();
        self.buf.drain(..head_len + content_length);
        Ok(Request {
            method,
            path,
            query,
            body,
            keep_alive,
        })
    }

    /// Method, path, Content-Length, keep-alive and Expect: 100-continue of a parsed head.
    fn interpret(
        req: &httparse::Request<'_, '_>,
    ) -> Result<(RequestLine, usize, bool, bool), ReadError> {
        let method = req.method.unwrap_or_default().to_string();
        let target = req.path.unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let (path, query) = (path.to_string(), query.to_string());
        let mut keep_alive = req.version == Some(1);
        let mut content_length = 0usize;
        let mut expect_continue = false;
        let mut seen_length = false;
        for h in req.headers.iter() {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| ReadError::Malformed(format!("header {} is not UTF-8", h.name)))?
                .trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = value.parse::<usize>().map_err(|_| {
                    ReadError::Malformed(format!("invalid Content-Length {value:?}"))
                })?;
                if seen_length && n != content_length {
                    return Err(ReadError::Malformed(
                        "conflicting Content-Length headers".into(),
                    ));
                }
                seen_length = true;
                content_length = n;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(ReadError::Unsupported(format!(
                    "Transfer-Encoding {value} is not supported; send a Content-Length"
                )));
            } else if h.name.eq_ignore_ascii_case("connection") {
                if value.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            } else if h.name.eq_ignore_ascii_case("expect") {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            }
        }
        Ok((
            (method, path, query),
            content_length,
            keep_alive,
            expect_continue,
        ))
    }

    fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes `response`, announcing the close when `keep_alive` is false.
    pub fn write_response(&mut self, response: &Response, keep_alive: bool) -> std::io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: prescient\r\n",
            response.status,
            reason(response.status)
        );
        if response.status != 204 {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                response.content_type,
                response.body.len()
            ));
        }
        for h in &response.headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        if !keep_alive {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&response.body);
        self.write_raw(out.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that yields `input` in chunks of `step` bytes and records what is written.
    struct Scripted {
        input: Cursor<Vec<u8>>,
        step: usize,
        written: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step);
            self.input.read(&mut buf[..n])
        }
    }
    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn conn(input: &[u8], step: usize) -> Connection<Scripted> {
        Connection::new(Scripted {
            input: Cursor::new(input.to_vec()),
            step,
            written: Vec::new(),
        })
    }

    #[test]
    fn parses_pipelined_requests_split_across_reads() {
        let raw = b"PUT /machine-config?x=1 HTTP/1.1\r\nContent-Length: 4\r\n\r\n{\"a\"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut c = conn(raw, 3);
        let r = c.read_request().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("PUT", "/machine-config")
        );
        assert_eq!(r.body, b"{\"a\"");
        assert!(r.keep_alive);
        let r = c.read_request().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.keep_alive),
            ("GET", "/", false)
        );
        assert!(matches!(c.read_request(), Err(ReadError::Closed)));
    }

    #[test]
    fn each_bad_request_maps_to_its_status() {
        let cases: [(&[u8], Option<u16>); 7] = [
            (b"GARBAGE\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", Some(400)),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
                Some(400),
            ),
            (
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Some(501),
            ),
            (b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", None), // truncated body
            (b"GET / HTTP/1.1\r\nHost: x", Some(400)),                 // truncated head
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                Some(400),
            ),
        ];
        for (raw, status) in cases {
            let e = conn(raw, 64).read_request().unwrap_err();
            assert_eq!(
                e.status(),
                status,
                "{:?}: {e}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(vec![b'a'; MAX_HEADER_BYTES + 10]);
        assert_eq!(
            conn(&huge, 4096).read_request().unwrap_err().status(),
            Some(431)
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(
            conn(&many, 4096).read_request().unwrap_err().status(),
            Some(431)
        );
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let raw = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        let mut c = conn(raw, 1024);
        // The body never comes: the client gets its 100 and then the connection ends.
        assert!(matches!(c.read_request(), Err(ReadError::Closed)));
        assert!(c
            .stream
            .written
            .starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    }

    #[test]
    fn responses_carry_length_type_and_close() {
        let mut c = conn(b"", 1);
        c.write_response(&Response::fault(400, "bad"), false)
            .unwrap();
        let text = String::from_utf8(c.stream.written.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("Content-Length: 23\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"bad\"}"));
        let mut c = conn(b"", 1);
        c.write_response(&Response::no_content(), true).unwrap();
        let text = String::from_utf8(c.stream.written.clone()).unwrap();
        assert_eq!(text, "HTTP/1.1 204 No Content\r\nServer: prescient\r\n\r\n");
    }
}
