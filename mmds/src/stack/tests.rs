//! The stack against a guest played by a second, independent smoltcp interface on Ethernet:
//! real ARP resolution and real TCP from the other side.

use super::*;
use crate::data_store::MmdsVersion;
use serde_json::json;
use smoltcp::wire::{IpAddress, Ipv4Address};

const GUEST_MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 2];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);

#[derive(Default)]
struct Wire {
    to_host: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct GuestRx(Vec<u8>);
impl phy::RxToken for GuestRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
struct GuestTx<'a>(&'a mut VecDeque<Vec<u8>>);
impl phy::TxToken for GuestTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0; len];
        let r = f(&mut v);
        self.0.push_back(v);
        r
    }
}
impl phy::Device for Wire {
    type RxToken<'a> = GuestRx;
    type TxToken<'a> = GuestTx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(GuestRx, GuestTx<'_>)> {
        let f = self.to_guest.pop_front()?;
        Some((GuestRx(f), GuestTx(&mut self.to_host)))
    }
    fn transmit(&mut self, _: Instant) -> Option<GuestTx<'_>> {
        Some(GuestTx(&mut self.to_host))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Guest {
    iface: Interface,
    sockets: SocketSet<'static>,
    wire: Wire,
    t: i64,
    /// Frames the stack did not take (would have gone to the TAP).
    to_tap: Vec<Vec<u8>>,
}

impl Guest {
    fn new() -> Self {
        let mut wire = Wire::default();
        let mut iface = Interface::new(
            Config::new(EthernetAddress(GUEST_MAC).into()),
            &mut wire,
            Instant::from_millis(0),
        );
        iface.update_ip_addrs(|a| a.push(IpCidr::new(GUEST_IP.into(), 16)).unwrap());
        Self {
            iface,
            sockets: SocketSet::new(vec![]),
            wire,
            t: 0,
            to_tap: vec![],
        }
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        s.connect(
            self.iface.context(),
            (IpAddress::Ipv4(DEFAULT_IPV4), 80),
            port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    /// Runs both sides until the wire is quiet.
    fn run(&mut self, stack: &mut MmdsStack) {
        for _ in 0..200 {
            self.t += 1;
            self.iface.poll(
                Instant::from_millis(self.t),
                &mut self.wire,
                &mut self.sockets,
            );
            let mut moved = false;
            while let Some(f) = self.wire.to_host.pop_front() {
                moved = true;
                if !stack.detour(&f) {
                    self.to_tap.push(f);
                }
            }
            stack.poll();
            while let Some(f) = stack.pop_frame() {
                moved = true;
                self.wire.to_guest.push_back(f);
            }
            if !moved {
                break;
            }
        }
    }

    fn exchange(&mut self, stack: &mut MmdsStack, port: u16, request: &str) -> String {
        let h = self.connect(port);
        self.run(stack);
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        assert!(s.may_send(), "connected: {:?}", s.state());
        s.send_slice(request.as_bytes()).unwrap();
        self.run(stack);
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let mut got = Vec::new();
        while s.can_recv() {
            s.recv(|d| {
                got.extend_from_slice(d);
                (d.len(), ())
            })
            .unwrap();
        }
        s.close();
        self.run(stack);
        String::from_utf8(got).unwrap()
    }
}

fn store(version: MmdsVersion) -> Arc<Mutex<Mmds>> {
    let mut m = Mmds::default();
    m.set_version(version);
    m.put(json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}}))
        .unwrap();
    Arc::new(Mutex::new(m))
}

