//! The metadata service's network endpoint, inside the VMM: the guest's ARP requests for the
//! MMDS address and its TCP segments to it never reach the TAP; they are answered here.
//!
//! ARP is answered from `smoltcp`'s wire types; IPv4 and TCP run on `smoltcp`'s interface and
//! sockets (an IP-medium interface: the Ethernet header of each answer is addressed to the MAC
//! the guest sent from). HTTP on top is [`crate::http`]. Everything is bounded: a fixed pool of
//! connections with fixed buffers, a request cap, replies no larger than the data store, and a
//! fixed queue of frames waiting for the guest's RX buffers, so a flood from the guest costs a
//! bounded amount of memory and never blocks the VMM.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr, IpProtocol, Ipv4Packet,
};

use crate::data_store::Mmds;
use crate::http::{self, Parsed, MAX_REQUEST_LEN};

/// The MAC the service answers from (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The address the service listens on unless configured otherwise.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const HTTP_PORT: u16 = 80;
/// Concurrent connections; one more SYN is refused (RST) until one ends.
pub const MAX_CONNECTIONS: usize = 16;
const SOCKET_RX_BYTES: usize = 4 << 10;
const SOCKET_TX_BYTES: usize = 16 << 10;
/// Frames for the guest waiting for RX buffers; more are dropped (TCP sends them again).
pub const MAX_PENDING_FRAMES: usize = 64;
/// A connection with nothing to do this long gives its place to a new one.
const IDLE_EVICT: Duration = Duration::from_secs(30);
const MTU: usize = 1500;
const ETH_HDR: usize = 14;
/// Guests whose MAC is remembered per IPv4 address (the last sender fills a full table).
const MAX_NEIGHBOURS: usize = 16;

/// What the stack has done, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StackCounters {
    /// Frames from the guest taken by the service.
    pub rx_frames: u64,
    /// Frames to the guest produced by the service.
    pub tx_frames: u64,
    /// Frames to the guest dropped because the guest took none for too long.
    pub tx_dropped: u64,
    /// HTTP requests answered (any status).
    pub requests: u64,
    /// Requests answered with a 4xx/5xx status.
    pub bad_requests: u64,
    /// Connections accepted.
    pub connections: u64,
}

/// The smoltcp device: IP packets in from the guest, Ethernet frames out to it.
struct Link {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    neighbours: VecDeque<(Ipv4Addr, [u8; 6])>,
    dropped: u64,
}

impl Link {
    fn mac_for(&self, ip: Ipv4Addr) -> [u8; 6] {
        self.neighbours
            .iter()
            .find(|(a, _)| *a == ip)
            .or(self.neighbours.back())
            .map(|(_, m)| *m)
            .unwrap_or([0xff; 6])
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        self.neighbours.retain(|(a, _)| *a != ip);
        if self.neighbours.len() == MAX_NEIGHBOURS {
            self.neighbours.pop_front();
        }
        self.neighbours.push_back((ip, mac));
    }

    fn push_frame(&mut self, frame: Vec<u8>) {
        if self.tx.len() < MAX_PENDING_FRAMES {
            self.tx.push_back(frame);
        } else {
            self.dropped += 1;
        }
    }
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut Link);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; ETH_HDR + len];
        let r = f(&mut frame[ETH_HDR..]);
        let dst = Ipv4Packet::new_checked(&frame[ETH_HDR..])
            .map(|p| self.0.mac_for(p.dst_addr()))
            .unwrap_or([0xff; 6]);
        EthernetRepr {
            src_addr: EthernetAddress(MMDS_MAC),
            dst_addr: EthernetAddress(dst),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        self.0.push_frame(frame);
        r
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(self)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

/// One connection slot: its socket and the HTTP exchange on it.
struct Conn {
    handle: SocketHandle,
    request: Vec<u8>,
    reply: Vec<u8>,
    sent: usize,
    close_after: bool,
    active: StdInstant,
    counted: bool,
}

/// The service's endpoint on one network interface.
pub struct MmdsStack {
    ip: Ipv4Addr,
    store: Arc<Mutex<Mmds>>,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    link: Link,
    epoch: StdInstant,
    counters: StackCounters,
}

impl std::fmt::Debug for MmdsStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsStack")
            .field("ip", &self.ip)
            .field("counters", &self.counters)
            .finish()
    }
}

fn listening_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_RX_BYTES]),
        tcp::SocketBuffer::new(vec![0; SOCKET_TX_BYTES]),
    );
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
    s.listen(HTTP_PORT)
        .expect("port 80 is a valid listen endpoint");
    s
}

