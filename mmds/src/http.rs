//! The guest's side of the metadata service: HTTP/1.1 requests from the guest, answered from the
//! data store with Firecracker's status codes and texts.

use crate::data_store::{Mmds, MmdsVersion, OutputFormat, StoreError};
use crate::token::TOKEN_PATH;

/// Headers and body of one request, at most; a longer request is answered 413 and the
/// connection closed (real clients send a few hundred bytes).
pub const MAX_REQUEST_LEN: usize = 8 << 10;
const MAX_HEADERS: usize = 32;

const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];

/// One answer to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub json: bool,
    pub body: String,
    /// Extra headers (`Allow`, the token's TTL).
    pub headers: Vec<(String, String)>,
    /// The connection ends after this reply.
    pub close: bool,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            json: false,
            body: body.into(),
            headers: Vec::new(),
            close: false,
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// The reply as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            501 => "Not Implemented",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nServer: Firecracker API\r\nConnection: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            if self.close { "close" } else { "keep-alive" },
            if self.json { "application/json" } else { "text/plain" },
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet (and within the limit).
    Incomplete,
    /// A request of `len` bytes and its answer.
    Complete { len: usize, reply: Reply },
}

fn header<'a>(req: &'a httparse::Request, names: &[&str]) -> Option<(&'a str, &'a str)> {
    req.headers.iter().find_map(|h| {
        names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(h.name))
            .map(|_| (h.name, std::str::from_utf8(h.value).unwrap_or("").trim()))
    })
}

/// The path of an origin-form or absolute-form target, without its query, with runs of `/`
/// made one (as Firecracker does).
fn path_of(target: &str) -> Option<String> {
    let target = match target.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/')?..],
        None => target,
    };
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    Some(out)
}

/// Parses the request at the start of `buf` and answers it.
pub fn handle(mmds: &mut Mmds, buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_LEN => return Parsed::Incomplete,
        Ok(httparse::Status::Partial) => {
            return Parsed::Complete {
                len: buf.len(),
                reply: Reply::text(413, "Request too large.").closing(),
            }
        }
        // Firecracker's answer to a request its parser cannot read.
        Err(_) => {
            return Parsed::Complete {
                len: buf.len(),
                reply: Reply::text(400, "Invalid request.").closing(),
            };
        }
    };
    let body_len = match header(&req, &["Content-Length"]) {
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) => n,
            Err(_) => {
                return Parsed::Complete {
                    len: buf.len(),
                    reply: Reply::text(400, "Invalid value. Key:Content-Length; Value:").closing(),
                }
            }
        },
        None => 0,
    };
    if head_len + body_len > MAX_REQUEST_LEN {
        return Parsed::Complete {
            len: buf.len(),
            reply: Reply::text(413, "Request too large.").closing(),
        };
    }
    if buf.len() < head_len + body_len {
        return Parsed::Incomplete;
    }
    let len = head_len + body_len;
    let close = req.version == Some(0)
        || header(&req, &["Connection"]).is_some_and(|(_, v)| v.eq_ignore_ascii_case("close"));
    let mut reply = answer(mmds, &req);
    reply.close |= close;
    Parsed::Complete { len, reply }
}

fn answer(mmds: &mut Mmds, req: &httparse::Request) -> Reply {
    let Some(path) = req.path.and_then(path_of) else {
        return Reply::text(400, "Invalid URI.");
    };
    match req.method.unwrap_or("") {
        "GET" => get(mmds, req, &path),
        "PUT" => put(mmds, req, &path),
        // Firecracker's HTTP parser knows GET, PUT and PATCH only: any other method is 501.
        "PATCH" => {
            let mut r = Reply::text(405, "Not allowed HTTP method.");
            r.headers.push(("Allow".into(), "GET, PUT".into()));
            r
        }
        _ => Reply::text(501, "Unsupported HTTP method."),
    }
}

fn get(mmds: &Mmds, req: &httparse::Request, path: &str) -> Reply {
    let token = header(req, &TOKEN_HEADERS).map(|(_, v)| v);
    if mmds.version() == MmdsVersion::V2 {
        match token {
            None => return Reply::text(401, "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token."),
            Some(t) if !mmds.token_is_valid(t) => return Reply::text(401, "MMDS token not valid."),
            Some(_) => {}
        }
    }
    let json =
        header(req, &["Accept"]).is_some_and(|(_, v)| v.eq_ignore_ascii_case("application/json"));
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match mmds.get(path, format) {
        Ok(body) => Reply {
            json: json && !mmds.imds_compat(),
            ..Reply::text(200, body)
        },
        Err(StoreError::NotFound) => Reply::text(404, format!("Resource not found: {path}.")),
        Err(e @ StoreError::UnsupportedValueType) => Reply::text(501, e.to_string()),
        Err(e @ StoreError::TooLarge) => Reply::text(413, e.to_string()),
        Err(e) => Reply::text(400, e.to_string()),
    }
}

