//! A vhost-user backend's replies (untrusted input): whatever bytes come back on the socket, the
//! frontend answers each request with a value or an error, never a panic or a hang.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use devices::virtio::vhost_user_block::protocol::{
    Frontend, PROTOCOL_F_CONFIG, PROTOCOL_F_REPLY_ACK,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // What fits in the socket's buffer, so that writing it all first cannot block.
    let data = &data[..data.len().min(64 << 10)];
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    theirs.write_all(data).expect("the replies fit the socket buffer");
    // End of the replies: a read past them sees EOF rather than waiting for the deadline.
    theirs
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut f = Frontend::new(ours, Duration::from_millis(50));
    let _ = f.set_owner();
    let _ = f.get_features();
    let _ = f.get_protocol_features();
    let _ = f.set_protocol_features(PROTOCOL_F_CONFIG | PROTOCOL_F_REPLY_ACK);
    let _ = f.get_config(0, 60);
    let _ = f.set_vring_num(0, 256);
    let _ = f.get_vring_base(0);
    drop(theirs);
});
