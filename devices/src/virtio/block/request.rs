//! One virtio-blk request: parsed from a guest descriptor chain, validated, executed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::{DISK_ID_LEN, MAX_REQUEST_BYTES, SECTOR_SHIFT, SECTOR_SIZE};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The request header the driver puts first.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
pub struct RequestHeader {
    pub kind: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: plain integers, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// A chain that cannot be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("descriptors outside guest memory or too long: {0}")]
    Buffers(virtio_queue::Error),
    #[error("no device-writable byte for the status")]
    NoStatus,
}

/// What executing a request did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub bytes_to_guest: usize,
    pub bytes_from_guest: usize,
    pub invalid: bool,
    pub io_error: bool,
}

impl Outcome {
    pub fn ok(bytes_to_guest: usize, bytes_from_guest: usize) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK,
            bytes_to_guest,
            bytes_from_guest,
            ..Self::default()
        }
    }

    fn invalid(status: u8) -> Self {
        Self {
            status,
            invalid: true,
            ..Self::default()
        }
    }

    pub fn io_error() -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR,
            io_error: true,
            ..Self::default()
        }
    }
}

/// What a valid data request asks of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
}

/// A data request, checked: what, where in the file, how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoPlan {
    pub kind: IoKind,
    pub offset: u64,
    pub len: usize,
}

/// A request whose status byte has been found.
pub struct Request<'a> {
    header: Option<RequestHeader>,
    /// Device-readable bytes after the header (OUT data).
    reader: Reader<'a>,
    /// Device-writable bytes before the status byte (IN data, GET_ID answer).
    data: Writer<'a>,
    status: Writer<'a>,
}

impl<'a> Request<'a> {
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let mut reader = Reader::new(mem, chain.clone()).map_err(ChainError::Buffers)?;
        let mut data = Writer::new(mem, chain).map_err(ChainError::Buffers)?;
        let writable = data.available_bytes();
        if writable == 0 {
            return Err(ChainError::NoStatus);
        }
        let status = data.split_at(writable - 1).map_err(ChainError::Buffers)?;
        // A header that is not there is answered with IOERR, since a status byte exists.
        let header = reader.read_obj::<RequestHeader>().ok();
        Ok(Self {
            header,
            reader,
            data,
            status,
        })
    }

    /// Bytes the request moves, for the rate limiter.
    pub fn data_len(&self) -> usize {
        match self.header.map(|h| h.kind) {
            Some(VIRTIO_BLK_T_IN) => self.data.available_bytes(),
            Some(VIRTIO_BLK_T_OUT) => self.reader.available_bytes(),
            _ => 0,
        }
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the disk.
    fn range_ok(sector: u64, len: usize, capacity: u64) -> bool {
        len <= MAX_REQUEST_BYTES
            && (len as u64).is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(len as u64 >> SECTOR_SHIFT)
                .is_some_and(|end| end <= capacity)
    }

    /// The file I/O a READ, WRITE or FLUSH asks for, checked against the disk; `Err` with the
    /// answer for anything else (GET_ID and unknown types are `Err(None)`: executed in place).
    pub fn plan(
        &self,
        read_only: bool,
        sync_on_flush: bool,
        capacity: u64,
    ) -> Result<IoPlan, Option<Outcome>> {
        let Some(header) = self.header else {
            return Err(Some(Outcome::invalid(VIRTIO_BLK_S_IOERR)));
        };
        let offset = header.sector << SECTOR_SHIFT;
        let (kind, len) = match header.kind {
            VIRTIO_BLK_T_IN => (IoKind::Read, self.data.available_bytes()),
            VIRTIO_BLK_T_OUT if read_only => {
                return Err(Some(Outcome::invalid(VIRTIO_BLK_S_IOERR)))
            }
            VIRTIO_BLK_T_OUT => (IoKind::Write, self.reader.available_bytes()),
            VIRTIO_BLK_T_FLUSH if !sync_on_flush => return Err(Some(Outcome::ok(0, 0))),
            VIRTIO_BLK_T_FLUSH => (IoKind::Flush, 0),
            _ => return Err(None),
        };
        if kind != IoKind::Flush && !Self::range_ok(header.sector, len, capacity) {
            return Err(Some(Outcome::invalid(VIRTIO_BLK_S_IOERR)));
        }
        Ok(IoPlan { kind, offset, len })
    }

    pub fn execute(
        &mut self,
        disk: &File,
        read_only: bool,
        sync_on_flush: bool,
        capacity: u64,
        disk_id: &[u8; DISK_ID_LEN],
        buf: &mut Vec<u8>,
    ) -> Outcome {
        let plan = match self.plan(read_only, sync_on_flush, capacity) {
            Ok(plan) => plan,
            Err(Some(outcome)) => return outcome,
            Err(None) if self.header.map(|h| h.kind) == Some(VIRTIO_BLK_T_GET_ID) => {
                let n = self.data.available_bytes().min(DISK_ID_LEN);
                if self.data.write_all(&disk_id[..n]).is_err() {
                    return Outcome::invalid(VIRTIO_BLK_S_IOERR);
                }
                return Outcome::ok(n, 0);
            }
            Err(None) => return Outcome::invalid(VIRTIO_BLK_S_UNSUPP),
        };
        match plan.kind {
            IoKind::Read => {
                buf.resize(plan.len, 0);
                if disk.read_exact_at(buf, plan.offset).is_err() {
                    return Outcome::io_error();
                }
                if self.data.write_all(buf).is_err() {
                    return Outcome::invalid(VIRTIO_BLK_S_IOERR);
                }
                Outcome::ok(plan.len, 0)
            }
            IoKind::Write => {
                buf.resize(plan.len, 0);
                if self.reader.read_exact(buf).is_err() {
                    return Outcome::invalid(VIRTIO_BLK_S_IOERR);
                }
                if disk.write_all_at(buf, plan.offset).is_err() {
                    return Outcome::io_error();
                }
                Outcome::ok(0, plan.len)
            }
            IoKind::Flush => match disk.sync_data() {
                Ok(()) => Outcome::ok(0, 0),
                Err(_) => Outcome::io_error(),
            },
        }
    }

    /// Writes the status byte; returns the used length (bytes written to the guest).
    pub fn complete(mut self, outcome: Outcome) -> u32 {
        if self.status.write_all(&[outcome.status]).is_err() {
            return outcome.bytes_to_guest as u32;
        }
        outcome.bytes_to_guest as u32 + 1
    }
}
