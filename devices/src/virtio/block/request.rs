//! One virtio-blk request: parsed from a guest descriptor chain, validated, executed.
//!
//! Data moves straight between guest memory and the disk file (`preadv`/`pwritev` on the
//! guest's buffers): no copy through a buffer of the VMM's, which costs as much again as the
//! file I/O for large requests.

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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

const HEADER_LEN: usize = std::mem::size_of::<RequestHeader>();

/// A chain that cannot be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor of {len} bytes at {addr:#x} is not inside one guest memory region")]
    Buffers { addr: u64, len: u32 },
    #[error("the chain's buffers add up to more than the address space")]
    TooLong,
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
    fn ok(bytes_to_guest: usize, bytes_from_guest: usize) -> Self {
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

    fn io_error() -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR,
            io_error: true,
            ..Self::default()
        }
    }
}

/// Guest memory ranges in chain order, each inside one region (checked when parsed).
#[derive(Debug, Default)]
struct Segments {
    ranges: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl Segments {
    fn push(&mut self, addr: GuestAddress, len: usize) {
        if len > 0 {
            self.ranges.push((addr, len));
            self.len += len;
        }
    }

    /// Splits off the first `n` bytes (fewer if there are not that many).
    fn take_front(&mut self, n: usize) -> Segments {
        let mut front = Segments::default();
        while front.len < n {
            let Some(&(addr, len)) = self.ranges.first() else {
                break;
            };
            let take = len.min(n - front.len);
            front.push(addr, take);
            if take == len {
                self.ranges.remove(0);
            } else {
                self.ranges[0] = (addr.unchecked_add(take as u64), len - take);
            }
            self.len -= take;
        }
        front
    }

    /// Splits off the last byte's address.
    fn take_last_byte(&mut self) -> Option<GuestAddress> {
        let (addr, len) = self.ranges.pop()?;
        self.len -= 1;
        if len > 1 {
            self.ranges.push((addr, len - 1));
        }
        Some(addr.unchecked_add(len as u64 - 1))
    }
}

/// A request whose status byte has been found.
pub struct Request {
    header: Option<RequestHeader>,
    /// Device-readable bytes after the header (OUT data).
    readable: Segments,
    /// Device-writable bytes before the status byte (IN data, GET_ID answer).
    writable: Segments,
    status: GuestAddress,
}

impl Request {
    pub fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let (mut readable, mut writable) = (Segments::default(), Segments::default());
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len());
            if len > 0 && mem.get_slice(addr, len as usize).is_err() {
                return Err(ChainError::Buffers { addr: addr.0, len });
            }
            let side = if desc.is_write_only() {
                &mut writable
            } else {
                &mut readable
            };
            side.len
                .checked_add(len as usize)
                .ok_or(ChainError::TooLong)?;
            side.push(addr, len as usize);
        }
        let status = writable.take_last_byte().ok_or(ChainError::NoStatus)?;
        // A header that is not there is answered with IOERR, since a status byte exists.
        let header_bytes = readable.take_front(HEADER_LEN);
        let header = (header_bytes.len == HEADER_LEN).then(|| {
            let mut h = RequestHeader::default();
            let mut at = 0;
            for &(addr, len) in &header_bytes.ranges {
                // The ranges were checked above.
                let _ = mem.read_slice(&mut h.as_mut_slice()[at..at + len], addr);
                at += len;
            }
            h
        });
        Ok(Self {
            header,
            readable,
            writable,
            status,
        })
    }

    /// Bytes the request moves, for the rate limiter.
    pub fn data_len(&self) -> usize {
        match self.header.map(|h| h.kind) {
            Some(VIRTIO_BLK_T_IN) => self.writable.len,
            Some(VIRTIO_BLK_T_OUT) => self.readable.len,
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

    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &File,
        read_only: bool,
        capacity: u64,
        disk_id: &[u8; DISK_ID_LEN],
    ) -> Outcome {
        let Some(header) = self.header else {
            return Outcome::invalid(VIRTIO_BLK_S_IOERR);
        };
        let offset = header.sector << SECTOR_SHIFT;
        match header.kind {
            VIRTIO_BLK_T_IN => {
                let len = self.writable.len;
                if !Self::range_ok(header.sector, len, capacity) {
                    return Outcome::invalid(VIRTIO_BLK_S_IOERR);
                }
                match file_io(disk, mem, &self.writable, offset, Direction::FileToGuest) {
                    Ok(()) => Outcome::ok(len, 0),
                    Err(_) => Outcome::io_error(),
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = self.readable.len;
                if read_only || !Self::range_ok(header.sector, len, capacity) {
                    return Outcome::invalid(VIRTIO_BLK_S_IOERR);
                }
                match file_io(disk, mem, &self.readable, offset, Direction::GuestToFile) {
                    Ok(()) => Outcome::ok(0, len),
                    Err(_) => Outcome::io_error(),
                }
            }
            VIRTIO_BLK_T_FLUSH => match disk.sync_data() {
                Ok(()) => Outcome::ok(0, 0),
                Err(_) => Outcome::io_error(),
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id: &[u8] = disk_id;
                let mut written = 0;
                for &(addr, len) in &self.writable.ranges {
                    let n = len.min(id.len());
                    // The ranges were checked when parsed.
                    let _ = mem.write_slice(&id[..n], addr);
                    id = &id[n..];
                    written += n;
                }
                Outcome::ok(written, 0)
            }
            _ => Outcome::invalid(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Writes the status byte; returns the used length (bytes written to the guest).
    pub fn complete(self, mem: &GuestMemoryMmap, outcome: Outcome) -> u32 {
        if mem.write_obj(outcome.status, self.status).is_err() {
            return outcome.bytes_to_guest as u32;
        }
        outcome.bytes_to_guest as u32 + 1
    }
}

#[derive(Clone, Copy)]
enum Direction {
    FileToGuest,
    GuestToFile,
}

/// Moves `data.len` bytes between the file at `offset` and the guest's `data` ranges, in as
/// few `preadv`/`pwritev` calls as the kernel allows; a short read (the file ended) is an error.
fn file_io(
    disk: &File,
    mem: &GuestMemoryMmap,
    data: &Segments,
    mut offset: u64,
    dir: Direction,
) -> std::io::Result<()> {
    let mut slices = Vec::with_capacity(data.ranges.len());
    for &(addr, len) in &data.ranges {
        slices.push(mem.get_slice(addr, len).map_err(std::io::Error::other)?);
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovecs: Vec<libc::iovec> = guards
        .iter()
        .zip(&slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    let mut iov: &mut [libc::iovec] = &mut iovecs;
    while !iov.is_empty() {
        let count = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: every iovec points into a guest memory mapping that `mem` keeps alive for the
        // call (the guards hold the slices), with the length of that slice, checked against
        // the regions when the request was parsed. The guest may touch the same memory at the
        // same time; that is its own race, as with any device doing DMA.
        let n = unsafe {
            match dir {
                Direction::FileToGuest => libc::preadv(disk.as_raw_fd(), iov.as_ptr(), count, off),
                Direction::GuestToFile => libc::pwritev(disk.as_raw_fd(), iov.as_ptr(), count, off),
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while let Some(first) = iov.first_mut() {
            if n < first.iov_len {
                // SAFETY: advancing inside the same iovec's buffer, by less than its length.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n).cast() };
                first.iov_len -= n;
                break;
            }
            n -= first.iov_len;
            iov = &mut iov[1..];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(ranges: &[(u64, usize)]) -> Segments {
        let mut s = Segments::default();
        for &(a, l) in ranges {
            s.push(GuestAddress(a), l);
        }
        s
    }

    #[test]
    fn segments_split_at_any_byte() {
        let mut s = seg(&[(0x1000, 10), (0x2000, 20)]);
        let front = s.take_front(16);
        assert_eq!(
            front.ranges,
            [(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 6)]
        );
        assert_eq!((front.len, s.len), (16, 14));
        assert_eq!(s.ranges, [(GuestAddress(0x2006), 14)]);
        assert_eq!(s.take_last_byte(), Some(GuestAddress(0x2013)));
        assert_eq!(s.ranges, [(GuestAddress(0x2006), 13)]);
        let mut one = seg(&[(0x3000, 1)]);
        assert_eq!(one.take_last_byte(), Some(GuestAddress(0x3000)));
        assert!(one.ranges.is_empty());
        assert_eq!(one.take_last_byte(), None);
        assert_eq!(seg(&[(0x1000, 4)]).take_front(16).len, 4);
    }
}
