//! The metadata service's network endpoint as a hostile guest sees it: any sequence of frames on
//! the virtio-net TX queue (raw bytes, or ARP/TCP segments to the service with any ports,
//! sequence numbers, flags and payloads, checksums right), with time passing between them.
//! Asserts that frames not for the service are left to the TAP, that the queues stay within
//! their bounds, and that every frame the service sends is addressed from its MAC.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mmds::stack::{guest_tcp_segment, MAX_PENDING_FRAMES, MMDS_MAC};
use mmds::{Mmds, MmdsStack, MmdsVersion, DEFAULT_IPV4};
use smoltcp::wire::{EthernetAddress, EthernetFrame, EthernetProtocol, Ipv4Address, TcpControl};

const GUEST_MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 2];
const GUEST_IP: Ipv4Address = Ipv4Address::new(169, 254, 0, 2);

#[derive(Debug, Arbitrary)]
enum Frame {
    Raw(Vec<u8>),
    Tcp {
        port: u16,
        seq: u32,
        ack: Option<u32>,
        control: u8,
        window: u16,
        payload: Vec<u8>,
    },
    /// The guest takes this many frames the service queued.
    Take(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    v2: bool,
    imds_compat: bool,
    frames: Vec<Frame>,
}

fn tcp_frame(port: u16, seq: u32, ack: Option<u32>, control: u8, window: u16, payload: &[u8]) -> Vec<u8> {
    let control = match control % 5 {
        0 => TcpControl::None,
        1 => TcpControl::Psh,
        2 => TcpControl::Syn,
        3 => TcpControl::Fin,
        _ => TcpControl::Rst,
    };
    let payload = &payload[..payload.len().min(1400)];
    guest_tcp_segment((GUEST_MAC, GUEST_IP), DEFAULT_IPV4, port, control, seq, ack, window, payload)
}

fuzz_target!(|input: Input| {
    let mut store = Mmds::new(1024);
    store.set_version(if input.v2 { MmdsVersion::V2 } else { MmdsVersion::V1 });
    store.set_imds_compat(input.imds_compat);
    let _ = store.put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3}}}));
    let mut stack = MmdsStack::new(DEFAULT_IPV4, Arc::new(Mutex::new(store)));
    for frame in input.frames.iter().take(512) {
        match frame {
            Frame::Raw(bytes) => {
                let taken = stack.detour(bytes);
                // Only ARP and IPv4 frames can be the service's.
                if taken {
                    let kind = EthernetFrame::new_checked(&bytes[..]).map(|e| e.ethertype());
                    assert!(matches!(kind, Ok(EthernetProtocol::Arp | EthernetProtocol::Ipv4)));
                }
            }
            Frame::Tcp { port, seq, ack, control, window, payload } => {
                assert!(stack.detour(&tcp_frame(*port, *seq, *ack, *control, *window, payload)));
            }
            Frame::Take(n) => {
                for _ in 0..*n {
                    let Some(out) = stack.pop_frame() else { break };
                    let eth = EthernetFrame::new_checked(&out[..]).expect("a whole frame");
                    assert_eq!(eth.src_addr(), EthernetAddress(MMDS_MAC));
                }
            }
        }
        stack.poll();
        let _ = stack.poll_delay();
        let c = stack.counters();
        assert!(c.requests <= c.rx_frames);
    }
    let mut queued = 0;
    while stack.pop_frame().is_some() {
        queued += 1;
    }
    assert!(queued <= MAX_PENDING_FRAMES, "{queued} frames queued");
});
