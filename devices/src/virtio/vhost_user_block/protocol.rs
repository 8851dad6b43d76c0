//! The frontend side of the vhost-user protocol, the subset a block device needs (QEMU's
//! docs/interop/vhost-user.rst): features, protocol features, owner, configuration space, memory
//! table, one virtqueue.
//!
//! Written here rather than taken from the rust-vmm `vhost` crate (0.18, which does build with
//! this project's vm-memory and vmm-sys-util): its frontend retries a receive that fails with
//! EAGAIN forever, so a backend that stops answering, or sends half a reply, either blocks the
//! VMM thread for good (no socket timeout) or spins it at 100 % CPU (with one). Here every
//! exchange has a deadline, every reply is checked against the request it answers before its
//! body is read, and nothing a backend sends can make the VMM allocate more than a page.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Requests (the protocol's `VHOST_USER_*` front-end message numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Request {
    GetFeatures = 1,
    SetFeatures = 2,
    SetOwner = 3,
    SetMemTable = 5,
    SetVringNum = 8,
    SetVringAddr = 9,
    SetVringBase = 10,
    GetVringBase = 11,
    SetVringKick = 12,
    SetVringCall = 13,
    GetProtocolFeatures = 15,
    SetProtocolFeatures = 16,
    SetVringEnable = 18,
    GetConfig = 24,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Request::GetFeatures => "GET_FEATURES",
            Request::SetFeatures => "SET_FEATURES",
            Request::SetOwner => "SET_OWNER",
            Request::SetMemTable => "SET_MEM_TABLE",
            Request::SetVringNum => "SET_VRING_NUM",
            Request::SetVringAddr => "SET_VRING_ADDR",
            Request::SetVringBase => "SET_VRING_BASE",
            Request::GetVringBase => "GET_VRING_BASE",
            Request::SetVringKick => "SET_VRING_KICK",
            Request::SetVringCall => "SET_VRING_CALL",
            Request::GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
            Request::SetProtocolFeatures => "SET_PROTOCOL_FEATURES",
            Request::SetVringEnable => "SET_VRING_ENABLE",
            Request::GetConfig => "GET_CONFIG",
        };
        f.write_str(name)
    }
}

/// Protocol feature bits prescient uses.
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
pub const PROTOCOL_F_CONFIG: u64 = 1 << 9;

/// Header flags: protocol version 1, "this is a reply", "acknowledge this request".
const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER_LEN: usize = 12;
/// The largest reply body accepted: more than any reply prescient asks for.
pub const MAX_REPLY_BODY: u32 = 4096;
/// The most memory regions one SET_MEM_TABLE carries (the protocol's limit on attached fds).
pub const MAX_REGIONS: usize = 8;

/// Errors of one exchange with a backend.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{request}: cannot send: {source}")]
    Send {
        request: Request,
        source: std::io::Error,
    },
    #[error("{request}: no complete reply within {timeout:?}")]
    Timeout { request: Request, timeout: Duration },
    #[error("{request}: the backend closed the connection")]
    Closed { request: Request },
    #[error("{request}: cannot read the reply: {source}")]
    Receive {
        request: Request,
        source: std::io::Error,
    },
    #[error("{request}: the reply is for request {got} (flags {flags:#x})")]
    WrongReply {
        request: Request,
        got: u32,
        flags: u32,
    },
    #[error("{request}: the reply has {got} bytes, expected {expected}")]
    WrongSize {
        request: Request,
        got: u32,
        expected: u32,
    },
    #[error("{request}: the backend refused it (status {status})")]
    Refused { request: Request, status: u64 },
    #[error("GET_CONFIG: the reply is for {got_offset}+{got_size} bytes, asked {offset}+{size}")]
    ConfigShape {
        offset: u32,
        size: u32,
        got_offset: u32,
        got_size: u32,
    },
    #[error("SET_MEM_TABLE: {0} memory regions, the protocol carries at most {MAX_REGIONS}")]
    TooManyRegions(usize),
}

/// One guest memory region as the backend maps it: from `fd` at `mmap_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
    pub fd: RawFd,
}

/// Where a virtqueue's parts are, as addresses in the frontend's (prescient's) address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddresses {
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
}

/// A header check, apart so that it can be tested on its own: the reply to `request` must say
/// it is a reply to that request, in version 1, with a body of `expected` bytes.
pub fn check_reply_header(
    request: Request,
    header: &[u8; HEADER_LEN],
    expected: u32,
) -> Result<(), ProtocolError> {
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (got, flags, size) = (word(0), word(4), word(8));
    if got != request as u32 || flags & FLAG_REPLY == 0 || flags & VERSION_MASK != VERSION {
        return Err(ProtocolError::WrongReply {
            request,
            got,
            flags,
        });
    }
    if size != expected {
        return Err(ProtocolError::WrongSize {
            request,
            got: size,
            expected,
        });
    }
    Ok(())
}

/// A connection to a backend.
pub struct Frontend {
    sock: UnixStream,
    timeout: Duration,
    /// REPLY_ACK was negotiated: every request without a reply of its own is acknowledged.
    acks: bool,
}

