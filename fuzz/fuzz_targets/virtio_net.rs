//! virtio-net TX and RX over fuzzed descriptor chains, on a TAP in a private network namespace
//! (root only; the TAP is down, so frames sent are refused like frames on a dead link). The TAP
//! is made persistent once: creating and destroying a network device per input would cost ~10 ms.
#![no_main]

use std::os::fd::AsRawFd;
use std::sync::Once;

use arbitrary::Arbitrary;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::net::{Net, Tap};
use libfuzzer_sys::fuzz_target;
use prescient_fuzz::{drive, DriverInput};

#[derive(Arbitrary, Debug)]
struct Input {
    mac: Option<[u8; 6]>,
    driver: DriverInput,
}

const TAP: &str = "prsnt-fuzz0";
/// `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// A private network namespace holding a persistent TAP for every input's device to attach to.
fn private_tap() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        // SAFETY: unshare(2) with a plain flag; it changes only this thread's namespaces.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let tap = Tap::open(TAP).expect("a TAP in the private namespace");
        // SAFETY: TUNSETPERSIST takes an int by value on the TAP's own open fd.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
        assert_eq!(ret, 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
    });
}

fuzz_target!(|input: Input| {
    private_tap();
    let net = Net::new(
        "fuzz",
        TAP,
        input.mac,
        RateLimiterConfig::default(),
        RateLimiterConfig::default(),
    )
    .expect("attach to the persistent TAP");
    drive(net, &input.driver);
});
