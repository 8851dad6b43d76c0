//! The `mmds` step: what a guest does to read its metadata from a Firecracker-style MMDS at
//! 169.254.169.254, run as `guest-agent mmds <seconds>` so that its lines arrive like any
//! workload's output (`agent: [mmds] {json}`).
//!
//! It routes the MMDS address to eth0 (as Firecracker's documentation tells guests to), asks
//! for a V2 session token with `PUT /latest/api/token`, then fetches with busybox `wget`, with
//! the token and without it. busybox `wget` cannot send a PUT, so the token request is written
//! here over the guest kernel's own TCP socket; every request still goes through Linux's
//! network stack and the virtio-net driver. The step reports what it got and succeeds when
//! every request could be made: the host's test decides which answers are right for the
//! configured MMDS version.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::report::json_string;

const MMDS: &str = "169.254.169.254";
const DEV: &str = "eth0";
/// The session token's lifetime asked for.
const TTL_SECS: u32 = 60;
/// What the step fetches: the root listing and one leaf.
const PATHS: [&str; 2] = ["/", "/latest/meta-data/ami-id"];

/// Runs the step; the process's exit status.
pub fn run(secs: u64) -> i32 {
    let timeout = Duration::from_secs(secs.max(1));
    let route = Command::new("ip")
        .args(["route", "replace", MMDS, "dev", DEV])
        .status();
    match route {
        Ok(s) if s.success() => println!(
            "{{\"route\":{}}}",
            json_string(&format!("{MMDS} dev {DEV}"))
        ),
        other => {
            println!(
                "{{\"error\":{}}}",
                json_string(&format!("ip route replace {MMDS} dev {DEV}: {other:?}"))
            );
            return 1;
        }
    }
    let token = match put_token(timeout) {
        Ok((status, body)) => {
            println!(
                "{{\"request\":\"PUT /latest/api/token\",\"status\":{status},\"body\":{}}}",
                json_string(&body)
            );
            (status == 200).then_some(body)
        }
        Err(e) => {
            println!(
                "{{\"error\":{}}}",
                json_string(&format!("PUT /latest/api/token: {e}"))
            );
            return 1;
        }
    };
    let mut ok = true;
    for path in PATHS {
        if let Some(token) = &token {
            ok &= wget(path, Token::Valid(token), timeout);
        }
        ok &= wget(path, Token::None, timeout);
    }
    ok &= wget(PATHS[1], Token::Forged, timeout);
    i32::from(!ok)
}

/// `PUT /latest/api/token` with a TTL: the status code and the body.
fn put_token(timeout: Duration) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = format!("{MMDS}:80").parse().expect("a literal address");
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "PUT /latest/api/token HTTP/1.1\r\nHost: {MMDS}\r\n\
         X-metadata-token-ttl-seconds: {TTL_SECS}\r\nContent-Length: 0\r\n\r\n"
    )?;
    parse_response(&mut s)
}

/// Reads one HTTP/1.1 response with a `Content-Length` (as MMDS sends them).
fn parse_response(s: &mut impl Read) -> std::io::Result<(u16, String)> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad(format!("no status line in {head:?}")))?;
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            let body_start = end + 4;
            if buf.len() >= body_start + len {
                let body = String::from_utf8_lossy(&buf[body_start..body_start + len]);
                return Ok((status, body.into_owned()));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(bad(format!("the connection closed after {:?}", text)));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What a request carries in `X-metadata-token`.
#[derive(Clone, Copy)]
enum Token<'a> {
    /// The one `PUT /latest/api/token` returned.
    Valid(&'a str),
    None,
    /// One MMDS never handed out, of a real token's length.
    Forged,
}

impl Token<'_> {
    fn name(self) -> &'static str {
        match self {
            Token::Valid(_) => "valid",
            Token::None => "none",
            Token::Forged => "forged",
        }
    }
}

/// busybox `wget -O - http://<MMDS><path>`, with `token` in `X-metadata-token`, under
/// busybox `timeout` (this build's `wget -T` dereferences a null pointer); says what it got.
/// False when wget could not be run or did not exit by itself.
fn wget(path: &str, token: Token, timeout: Duration) -> bool {
    let mut cmd = Command::new("timeout");
    cmd.args([&timeout.as_secs().to_string(), "wget", "-q", "-O", "-"]);
    let forged = "0".repeat(48);
    let header = match token {
        Token::Valid(t) => Some(t),
        Token::Forged => Some(forged.as_str()),
        Token::None => None,
    };
    if let Some(t) = header {
        cmd.args(["--header", &format!("X-metadata-token: {t}")]);
    }
    cmd.arg(format!("http://{MMDS}{path}"));
    match cmd.output() {
        Ok(out) => {
            let code = out.status.code();
            println!(
                "{{\"request\":{},\"token\":\"{}\",\"exit_code\":{},\"stdout\":{},\"stderr\":{}}}",
                json_string(&format!("wget {path}")),
                token.name(),
                code.map_or("null".into(), |c| c.to_string()),
                json_string(&String::from_utf8_lossy(&out.stdout)),
                json_string(&String::from_utf8_lossy(&out.stderr)),
            );
            // 143: `timeout` ended it.
            code.is_some_and(|c| c != 143)
        }
        Err(e) => {
            println!(
                "{{\"error\":{}}}",
                json_string(&format!("cannot run wget: {e}"))
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_response_split_across_reads() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nabcde";
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(3).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        assert_eq!(
            parse_response(&mut Trickle(raw)).unwrap(),
            (200, "abcde".to_string())
        );
    }

    #[test]
    fn a_response_cut_short_is_an_error() {
        let raw: &[u8] = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 9\r\n\r\nNo";
        let err = parse_response(&mut &raw[..]).unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }
}