fn put(mmds: &mut Mmds, req: &httparse::Request, path: &str) -> Reply {
    if let Some((name, _)) = header(req, &["X-Forwarded-For"]) {
        return Reply::text(
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {name}"),
        );
    }
    if path != TOKEN_PATH {
        return Reply::text(404, format!("Resource not found: {path}."));
    }
    let Some((name, value)) = header(req, &TTL_HEADERS) else {
        return Reply::text(400, "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.");
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Reply::text(400, format!("Invalid value. Key:{name}; Value:{value}"));
    };
    match mmds.issue_token(ttl) {
        Ok(token) => {
            let mut r = Reply::text(200, token);
            r.headers.push((name.to_string(), ttl.to_string()));
            r
        }
        Err(e) => Reply::text(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mmds(version: MmdsVersion) -> Mmds {
        let mut m = Mmds::default();
        m.set_version(version);
        m.put(json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}))
            .unwrap();
        m
    }

    fn reply(m: &mut Mmds, req: &str) -> Reply {
        match handle(m, req.as_bytes()) {
            Parsed::Complete { len, reply } => {
                assert!(len <= req.len());
                reply
            }
            Parsed::Incomplete => panic!("incomplete: {req:?}"),
        }
    }

    #[test]
    fn v1_answers_without_a_token_in_both_formats() {
        let mut m = mmds(MmdsVersion::V1);
        let r = reply(&mut m, "GET /latest/meta-data/ HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.body.as_str()), (200, "ami-id"));
        let r = reply(
            &mut m,
            "GET //latest//meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(
            (r.status, r.body.as_str(), r.json),
            (200, "\"ami-id\"".replace("ami-id", "ami-1").as_str(), true)
        );
        let r = reply(
            &mut m,
            "GET http://169.254.169.254/latest/meta-data/ami-id?x=1 HTTP/1.1\r\n\r\n",
        );
        assert_eq!((r.status, r.body.as_str()), (200, "ami-1"));
        let r = reply(&mut m, "GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "Resource not found: /nope.")
        );
    }

    #[test]
    fn v2_needs_a_valid_token() {
        let mut m = mmds(MmdsVersion::V2);
        let r = reply(&mut m, "GET /latest HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 401);
        assert!(r.body.starts_with("No MMDS token provided"));
        let r = reply(
            &mut m,
            "GET /latest HTTP/1.1\r\nX-metadata-token: abc\r\n\r\n",
        );
        assert_eq!((r.status, r.body.as_str()), (401, "MMDS token not valid."));
        let r = reply(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers,
            vec![("X-metadata-token-ttl-seconds".to_string(), "60".to_string())]
        );
        let token = r.body;
        let r = reply(
            &mut m,
            &format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"),
        );
        assert_eq!((r.status, r.body.as_str()), (200, "ami-1"));
    }

    #[test]
    fn token_requests_are_checked() {
        let mut m = mmds(MmdsVersion::V2);
        let cases = [
            ("PUT /latest/api/token HTTP/1.1\r\n\r\n", 400, "Token time to live value not found"),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n", 400, "Invalid time to live value provided for token: 0."),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n", 400, "Invalid time to live"),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: -3\r\n\r\n", 400, "Invalid value. Key:X-metadata-token-ttl-seconds; Value:-3"),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", 400, "Invalid header. Reason: Unsupported header name"),
            ("PUT /latest/meta-data HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n", 404, "Resource not found: /latest/meta-data."),
            ("PATCH /latest HTTP/1.1\r\n\r\n", 405, "Not allowed HTTP method."),
            ("DELETE /latest HTTP/1.1\r\n\r\n", 501, "Unsupported HTTP method."),
            ("GET latest HTTP/1.1\r\n\r\n", 400, "Invalid URI."),
        ];
        for (req, status, text) in cases {
            let r = reply(&mut m, req);
            assert_eq!(r.status, status, "{req:?}: {r:?}");
            assert!(r.body.starts_with(text), "{req:?}: {r:?}");
        }
    }

    #[test]
    fn partial_oversized_and_broken_requests() {
        let mut m = mmds(MmdsVersion::V1);
        assert_eq!(
            handle(&mut m, b"GET /latest HTTP/1.1\r\n"),
            Parsed::Incomplete
        );
        assert_eq!(
            handle(
                &mut m,
                b"GET /latest HTTP/1.1\r\nContent-Length: 4\r\n\r\nab"
            ),
            Parsed::Incomplete
        );
        let big = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LEN));
        let r = reply(&mut m, &big);
        assert_eq!((r.status, r.close), (413, true));
        let r = reply(&mut m, "GET / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n");
        assert_eq!((r.status, r.close), (413, true));
        let r = reply(&mut m, "\x01\x02 garbage\r\n\r\n");
        assert_eq!((r.status, r.close), (400, true));
        // Two pipelined requests: the first is answered, its length reported.
        let two = "GET /latest HTTP/1.1\r\n\r\nGET /latest HTTP/1.0\r\n\r\n";
        match handle(&mut m, two.as_bytes()) {
            Parsed::Complete { len, reply } => {
                assert_eq!(len, two.len() / 2);
                assert!(!reply.close);
                match handle(&mut m, &two.as_bytes()[len..]) {
                    Parsed::Complete { reply, .. } => assert!(reply.close, "HTTP/1.0 closes"),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replies_are_http() {
        let mut r = Reply::text(405, "no");
        r.headers.push(("Allow".into(), "GET, PUT".into()));
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Allow: GET, PUT\r\n"));
        assert!(text.ends_with("\r\n\r\nno"));
    }
}
