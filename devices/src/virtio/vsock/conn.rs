//! One stream connection between a guest port and a host Unix socket.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmm_sys_util::epoll::EventSet;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Bytes of guest data the host side buffers per connection: the `buf_alloc` it advertises.
pub const CONN_BUF: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line a host client may send.
pub const MAX_CONNECT_LINE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host client accepted on `uds_path`; its `CONNECT <port>\n` line is being read.
    AwaitLine,
    /// OP_REQUEST sent to the guest, waiting for its OP_RESPONSE.
    Connecting,
    Established,
}

/// A connection. `local_port` is the host side's vsock port, `peer_port` the guest's.
pub struct Conn {
    pub stream: UnixStream,
    pub state: State,
    pub local_port: u32,
    pub peer_port: u32,
    pub line: Vec<u8>,
    /// The guest's receive buffer and how much of it it has consumed (its credit to us).
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    pub tx_cnt: u32,
    /// Guest bytes written to the host socket, and the value the guest last heard of.
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    /// Guest bytes not yet written to the host socket (at most `CONN_BUF`).
    pub to_host: VecDeque<u8>,
    /// The socket polled readable and has not returned WouldBlock since.
    pub readable: bool,
    /// The host client will send nothing more.
    pub host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    pub peer_shut: u32,
    pub host_write_shut: bool,
    /// A CREDIT_REQUEST is outstanding, a CREDIT_UPDATE is queued.
    pub credit_requested: bool,
    pub credit_update_queued: bool,
    /// The interest registered with the event loop (None: not registered).
    pub registered: Option<EventSet>,
}

/// What flushing the pending bytes toward the host found.
#[derive(Debug)]
pub enum Flush {
    Done,
    Blocked,
    Failed(std::io::Error),
}

impl Conn {
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            readable: false,
            host_eof: false,
            peer_shut: 0,
            host_write_shut: false,
            credit_requested: false,
            credit_update_queued: false,
            registered: None,
        }
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data can move toward the guest on this connection.
    pub fn wants_to_send(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// The epoll interest this connection needs now.
    pub fn interest(&self, rx_starved: bool) -> Option<EventSet> {
        let mut set = EventSet::empty();
        match self.state {
            State::AwaitLine => set |= EventSet::IN,
            // HUP/ERR still arrive, so a client that gives up is noticed.
            State::Connecting => return Some(set),
            State::Established => {
                if self.wants_to_send() && !rx_starved && !self.readable {
                    set |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    set |= EventSet::OUT;
                }
            }
        }
        (!set.is_empty()).then_some(set)
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no payload is read with it).
    /// Ok(Some(port)): complete; Ok(None): more to come; Err: close the client.
    pub fn read_connect_line(&mut self) -> Result<Option<u32>, String> {
        loop {
            let mut b = [0u8; 1];
            match self.stream.read(&mut b) {
                Ok(0) => return Err("closed before its CONNECT line".into()),
                Ok(_) if b[0] == b'\n' => return parse_connect(&self.line).map(Some),
                Ok(_) if self.line.len() < MAX_CONNECT_LINE => self.line.push(b[0]),
                Ok(_) => return Err("CONNECT line too long".into()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Writes pending guest bytes to the host socket; returns how many went out, and how it ended.
    pub fn flush_to_host(&mut self) -> (usize, Flush) {
        let mut sent = 0;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return (sent, Flush::Failed(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    sent += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return (sent, Flush::Blocked),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return (sent, Flush::Failed(e)),
            }
        }
        (sent, Flush::Done)
    }

    /// Both directions are finished: the guest sends nothing more and nothing more goes to it.
    pub fn finished(&self) -> bool {
        self.to_host.is_empty()
            && self.peer_shut & SHUTDOWN_SEND != 0
            && (self.peer_shut & SHUTDOWN_RCV != 0 || self.host_eof)
    }

    pub fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }
}

/// Parses `CONNECT <port>` (the line without its newline).
pub fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_string())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("expected \"CONNECT <port>\", got {text:?}"))
}

/// Connects a non-blocking stream socket to `path` without ever waiting (a full backlog is an
/// error, as is a path too long for `sun_path`).
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    let r = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
