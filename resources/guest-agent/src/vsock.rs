//! The agent's lines over vsock, for hosts that follow the guest without its serial console.
//!
//! With `prescient.agent.vsock_port=P` on the kernel command line the agent connects to the host
//! (CID 2) on port P. Under prescient and Firecracker that connection reaches the Unix socket
//! `<uds_path>_<P>` on the host, where a listener reads the same `agent: ...` lines the console
//! shows, one per line, and may write requests back (the same lines the console takes). The link
//! is best effort: while it is down (no listener yet, or the host closed it) lines go to the
//! console only, and the reporter reconnects on its next tick.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// The host's context id (VMADDR_CID_HOST).
const HOST_CID: u32 = 2;

/// `prescient.agent.vsock_port=` of the kernel command line: a port in 1..=u32::MAX-1.
pub fn port_from_cmdline(cmdline: &str) -> Result<Option<u32>, String> {
    let Some(v) = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("prescient.agent.vsock_port="))
    else {
        return Ok(None);
    };
    match v.parse::<u32>() {
        Ok(p) if p != 0 && p != u32::MAX => Ok(Some(p)),
        _ => Err(format!(
            "prescient.agent.vsock_port must be a port number between 1 and 4294967294, got {v:?}"
        )),
    }
}

/// A connection to the host that is re-made when it breaks.
pub struct Link {
    port: u32,
    socket: Mutex<Option<OwnedFd>>,
}

impl Link {
    pub fn new(port: u32) -> Self {
        Self {
            port,
            socket: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        self.socket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects if not connected: a new connection's read side (the host's requests), or why
    /// the host is not reachable now.
    pub fn ensure_connected(&self) -> io::Result<Option<std::fs::File>> {
        let mut socket = self.lock();
        if socket.is_some() {
            return Ok(None);
        }
        let fd = connect(self.port)?;
        let reader = std::fs::File::from(fd.try_clone()?);
        *socket = Some(fd);
        Ok(Some(reader))
    }

    /// Sends one line; a failed send closes the link until the next `ensure_connected`.
    pub fn send_line(&self, line: &str) {
        let mut socket = self.lock();
        let Some(fd) = socket.as_ref() else { return };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if send_all(fd, &bytes).is_err() {
            *socket = None;
        }
    }
}

/// A blocking connect: the VMM answers at once (a response, or a reset when nothing listens on
/// the host side); the kernel's 2 s vsock connect timeout bounds a VMM that does not.
fn connect(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = HOST_CID;
    addr.svm_port = port;
    // SAFETY: connect with a pointer to a sockaddr_vm of the length passed.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn send_all(fd: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: send(2) from a live slice of the length passed; MSG_NOSIGNAL: a closed peer is
        // an error, not a SIGPIPE.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_from_the_command_line() {
        assert_eq!(port_from_cmdline("console=ttyS0"), Ok(None));
        assert_eq!(
            port_from_cmdline("a prescient.agent.vsock_port=52 b"),
            Ok(Some(52))
        );
        for bad in ["0", "4294967295", "x", "-1", ""] {
            let err = port_from_cmdline(&format!("prescient.agent.vsock_port={bad}")).unwrap_err();
            assert!(err.contains("vsock_port"), "{err}");
        }
    }

    #[test]
    fn a_link_that_never_connected_drops_lines_quietly() {
        let link = Link::new(52);
        link.send_line("agent: ready");
        assert!(link.lock().is_none());
    }
}
