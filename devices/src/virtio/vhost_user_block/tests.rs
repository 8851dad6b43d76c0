//! The frontend against scripted backends on a socket pair: good replies, then every kind of bad
//! one a broken or hostile backend can send. Each must end in an error naming the socket and the
//! step, never a panic or a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use super::*;

const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_CONFIG: u32 = 24;
const VERSION_AND_REPLY: u32 = 0x1 | 0x4;
const PROTOCOL_CONFIG: u64 = 1 << 9;
const GOOD_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << 9) | (1 << 38);

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn u64_reply(request: u32, value: u64) -> Vec<u8> {
    let mut m = header(request, VERSION_AND_REPLY, 8);
    m.extend_from_slice(&value.to_le_bytes());
    m
}

fn config_reply(offset: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = header(
        GET_CONFIG,
        VERSION_AND_REPLY,
        12 + u32::try_from(payload.len()).unwrap(),
    );
    for v in [offset, size, 0] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m.extend_from_slice(payload);
    m
}

/// A config space of `sectors` sectors.
fn config_of(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN as usize];
    c[..8].copy_from_slice(&sectors.to_le_bytes());
    c
}

/// A backend that reads each request and answers it with what `answer` gives (nothing for
/// requests without a reply), until `answer` says stop (`Err`) or the frontend hangs up.
fn backend(
    mut answer: impl FnMut(u32) -> Result<Option<Vec<u8>>, ()> + Send + 'static,
) -> (UnixStream, JoinHandle<()>) {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || loop {
        let mut hdr = [0u8; 12];
        if theirs.read_exact(&mut hdr).is_err() {
            return;
        }
        let request = u32::from_le_bytes(hdr[..4].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        if theirs.read_exact(&mut body).is_err() {
            return;
        }
        match answer(request) {
            Ok(Some(reply)) => {
                if theirs.write_all(&reply).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(()) => return,
        }
    });
    (ours, t)
}

/// The replies of a well-behaved backend, with `config` for GET_CONFIG.
fn good(request: u32, config: &[u8]) -> Option<Vec<u8>> {
    match request {
        GET_FEATURES => Some(u64_reply(GET_FEATURES, GOOD_FEATURES)),
        GET_PROTOCOL_FEATURES => Some(u64_reply(GET_PROTOCOL_FEATURES, PROTOCOL_CONFIG)),
        GET_CONFIG => Some(config_reply(0, CONFIG_LEN, config)),
        _ => None,
    }
}

fn handshake_with(
    answer: impl FnMut(u32) -> Result<Option<Vec<u8>>, ()> + Send + 'static,
) -> Result<BackendInfo, VhostUserBlockError> {
    let (sock, t) = backend(answer);
    let mut conn =
        Connection::from_stream(Path::new("/run/vu.sock"), sock, Duration::from_millis(300))
            .unwrap();
    let r = conn.handshake();
    drop(conn);
    t.join().unwrap();
    r
}

/// The error's text, which must name the socket.
fn message(r: Result<BackendInfo, VhostUserBlockError>) -> String {
    let e = r.expect_err("a bad backend must be refused").to_string();
    assert!(e.contains("/run/vu.sock"), "{e}");
    e
}

#[test]
fn a_good_backend_gives_its_capacity_and_features() {
    let info = handshake_with(|r| Ok(good(r, &config_of(8192)))).unwrap();
    assert_eq!(info.capacity_sectors(), 8192);
    assert!(!info.read_only());
    assert_eq!(info.config.len(), CONFIG_LEN as usize);
}

#[test]
fn the_guest_sees_only_the_features_prescient_passes_through() {
    let (sock, _t) = backend(|r| Ok(good(r, &config_of(1))));
    let mut conn =
        Connection::from_stream(Path::new("/run/vu.sock"), sock, Duration::from_secs(1)).unwrap();
    let info = conn.handshake().unwrap();
    let dev = VhostUserBlock::with_connection("vu", conn, info).unwrap();
    // FLUSH and VERSION_1 pass; vhost-user's own bit and an unknown device bit (38) do not.
    assert_eq!(
        dev.avail_features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << 9),
        "{:#x}",
        dev.avail_features()
    );
    let mut dev = dev;
    dev.set_cache_writeback(false);
    assert_eq!(
        dev.avail_features(),
        1 << VIRTIO_F_VERSION_1,
        "Unsafe hides FLUSH"
    );
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 1);
}

