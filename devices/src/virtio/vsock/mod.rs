//! virtio-vsock (device type 19) with Firecracker's host convention: the host end of every
//! connection is a Unix stream socket.
//!
//! * Host-initiated: the VMM listens on `uds_path`; a client connects and writes
//!   `CONNECT <port>\n`; the guest gets an OP_REQUEST to `<port>` from a host-side ephemeral port,
//!   and on its OP_RESPONSE the client reads `OK <host port>\n`. Then bytes flow both ways.
//! * Guest-initiated: an OP_REQUEST to host port P connects to `<uds_path>_<P>`; no listener
//!   there is an OP_RST.
//!
//! Flow control is the virtio credit scheme: at most the guest's `buf_alloc` minus what it has not
//! consumed goes to it, and the guest may have at most [`CONN_BUF`] bytes in flight toward a host
//! socket (a guest that overruns its credit gets an RST). Packets toward the guest wait in a
//! bounded control queue or, for data, in the host socket itself: a socket is polled only while
//! its data can move. Every packet from the guest is validated; unknown ops and types are answered
//! with an RST, malformed packets are dropped and counted. Nothing the guest or a host client does
//! can block the event loop: all sockets are non-blocking.

mod conn;
pub mod packet;
/// The packet buffer grows to the largest packet seen (at most [`MAX_PKT_PAYLOAD`]), not to the
/// largest possible: a guest with 4 KiB buffers keeps a 4 KiB one (the buffer stays resident for
/// the VM's life).
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

#[cfg(test)]
mod tests;

pub use conn::CONN_BUF;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, Reader, Writer};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    add_used, pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError,
    ActiveQueues, DeviceCounters, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};
use conn::{connect_nonblocking, Conn, Flush, State};
use packet::*;

pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// Connections (and host clients still sending their CONNECT line) at most.
pub const MAX_CONNS: usize = 1024;
/// Control packets waiting for guest buffers at most; the TX queue waits while this is reached.
const MAX_CONTROL: usize = 4096;
/// First host-side port for host-initiated connections.
const EPHEMERAL_BASE: u32 = 1 << 30;

/// Errors of creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved: it must be at least 3 and below 4294967295")]
    Cid(u64),
    #[error("{0} already exists: remove it or choose another uds_path")]
    Exists(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd for a vsock queue: {0}")]
    EventFd(std::io::Error),
}

/// A control packet toward the guest; its credit fields are filled in when it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ctl {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    config: [u8; 8],
    queue_events: [EventFd; 3],
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues<3>>,
    /// Connections by (host port, guest port).
    conns: BTreeMap<(u32, u32), Conn>,
    /// Host clients that have not finished their CONNECT line.
    handshakes: Vec<Conn>,
    /// Connections closed but still registered with the event loop.
    closed: Vec<Conn>,
    control: VecDeque<Ctl>,
    /// Something waits to go to the guest and it has posted no buffer.
    rx_starved: bool,
    /// TX processing stopped because the control queue is full.
    tx_stalled: bool,
    next_port: u32,
    buf: Vec<u8>,
}

/// Checks the CID before anything is created.
pub fn validate_cid(cid: u64) -> Result<(), VsockError> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::Cid(cid))
    }
}

