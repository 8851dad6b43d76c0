//! virtio-blk over real descriptor chains in guest memory, including every kind of bad chain.

use std::io::Write;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::test_utils::{activate_with, guest_memory, DriverQueue, VERSION_1_ONLY, WRITE};
use crate::virtio::VirtioInterrupt;

use super::request::*;
use super::*;
use crate::rate_limiter::TokenBucketConfig;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x10_1000;
const STATUS: u64 = 0x12_0000;

fn mem() -> GuestMemoryMmap {
    guest_memory(2 << 20)
}

fn disk(name: &str, sectors: u64) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("prescient-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&vec![0x5a; (sectors * SECTOR_SIZE) as usize])
        .unwrap();
    p
}

fn desc(addr: u64, len: u32, flags: u16) -> (u64, u32, u16) {
    (addr, len, flags)
}

/// A device with its one queue in `mem`, the driver's side of that queue, and the interrupt
/// eventfd.
struct Rig<'a> {
    blk: Block,
    queue: DriverQueue<'a>,
    mem: &'a GuestMemoryMmap,
    irq: EventFd,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, path: &Path, ro: bool, limiter: RateLimiterConfig) -> Self {
        Self::with_features(mem, path, ro, limiter, VERSION_1_ONLY)
    }

    fn with_features(
        mem: &'a GuestMemoryMmap,
        path: &Path,
        ro: bool,
        limiter: RateLimiterConfig,
        features: u64,
    ) -> Self {
        let mut blk = Block::new("rootfs", path, ro, limiter).unwrap();
        let queue = DriverQueue::new(mem, GuestAddress(0), 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        activate_with(
            &mut blk,
            mem,
            std::slice::from_ref(&queue),
            interrupt,
            features,
        )
        .unwrap();
        Self {
            blk,
            queue,
            mem,
            irq,
        }
    }

    /// Places one chain (NEXT flags added) and makes it available.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        self.queue.add_chain(descs);
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem
            .write_obj(
                RequestHeader {
                    kind,
                    reserved: 0,
                    sector,
                },
                GuestAddress(HDR),
            )
            .unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// (head, len) of used entry `i`.
    fn used(&self, i: usize) -> (u32, u32) {
        self.queue.used(i)
    }

    fn used_count(&self) -> u16 {
        self.queue.used_count()
    }

    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> u8 {
        self.header(kind, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![desc(HDR, 16, 0)];
        if let Some((len, device_writes)) = data {
            descs.push(desc(DATA, len, if device_writes { WRITE } else { 0 }));
        }
        descs.push(desc(STATUS, 1, WRITE));
        self.submit(&descs);
        self.blk.process_queue();
        self.status()
    }
}

#[test]
fn write_then_read_back_round_trips_through_the_file() {
    let mem = mem();
    let path = disk("rw.img", 64);
    let mut rig = Rig::new(&mem, &path, false, RateLimiterConfig::default());
    mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 2, Some((1024, false))),
        VIRTIO_BLK_S_OK
    );
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[1024..2048], &[0xab; 1024][..]);
    assert_eq!(file[2048], 0x5a, "nothing written past the request");
    assert_eq!(rig.used(0).1, 1, "a write returns only the status byte");

    mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 2, Some((1024, true))),
        VIRTIO_BLK_S_OK
    );
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0xab; 1024]);
    assert_eq!(rig.used(1).1, 1025);
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, None), VIRTIO_BLK_S_OK);
    assert!(
        rig.irq.read().unwrap() >= 1,
        "completions raise the interrupt"
    );
    let c = rig.blk.counters();
    assert_eq!(c.requests.load(Ordering::Relaxed), 3);
    assert_eq!(c.bytes_from_guest.load(Ordering::Relaxed), 1024);
    assert_eq!(c.bytes_to_guest.load(Ordering::Relaxed), 1024);
}

