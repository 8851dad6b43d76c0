//! vsock over real descriptor chains: header checks, RST for unreachable ports, and a
//! guest-initiated connection carrying bytes both ways.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::test_utils::{activate, guest_memory, DriverQueue, WRITE};

use super::*;

const GUEST_CID: u64 = 3;
const RXBUF: u64 = 0x10_0000;
const TXBUF: u64 = 0x20_0000;

fn mem() -> GuestMemoryMmap {
    guest_memory(4 << 20)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prescient-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Rig<'a> {
    dev: Vsock,
    queues: Vec<DriverQueue<'a>>,
    mem: &'a GuestMemoryMmap,
    rx_posted: u64,
    tx_sent: u64,
}

/// The three queues of a vsock device, 64 KiB apart from `base`.
fn driver_queues(mem: &GuestMemoryMmap, base: u64) -> Vec<DriverQueue<'_>> {
    (0..3u64)
        .map(|i| DriverQueue::new(mem, GuestAddress(base + i * 0x1_0000), 64))
        .collect()
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, dir: &Path) -> Self {
        let mut dev = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        let queues = driver_queues(mem, 0);
        activate(&mut dev, mem, &queues).unwrap();
        Self {
            dev,
            queues,
            mem,
            rx_posted: 0,
            tx_sent: 0,
        }
    }

    fn chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
        self.queues[q].add_chain(descs);
    }

    /// Posts one 4 KiB receive buffer; returns its address.
    fn post_rx(&mut self) -> u64 {
        let addr = RXBUF + self.rx_posted * 0x1000;
        self.rx_posted += 1;
        self.chain(RX, &[(addr, 0x1000, WRITE)]);
        addr
    }

    /// Queues one packet from the guest (header + payload, `len` as given) and processes it.
    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = TXBUF + self.tx_sent * 0x1_0000;
        self.tx_sent += 1;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.chain(TX, &[(addr, bytes.len() as u32, 0)]);
        self.dev.process_tx();
        self.dev.process_rx();
    }

    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
        let h = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes);
    }

    fn rx_used(&self) -> u16 {
        self.queues[RX].used_count()
    }

    fn tx_used(&self) -> u16 {
        self.queues[TX].used_count()
    }

    /// The header (and payload) of the packet in the receive buffer at `addr`.
    fn received(&self, addr: u64) -> (Header, Vec<u8>) {
        let mut raw = [0u8; HDR_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let h = Header::from_bytes(&raw);
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        (h, data)
    }
}

fn hdr(op: u16, kind: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        len,
        kind,
        op,
        ..Header::default()
    }
}

