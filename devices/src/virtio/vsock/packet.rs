//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and the checks every packet from the
//! guest goes through before it can touch a connection.

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HDR_LEN: usize = 44;
/// The host's CID, as every guest sees it.
pub const HOST_CID: u64 = 2;
/// The only socket type: stream.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// One packet header, host-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le_u64(&b[0..]),
            dst_cid: le_u64(&b[8..]),
            src_port: le_u32(&b[16..]),
            dst_port: le_u32(&b[20..]),
            len: le_u32(&b[24..]),
            kind: le_u16(&b[28..]),
            op: le_u16(&b[30..]),
            flags: le_u32(&b[32..]),
            buf_alloc: le_u32(&b[36..]),
            fwd_cnt: le_u32(&b[40..]),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// What to do with a packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Well formed: handle it.
    Accept,
    /// Addressed and sized correctly but of an unknown type or op: answer with RST.
    Reset,
    /// Malformed (addresses, lengths): drop it and count it.
    Drop(&'static str),
}

/// Checks a header from the guest whose chain holds `payload_avail` readable bytes after it.
pub fn check(h: &Header, guest_cid: u64, payload_avail: usize) -> Verdict {
    if h.src_cid != guest_cid {
        return Verdict::Drop("source CID is not the guest's");
    }
    if h.dst_cid != HOST_CID {
        return Verdict::Drop("destination CID is not the host");
    }
    let len = h.len as usize;
    if len > MAX_PKT_PAYLOAD {
        return Verdict::Drop("payload longer than 64 KiB");
    }
    if len > payload_avail {
        return Verdict::Drop("payload longer than the descriptor chain");
    }
    if h.kind != TYPE_STREAM || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op) {
        return Verdict::Reset;
    }
    if h.op != OP_RW && len != 0 {
        return Verdict::Drop("payload on a control packet");
    }
    Verdict::Accept
}