#[test]
fn with_event_idx_the_driver_learns_when_to_notify_and_interrupts_follow_used_event() {
    let mem = mem();
    let path = disk("event-idx.img", 8);
    assert_ne!(
        Block::new("x", &path, false, RateLimiterConfig::default())
            .unwrap()
            .avail_features()
            & (1 << VIRTIO_RING_F_EVENT_IDX),
        0
    );
    let features = VERSION_1_ONLY | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut rig = Rig::with_features(&mem, &path, false, RateLimiterConfig::default(), features);
    // The driver wants an interrupt only once the second request is done.
    rig.queue.set_used_event(1);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
    assert!(rig.irq.read().is_err(), "no interrupt before used_event");
    assert_eq!(
        rig.queue.avail_event(),
        1,
        "notify me when request 1 is there"
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 1, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(rig.irq.read().unwrap(), 1, "the interrupt after used_event");
    assert_eq!(rig.queue.avail_event(), 2);
}

#[test]
fn each_invalid_request_gets_its_status_and_touches_nothing() {
    let mem = mem();
    let path = disk("bad.img", 8);
    let mut rig = Rig::new(&mem, &path, false, RateLimiterConfig::default());
    // Past the end, straddling the end, partial sector, oversized, unknown type.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 8, Some((512, true))),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 7, Some((1024, false))),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((100, true))),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, u64::MAX, Some((512, true))),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(rig.request(99, 0, None), VIRTIO_BLK_S_UNSUPP);
    let file = std::fs::read(&path).unwrap();
    assert!(file.iter().all(|&b| b == 0x5a));
    assert_eq!(
        rig.blk.counters().invalid_requests.load(Ordering::Relaxed),
        5
    );
}

#[test]
fn a_read_only_disk_refuses_writes_but_serves_reads() {
    let mem = mem();
    let path = disk("ro.img", 8);
    let mut rig = Rig::new(&mem, &path, true, RateLimiterConfig::default());
    assert_ne!(rig.blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, Some((512, false))),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0x5a));
}

#[test]
fn get_id_returns_the_drive_id() {
    let mem = mem();
    let path = disk("id.img", 8);
    let mut rig = Rig::new(&mem, &path, false, RateLimiterConfig::default());
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, true))),
        VIRTIO_BLK_S_OK
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"rootfs");
    assert_eq!(
        rig.used(0).1,
        21,
        "the 20-byte id (NUL padded) plus the status byte"
    );
}

#[test]
fn malformed_chains_are_returned_unused_without_stalling_the_queue() {
    let mem = mem();
    let path = disk("chains.img", 8);
    let mut rig = Rig::new(&mem, &path, false, RateLimiterConfig::default());
    // No writable descriptor at all: nowhere to put a status.
    rig.header(VIRTIO_BLK_T_IN, 0);
    rig.submit(&[desc(HDR, 16, 0), desc(DATA, 512, 0)]);
    // A data buffer outside guest memory.
    rig.submit(&[
        desc(HDR, 16, 0),
        desc(0xffff_0000, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ]);
    // A header shorter than 16 bytes: answered, since the status byte exists.
    rig.submit(&[desc(HDR, 8, 0), desc(STATUS, 1, WRITE)]);
    rig.blk.process_queue();
    assert_eq!(rig.used_count(), 3, "every chain came back");
    assert_eq!(rig.used(0).1, 0);
    assert_eq!(rig.used(1).1, 0);
    assert_eq!(rig.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        rig.blk.counters().invalid_requests.load(Ordering::Relaxed),
        3
    );
    // The queue still works afterwards.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn the_rate_limiter_holds_requests_in_the_ring_until_tokens_return() {
    let mem = mem();
    let path = disk("rl.img", 8);
    let limiter = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: None,
            refill_time: 100,
        }),
    };
    let mut rig = Rig::new(&mem, &path, false, limiter);
    rig.header(VIRTIO_BLK_T_IN, 0);
    for _ in 0..2 {
        rig.submit(&[
            desc(HDR, 16, 0),
            desc(DATA, 512, WRITE),
            desc(STATUS, 1, WRITE),
        ]);
    }
    rig.blk.process_queue();
    assert_eq!(rig.used_count(), 1, "the second request waits");
    assert_eq!(rig.blk.counters().throttled.load(Ordering::Relaxed), 1);
    std::thread::sleep(std::time::Duration::from_millis(120));
    rig.blk.limiter.on_timer();
    rig.blk.process_queue();
    assert_eq!(
        rig.used_count(),
        2,
        "served once the bucket refilled, exactly once"
    );
    // A live update to an unlimited limiter keeps serving.
    rig.blk
        .update_rate_limiter(RateLimiterConfig::default())
        .unwrap();
    rig.submit(&[
        desc(HDR, 16, 0),
        desc(DATA, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ]);
    rig.blk.process_queue();
    assert_eq!(rig.used_count(), 3);
}

#[test]
fn an_available_index_a_ring_ahead_is_counted_and_takes_nothing() {
    let mem = mem();
    let path = disk("idx.img", 8);
    let mut rig = Rig::new(&mem, &path, false, RateLimiterConfig::default());
    rig.queue.publish(&[], 16 * 3);
    rig.blk.process_queue();
    rig.blk.process_queue();
    assert_eq!(rig.used_count(), 0, "nothing was taken");
    let invalid = &rig.blk.counters().invalid_requests;
    // Each round looks twice (again after notifications are back on) and counts each look.
    assert_eq!(invalid.load(Ordering::Relaxed), 4, "each look is counted");
    // A driver that fixes its index gets its next request served.
    rig.queue.publish(&[], 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
}
