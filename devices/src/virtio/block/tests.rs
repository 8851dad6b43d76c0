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
        Self::with(mem, Block::new("rootfs", path, ro, limiter).unwrap())
    }

    /// The same device on the Async (io_uring) engine.
    fn new_async(mem: &'a GuestMemoryMmap, path: &Path) -> Self {
        let mut blk = Block::new("rootfs", path, false, RateLimiterConfig::default()).unwrap();
        blk.use_io_uring().unwrap();
        Self::with(mem, blk)
    }

    fn with(mem: &'a GuestMemoryMmap, mut blk: Block) -> Self {
        let queue = DriverQueue::new(mem, GuestAddress(0), 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        activate_with(
            &mut blk,
            mem,
            std::slice::from_ref(&queue),
            interrupt,
            VERSION_1_ONLY,
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
        self.settle();
        self.status()
    }

    /// With the Async engine: waits for what is in flight and returns it to the guest.
    fn settle(&mut self) {
        while self.blk.io.as_ref().is_some_and(|io| io.in_flight() > 0) {
            let fd = self.blk.io.as_ref().unwrap().event_fd();
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(n, 1, "an io_uring completion within 5 s");
            self.blk.complete_async();
            self.blk.process_queue();
        }
    }
}

#[test]
fn the_async_engine_moves_data_straight_between_guest_memory_and_the_file() {
    let mem = mem();
    let path = disk("async.img", 64);
    let mut rig = Rig::new_async(&mem, &path);
    mem.write_slice(&[0xcd; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 8, Some((4096, false))),
        VIRTIO_BLK_S_OK
    );
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4096..8192], &[0xcd; 4096][..]);
    assert_eq!(file[8192], 0x5a);
    assert_eq!(rig.used(0).1, 1);
    // Header and data in one descriptor: the data starts 16 bytes in.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0x11; 512], GuestAddress(HDR + 16))
        .unwrap();
    rig.submit(&[desc(HDR, 16 + 512, 0), desc(STATUS, 1, WRITE)]);
    rig.blk.process_queue();
    rig.settle();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK);
    assert_eq!(&std::fs::read(&path).unwrap()[..512], &[0x11; 512][..]);
    // Read back into two descriptors.
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    rig.header(VIRTIO_BLK_T_IN, 8);
    rig.submit(&[
        desc(HDR, 16, 0),
        desc(DATA, 1024, WRITE),
        desc(DATA + 0x2000, 3072, WRITE),
        desc(STATUS, 1, WRITE),
    ]);
    rig.blk.process_queue();
    rig.settle();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK);
    let mut a = [0u8; 1024];
    let mut b = [0u8; 3072];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut b, GuestAddress(DATA + 0x2000)).unwrap();
    assert!(a.iter().chain(b.iter()).all(|&x| x == 0xcd));
    assert_eq!(rig.used(2).1, 4097);
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, None), VIRTIO_BLK_S_OK);
    // Invalid requests are answered in place, as with Sync.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 64, Some((512, true))),
        VIRTIO_BLK_S_IOERR
    );
    let c = rig.blk.counters();
    assert_eq!(c.requests.load(Ordering::Relaxed), 5);
    assert_eq!(c.bytes_from_guest.load(Ordering::Relaxed), 4096 + 512);
    assert_eq!(c.bytes_to_guest.load(Ordering::Relaxed), 4096);
    assert_eq!(c.invalid_requests.load(Ordering::Relaxed), 1);
}

/// Five reads of eight sectors each (the 16-entry test queue holds five 3-descriptor chains),
/// all made available before the device looks.
fn five_reads(mem: &GuestMemoryMmap, rig: &mut Rig) {
    for i in 0..5u64 {
        let hdr = HDR + i * 32;
        mem.write_obj(
            RequestHeader {
                kind: VIRTIO_BLK_T_IN,
                reserved: 0,
                sector: i * 8,
            },
            GuestAddress(hdr),
        )
        .unwrap();
        rig.queue.add_chain(&[
            desc(hdr, 16, 0),
            desc(DATA + i * 4096, 4096, WRITE),
            desc(STATUS + i, 1, WRITE),
        ]);
    }
}

fn assert_five_reads_ok(mem: &GuestMemoryMmap) {
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[test]
fn the_async_engine_keeps_many_requests_in_flight() {
    let mem = mem();
    let path = disk("async-qd.img", 64);
    let mut rig = Rig::new_async(&mem, &path);
    five_reads(&mem, &mut rig);
    rig.blk.process_queue();
    rig.settle();
    assert_eq!(rig.used_count(), 5);
    assert_five_reads_ok(&mem);
}

#[test]
fn a_snapshot_of_the_async_engine_completes_what_is_in_flight() {
    use crate::persist::Persist;
    let mem = mem();
    let path = disk("async-save.img", 64);
    let mut rig = Rig::new_async(&mem, &path);
    five_reads(&mem, &mut rig);
    rig.blk.process_queue();
    // No completion taken from the ring: the save must wait for them and answer the guest.
    let _state = rig.blk.save();
    assert_eq!(rig.blk.io.as_ref().map(|io| io.in_flight()), Some(0));
    assert_eq!(rig.used_count(), 5);
    assert_five_reads_ok(&mem);
}

#[test]
fn unsafe_cache_offers_no_flush_and_acks_one_without_syncing() {
    let mem = mem();
    let path = disk("unsafe.img", 8);
    let mut blk = Block::new("rootfs", &path, false, RateLimiterConfig::default()).unwrap();
    assert_ne!(blk.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    blk.set_cache_writeback(false);
    assert_eq!(blk.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let mut rig = Rig::with(&mem, blk);
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, None), VIRTIO_BLK_S_OK);
}

#[test]
fn a_swapped_backing_file_serves_the_next_requests_with_its_size() {
    let mem = mem();
    let a = disk("swap-a.img", 8);
    let b = std::env::temp_dir()
        .join(format!("prescient-blk-{}", std::process::id()))
        .join("swap-b.img");
    std::fs::write(&b, vec![0x77u8; 16 * 512]).unwrap();
    let mut rig = Rig::new(&mem, &a, false, RateLimiterConfig::default());
    let capacity = |blk: &Block| {
        let mut c = [0u8; 8];
        blk.read_config(0, &mut c);
        u64::from_le_bytes(c)
    };
    assert_eq!(capacity(&rig.blk), 8);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
    let generation = rig.blk.config_generation();
    let _ = rig.irq.read();
    rig.blk.swap_backing(&b).unwrap();
    assert_eq!(capacity(&rig.blk), 16);
    assert_ne!(rig.blk.config_generation(), generation);
    assert!(
        rig.irq.read().unwrap() >= 1,
        "the guest is told its configuration changed"
    );
    assert_eq!(rig.blk.path(), b.as_path());
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 12, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x77; 512]);
    // A file that cannot be opened leaves the old one in place.
    assert!(rig
        .blk
        .swap_backing(Path::new("/nonexistent/disk.img"))
        .is_err());
    assert_eq!(rig.blk.path(), b.as_path());
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
    assert_eq!(invalid.load(Ordering::Relaxed), 2, "each look is counted");
    // A driver that fixes its index gets its next request served.
    rig.queue.publish(&[], 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, Some((512, true))),
        VIRTIO_BLK_S_OK
    );
}