fn body(reply: &str) -> &str {
    reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

#[test]
fn a_guest_resolves_connects_and_reads_metadata() {
    let mut stack = MmdsStack::new(DEFAULT_IPV4, store(MmdsVersion::V1));
    let mut guest = Guest::new();
    let r = guest.exchange(
        &mut stack,
        40000,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert_eq!(body(&r), "ami-12345678");
    assert!(guest.to_tap.is_empty(), "nothing of it went to the TAP");
    let c = stack.counters();
    assert_eq!((c.requests, c.bad_requests, c.connections), (1, 0, 1));
    // Connections are reused slots: many more than the pool, one after the other.
    for i in 0..(2 * MAX_CONNECTIONS as u16) {
        let r = guest.exchange(&mut stack, 41000 + i, "GET /latest HTTP/1.0\r\n\r\n");
        assert_eq!(body(&r), "meta-data/", "{i}: {r}");
    }
}

#[test]
fn v2_session_through_tcp() {
    let mut stack = MmdsStack::new(DEFAULT_IPV4, store(MmdsVersion::V2));
    let mut guest = Guest::new();
    let r = guest.exchange(&mut stack, 40001, "GET /latest HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    let r = guest.exchange(
        &mut stack,
        40002,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21600\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let token = body(&r).to_string();
    let r = guest.exchange(
        &mut stack,
        40003,
        &format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\nAccept: application/json\r\n\r\n"),
    );
    assert_eq!(body(&r), "\"ami-12345678\"", "{r}");
    assert_eq!(stack.counters().bad_requests, 1);
}

#[test]
fn other_traffic_is_left_for_the_tap() {
    let mut stack = MmdsStack::new(Ipv4Addr::new(169, 254, 170, 2), store(MmdsVersion::V1));
    let mut guest = Guest::new();
    // The guest talks to the default address, which this stack does not own.
    let h = guest.connect(40010);
    guest.run(&mut stack);
    assert!(!guest.to_tap.is_empty());
    assert!(
        guest.to_tap.iter().all(|f| !stack.detour(f)),
        "an ARP for another address is not ours"
    );
    let _ = h;
    // UDP to the service's address goes to the TAP, as in Firecracker.
    let mut udp = arp_reply(
        Ipv4Addr::new(169, 254, 170, 2),
        EthernetAddress(GUEST_MAC),
        GUEST_IP,
    );
    udp.truncate(14);
    udp[12..14].copy_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 28];
    ip[0] = 0x45;
    ip[3] = 28;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GUEST_IP.octets());
    ip[16..20].copy_from_slice(&[169, 254, 170, 2]);
    udp.extend_from_slice(&ip);
    assert!(!stack.detour(&udp));
    // Garbage and truncated frames are not taken either.
    assert!(!stack.detour(&[]));
    assert!(!stack.detour(&[0u8; 13]));
    assert!(!stack.detour(&udp[..20]));
}

/// A bare SYN from the guest's address and `port`, as a flooding guest sends it.
fn syn_frame(port: u16) -> Vec<u8> {
    use smoltcp::wire::TcpControl;
    guest_tcp_segment(
        (GUEST_MAC, GUEST_IP),
        DEFAULT_IPV4,
        port,
        TcpControl::Syn,
        7,
        None,
        1024,
        &[],
    )
}

#[test]
fn a_syn_flood_stays_bounded_and_the_service_recovers() {
    let mut stack = MmdsStack::new(DEFAULT_IPV4, store(MmdsVersion::V1));
    let mut guest = Guest::new();
    // Resolve once, then SYNs from 1000 ports that never complete, and their SYN-ACKs never
    // taken by the guest: half-open connections and queued answers pile up.
    guest.exchange(&mut stack, 39999, "GET /latest HTTP/1.1\r\n\r\n");
    for i in 0..1000u16 {
        assert!(stack.detour(&syn_frame(20000 + i)));
        assert!(stack.link.tx.len() <= MAX_PENDING_FRAMES);
        assert!(stack.link.rx.len() <= MAX_PENDING_FRAMES);
    }
    assert!(
        stack.counters().tx_dropped > 0,
        "answers beyond the queue were dropped"
    );
    while stack.pop_frame().is_some() {}
    // A real client is served at once: a half-open connection gave its slot up.
    let r = guest.exchange(&mut stack, 50000, "GET /latest HTTP/1.1\r\n\r\n");
    assert_eq!(body(&r), "meta-data/", "{r}");
}

#[test]
fn arp_requests_for_the_service_are_answered_from_its_mac() {
    let mut stack = MmdsStack::new(DEFAULT_IPV4, store(MmdsVersion::V1));
    let request = {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: GUEST_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: DEFAULT_IPV4,
        };
        let mut f = vec![0u8; 14 + arp.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
        EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        f
    };
    assert!(stack.detour(&request));
    let reply = stack.pop_frame().unwrap();
    let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
    assert_eq!(
        arp,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(MMDS_MAC),
            source_protocol_addr: Ipv4Address::new(169, 254, 169, 254),
            target_hardware_addr: EthernetAddress(GUEST_MAC),
            target_protocol_addr: GUEST_IP,
        }
    );
    assert!(stack.pop_frame().is_none());
}