#[test]
fn a_backend_that_hangs_up_is_an_error() {
    let e = message(handshake_with(|_| Err(())));
    assert!(e.contains("GET_FEATURES"), "{e}");
}

#[test]
fn a_backend_that_never_answers_times_out() {
    let e = message(handshake_with(|r| match r {
        GET_FEATURES => Ok(None),
        _ => Ok(None),
    }));
    assert!(e.contains("GET_FEATURES"), "{e}");
}

#[test]
fn a_reply_to_another_request_is_refused() {
    let e = message(handshake_with(|r| match r {
        GET_FEATURES => Ok(Some(u64_reply(GET_CONFIG, GOOD_FEATURES))),
        r => Ok(good(r, &config_of(1))),
    }));
    assert!(e.contains("GET_FEATURES"), "{e}");
}

#[test]
fn a_reply_without_the_reply_flag_is_refused() {
    let e = message(handshake_with(|r| match r {
        GET_FEATURES => {
            let mut m = header(GET_FEATURES, 0x1, 8);
            m.extend_from_slice(&GOOD_FEATURES.to_le_bytes());
            Ok(Some(m))
        }
        r => Ok(good(r, &config_of(1))),
    }));
    assert!(e.contains("GET_FEATURES"), "{e}");
}

#[test]
fn a_short_or_oversized_body_is_refused() {
    for size in [4u32, 7, 9, 4096, u32::MAX] {
        let e = message(handshake_with(move |r| match r {
            GET_FEATURES => {
                let mut m = header(GET_FEATURES, VERSION_AND_REPLY, size);
                m.extend_from_slice(&GOOD_FEATURES.to_le_bytes());
                Ok(Some(m))
            }
            r => Ok(good(r, &config_of(1))),
        }));
        assert!(e.contains("GET_FEATURES"), "size {size}: {e}");
    }
}

#[test]
fn a_backend_without_what_prescient_needs_is_named() {
    let e = message(handshake_with(|r| match r {
        GET_FEATURES => Ok(Some(u64_reply(GET_FEATURES, 1 << VIRTIO_F_VERSION_1))),
        r => Ok(good(r, &config_of(1))),
    }));
    assert!(e.contains("VHOST_USER_F_PROTOCOL_FEATURES"), "{e}");
    let e = message(handshake_with(|r| match r {
        GET_PROTOCOL_FEATURES => Ok(Some(u64_reply(GET_PROTOCOL_FEATURES, 0))),
        r => Ok(good(r, &config_of(1))),
    }));
    assert!(e.contains("CONFIG protocol feature"), "{e}");
}

#[test]
fn a_config_reply_of_the_wrong_shape_is_refused() {
    let short = config_of(1)[..8].to_vec();
    let cases: Vec<Vec<u8>> = vec![
        // Fewer bytes than asked, saying so.
        config_reply(0, 8, &short),
        // Fewer bytes than its own header says.
        config_reply(0, CONFIG_LEN, &short),
        // Another offset.
        config_reply(4, CONFIG_LEN, &config_of(1)),
        // The backend's "failed" answer (size 0).
        config_reply(0, 0, &[]),
        // More than was asked.
        config_reply(0, CONFIG_LEN + 4, &[0u8; CONFIG_LEN as usize + 4]),
    ];
    for reply in cases {
        let e = message(handshake_with(move |r| match r {
            GET_CONFIG => Ok(Some(reply.clone())),
            r => Ok(good(r, &config_of(1))),
        }));
        assert!(e.contains("GET_CONFIG"), "{e}");
    }
}