impl MmdsStack {
    /// An endpoint at `ip` serving `store`.
    pub fn new(ip: Ipv4Addr, store: Arc<Mutex<Mmds>>) -> Self {
        let mut link = Link {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            neighbours: VecDeque::new(),
            dropped: 0,
        };
        let epoch = StdInstant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = epoch.elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
        let mut iface = Interface::new(config, &mut link, Instant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(ip.into(), 32))
                .expect("one address fits");
        });
        // The guest may be on any subnet: answers go back the way it came.
        iface
            .routes_mut()
            .add_default_ipv4_route(ip)
            .expect("one route fits");
        let mut sockets = SocketSet::new(Vec::with_capacity(MAX_CONNECTIONS));
        let conns = (0..MAX_CONNECTIONS)
            .map(|_| Conn {
                handle: sockets.add(listening_socket()),
                request: Vec::new(),
                reply: Vec::new(),
                sent: 0,
                close_after: false,
                active: epoch,
                counted: false,
            })
            .collect();
        Self {
            ip,
            store,
            iface,
            sockets,
            conns,
            link,
            epoch,
            counters: StackCounters::default(),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn counters(&self) -> StackCounters {
        StackCounters {
            tx_dropped: self.link.dropped,
            ..self.counters
        }
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.epoch.elapsed().as_millis() as i64)
    }

    /// Takes `frame` (an Ethernet frame the guest sent) if it is for the service: an ARP packet
    /// asking about the service's address, or an IPv4 TCP segment to it. Anything else is left
    /// for the TAP (`false`).
    pub fn detour(&mut self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let Ok(repr) =
                    ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p))
                else {
                    return false;
                };
                let ArpRepr::EthernetIpv4 {
                    operation,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                } = repr
                else {
                    return false;
                };
                if target_protocol_addr != self.ip {
                    return false;
                }
                self.counters.rx_frames += 1;
                if operation == ArpOperation::Request {
                    self.link
                        .learn(source_protocol_addr, source_hardware_addr.0);
                    self.link.push_frame(arp_reply(
                        self.ip,
                        source_hardware_addr,
                        source_protocol_addr,
                    ));
                }
                true
            }
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return false;
                };
                if ip.dst_addr() != self.ip || ip.next_header() != IpProtocol::Tcp {
                    return false;
                }
                self.counters.rx_frames += 1;
                self.link.learn(ip.src_addr(), eth.src_addr().0);
                if is_syn(&ip) {
                    self.make_room();
                }
                // Bounded like the frames out: a guest that sends faster than the VMM polls
                // loses segments, and TCP sends them again.
                if self.link.rx.len() < MAX_PENDING_FRAMES {
                    self.link.rx.push_back(eth.payload().to_vec());
                }
                self.poll();
                true
            }
            _ => false,
        }
    }

    /// Before a new connection's SYN is taken: if no slot listens, the oldest half-open
    /// connection (a SYN never completed, as in a flood), else the longest idle one, gives its
    /// slot up, so a flood delays real clients by at most one SYN-ACK round.
    fn make_room(&mut self) {
        let now = StdInstant::now();
        let mut victim: Option<(bool, StdInstant, usize)> = None;
        for (i, conn) in self.conns.iter().enumerate() {
            let state = self.sockets.get::<tcp::Socket>(conn.handle).state();
            if state == tcp::State::Listen {
                return;
            }
            let half_open = state == tcp::State::SynReceived;
            let idle = conn.reply.is_empty() && now.duration_since(conn.active) >= IDLE_EVICT;
            if !(half_open || idle) {
                continue;
            }
            // Half-open first, then the oldest.
            let key = (!half_open, conn.active, i);
            if victim.is_none_or(|v| key < v) {
                victim = Some(key);
            }
        }
        if let Some((_, _, i)) = victim {
            let conn = &mut self.conns[i];
            *self.sockets.get_mut::<tcp::Socket>(conn.handle) = listening_socket();
            conn.request.clear();
            conn.reply.clear();
            conn.sent = 0;
            conn.close_after = false;
            conn.counted = false;
            conn.active = now;
        }
    }

    /// Runs TCP and HTTP until nothing more happens now.
    pub fn poll(&mut self) {
        for _ in 0..64 {
            let now = self.now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);
            if !self.serve() {
                break;
            }
        }
    }

    /// How long until [`Self::poll`] must run again (retransmissions, timeouts), if ever.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_millis(d.total_millis()))
    }

    /// The next frame for the guest.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        let f = self.link.tx.pop_front();
        if f.is_some() {
            self.counters.tx_frames += 1;
        }
        f
    }

    /// Puts a frame the guest had no room for back at the head of the queue.
    pub fn unpop_frame(&mut self, frame: Vec<u8>) {
        self.counters.tx_frames -= 1;
        self.link.tx.push_front(frame);
    }

    pub fn has_frames(&self) -> bool {
        !self.link.tx.is_empty()
    }

    /// Moves HTTP bytes between the sockets and the data store; whether anything moved.
    fn serve(&mut self) -> bool {
        let mut progress = false;
        let now = StdInstant::now();
        for conn in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            match socket.state() {
                tcp::State::Closed | tcp::State::TimeWait => {
                    // TIME-WAIT would hold the slot for seconds; the peer has what it needs.
                    socket.abort();
                    *socket = listening_socket();
                    conn.request.clear();
                    conn.reply.clear();
                    conn.sent = 0;
                    conn.close_after = false;
                    conn.counted = false;
                    continue;
                }
                tcp::State::Listen => continue,
                _ => {}
            }
            if !conn.counted && socket.is_active() {
                conn.counted = true;
                conn.active = now;
                self.counters.connections += 1;
            }
            // Take request bytes, never more than one request's limit held.
            while socket.can_recv() && conn.request.len() < MAX_REQUEST_LEN && !conn.close_after {
                let room = MAX_REQUEST_LEN - conn.request.len();
                let got = socket
                    .recv(|data| {
                        let n = data.len().min(room);
                        (n, data[..n].to_vec())
                    })
                    .unwrap_or_default();
                if got.is_empty() {
                    break;
                }
                conn.request.extend_from_slice(&got);
                conn.active = now;
                progress = true;
            }
            // Answer whole requests, one reply in flight at a time.
            while conn.sent == conn.reply.len() && !conn.close_after && !conn.request.is_empty() {
                let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                match http::handle(&mut store, &conn.request) {
                    Parsed::Incomplete => break,
                    Parsed::Complete { len, reply } => {
                        conn.request.drain(..len);
                        self.counters.requests += 1;
                        if reply.status >= 400 {
                            self.counters.bad_requests += 1;
                        }
                        conn.close_after = reply.close;
                        conn.reply = reply.to_bytes();
                        conn.sent = 0;
                        progress = true;
                    }
                }
            }
            if conn.sent < conn.reply.len() && socket.can_send() {
                if let Ok(n) = socket.send_slice(&conn.reply[conn.sent..]) {
                    conn.sent += n;
                    progress |= n > 0;
                    conn.active = now;
                }
            }
            let replied = conn.sent == conn.reply.len();
            if replied {
                conn.reply.clear();
                conn.sent = 0;
            }
            let peer_done = !socket.may_recv();
            if replied && (conn.close_after || peer_done) && socket.may_send() {
                socket.close();
                progress = true;
            }
        }
        progress
    }
}

