//! What the fuzz targets share: a hostile virtio driver that lays fuzzed split queues and buffers
//! into guest memory, starts a device on them and kicks it through a real event loop.

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::virtio::test_utils::{
    activate_with, guest_memory, interrupt, DriverQueue, VERSION_1_ONLY,
};
use devices::virtio::{DeviceCounters, VirtioDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of every device target.
pub const MEM_SIZE: u64 = 1 << 20;
/// Queue `i`'s rings start at `i * QUEUE_STRIDE`; buffers may be anywhere, rings included.
const QUEUE_STRIDE: u64 = 0x1_0000;
/// Kicks per input: enough to interleave queues, few enough to keep inputs fast.
const MAX_KICKS: usize = 32;

/// A descriptor's buffer address: mostly inside guest memory (so the fuzzer reaches the request
/// parsers), sometimes anywhere.
#[derive(Arbitrary, Debug)]
pub enum Addr {
    Ram(u32),
    Raw(u64),
}

impl Addr {
    fn resolve(&self) -> u64 {
        match *self {
            Addr::Ram(a) => u64::from(a) % MEM_SIZE,
            Addr::Raw(a) => a,
        }
    }
}

/// A descriptor's length: mostly a buffer's worth, sometimes anything.
#[derive(Arbitrary, Debug)]
pub enum Len {
    Short(u16),
    Raw(u32),
}

/// One descriptor as the driver writes it: any flags, any `next` (indices past a small table
/// included; queues hold at most 256 entries).
#[derive(Arbitrary, Debug)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    pub flags: u16,
    pub next: u8,
}

/// The available index a driver publishes: mostly near the start (the device starts at 0, so up to
/// the queue size is valid), sometimes anything, wrap-around included.
#[derive(Arbitrary, Debug)]
pub enum AvailIdx {
    Near(u8),
    Raw(u16),
}

impl AvailIdx {
    fn resolve(&self) -> u16 {
        match *self {
            AvailIdx::Near(i) => u16::from(i),
            AvailIdx::Raw(i) => i,
        }
    }
}

/// One queue: its size (a power of two up to the device's maximum), its descriptor table, the
/// heads it makes available and the available index it publishes.
#[derive(Arbitrary, Debug)]
pub struct QueueInput {
    pub size_log2: u8,
    pub descs: Vec<Desc>,
    pub avail: Vec<u8>,
    pub avail_idx: AvailIdx,
}

/// Everything a hostile driver controls: the queues, bytes anywhere in guest memory (headers,
/// payloads, or the rings themselves), and which queue it notifies, in order (every queue is
/// notified once more at the end, as a driver that set them up would).
#[derive(Arbitrary, Debug)]
pub struct DriverInput {
    pub queues: Vec<QueueInput>,
    pub writes: Vec<(u32, Vec<u8>)>,
    pub kicks: Vec<u8>,
}

/// Starts `dev` on the queues `input` describes and delivers its kicks through an event manager,
/// as the VMM thread would. Returns the device's counters.
pub fn drive<D>(dev: D, input: &DriverInput) -> Arc<DeviceCounters>
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    drive_acking(dev, VERSION_1_ONLY, input).counters()
}

/// [`drive`] for a driver that acked `acked_features` (which decide, for some devices, which
/// queues exist and what they do). Returns the device, for the target to check what it holds.
pub fn drive_acking<D>(dev: D, acked_features: u64, input: &DriverInput) -> D
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    drive_activated(dev, acked_features, input, |_| {})
}

/// [`drive_acking`], with `activated` run on the device once the driver has set it up (what the
/// host does to a running device: a balloon's hinting run, say) before the kicks.
pub fn drive_activated<D>(
    mut dev: D,
    acked_features: u64,
    input: &DriverInput,
    activated: impl FnOnce(&mut D),
) -> D
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let mem = guest_memory(MEM_SIZE as usize);
    let max_sizes = dev.queue_max_sizes().to_vec();
    let queues: Vec<DriverQueue<'_>> = max_sizes
        .iter()
        .enumerate()
        .map(|(i, &max)| {
            let spec = input.queues.get(i);
            let size = spec.map_or(max, |q| {
                1u16.checked_shl(u32::from(q.size_log2 % 16))
                    .unwrap_or(1)
                    .min(max)
            });
            let q = DriverQueue::new(&mem, GuestAddress(i as u64 * QUEUE_STRIDE), size);
            if let Some(spec) = spec {
                for (j, d) in spec.descs.iter().take(usize::from(size)).enumerate() {
                    let len = match d.len {
                        Len::Short(l) => u32::from(l),
                        Len::Raw(l) => l,
                    };
                    q.store_raw(j as u16, d.addr.resolve(), len, d.flags, u16::from(d.next));
                }
                let heads: Vec<u16> = spec.avail.iter().map(|&h| u16::from(h)).collect();
                q.publish(&heads, spec.avail_idx.resolve());
            }
            q
        })
        .collect();
    for (addr, bytes) in &input.writes {
        // A write running past the end of memory is cut short, as a driver's would be.
        let _ = mem.write(bytes, GuestAddress(u64::from(*addr) % MEM_SIZE));
    }
    if activate_with(&mut dev, &mem, &queues, interrupt(), acked_features).is_err() {
        return dev;
    }
    activated(&mut dev);
    let kicks: Vec<_> = dev
        .queue_events()
        .iter()
        .map(|e| e.try_clone().expect("dup a queue eventfd"))
        .collect();
    let dev = Arc::new(Mutex::new(dev));
    let mut events =
        EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().expect("an epoll instance");
    events.add_subscriber(dev.clone());
    let fuzzed = input.kicks.iter().take(MAX_KICKS).map(|&k| usize::from(k));
    for k in fuzzed.chain(0..kicks.len()) {
        kicks[k % kicks.len()]
            .write(1)
            .expect("kick a queue eventfd");
        // Every event ready now is handled; nothing here may block.
        events.run_with_timeout(0).expect("the event loop runs");
    }
    drop(events);
    Arc::into_inner(dev)
        .expect("the event manager was the device's only other owner")
        .into_inner()
        .expect("no handler panicked while holding the device")
}