#[test]
fn headers_round_trip_and_are_checked() {
    let h = Header {
        src_cid: 0x1122_3344_5566_7788,
        dst_cid: 2,
        src_port: 0xdead_beef,
        dst_port: 7,
        len: 5,
        kind: 1,
        op: 5,
        flags: 3,
        buf_alloc: 65536,
        fwd_cnt: 9,
    };
    let b = h.to_bytes();
    assert_eq!(&b[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&b[28..32], &[1, 0, 5, 0]);
    assert_eq!(Header::from_bytes(&b), h);

    assert_eq!(check(&hdr(OP_RW, 1, 10), GUEST_CID, 10), Verdict::Accept);
    assert_eq!(check(&hdr(OP_REQUEST, 1, 0), GUEST_CID, 0), Verdict::Accept);
    assert!(matches!(
        check(&hdr(OP_RW, 1, 11), GUEST_CID, 10),
        Verdict::Drop(_)
    ));
    assert!(matches!(
        check(&hdr(OP_RW, 1, 70_000), GUEST_CID, 70_000),
        Verdict::Drop(_)
    ));
    assert!(matches!(
        check(&hdr(OP_REQUEST, 1, 4), GUEST_CID, 4),
        Verdict::Drop(_)
    ));
    assert!(matches!(check(&hdr(OP_RW, 1, 0), 4, 0), Verdict::Drop(_)));
    let mut wrong_dst = hdr(OP_RW, 1, 0);
    wrong_dst.dst_cid = 7;
    assert!(matches!(check(&wrong_dst, GUEST_CID, 0), Verdict::Drop(_)));
    assert_eq!(check(&hdr(OP_RW, 2, 0), GUEST_CID, 0), Verdict::Reset);
    assert_eq!(check(&hdr(0, 1, 0), GUEST_CID, 0), Verdict::Reset);
    assert_eq!(check(&hdr(8, 1, 0), GUEST_CID, 0), Verdict::Reset);
}

#[test]
fn a_request_to_a_port_without_a_host_socket_gets_an_rst() {
    let dir = scratch("rst");
    let mem = mem();
    let mut rig = Rig::new(&mem, &dir);
    let buf = rig.post_rx();
    rig.send(OP_REQUEST, 1000, 5678, &[]);
    assert_eq!(rig.tx_used(), 1);
    assert_eq!(rig.rx_used(), 1);
    assert_eq!(rig.queues[RX].used(0).1, HDR_LEN as u32);
    let (h, _) = rig.received(buf);
    assert_eq!(h.op, OP_RST);
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((h.src_port, h.dst_port), (5678, 1000));
    assert_eq!(rig.dev.connection_count(), 0);
    assert_eq!(
        rig.dev.counters().invalid_requests.load(Ordering::Relaxed),
        0
    );
}

#[test]
fn malformed_packets_are_dropped_and_unknown_ops_reset() {
    let dir = scratch("bad");
    let mem = mem();
    let mut rig = Rig::new(&mem, &dir);
    let buf = rig.post_rx();
    // Shorter than a header: dropped, counted, buffer returned, no answer.
    rig.send_raw(&[0u8; 20]);
    // A length beyond the chain.
    let mut h = hdr(OP_RW, 1, 100);
    h.src_port = 9;
    let mut bytes = h.to_bytes().to_vec();
    bytes.extend_from_slice(&[0; 10]);
    rig.send_raw(&bytes);
    // From another CID.
    let mut h = hdr(OP_REQUEST, 1, 0);
    h.src_cid = 99;
    rig.send_raw(&h.to_bytes());
    assert_eq!(rig.tx_used(), 3);
    assert_eq!(rig.rx_used(), 0);
    let counters = rig.dev.counters();
    assert_eq!(counters.invalid_requests.load(Ordering::Relaxed), 3);
    // An unknown op is answered with an RST (never an RST to an RST).
    rig.send(42, 1000, 80, &[]);
    assert_eq!(rig.rx_used(), 1);
    assert_eq!(rig.received(buf).0.op, OP_RST);
    rig.post_rx();
    rig.send(OP_RST, 1000, 80, &[]);
    assert_eq!(rig.rx_used(), 1);
    // Data on a connection that does not exist is reset too.
    rig.send(OP_RW, 1000, 81, b"abc");
    assert_eq!(rig.rx_used(), 2);
}

#[test]
fn a_guest_connection_carries_bytes_both_ways_and_closes() {
    let dir = scratch("conn");
    let mem = mem();
    let mut rig = Rig::new(&mem, &dir);
    let host = UnixListener::bind(dir.join("v.sock_5678")).unwrap();
    let b0 = rig.post_rx();
    rig.send(OP_REQUEST, 1000, 5678, &[]);
    let (h, _) = rig.received(b0);
    assert_eq!(h.op, OP_RESPONSE);
    assert_eq!(h.buf_alloc, CONN_BUF);
    assert_eq!(rig.dev.connection_count(), 1);
    let (mut peer, _) = host.accept().unwrap();

    rig.send(OP_RW, 1000, 5678, b"hello");
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(
        rig.dev.conns[&(5678, 1000)].fwd_cnt,
        5,
        "forwarded bytes are counted"
    );

    peer.write_all(b"world").unwrap();
    let b1 = rig.post_rx();
    rig.dev.on_conn_event((5678, 1000), EventSet::IN);
    rig.dev.process_rx();
    let (h, data) = rig.received(b1);
    assert_eq!((h.op, h.len, h.fwd_cnt), (OP_RW, 5, 5));
    assert_eq!(data, b"world");

    // The host closes: the guest hears SHUTDOWN(SEND); the guest's SHUTDOWN ends it with an RST.
    drop(peer);
    let b2 = rig.post_rx();
    rig.dev
        .on_conn_event((5678, 1000), EventSet::IN | EventSet::HANG_UP);
    rig.dev.process_rx();
    let (h, _) = rig.received(b2);
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    let b3 = rig.post_rx();
    let mut sh = hdr(OP_SHUTDOWN, 1, 0);
    sh.src_port = 1000;
    sh.dst_port = 5678;
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send_raw(&sh.to_bytes());
    assert_eq!(rig.received(b3).0.op, OP_RST);
    assert_eq!(rig.dev.connection_count(), 0);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let dir = scratch("credit");
    let mem = mem();
    let mut rig = Rig::new(&mem, &dir);
    let host = UnixListener::bind(dir.join("v.sock_7")).unwrap();
    rig.post_rx();
    rig.send(OP_REQUEST, 1000, 7, &[]);
    let (_peer, _) = host.accept().unwrap();
    // The peer never reads: the socket buffer fills, then CONN_BUF more, then the guest is over.
    let chunk = vec![0x5a; 60 * 1024];
    let mut sent = 0;
    while rig.dev.connection_count() == 1 && sent < 64 {
        rig.send(OP_RW, 1000, 7, &chunk);
        sent += 1;
    }
    assert_eq!(rig.dev.connection_count(), 0, "the connection was reset");
    assert!(rig.dev.counters().invalid_requests.load(Ordering::Relaxed) >= 1);
}

#[test]
fn config_space_holds_the_cid_and_bad_setups_are_refused() {
    let dir = scratch("cfg");
    let path = dir.join("v.sock");
    let dev = Vsock::new(0x1_0000_0003 & 0xffff_ffff, &path).unwrap();
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 3);
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert!(matches!(Vsock::new(5, &path), Err(VsockError::Exists(_))));
    drop(dev);
    assert!(!path.exists(), "the listener's socket is removed");
    assert!(matches!(Vsock::new(2, &path), Err(VsockError::Cid(2))));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &path),
        Err(VsockError::Cid(_))
    ));
}

#[test]
fn a_host_client_waiting_for_the_guest_survives_a_driver_reset() {
    let dir = scratch("reset");
    let mem = mem();
    let mut rig = Rig::new(&mem, &dir);
    let mut client = std::os::unix::net::UnixStream::connect(dir.join("v.sock")).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    rig.dev.accept();
    assert_eq!(rig.dev.handshakes.len(), 1);
    rig.dev.on_handshake(0);
    assert_eq!(rig.dev.connection_count(), 1);
    rig.dev.reset();
    assert_eq!(rig.dev.connection_count(), 1, "still waiting for the guest");
    // The new driver gets the REQUEST.
    let mut rig2 = Rig {
        dev: rig.dev,
        ..Rig::new(&mem, &scratch("reset2"))
    };
    let queues = driver_queues(&mem, 0x30_0000);
    activate(&mut rig2.dev, &mem, &queues).unwrap();
    rig2.queues = queues;
    let b = rig2.post_rx();
    rig2.dev.process_rx();
    let (h, _) = rig2.received(b);
    assert_eq!((h.op, h.dst_port), (OP_REQUEST, 1234));
    assert!(h.src_port >= EPHEMERAL_BASE);
}
