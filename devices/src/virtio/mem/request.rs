//! virtio-mem's wire format: the 24-byte request and the 10-byte response (virtio 1.2, 5.15.6).

/// Request types.
const PLUG: u16 = 0;
const UNPLUG: u16 = 1;
const UNPLUG_ALL: u16 = 2;
const STATE: u16 = 3;
/// Response types.
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;

pub const REQUEST_SIZE: usize = 24;
pub const RESPONSE_SIZE: usize = 10;

/// A run of `nb_blocks` device blocks from guest address `addr`, as the guest gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub addr: u64,
    pub nb_blocks: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemRequest {
    Plug(BlockRange),
    Unplug(BlockRange),
    UnplugAll,
    State(BlockRange),
    Unknown(u16),
}

impl MemRequest {
    /// The wire form (tests and fuzzing build requests with it).
    pub fn encode(self) -> [u8; REQUEST_SIZE] {
        let (kind, range) = match self {
            MemRequest::Plug(r) => (PLUG, r),
            MemRequest::Unplug(r) => (UNPLUG, r),
            MemRequest::UnplugAll => (
                UNPLUG_ALL,
                BlockRange {
                    addr: 0,
                    nb_blocks: 0,
                },
            ),
            MemRequest::State(r) => (STATE, r),
            MemRequest::Unknown(k) => (
                k,
                BlockRange {
                    addr: 0,
                    nb_blocks: 0,
                },
            ),
        };
        let mut b = [0u8; REQUEST_SIZE];
        b[..2].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&range.addr.to_le_bytes());
        b[16..18].copy_from_slice(&range.nb_blocks.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8; REQUEST_SIZE]) -> MemRequest {
        let kind = u16::from_le_bytes([b[0], b[1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[8..16]);
        let range = BlockRange {
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        };
        match kind {
            PLUG => MemRequest::Plug(range),
            UNPLUG => MemRequest::Unplug(range),
            UNPLUG_ALL => MemRequest::UnplugAll,
            STATE => MemRequest::State(range),
            other => MemRequest::Unknown(other),
        }
    }
}

/// A range's state, in a STATE answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Plugged = 0,
    Unplugged = 1,
    Mixed = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemResponse {
    Ack,
    /// Allowed in principle, refused now (plugging past the requested size).
    Nack,
    /// A request the device can never serve: out of range, misaligned, wrong block states.
    Error,
    State(BlockState),
}

impl MemResponse {
    pub fn encode(self) -> [u8; RESPONSE_SIZE] {
        let (kind, state) = match self {
            MemResponse::Ack => (RESP_ACK, 0),
            MemResponse::Nack => (RESP_NACK, 0),
            MemResponse::Error => (RESP_ERROR, 0),
            MemResponse::State(s) => (RESP_ACK, s as u16),
        };
        let mut out = [0u8; RESPONSE_SIZE];
        out[..2].copy_from_slice(&kind.to_le_bytes());
        out[8..].copy_from_slice(&state.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_responses_encode_little_endian() {
        let r = BlockRange {
            addr: 0x1_4000_0000,
            nb_blocks: 3,
        };
        for req in [
            MemRequest::Plug(r),
            MemRequest::Unplug(r),
            MemRequest::UnplugAll,
            MemRequest::State(r),
            MemRequest::Unknown(77),
        ] {
            assert_eq!(MemRequest::parse(&req.encode()), req);
        }
        let raw = MemRequest::Plug(r).encode();
        assert_eq!((raw[0], raw[8], raw[12], raw[16]), (0, 0, 1, 3));
        assert_eq!(MemResponse::Nack.encode()[..2], [1, 0]);
        assert_eq!(MemResponse::Error.encode()[..2], [3, 0]);
        let s = MemResponse::State(BlockState::Mixed).encode();
        assert_eq!((s[0], s[8]), (0, 2));
    }
}