impl Frontend {
    /// Speaks on `sock`; each exchange must finish within `timeout`.
    pub fn new(sock: UnixStream, timeout: Duration) -> Self {
        Self {
            sock,
            timeout,
            acks: false,
        }
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    fn send(&mut self, request: Request, body: &[u8], fds: &[RawFd]) -> Result<(), ProtocolError> {
        let mut flags = VERSION;
        if self.acks && !matches!(request, Request::GetVringBase | Request::GetConfig) {
            flags |= FLAG_NEED_REPLY;
        }
        let mut msg = Vec::with_capacity(HEADER_LEN + body.len());
        for w in [request as u32, flags, body.len() as u32] {
            msg.extend_from_slice(&w.to_le_bytes());
        }
        msg.extend_from_slice(body);
        let send_error = |source| ProtocolError::Send { request, source };
        self.sock
            .set_write_timeout(Some(self.timeout))
            .map_err(send_error)?;
        if fds.is_empty() {
            return self.sock.write_all(&msg).map_err(send_error);
        }
        // The descriptors travel with the first byte; a message this small goes in one piece.
        let sent = self
            .sock
            .send_with_fds(&[&msg[..]], fds)
            .map_err(|e| send_error(std::io::Error::from_raw_os_error(e.errno())))?;
        if sent != msg.len() {
            return Err(send_error(std::io::Error::new(
                ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", msg.len()),
            )));
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes before the deadline.
    fn read_by(
        &mut self,
        request: Request,
        deadline: Instant,
        buf: &mut [u8],
    ) -> Result<(), ProtocolError> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProtocolError::Timeout {
                    request,
                    timeout: self.timeout,
                });
            }
            self.sock
                .set_read_timeout(Some(left))
                .map_err(|source| ProtocolError::Receive { request, source })?;
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => return Err(ProtocolError::Closed { request }),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ProtocolError::Timeout {
                        request,
                        timeout: self.timeout,
                    })
                }
                Err(source) => return Err(ProtocolError::Receive { request, source }),
            }
        }
        Ok(())
    }

    /// The reply to `request`, whose body must be `len` bytes.
    fn reply(&mut self, request: Request, len: u32) -> Result<Vec<u8>, ProtocolError> {
        debug_assert!(len <= MAX_REPLY_BODY);
        let deadline = Instant::now() + self.timeout;
        let mut header = [0u8; HEADER_LEN];
        self.read_by(request, deadline, &mut header)?;
        check_reply_header(request, &header, len)?;
        let mut body = vec![0u8; len as usize];
        self.read_by(request, deadline, &mut body)?;
        Ok(body)
    }

    fn reply_u64(&mut self, request: Request) -> Result<u64, ProtocolError> {
        let b = self.reply(request, 8)?;
        Ok(u64::from_le_bytes(b[..8].try_into().unwrap_or_default()))
    }

    /// A request without a reply of its own (acknowledged when REPLY_ACK is on).
    fn set(&mut self, request: Request, body: &[u8], fds: &[RawFd]) -> Result<(), ProtocolError> {
        self.send(request, body, fds)?;
        if self.acks {
            let status = self.reply_u64(request)?;
            if status != 0 {
                return Err(ProtocolError::Refused { request, status });
            }
        }
        Ok(())
    }

    fn get_u64(&mut self, request: Request) -> Result<u64, ProtocolError> {
        self.send(request, &[], &[])?;
        self.reply_u64(request)
    }

    pub fn set_owner(&mut self) -> Result<(), ProtocolError> {
        self.set(Request::SetOwner, &[], &[])
    }

    pub fn get_features(&mut self) -> Result<u64, ProtocolError> {
        self.get_u64(Request::GetFeatures)
    }

    pub fn set_features(&mut self, features: u64) -> Result<(), ProtocolError> {
        self.set(Request::SetFeatures, &features.to_le_bytes(), &[])
    }

    pub fn get_protocol_features(&mut self) -> Result<u64, ProtocolError> {
        self.get_u64(Request::GetProtocolFeatures)
    }

    /// Acknowledges `features`; with REPLY_ACK among them, every later request is acknowledged.
    pub fn set_protocol_features(&mut self, features: u64) -> Result<(), ProtocolError> {
        self.set(Request::SetProtocolFeatures, &features.to_le_bytes(), &[])?;
        self.acks = features & PROTOCOL_F_REPLY_ACK != 0;
        Ok(())
    }

    /// `size` bytes of the configuration space from `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, ProtocolError> {
        let size = size.min(MAX_REPLY_BODY - 12);
        let mut body = Vec::with_capacity(12 + size as usize);
        for w in [offset, size, 0] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        body.resize(12 + size as usize, 0);
        self.send(Request::GetConfig, &body, &[])?;
        let reply = self.reply(Request::GetConfig, 12 + size)?;
        let word =
            |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        let (got_offset, got_size) = (word(0), word(4));
        if got_offset != offset || got_size != size {
            return Err(ProtocolError::ConfigShape {
                offset,
                size,
                got_offset,
                got_size,
            });
        }
        Ok(reply[12..].to_vec())
    }

    pub fn set_mem_table(&mut self, regions: &[MemoryRegion]) -> Result<(), ProtocolError> {
        if regions.len() > MAX_REGIONS {
            return Err(ProtocolError::TooManyRegions(regions.len()));
        }
        let mut body = Vec::with_capacity(8 + 32 * regions.len());
        body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            for w in [r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset] {
                body.extend_from_slice(&w.to_le_bytes());
            }
        }
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd).collect();
        self.set(Request::SetMemTable, &body, &fds)
    }

    fn vring_state(index: u32, num: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&index.to_le_bytes());
        b[4..].copy_from_slice(&num.to_le_bytes());
        b
    }

    pub fn set_vring_num(&mut self, index: u32, num: u16) -> Result<(), ProtocolError> {
        let b = Self::vring_state(index, u32::from(num));
        self.set(Request::SetVringNum, &b, &[])
    }

    pub fn set_vring_base(&mut self, index: u32, base: u16) -> Result<(), ProtocolError> {
        let b = Self::vring_state(index, u32::from(base));
        self.set(Request::SetVringBase, &b, &[])
    }

    /// Stops the ring; the backend answers with where it stopped.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32, ProtocolError> {
        let b = Self::vring_state(index, 0);
        self.send(Request::GetVringBase, &b, &[])?;
        let reply = self.reply(Request::GetVringBase, 8)?;
        Ok(u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]))
    }

    pub fn set_vring_addr(&mut self, index: u32, a: &VringAddresses) -> Result<(), ProtocolError> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(&index.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for w in [a.desc, a.used, a.avail, 0] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        self.set(Request::SetVringAddr, &b, &[])
    }

    pub fn set_vring_kick(&mut self, index: u32, fd: RawFd) -> Result<(), ProtocolError> {
        self.set(
            Request::SetVringKick,
            &u64::from(index).to_le_bytes(),
            &[fd],
        )
    }

    pub fn set_vring_call(&mut self, index: u32, fd: RawFd) -> Result<(), ProtocolError> {
        self.set(
            Request::SetVringCall,
            &u64::from(index).to_le_bytes(),
            &[fd],
        )
    }

    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), ProtocolError> {
        let b = Self::vring_state(index, u32::from(enable));
        self.set(Request::SetVringEnable, &b, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&request.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn reply_headers_must_answer_the_request_in_version_1() {
        let ok = header(1, VERSION | FLAG_REPLY, 8);
        assert!(check_reply_header(Request::GetFeatures, &ok, 8).is_ok());
        for (h, what) in [
            (header(2, VERSION | FLAG_REPLY, 8), "another request"),
            (header(1, VERSION, 8), "not a reply"),
            (header(1, 0x2 | FLAG_REPLY, 8), "version 2"),
        ] {
            let e = check_reply_header(Request::GetFeatures, &h, 8).unwrap_err();
            assert!(matches!(e, ProtocolError::WrongReply { .. }), "{what}: {e}");
        }
        let e = check_reply_header(Request::GetFeatures, &header(1, VERSION | FLAG_REPLY, 9), 8)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "GET_FEATURES: the reply has 9 bytes, expected 8"
        );
    }

    /// Every 12-byte header: checked without a panic, and accepted only when exactly right.
    #[test]
    fn arbitrary_headers_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut h = [0u8; HEADER_LEN];
            h[..8].copy_from_slice(&x.to_le_bytes());
            h[8..].copy_from_slice(&(x as u32 % 16).to_le_bytes());
            let ok = check_reply_header(Request::GetConfig, &h, 8).is_ok();
            assert_eq!(
                ok,
                h[..4] == [24, 0, 0, 0] && h[4] & 0x7 == 0x5 && h[8] == 8
            );
        }
    }

    #[test]
    fn messages_are_laid_out_as_the_protocol_says() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut f = Frontend::new(ours, Duration::from_secs(1));
        f.set_vring_addr(
            0,
            &VringAddresses {
                desc: 0x1000,
                used: 0x3000,
                avail: 0x2000,
            },
        )
        .unwrap();
        let mut m = [0u8; HEADER_LEN + 40];
        theirs.read_exact(&mut m).unwrap();
        assert_eq!(&m[..12], &header(9, VERSION, 40));
        assert_eq!(u64::from_le_bytes(m[20..28].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(m[28..36].try_into().unwrap()), 0x3000);
        assert_eq!(u64::from_le_bytes(m[36..44].try_into().unwrap()), 0x2000);
        // With REPLY_ACK each set asks for an acknowledgement, and a refusal is an error.
        f.acks = true;
        let t = std::thread::spawn(move || {
            let mut m = [0u8; HEADER_LEN + 8];
            theirs.read_exact(&mut m).unwrap();
            assert_eq!(&m[..12], &header(8, VERSION | FLAG_NEED_REPLY, 8));
            let mut r = header(8, VERSION | FLAG_REPLY, 8).to_vec();
            r.extend_from_slice(&5u64.to_le_bytes());
            theirs.write_all(&r).unwrap();
        });
        let e = f.set_vring_num(0, 256).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SET_VRING_NUM: the backend refused it (status 5)"
        );
        t.join().unwrap();
    }
}