impl Vsock {
    /// Listens on `uds_path` (which must not exist) for host-initiated connections.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        validate_cid(guest_cid)?;
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::Exists(uds_path.to_path_buf()));
        }
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            config: guest_cid.to_le_bytes(),
            queue_events: [evt()?, evt()?, evt()?],
            counters: Arc::default(),
            active: None,
            conns: BTreeMap::new(),
            handshakes: Vec::new(),
            closed: Vec::new(),
            control: VecDeque::new(),
            rx_starved: false,
            tx_stalled: false,
            next_port: EPHEMERAL_BASE,
            buf: Vec::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Connections open now (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn push_ctl(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
        self.control.push_back(Ctl {
            local_port,
            peer_port,
            op,
            flags,
        });
    }

    /// Closes a connection (its fd leaves the event loop at the next sync), optionally telling
    /// the guest with an RST.
    fn close(&mut self, key: (u32, u32), rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            self.closed.push(conn);
        }
        if rst {
            self.push_ctl(key.0, key.1, OP_RST, 0);
        }
    }

    fn header_for(&mut self, ctl: Ctl, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&(ctl.local_port, ctl.peer_port)) {
            Some(c) => {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                if ctl.op == OP_CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
                (CONN_BUF, c.fwd_cnt)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: ctl.local_port,
            dst_port: ctl.peer_port,
            len,
            kind: TYPE_STREAM,
            op: ctl.op,
            flags: ctl.flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// The next connection (after `after`, wrapping) whose host data can go to the guest.
    fn next_sender(&self, after: Option<(u32, u32)>) -> Option<(u32, u32)> {
        let ready = |(k, c): (&(u32, u32), &Conn)| (c.readable && c.wants_to_send()).then_some(*k);
        match after {
            Some(a) => self
                .conns
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .find_map(ready)
                .or_else(|| self.conns.range(..=a).find_map(ready)),
            None => self.conns.iter().find_map(ready),
        }
    }

    /// Fills the guest's receive buffers: control packets first, then host data.
    fn process_rx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let mut completed = false;
        let mut last = None;
        loop {
            let sender = if self.control.is_empty() {
                match self.next_sender(last) {
                    Some(k) => Some(k),
                    None => break,
                }
            } else {
                None
            };
            let q = &mut active.queues[RX];
            let Some(chain) = pop_chain(q, &active.mem, &self.counters) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let mut w = match Writer::new(&active.mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    if let Err(e) = add_used(q, &active.mem, &active.writes, head, 0) {
                        tracing::warn!("vsock: cannot return an RX buffer: {e}");
                    }
                    completed = true;
                    continue;
                }
            };
            let used = match sender {
                None => {
                    let Some(ctl) = self.control.pop_front() else {
                        q.go_to_previous_position();
                        break;
                    };
                    let hdr = self.header_for(ctl, 0);
                    match w.write_all(&hdr.to_bytes()) {
                        Ok(()) => HDR_LEN,
                        Err(_) => {
                            DeviceCounters::inc(&self.counters.invalid_requests, 1);
                            0
                        }
                    }
                }
                Some(key) => {
                    last = Some(key);
                    let room = w.available_bytes() - HDR_LEN;
                    let Some(conn) = self.conns.get_mut(&key) else {
                        q.go_to_previous_position();
                        continue;
                    };
                    let cap = room.min(conn.peer_credit() as usize).min(MAX_PKT_PAYLOAD);
                    if cap == 0 {
                        // A buffer with room for the header only: nothing to put in it.
                        DeviceCounters::inc(&self.counters.invalid_requests, 1);
                        if let Err(e) = add_used(q, &active.mem, &active.writes, head, 0) {
                            tracing::warn!("vsock: cannot return an RX buffer: {e}");
                        }
                        completed = true;
                        continue;
                    }
                    grow(&mut buf, cap);
                    match conn.stream.read(&mut buf[..cap]) {
                        Ok(0) => {
                            conn.host_eof = true;
                            conn.readable = false;
                            q.go_to_previous_position();
                            self.push_ctl(key.0, key.1, OP_SHUTDOWN, SHUTDOWN_SEND);
                            self.finish_if_done(key);
                            continue;
                        }
                        Ok(n) => {
                            conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                            let ctl = Ctl {
                                local_port: key.0,
                                peer_port: key.1,
                                op: OP_RW,
                                flags: 0,
                            };
                            let hdr = self.header_for(ctl, n as u32);
                            let written = w
                                .write_all(&hdr.to_bytes())
                                .and_then(|()| w.write_all(&buf[..n]));
                            match written {
                                Ok(()) => {
                                    DeviceCounters::inc(&self.counters.requests, 1);
                                    DeviceCounters::inc(&self.counters.bytes_to_guest, n as u64);
                                    HDR_LEN + n
                                }
                                Err(_) => {
                                    // The bytes are gone from the socket: the stream is broken.
                                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                                    self.close(key, true);
                                    0
                                }
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::Interrupted
                            ) =>
                        {
                            if e.kind() == ErrorKind::WouldBlock {
                                conn.readable = false;
                            }
                            q.go_to_previous_position();
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!("vsock: host socket read: {e}");
                            DeviceCounters::inc(&self.counters.io_errors, 1);
                            q.go_to_previous_position();
                            self.close(key, true);
                            continue;
                        }
                    }
                }
            };
            if let Err(e) = add_used(q, &active.mem, &active.writes, head, used as u32) {
                tracing::warn!("vsock: cannot return an RX buffer: {e}");
            }
            completed = true;
        }
        if completed {
            active.notify(RX);
        }
        self.buf = buf;
        self.active = Some(active);
    }

    /// Takes the guest's packets.
    fn process_tx(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let mut completed = false;
        self.tx_stalled = false;
        loop {
            if self.control.len() >= MAX_CONTROL {
                self.tx_stalled = true;
                break;
            }
            let q = &mut active.queues[TX];
            let Some(chain) = pop_chain(q, &active.mem, &self.counters) else {
                break;
            };
            let head = chain.head_index();
            match Reader::new(&active.mem, chain) {
                Ok(mut r) if r.available_bytes() >= HDR_LEN => {
                    let mut raw = [0u8; HDR_LEN];
                    let parsed = r.read_exact(&mut raw).map(|()| Header::from_bytes(&raw));
                    match parsed {
                        Ok(hdr) => {
                            let avail = r.available_bytes();
                            match check(&hdr, self.guest_cid, avail) {
                                Verdict::Drop(why) => {
                                    tracing::debug!("vsock: dropped a guest packet: {why}");
                                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                                }
                                Verdict::Reset => {
                                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                                    if hdr.op != OP_RST {
                                        self.close((hdr.dst_port, hdr.src_port), true);
                                    }
                                }
                                Verdict::Accept => {
                                    let len = hdr.len as usize;
                                    grow(&mut buf, len);
                                    match r.read_exact(&mut buf[..len]) {
                                        Ok(()) => self.handle(&hdr, &buf[..len]),
                                        Err(_) => {
                                            DeviceCounters::inc(&self.counters.invalid_requests, 1)
                                        }
                                    }
                                }
                            }
                        }
                        Err(_) => DeviceCounters::inc(&self.counters.invalid_requests, 1),
                    }
                }
                _ => DeviceCounters::inc(&self.counters.invalid_requests, 1),
            }
            let q = &mut active.queues[TX];
            if let Err(e) = add_used(q, &active.mem, &active.writes, head, 0) {
                tracing::warn!("vsock: cannot return a TX buffer: {e}");
            }
            completed = true;
        }
        if completed {
            active.notify(TX);
        }
        self.buf = buf;
        self.active = Some(active);
    }

    /// One valid packet from the guest.
    fn handle(&mut self, hdr: &Header, payload: &[u8]) {
        DeviceCounters::inc(&self.counters.requests, 1);
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_REQUEST {
            return self.guest_connect(hdr, key);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.push_ctl(key.0, key.1, OP_RST, 0);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        if conn.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        match hdr.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                let line = format!("OK {}\n", key.0);
                // The client has read nothing yet, so the empty socket buffer takes the line.
                match (&conn.stream).write(line.as_bytes()) {
                    Ok(n) if n == line.len() => conn.state = State::Established,
                    _ => {
                        DeviceCounters::inc(&self.counters.io_errors, 1);
                        self.close(key, true);
                    }
                }
            }
            OP_RW if conn.state == State::Established && conn.peer_shut & SHUTDOWN_SEND == 0 => {
                let pending = conn.to_host.len() + payload.len();
                if pending > CONN_BUF as usize {
                    tracing::debug!("vsock: guest port {} overran its credit", key.1);
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    return self.close(key, true);
                }
                conn.to_host.extend(payload);
                DeviceCounters::inc(&self.counters.bytes_from_guest, payload.len() as u64);
                self.flush(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.push_ctl(key.0, key.1, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_SHUTDOWN => {
                conn.peer_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.finish_if_done(key);
            }
            OP_RST => self.close(key, false),
            // RESPONSE when not connecting, RW when not established or after SHUTDOWN(SEND).
            _ => {
                DeviceCounters::inc(&self.counters.invalid_requests, 1);
                self.close(key, true);
            }
        }
    }

    /// A guest OP_REQUEST: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header, key: (u32, u32)) {
        if self.conns.contains_key(&key) {
            DeviceCounters::inc(&self.counters.invalid_requests, 1);
            return self.close(key, true);
        }
        if self.conns.len() + self.handshakes.len() >= MAX_CONNS {
            return self.push_ctl(key.0, key.1, OP_RST, 0);
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut conn = Conn::new(stream, State::Established, key.0, key.1);
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = hdr.fwd_cnt;
                self.conns.insert(key, conn);
                self.push_ctl(key.0, key.1, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.push_ctl(key.0, key.1, OP_RST, 0);
            }
        }
    }

    /// Writes what the guest sent toward the host socket.
    fn flush(&mut self, key: (u32, u32)) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let (_, result) = conn.flush_to_host();
        if let Flush::Failed(e) = result {
            tracing::debug!("vsock: host socket write: {e}");
            return self.close(key, true);
        }
        if conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent) >= CONN_BUF / 4
            && !conn.credit_update_queued
        {
            conn.credit_update_queued = true;
            self.push_ctl(key.0, key.1, OP_CREDIT_UPDATE, 0);
        }
        self.finish_if_done(key);
    }

    /// Half-closes the host socket after the guest's SHUTDOWN(SEND), and ends the connection
    /// with an RST once nothing more can flow either way.
    fn finish_if_done(&mut self, key: (u32, u32)) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.peer_shut & SHUTDOWN_SEND != 0 && conn.to_host.is_empty() && !conn.host_write_shut {
            conn.host_write_shut = true;
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        if conn.finished() {
            self.close(key, true);
        }
    }

    /// Accepts host clients on `uds_path`.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.handshakes.len() >= MAX_CONNS {
                        tracing::warn!("vsock: too many connections, refusing a host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: host client: {e}");
                        continue;
                    }
                    self.handshakes
                        .push(Conn::new(stream, State::AwaitLine, 0, 0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    DeviceCounters::inc(&self.counters.io_errors, 1);
                    return;
                }
            }
        }
    }

    fn free_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(EPHEMERAL_BASE);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// A host client sent (part of) its CONNECT line.
    fn on_handshake(&mut self, index: usize) {
        match self.handshakes[index].read_connect_line() {
            Ok(None) => {}
            Ok(Some(port)) => {
                let mut conn = self.handshakes.swap_remove(index);
                let local = self.free_port(port);
                conn.state = State::Connecting;
                conn.local_port = local;
                conn.peer_port = port;
                self.conns.insert((local, port), conn);
                self.push_ctl(local, port, OP_REQUEST, 0);
            }
            Err(why) => {
                tracing::debug!("vsock: host client: {why}");
                let conn = self.handshakes.swap_remove(index);
                self.closed.push(conn);
            }
        }
    }

    fn on_conn_event(&mut self, key: (u32, u32), events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let broken = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        match conn.state {
            // The client gave up before the guest answered.
            State::Connecting | State::AwaitLine if broken => self.close(key, true),
            State::Connecting | State::AwaitLine => {}
            State::Established => {
                if events.contains(EventSet::IN) || broken {
                    conn.readable = true;
                }
                if events.contains(EventSet::OUT) || broken {
                    self.flush(key);
                }
            }
        }
    }

    /// Asks the guest for credit when data waits on an exhausted window.
    fn request_credit(&mut self) {
        let mut asks = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            if c.state == State::Established
                && !c.host_eof
                && c.peer_credit() == 0
                && !c.credit_requested
            {
                c.credit_requested = true;
                asks.push(*k);
            }
        }
        for k in asks {
            self.push_ctl(k.0, k.1, OP_CREDIT_REQUEST, 0);
        }
    }

    /// Moves everything that can move, then polls exactly the sockets that can make progress.
    fn run(&mut self, ops: &mut EventOps) {
        for _ in 0..64 {
            self.request_credit();
            self.process_rx();
            if !self.tx_stalled || self.control.len() >= MAX_CONTROL {
                break;
            }
            self.process_tx();
        }
        self.sync_polling(ops);
    }

    fn sync_polling(&mut self, ops: &mut EventOps) {
        for conn in self.closed.drain(..) {
            if conn.registered.is_some() {
                if let Err(e) = ops.remove(Events::empty_raw(conn.fd())) {
                    tracing::warn!("vsock: cannot stop polling a socket: {e}");
                }
            }
        }
        let starved = self.rx_starved;
        for conn in self.handshakes.iter_mut().chain(self.conns.values_mut()) {
            let want = conn.interest(starved);
            if want == conn.registered {
                continue;
            }
            let fd = conn.fd();
            let result = match (conn.registered, want) {
                (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
                (Some(_), None) => ops.remove(Events::empty_raw(fd)),
                (Some(_), Some(set)) => ops.modify(Events::new_raw(fd, set)),
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => tracing::error!("vsock: cannot change socket polling: {e}"),
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueues::new(ctx)?);
        self.rx_starved = false;
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveQueues::states)
    }

    fn reset(&mut self) {
        // The guest's sockets are gone: connections it knew of close (their sockets leave the
        // event loop at its next event). Host clients still waiting for the guest keep waiting:
        // their OP_REQUEST goes to the next driver. The listener stays.
        self.active = None;
        self.control.clear();
        let conns = std::mem::take(&mut self.conns);
        for (key, conn) in conns {
            if conn.state == State::Connecting {
                self.conns.insert(key, conn);
                self.push_ctl(key.0, key.1, OP_REQUEST, 0);
            } else {
                self.closed.push(conn);
            }
        }
        self.rx_starved = false;
        self.tx_stalled = false;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

/// Nothing survives a snapshot but the configuration: as in Firecracker, saving closes every
/// connection and tells the driver with a TRANSPORT_RESET event, which the restored guest (and
/// the original one, when it resumes) finds in its event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub transport_reset_sent: bool,
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

impl Vsock {
    /// Closes every connection and queues a TRANSPORT_RESET event; false when the driver had
    /// posted no event buffer (it then finds its connections reset by RSTs as it uses them).
    fn transport_reset(&mut self) -> bool {
        let conns = std::mem::take(&mut self.conns);
        self.closed.extend(conns.into_values());
        self.control.clear();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = active.mem.clone();
        let Some(chain) = pop_chain(&mut active.queues[EVT], &mem, &self.counters) else {
            return false;
        };
        let head = chain.head_index();
        let written = chain
            .clone()
            .find(|d| d.is_write_only() && d.len() >= 4)
            .is_some_and(|d| {
                vm_memory::Bytes::write_obj(&mem, EVENT_TRANSPORT_RESET.to_le(), d.addr()).is_ok()
            });
        if let Err(e) = add_used(
            &mut active.queues[EVT],
            &mem,
            &active.writes,
            head,
            if written { 4 } else { 0 },
        ) {
            tracing::warn!("vsock: event queue: {e}");
            return false;
        }
        active.notify(EVT);
        written
    }
}

impl Persist for Vsock {
    type State = VsockState;

    fn save(&mut self) -> VsockState {
        VsockState {
            transport_reset_sent: self.transport_reset(),
        }
    }

    fn restore(&mut self, _state: VsockState) -> Result<(), PersistError> {
        Ok(())
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_events[RX].as_raw_fd(),
            self.queue_events[TX].as_raw_fd(),
            self.queue_events[EVT].as_raw_fd(),
            self.listener.as_raw_fd(),
        ];
        watch_fds(ops, "vsock", fds);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_events[RX].as_raw_fd() {
            let _ = self.queue_events[RX].read();
            self.rx_starved = false;
        } else if fd == self.queue_events[TX].as_raw_fd() {
            let _ = self.queue_events[TX].read();
            self.process_tx();
        } else if fd == self.queue_events[EVT].as_raw_fd() {
            // The driver posted event buffers; no event is ever sent.
            let _ = self.queue_events[EVT].read();
        } else if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if let Some(i) = self.handshakes.iter().position(|c| c.fd() == fd) {
            self.on_handshake(i);
        } else if let Some(key) = self
            .conns
            .iter()
            .find_map(|(k, c)| (c.fd() == fd).then_some(*k))
        {
            self.on_conn_event(key, events.event_set());
        } else if let Err(e) = ops.remove(Events::empty_raw(fd)) {
            tracing::debug!("vsock: stale fd {fd}: {e}");
        }
        self.run(ops);
    }
}
