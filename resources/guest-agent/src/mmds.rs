//! The `mmds` step: what a guest does to read its metadata from a Firecracker-style MMDS at
//! 169.254.169.254, run as `guest-agent mmds <seconds>` so that its lines arrive like any
//! workload's output (`agent: [mmds] {json}`).
//!
//! It routes the MMDS address to eth0 (as Firecracker's documentation tells guests to), asks
//! for a V2 session token with `curl -X PUT .../latest/api/token` (Debian's curl, from the
//! workloads: busybox `wget` cannot send a PUT), then fetches with busybox `wget`, with the
//! token and without it, as a user of Firecracker's MMDS would. The step reports what it got
//! and succeeds when every request could be made: the host's test decides which answers are
//! right for the configured MMDS version.

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

/// `curl -X PUT http://<MMDS>/latest/api/token` with a TTL: the status code and the body.
fn put_token(timeout: Duration) -> Result<(u16, String), String> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "PUT",
            "--max-time",
            &timeout.as_secs().to_string(),
        ])
        .args(["-H", &format!("X-metadata-token-ttl-seconds: {TTL_SECS}")])
        // The status on a line of its own after the body.
        .args(["-w", "\n%{http_code}", "-o", "-"])
        .arg(format!("http://{MMDS}/latest/api/token"))
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "curl exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    status_and_body(&stdout).ok_or_else(|| format!("curl printed no status: {stdout:?}"))
}

/// Splits curl's output (the body, a newline, `-w`'s status code) into the code and the body.
fn status_and_body(out: &str) -> Option<(u16, String)> {
    let (body, code) = out.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
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
    fn curls_output_is_split_into_status_and_body() {
        assert_eq!(
            status_and_body("AQAEAHRva2Vu\n200"),
            Some((200, "AQAEAHRva2Vu".to_string()))
        );
        assert_eq!(status_and_body("\n400"), Some((400, String::new())));
        assert_eq!(
            status_and_body("a\nb\n401"),
            Some((401, "a\nb".to_string()))
        );
        assert_eq!(status_and_body("no status"), None);
        assert_eq!(status_and_body("body\n"), None);
    }
}
