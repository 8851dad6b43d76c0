//! virtio-net TX and RX over fuzzed descriptor chains, on a TAP in a private network namespace
//! (root only). The TAP is made persistent and brought up once (creating a network device per
//! input would cost ~10 ms); each input's frames are sent to it through a packet socket before
//! the device starts, so RX has frames to place in the fuzzed buffers. Frames the guest sends go
//! out of the TAP into the namespace, where nothing listens.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::net::{Net, Tap};
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive, DriverInput};

#[derive(Arbitrary, Debug)]
struct Input {
    mac: Option<[u8; 6]>,
    /// Frames that arrive from the host side (at most a few, each cut to 1514 bytes).
    frames: Vec<Vec<u8>>,
    driver: DriverInput,
}

const TAP: &str = "prsnt-fuzz0";
/// `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// An Ethernet header, and the most a 1500-byte MTU carries after it.
const ETH_HLEN: usize = 14;
const MAX_FRAME: usize = 1514;

/// The packet socket that injects frames, and the TAP's interface index.
struct Injector {
    socket: OwnedFd,
    ifindex: i32,
}

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// A private network namespace with a persistent TAP, up, with IPv6 off so the kernel sends
/// nothing of its own.
fn setup() -> &'static Injector {
    static INJECTOR: OnceLock<Injector> = OnceLock::new();
    INJECTOR.get_or_init(|| {
        // SAFETY: unshare(2) with a plain flag; it changes only this thread's namespaces.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            "unshare(CLONE_NEWNET)",
        );
        let tap = Tap::open(TAP).expect("a TAP in the private namespace");
        // SAFETY: TUNSETPERSIST takes an int by value on the TAP's own open fd.
        check(
            unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) },
            "TUNSETPERSIST",
        );
        // /proc/sys/net shows the namespace of the thread that opens it: ours.
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6"), "1")
            .expect("turn IPv6 off on the TAP");
        // SAFETY: plain socket(2) calls; each fd is owned at once.
        let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        check(inet, "socket(AF_INET)");
        // SAFETY: `inet` is a fresh fd nobody else owns.
        let inet = unsafe { OwnedFd::from_raw_fd(inet) };
        // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(TAP.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
        check(
            unsafe { libc::ioctl(inet.as_raw_fd(), libc::SIOCSIFFLAGS, &req) },
            "SIOCSIFFLAGS",
        );
        // SAFETY: `req.ifr_name` is NUL-terminated.
        let ifindex = unsafe { libc::if_nametoindex(req.ifr_name.as_ptr()) };
        assert_ne!(
            ifindex,
            0,
            "if_nametoindex: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: plain socket(2); owned at once.
        let packet = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        check(packet, "socket(AF_PACKET)");
        drop(tap);
        Injector {
            // SAFETY: `packet` is a fresh fd nobody else owns.
            socket: unsafe { OwnedFd::from_raw_fd(packet) },
            ifindex: ifindex as i32,
        }
    })
}

impl Injector {
    /// Sends `frame` out of the TAP (towards the device); too short frames are padded.
    fn send(&self, frame: &[u8]) {
        let mut frame = frame[..frame.len().min(MAX_FRAME)].to_vec();
        frame.resize(frame.len().max(ETH_HLEN), 0);
        // SAFETY: an all-zero sockaddr_ll is valid; family and interface are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex;
        // SAFETY: the buffer and the address live across the call, with their real lengths.
        let ret = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        // A full TAP queue refuses frames, as a busy link would.
        let _ = ret;
    }
}

fuzz_target!(|input: Input| {
    let injector = setup();
    let net = Net::new(
        "fuzz",
        TAP,
        input.mac,
        RateLimiterConfig::default(),
        RateLimiterConfig::default(),
    )
    .expect("attach to the persistent TAP");
    // The TAP has a carrier only while a device is attached.
    for frame in input.frames.iter().take(4) {
        injector.send(frame);
    }
    drive(net, &input.driver);
});
