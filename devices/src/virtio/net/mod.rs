//! virtio-net on a host TAP device.
//!
//! TX: frames the guest queues are written to the TAP. RX: frames read from the TAP go into the
//! buffers the guest posted. A frame read while the guest has no buffer (or while the RX rate
//! limiter says wait) is held, and the TAP is not polled until buffers or tokens return, so no
//! frame is lost to a full ring and the loop never spins.
//!
//! With the metadata service on this interface ([`Net::attach_mmds`]), TX frames for its address
//! (ARP and TCP) go to the service's stack in the VMM instead of the TAP, and its answers reach
//! the guest's RX buffers ahead of TAP frames, as in Firecracker.

mod tap;

pub use tap::{Tap, TapError, VNET_HDR_LEN};

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use mmds::MmdsStack;
use virtio_queue::{QueueOwnedT, Reader, Writer};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    add_used, pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError,
    ActiveQueues, DeviceCounters, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};
use crate::rate_limiter::{
    Cost, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};

/// The TAP is reattached by name from the configuration; a frame read from it and not yet
/// delivered is dropped, as a network may. What stays is the limiters' fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub rx_limiter: RateLimiterState,
    pub tx_limiter: RateLimiterState,
}

impl Persist for Net {
    type State = NetState;

    fn save(&mut self) -> NetState {
        NetState {
            rx_limiter: self.rx_limiter.save(),
            tx_limiter: self.tx_limiter.save(),
        }
    }

    fn restore(&mut self, state: NetState) -> Result<(), PersistError> {
        self.rx_limiter.restore(state.rx_limiter)?;
        self.tx_limiter.restore(state.tx_limiter)?;
        // The restored driver may have posted buffers while nothing read the TAP.
        self.tap_polled = false;
        Ok(())
    }
}

pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// A header plus the largest frame a TAP without offloads delivers.
pub const MAX_FRAME_WITH_HDR: usize = VNET_HDR_LEN + 65_550;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_MTU: u32 = 3;
/// Offset of `mtu` in the configuration space (after mac, status, max_virtqueue_pairs).
const CONFIG_MTU_OFFSET: usize = 10;

/// Errors of creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create an eventfd for a network queue: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    #[error("cannot create the metadata service's timer: {0}")]
    MmdsTimer(vmm_sys_util::errno::Error),
}

/// The metadata service on this interface: its stack and the timer for its retransmissions.
struct MmdsPort {
    stack: MmdsStack,
    timer: TimerFd,
    timer_watched: bool,
}

/// Puts the next frame the metadata service has for the guest, after a virtio-net header, in
/// `buf`; its length.
fn next_mmds_frame(mmds: &mut Option<MmdsPort>, buf: &mut [u8]) -> Option<usize> {
    let frame = mmds.as_mut()?.stack.pop_frame()?;
    let len = VNET_HDR_LEN + frame.len();
    buf[..VNET_HDR_LEN].fill(0);
    // num_buffers: 1, as the spec asks without VIRTIO_NET_F_MRG_RXBUF.
    buf[VNET_HDR_LEN - 2] = 1;
    buf[VNET_HDR_LEN..len].copy_from_slice(&frame);
    Some(len)
}

/// A virtio-net device.
pub struct Net {
    id: String,
    tap: Tap,
    config: Vec<u8>,
    has_mac: bool,
    has_mtu: bool,
    queue_events: [EventFd; 2],
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues<2>>,
    /// A frame read from the TAP and not yet delivered, `rx_len` bytes long (0: none).
    rx_frame: Vec<u8>,
    rx_len: usize,
    tap_polled: bool,
    tx_frame: Vec<u8>,
    mmds: Option<MmdsPort>,
}