/// Arbitrary bytes in place of each reply (a small deterministic fuzz): an error every time,
/// never a panic.
#[test]
fn arbitrary_replies_are_errors() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..32 {
        let target = [GET_FEATURES, GET_PROTOCOL_FEATURES, GET_CONFIG][round % 3];
        let len = (next() % 96) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && junk.len() >= 12 {
            // A plausible header over junk: the right request and flags.
            junk[..8].copy_from_slice(&header(target, VERSION_AND_REPLY, 0)[..8]);
        }
        let r = handshake_with(move |r| {
            if r == target {
                Ok(Some(junk.clone()))
            } else {
                Ok(good(r, &config_of(1)))
            }
        });
        if let Err(e) = r {
            assert!(e.to_string().contains("/run/vu.sock"), "{e}");
        }
    }
}

#[test]
fn nothing_listening_is_a_connect_error_naming_the_socket() {
    let e = probe(Path::new("/nonexistent/vu.sock")).unwrap_err();
    assert!(matches!(e, VhostUserBlockError::Connect { .. }));
    assert!(e.to_string().contains("/nonexistent/vu.sock"), "{e}");
}

/// Guest memory from a memfd, mapped shared: what the VMM gives a device with a backend.
fn shared_memory(size: usize) -> GuestMemoryMmap {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"test_guest_mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    let at = vm_memory::FileOffset::new(file, 0);
    GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), size, Some(at))]).unwrap()
}

/// Activation (handed from the vCPU's thread to the event loop) shares memory and the queue in
/// the protocol's order; the backend's completions raise the device's interrupt; a backend that
/// goes away is noticed by the event loop and the device refuses to start again.
#[test]
fn activation_runs_on_the_event_loop_and_completions_raise_the_interrupt() {
    use crate::virtio::test_utils::{activate_with, DriverQueue};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::mpsc;
    use std::sync::Mutex;

    let (seen_tx, seen) = mpsc::channel();
    let mut enables = 0;
    let (sock, t) = backend(move |r| {
        let _ = seen_tx.send(r);
        if r == 18 {
            enables += 1;
            if enables == 2 {
                // Hangs up on the second SET_VRING_ENABLE.
                return Err(());
            }
        }
        Ok(good(r, &config_of(64)))
    });
    let mut conn =
        Connection::from_stream(Path::new("/run/vu.sock"), sock, Duration::from_secs(1)).unwrap();
    let info = conn.handshake().unwrap();
    let dev = Arc::new(Mutex::new(
        VhostUserBlock::with_connection("vu", conn, info).unwrap(),
    ));
    let mut ops: EventManager<Arc<Mutex<VhostUserBlock>>> = EventManager::new().unwrap();
    ops.add_subscriber(dev.clone());
    let mem = shared_memory(1 << 20);
    let q = DriverQueue::new(&mem, GuestAddress(0x1000), 16);
    let irq = crate::virtio::test_utils::interrupt();
    activate_with(
        &mut *dev.lock().unwrap(),
        &mem,
        &[q],
        irq.clone(),
        1 << VIRTIO_F_VERSION_1,
    )
    .unwrap();
    let handshake: Vec<u32> = seen.try_iter().collect();
    assert_eq!(
        handshake,
        [3, GET_FEATURES, GET_PROTOCOL_FEATURES, 16, GET_CONFIG]
    );
    // Nothing is sent from the vCPU's thread: the event loop does it.
    ops.run_with_timeout(1000).unwrap();
    let mut started = Vec::new();
    while started.len() < 8 {
        started.push(seen.recv_timeout(Duration::from_secs(2)).unwrap());
    }
    // SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE.
    assert_eq!(started, [2, 5, 8, 9, 10, 13, 12, 18]);
    assert!(dev.lock().unwrap().started);

    dev.lock().unwrap().call.write(1).unwrap();
    ops.run_with_timeout(1000).unwrap();
    assert_eq!(irq.status() & crate::virtio::INTERRUPT_USED_RING, 1);

    // The backend goes away: seen on its socket, and the drive is out of service.
    let _ = dev.lock().unwrap().conn.frontend.set_vring_enable(0, false);
    t.join().unwrap();
    assert!(!dev.lock().unwrap().broken);
    ops.run_with_timeout(1000).unwrap();
    assert!(dev.lock().unwrap().broken);
    let e = dev.lock().unwrap().refresh_config().unwrap_err();
    assert!(e.to_string().contains("went away"), "{e}");
}
