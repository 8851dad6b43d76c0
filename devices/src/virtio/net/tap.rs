//! A TAP device opened with a virtio-net header, so frames pass between guest and host with the
//! same 12-byte header on both sides.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// `struct ifreq`: the name and the flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// The virtio_net_hdr of VERSION_1 devices (with num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// Errors of opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} must be 1 to 15 bytes with no NUL")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to TAP {name}: {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot configure TAP {name}: {source}")]
    Configure {
        name: String,
        source: std::io::Error,
    },
}

/// An open TAP device, non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) TAP `name` in this process's network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        let ioctl = |request, arg: *const libc::c_void, what: &str| {
            // SAFETY: `fd` is our open tun fd; `arg` points at a live value of the size the
            // request expects (an ifreq, or an int), which outlives the call.
            let ret = unsafe { libc::ioctl(fd, request, arg) };
            if ret < 0 {
                let source = std::io::Error::last_os_error();
                tracing::debug!("TAP {name}: {what} failed: {source}");
                return Err(source);
            }
            Ok(())
        };
        ioctl(TUNSETIFF, (&mut req as *mut IfReq).cast(), "TUNSETIFF").map_err(|source| {
            TapError::Attach {
                name: name.to_string(),
                source,
            }
        })?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        let configure = |source| TapError::Configure {
            name: name.to_string(),
            source,
        };
        ioctl(
            TUNSETVNETHDRSZ,
            (&hdr_len as *const libc::c_int).cast(),
            "TUNSETVNETHDRSZ",
        )
        .map_err(configure)?;
        // No offloads: the guest gets and sends plain frames with a zeroed header.
        ioctl(TUNSETOFFLOAD, std::ptr::null(), "TUNSETOFFLOAD").map_err(configure)?;
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)
    }
}

use std::os::unix::fs::OpenOptionsExt;

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