impl Net {
    pub fn new(
        id: &str,
        tap_name: &str,
        mac: Option<[u8; 6]>,
        rx: RateLimiterConfig,
        tx: RateLimiterConfig,
    ) -> Result<Self, NetError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            id: id.to_string(),
            tap: Tap::open(tap_name)?,
            config: mac.map(|m| m.to_vec()).unwrap_or_default(),
            has_mac: mac.is_some(),
            has_mtu: false,
            queue_events: [evt()?, evt()?],
            rx_limiter: RateLimiter::new(rx)?,
            tx_limiter: RateLimiter::new(tx)?,
            counters: Arc::default(),
            active: None,
            rx_frame: vec![0; MAX_FRAME_WITH_HDR],
            rx_len: 0,
            // Polled from the guest's first RX kick: before that there is nowhere to put frames.
            tap_polled: false,
            tx_frame: Vec::with_capacity(MAX_FRAME_WITH_HDR),
            mmds: None,
        })
    }

    /// Advertises `mtu` to the guest (VIRTIO_NET_F_MTU), before it negotiates features.
    pub fn set_mtu(&mut self, mtu: u16) {
        self.config.resize(CONFIG_MTU_OFFSET + 2, 0);
        self.config[CONFIG_MTU_OFFSET..].copy_from_slice(&mtu.to_le_bytes());
        self.has_mtu = true;
    }

    /// Serves the metadata service on this interface from now on.
    pub fn attach_mmds(&mut self, stack: MmdsStack) -> Result<(), NetError> {
        self.mmds = Some(MmdsPort {
            stack,
            timer: TimerFd::new().map_err(NetError::MmdsTimer)?,
            timer_watched: false,
        });
        Ok(())
    }

    /// The metadata service's counters, if it runs here.
    pub fn mmds_counters(&self) -> Option<mmds::StackCounters> {
        self.mmds.as_ref().map(|m| m.stack.counters())
    }

    /// Watches the service's timer (once) and sets it for the stack's next deadline.
    fn arm_mmds_timer(&mut self, ops: &mut EventOps) {
        let Some(m) = self.mmds.as_mut() else {
            return;
        };
        if !m.timer_watched {
            match ops.add(Events::new(&m.timer, EventSet::IN)) {
                Ok(()) => m.timer_watched = true,
                Err(e) => tracing::error!("net {}: cannot watch the MMDS timer: {e}", self.id),
            }
        }
        let delay = m.stack.poll_delay();
        let result = match delay {
            // A zero delay would disarm the timer: poll again in a millisecond instead.
            Some(d) => m
                .timer
                .reset(d.max(std::time::Duration::from_millis(1)), None),
            None => m.timer.clear(),
        };
        if let Err(e) = result {
            tracing::warn!("net {}: MMDS timer: {e}", self.id);
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Replaces the rate limiters while the guest runs. A queue waiting on the old buckets is
    /// re-checked when the limiter's timer fires.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> Result<(), NetError> {
        if let Some(rx) = rx {
            self.rx_limiter.update_buckets(rx)?;
        }
        if let Some(tx) = tx {
            self.tx_limiter.update_buckets(tx)?;
        }
        Ok(())
    }

    /// Moves frames from the TAP into guest buffers; returns whether the TAP should be polled
    /// (false before activation, and while a frame waits for a buffer or for tokens).
    fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let q = &mut active.queues[RX];
        let mut completed = false;
        let poll_tap = loop {
            if self.rx_len == 0 {
                if let Some(n) = next_mmds_frame(&mut self.mmds, &mut self.rx_frame) {
                    self.rx_len = n;
                }
            }
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                    Err(e) => {
                        tracing::warn!("net {}: TAP read: {e}", self.id);
                        DeviceCounters::inc(&self.counters.io_errors, 1);
                        break true;
                    }
                }
            }
            let Some(chain) = pop_chain(q, &active.mem, &self.counters) else {
                break false;
            };
            let head = chain.head_index();
            let frame_bytes = (self.rx_len.saturating_sub(VNET_HDR_LEN)) as u64;
            if !self.rx_limiter.consume(Cost {
                bytes: frame_bytes,
                ops: 1,
            }) {
                q.go_to_previous_position();
                DeviceCounters::inc(&self.counters.throttled, 1);
                break false;
            }
            let used = match Writer::new(&active.mem, chain) {
                Ok(mut w) if w.available_bytes() >= self.rx_len => {
                    match w.write_all(&self.rx_frame[..self.rx_len]) {
                        Ok(()) => {
                            DeviceCounters::inc(&self.counters.requests, 1);
                            DeviceCounters::inc(&self.counters.bytes_to_guest, frame_bytes);
                            self.rx_len as u32
                        }
                        Err(_) => 0,
                    }
                }
                // A buffer too small for the frame, or outside guest memory: the frame is
                // dropped, as a NIC drops what does not fit, and the buffer returned.
                _ => {
                    DeviceCounters::inc(&self.counters.invalid_requests, 1);
                    0
                }
            };
            self.rx_len = 0;
            if let Err(e) = add_used(q, &active.mem, &active.writes, head, used) {
                tracing::warn!("net {}: cannot return an RX buffer: {e}", self.id);
            }
            completed = true;
        };
        if completed {
            active.notify(RX);
        }
        poll_tap
    }

    /// Sends the frames the guest queued.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let q = &mut active.queues[TX];
        let mut completed = false;
        while let Some(chain) = pop_chain(q, &active.mem, &self.counters) {
            let head = chain.head_index();
            match Reader::new(&active.mem, chain) {
                Ok(mut r) if (VNET_HDR_LEN..=MAX_FRAME_WITH_HDR).contains(&r.available_bytes()) => {
                    let len = r.available_bytes();
                    if !self.tx_limiter.consume(Cost {
                        bytes: (len - VNET_HDR_LEN) as u64,
                        ops: 1,
                    }) {
                        q.go_to_previous_position();
                        DeviceCounters::inc(&self.counters.throttled, 1);
                        break;
                    }
                    self.tx_frame.resize(len, 0);
                    let mmds = &mut self.mmds;
                    let tap = &mut self.tap;
                    let frame = &mut self.tx_frame;
                    let sent = r.read_exact(frame).and_then(|()| {
                        if let Some(m) = mmds.as_mut() {
                            if m.stack.detour(&frame[VNET_HDR_LEN..]) {
                                return Ok(());
                            }
                        }
                        tap.write_frame(frame)
                    });
                    match sent {
                        Ok(()) => {
                            DeviceCounters::inc(&self.counters.requests, 1);
                            DeviceCounters::inc(
                                &self.counters.bytes_from_guest,
                                (len - VNET_HDR_LEN) as u64,
                            );
                        }
                        Err(e) => {
                            // Lost like a frame on a busy wire; the guest's buffer comes back.
                            tracing::debug!("net {}: TAP write: {e}", self.id);
                            DeviceCounters::inc(&self.counters.io_errors, 1);
                        }
                    }
                }
                _ => DeviceCounters::inc(&self.counters.invalid_requests, 1),
            }
            if let Err(e) = add_used(q, &active.mem, &active.writes, head, 0) {
                tracing::warn!("net {}: cannot return a TX buffer: {e}", self.id);
            }
            completed = true;
        }
        if completed {
            active.notify(TX);
        }
    }

    fn set_tap_polling(&mut self, poll: bool, ops: &mut EventOps) {
        if poll == self.tap_polled {
            return;
        }
        let events = Events::new_raw(self.tap.as_raw_fd(), EventSet::IN);
        let result = if poll {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_polled = poll,
            Err(e) => tracing::error!("net {}: cannot change TAP polling: {e}", self.id),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1;
        if self.has_mac {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        if self.has_mtu {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueues::new(ctx)?);
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveQueues::states)
    }

    fn reset(&mut self) {
        // The TAP stays polled if it was; the next event finds no active device and stops it.
        self.active = None;
        self.rx_len = 0;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_events[RX].as_raw_fd(),
            self.queue_events[TX].as_raw_fd(),
            self.rx_limiter.as_raw_fd(),
            self.tx_limiter.as_raw_fd(),
        ];
        watch_fds(ops, &format!("net {}", self.id), fds);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let mmds_fd = self.mmds.as_ref().map(|m| m.timer.as_raw_fd());
        if fd == self.queue_events[TX].as_raw_fd() || fd == self.tx_limiter.as_raw_fd() {
            if fd == self.tx_limiter.as_raw_fd() {
                self.tx_limiter.on_timer();
            } else {
                let _ = self.queue_events[TX].read();
            }
            self.process_tx();
            if self.mmds.is_none() {
                return;
            }
            // The service may have answered: its frames go out now.
        } else if Some(fd) == mmds_fd {
            if let Some(m) = self.mmds.as_mut() {
                let _ = m.timer.wait();
                m.stack.poll();
            }
        } else if fd == self.queue_events[RX].as_raw_fd() {
            let _ = self.queue_events[RX].read();
        } else if fd == self.rx_limiter.as_raw_fd() {
            self.rx_limiter.on_timer();
        }
        let poll = self.process_rx();
        self.set_tap_polling(poll, ops);
        self.arm_mmds_timer(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vm_memory::GuestAddress;

    use crate::virtio::test_utils::{activate, guest_memory, DriverQueue, WRITE};

    /// Moves this test thread into a network namespace of its own, so its TAP never appears on
    /// the host (network namespaces are per thread).
    fn private_netns() {
        // SAFETY: unshare(2) with a plain flag; it changes only this thread's namespaces.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
    }

    #[test]
    fn bad_tap_names_are_refused_before_any_syscall() {
        for name in ["", "a-name-that-is-too-long", "nul\0"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::Name(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn malformed_tx_chains_come_back_unused_and_are_counted() {
        private_netns();
        let mem = guest_memory(2 << 20);
        let mut net = Net::new(
            "eth0",
            "prsnt-ut0",
            Some([6, 0, 0, 0, 0, 1]),
            RateLimiterConfig::default(),
            RateLimiterConfig::default(),
        )
        .unwrap();
        assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [6, 0, 0, 0, 0, 1]);
        net.set_mtu(9000);
        assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MTU), 0);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 9000);

        let queues = [
            DriverQueue::new(&mem, GuestAddress(0), 16),
            DriverQueue::new(&mem, GuestAddress(0x8000), 16),
        ];
        activate(&mut net, &mem, &queues).unwrap();
        let [rx, mut tx] = queues;
        // Shorter than a virtio-net header; outside guest memory; device-writable only.
        tx.add_chain(&[(0x10_0000, 8, 0)]);
        tx.add_chain(&[(0xffff_0000, 64, 0)]);
        tx.add_chain(&[(0x10_1000, 64, WRITE)]);
        // A well-formed frame: the TAP is down, so the write fails like a frame on a dead link.
        tx.add_chain(&[(0x10_2000, (VNET_HDR_LEN + 60) as u32, 0)]);
        net.process_tx();
        assert_eq!(tx.used_count(), 4, "every chain came back");
        for i in 0..4 {
            assert_eq!(tx.used(i).1, 0);
        }
        let c = net.counters();
        assert_eq!(c.invalid_requests.load(Ordering::Relaxed), 3);
        let sent = c.requests.load(Ordering::Relaxed) + c.io_errors.load(Ordering::Relaxed);
        assert_eq!(sent, 1, "the good frame was handed to the TAP");
        // No frame waits on the TAP: RX takes nothing and asks to keep polling.
        assert!(net.process_rx());
        assert_eq!(rx.used_count(), 0);
    }

    #[test]
    fn a_two_queue_device_refuses_another_queue_count() {
        private_netns();
        let mut net = Net::new(
            "eth0",
            "prsnt-ut1",
            None,
            RateLimiterConfig::default(),
            RateLimiterConfig::default(),
        )
        .unwrap();
        let mem = guest_memory(1 << 20);
        let e = activate(
            &mut net,
            &mem,
            &[DriverQueue::new(&mem, GuestAddress(0), 16)],
        );
        assert!(matches!(
            e,
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
    }
}