/// A TCP segment as a guest at `guest` (MAC, IPv4) sends it to the service at `service` port 80,
/// checksums right: for tests and fuzzing of the stack from the guest's side.
#[allow(clippy::too_many_arguments)]
pub fn guest_tcp_segment(
    guest: ([u8; 6], Ipv4Addr),
    service: Ipv4Addr,
    port: u16,
    control: smoltcp::wire::TcpControl,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    use smoltcp::wire::{IpAddress, Ipv4Repr, TcpPacket, TcpRepr, TcpSeqNumber};
    let tcp = TcpRepr {
        src_port: port,
        dst_port: HTTP_PORT,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: guest.1,
        dst_addr: service,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut f = vec![0u8; ETH_HDR + ip.buffer_len() + tcp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
    EthernetRepr {
        src_addr: EthernetAddress(guest.0),
        dst_addr: EthernetAddress(MMDS_MAC),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    tcp.emit(
        &mut TcpPacket::new_unchecked(packet.payload_mut()),
        &IpAddress::Ipv4(guest.1),
        &IpAddress::Ipv4(service),
        &ChecksumCapabilities::default(),
    );
    f
}

/// A TCP segment opening a connection (SYN without ACK).
fn is_syn(ip: &Ipv4Packet<&[u8]>) -> bool {
    let tcp = ip.payload();
    let header_ok = tcp.len() >= 14 && usize::from(ip.header_len()) >= 20;
    header_ok && tcp[13] & 0x12 == 0x02
}

fn arp_reply(ip: Ipv4Addr, to_mac: EthernetAddress, to_ip: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(MMDS_MAC),
        source_protocol_addr: ip,
        target_hardware_addr: to_mac,
        target_protocol_addr: to_ip,
    };
    let mut frame = vec![0u8; ETH_HDR + arp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: EthernetAddress(MMDS_MAC),
        dst_addr: to_mac,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    frame
}

#[cfg(test)]
mod tests;
