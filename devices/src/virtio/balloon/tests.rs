//! The balloon over real descriptor chains in guest memory, bad PFNs and ranges included.

use std::sync::atomic::Ordering;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::Bytes;

use super::stats::ENTRY_SIZE;
use super::*;
use crate::virtio::{VirtioInterrupt, INTERRUPT_CONFIG_CHANGE};

const WRITE: u16 = 2;
const LIST: u64 = 0x10_0000;
const PAGES: u64 = 0x20_0000;
const ALL: u64 = (1 << F_STATS_VQ) | (1 << F_REPORTING) | (1 << VIRTIO_F_VERSION_1);

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn options() -> BalloonOptions {
    BalloonOptions {
        target_pages: 0,
        deflate_on_oom: true,
        stats_interval: Duration::from_millis(100),
        free_page_hinting: true,
        free_page_reporting: true,
    }
}

struct Rig<'a> {
    dev: Balloon,
    mocks: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    mem: &'a GuestMemoryMmap,
    irq: EventFd,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, acked: u64) -> Self {
        let mut dev = Balloon::new(options()).unwrap();
        let mocks: Vec<_> = (0..QUEUES as u64)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x30_0000 + i * 0x1_0000), 16))
            .collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: mocks.iter().map(|m| m.create_queue().unwrap()).collect(),
            acked_features: acked,
            interrupt: Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap())),
            writes: Arc::default(),
        })
        .unwrap();
        Rig {
            dev,
            mocks,
            mem,
            irq,
        }
    }

    /// Queues a readable list of PFNs on `queue` as chain number `nth` and processes it.
    fn send_pfns(&mut self, queue: usize, nth: u16, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let at = LIST + u64::from(nth) * 0x1000;
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.mocks[queue]
            .add_desc_chains(&[desc(at, bytes.len() as u32, 0)], nth)
            .unwrap();
        self.dev.process_queue(queue);
    }

    fn used(&self, queue: usize) -> u16 {
        self.mocks[queue].used().idx().load()
    }

    fn fill_pages(&self, pages: std::ops::Range<u64>) {
        for p in pages {
            self.mem
                .write_obj(0x77_u64, GuestAddress(PAGES + p * PAGE_SIZE))
                .unwrap();
        }
    }

    fn page(&self, p: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(PAGES + p * PAGE_SIZE))
            .unwrap()
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

const FIRST_PFN: u32 = (PAGES / PAGE_SIZE) as u32;

#[test]
fn queue_roles_follow_the_negotiated_features() {
    use Role::*;
    let v1 = 1 << VIRTIO_F_VERSION_1;
    assert_eq!(roles(v1), [Some(Inflate), Some(Deflate), None, None, None]);
    assert_eq!(
        roles(v1 | 1 << F_REPORTING),
        [Some(Inflate), Some(Deflate), Some(Reporting), None, None]
    );
    assert_eq!(
        roles(ALL),
        [
            Some(Inflate),
            Some(Deflate),
            Some(Stats),
            Some(Reporting),
            None
        ]
    );
    assert_eq!(
        roles(ALL | 1 << F_FREE_PAGE_HINT),
        [
            Some(Inflate),
            Some(Deflate),
            Some(Stats),
            Some(Hinting),
            Some(Reporting)
        ]
    );
}

#[test]
fn inflate_discards_listed_pages_and_skips_bad_pfns() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    rig.fill_pages(0..4);
    rig.send_pfns(
        0,
        0,
        &[FIRST_PFN, FIRST_PFN + 1, FIRST_PFN + 3, 0xffff_0000],
    );
    assert_eq!(rig.used(0), 1);
    assert_eq!(
        (rig.page(0), rig.page(1), rig.page(2), rig.page(3)),
        (0, 0, 0x77, 0)
    );
    assert_eq!(rig.dev.activity().inflated_pages, 3);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 1);
    assert_eq!(rig.irq.read().unwrap(), 1);

    // A list with a torn last entry still has its whole PFNs served.
    let mut bytes = (FIRST_PFN + 2).to_le_bytes().to_vec();
    bytes.push(9);
    mem.write_slice(&bytes, GuestAddress(LIST + 0x1000))
        .unwrap();
    rig.mocks[0]
        .add_desc_chains(&[desc(LIST + 0x1000, 5, 0)], 1)
        .unwrap();
    rig.dev.process_queue(0);
    assert_eq!(rig.page(2), 0);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 2);
}

#[test]
fn inflated_pages_are_discarded_in_runs_whatever_their_order() {
    let mib = |pages: u64| pages * PAGE_SIZE;
    // Linux lists its pages in descending order: one run, one discard.
    let mut pfns: Vec<u32> = (0x100..0x200).rev().collect();
    assert_eq!(
        page_ranges(&mut pfns).collect::<Vec<_>>(),
        [(mib(0x100), mib(0x100))]
    );
    // Gaps split runs; duplicates fold in; the top PFN does not overflow.
    let mut pfns = vec![9, 3, 4, 4, 5, 7, u32::MAX, u32::MAX - 1];
    assert_eq!(
        page_ranges(&mut pfns).collect::<Vec<_>>(),
        [
            (mib(3), mib(3)),
            (mib(7), mib(1)),
            (mib(9), mib(1)),
            (mib(u64::from(u32::MAX) - 1), mib(2)),
        ]
    );
    assert_eq!(page_ranges(&mut []).count(), 0);
}

#[test]
fn an_inflate_list_in_descending_order_discards_every_page() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    rig.fill_pages(0..4);
    rig.send_pfns(0, 0, &[FIRST_PFN + 3, FIRST_PFN + 2, FIRST_PFN + 1]);
    assert_eq!(
        (rig.page(0), rig.page(1), rig.page(2), rig.page(3)),
        (0x77, 0, 0, 0)
    );
    assert_eq!(rig.dev.activity().inflated_pages, 3);
}

#[test]
fn a_notification_before_activation_is_no_invalid_request() {
    let mut dev = Balloon::new(options()).unwrap();
    dev.process_queue(2);
    assert_eq!(dev.counters.invalid_requests.load(Ordering::Relaxed), 0);
}

#[test]
fn deflate_counts_pages_without_touching_memory() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    rig.fill_pages(0..2);
    rig.send_pfns(1, 0, &[FIRST_PFN, FIRST_PFN + 1]);
    assert_eq!(rig.used(1), 1);
    assert_eq!((rig.page(0), rig.page(1)), (0x77, 0x77));
    assert_eq!(rig.dev.activity().deflated_pages, 2);
}

fn stats_entry(tag: u16, value: u64) -> Vec<u8> {
    let mut e = tag.to_le_bytes().to_vec();
    e.extend_from_slice(&value.to_le_bytes());
    e
}

#[test]
fn stats_buffer_is_held_until_polled_and_its_report_kept() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    let mut report = stats_entry(4, 10 << 20);
    report.extend(stats_entry(5, 64 << 20));
    mem.write_slice(&report, GuestAddress(LIST)).unwrap();
    rig.mocks[2]
        .add_desc_chains(&[desc(LIST, report.len() as u32, 0)], 0)
        .unwrap();
    rig.dev.process_queue(2);
    assert_eq!(rig.used(2), 0, "held, not returned");
    let s = rig.dev.stats();
    assert_eq!(s.guest.free_memory, Some(10 << 20));
    assert_eq!(s.guest.total_memory, Some(64 << 20));
    assert!(s.stats_age_ms.is_some());

    // The timer asks for the next report by returning the buffer.
    std::thread::sleep(Duration::from_millis(120));
    rig.dev.poll_stats();
    assert_eq!(rig.used(2), 1);
    // Nothing held: a second tick returns nothing.
    rig.dev.poll_stats();
    assert_eq!(rig.used(2), 1);

    // Two buffers at once: the older goes back at once and is counted.
    for n in 1..3 {
        rig.mocks[2]
            .add_desc_chains(&[desc(LIST, report.len() as u32, 0)], n)
            .unwrap();
    }
    rig.dev.process_queue(2);
    assert_eq!(rig.used(2), 2);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 1);
    assert_eq!(rig.dev.activity().stats_reports, 3);
}

/// Found by the `virtio_balloon` fuzz target (a 10 s timeout in `page_list`): every PFN of a
/// chain of RAM-sized descriptors was read, one by one, on the VMM thread.
#[test]
fn a_page_list_longer_than_served_is_refused_whole() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    rig.fill_pages(0..2);
    let pfns: Vec<u32> = (0..MAX_PFNS as u32 + 1)
        .map(|i| FIRST_PFN + i % 2)
        .collect();
    rig.send_pfns(0, 0, &pfns);
    assert_eq!(rig.used(0), 1, "the buffer goes back");
    assert_eq!(
        (rig.page(0), rig.page(1)),
        (0x77, 0x77),
        "nothing discarded"
    );
    assert_eq!(rig.dev.activity().inflated_pages, 0);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 1);

    // The longest list served is served whole.
    rig.send_pfns(0, 1, &pfns[..MAX_PFNS]);
    assert_eq!((rig.page(0), rig.page(1)), (0, 0));
    assert_eq!(rig.dev.activity().inflated_pages, MAX_PFNS as u64);
}

/// Found while fuzzing (`virtio_balloon`, whose RSS kept climbing): the report was read whole into
/// one allocation, so a chain of descriptors each spanning guest RAM made the VMM allocate queue
/// size x RAM.
#[test]
fn an_oversized_stats_buffer_is_refused_without_reading_it() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    // Whole entries (a malformed report is refused anyway): 16 x 1 MiB less 6 bytes.
    let chain: Vec<RawDescriptor> = (0..16u16)
        .map(|i| {
            let flags = if i < 15 { 1 } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(0, 0x10_0000 - 6, flags, i + 1))
        })
        .collect();
    rig.mocks[2].add_desc_chains(&chain, 0).unwrap();
    rig.dev.process_queue(2);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 1);
    assert_eq!(rig.dev.activity().stats_reports, 0);
    assert!(rig.dev.latest_report().is_none());

    // A report of the largest size taken is still read (the refused buffer, still held, goes
    // back as a second one arrives).
    let report: Vec<u8> = (0..MAX_REPORT_SIZE / ENTRY_SIZE)
        .flat_map(|_| stats_entry(4, 1 << 20))
        .collect();
    mem.write_slice(&report, GuestAddress(LIST)).unwrap();
    rig.mocks[2]
        .add_desc_chains(&[desc(LIST, report.len() as u32, 0)], 0)
        .unwrap();
    rig.dev.process_queue(2);
    assert_eq!(rig.dev.activity().stats_reports, 1);
    assert_eq!(rig.dev.stats().guest.free_memory, Some(1 << 20));
}

#[test]
fn reported_ranges_are_discarded_and_bad_ones_skipped() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    rig.fill_pages(0..4);
    let linked =
        |addr, len, next| RawDescriptor::from(SplitDescriptor::new(addr, len, WRITE | 1, next));
    let chain = [
        linked(PAGES, 0x2000, 1),
        linked(PAGES + 0x2800, 0x1000, 2), // misaligned
        desc(0xf000_0000, 0x1000, WRITE),  // outside memory
    ];
    rig.mocks[3].add_desc_chains(&chain, 0).unwrap();
    rig.dev.process_queue(3);
    assert_eq!(rig.used(3), 1);
    assert_eq!(
        (rig.page(0), rig.page(1), rig.page(2), rig.page(3)),
        (0, 0, 0x77, 0x77)
    );
    assert_eq!(rig.dev.activity().reported_bytes, 0x2000);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 2);
}

#[test]
fn config_space_target_actual_and_change_notification() {
    let mem = mem();
    let mut rig = Rig::new(&mem, ALL);
    rig.dev.set_target_pages(512);
    assert_eq!(rig.dev.config_generation(), 1);
    assert_eq!(
        rig.dev.active.as_ref().unwrap().queues.interrupt.status() & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    rig.dev.write_config(4, &300u32.to_le_bytes());
    let mut data = [0u8; 8];
    rig.dev.read_config(0, &mut data);
    assert_eq!(&data[..4], &512u32.to_le_bytes());
    assert_eq!(&data[4..], &300u32.to_le_bytes());
    // num_pages belongs to the device; odd widths are refused.
    rig.dev.write_config(0, &1u32.to_le_bytes());
    rig.dev.write_config(4, &[1, 2]);
    assert_eq!(rig.dev.actual_pages(), 300);
    assert_eq!(rig.dev.options().target_pages, 512);
    assert_eq!(
        rig.dev
            .counters
            .invalid_register_access
            .load(Ordering::Relaxed),
        2
    );
    let s = rig.dev.stats();
    assert_eq!((s.target_mib, s.actual_mib), (2, 1));
}

#[test]
fn statistics_cannot_be_switched_on_or_off_after_start() {
    let mut dev = Balloon::new(options()).unwrap();
    assert!(matches!(
        dev.set_stats_interval(Duration::ZERO),
        Err(BalloonError::StatsToggle)
    ));
    dev.set_stats_interval(Duration::from_millis(250)).unwrap();
    assert_eq!(dev.options().stats_interval, Duration::from_millis(250));
    let mut off = Balloon::new(BalloonOptions {
        stats_interval: Duration::ZERO,
        ..options()
    })
    .unwrap();
    assert!(off.set_stats_interval(Duration::from_secs(1)).is_err());
    assert_eq!(off.avail_features() & (1 << F_STATS_VQ), 0);
}

#[test]
fn a_negotiated_queue_that_was_not_set_up_refuses_activation() {
    let mem = mem();
    let mut dev = Balloon::new(options()).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    let mut queues: Vec<Queue> = vec![mock.create_queue().unwrap()];
    queues.extend((1..QUEUES).map(|_| Queue::new(16).unwrap()));
    let e = dev
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            acked_features: ALL,
            interrupt: Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            writes: Arc::default(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("queue 1"), "{e}");
    // Notifications for queues the features did not create are counted, not served.
    let mut rig = Rig::new(&mem, ALL & !(1 << F_REPORTING));
    rig.dev.process_queue(3);
    assert_eq!(rig.dev.counters.invalid_requests.load(Ordering::Relaxed), 1);
}

const HINT: u64 = ALL | (1 << F_FREE_PAGE_HINT);
/// With HINT: inflate, deflate, stats, hinting, reporting.
const HINT_Q: usize = 3;

impl Rig<'_> {
    /// One hinting chain: the command ids and free ranges in order (`Ok(cmd)`, `Err((addr, len))`).
    fn hint(&mut self, nth: u16, items: &[Result<u32, (u64, u32)>]) {
        let mut chain = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let next = if i + 1 < items.len() { 1 } else { 0 };
            // Links are descriptor table indices; chain `nth` starts at index nth * 4.
            let link = nth * 4 + (i + 1) as u16;
            chain.push(match *item {
                Ok(cmd) => {
                    let at = LIST + u64::from(nth) * 0x1000 + i as u64 * 4;
                    self.mem.write_obj(cmd, GuestAddress(at)).unwrap();
                    RawDescriptor::from(SplitDescriptor::new(at, 4, next, link))
                }
                Err((addr, len)) => {
                    RawDescriptor::from(SplitDescriptor::new(addr, len, WRITE | next, link))
                }
            });
        }
        self.mocks[HINT_Q].add_desc_chains(&chain, nth * 4).unwrap();
        self.dev.process_queue(HINT_Q);
    }

    fn hint_cmd_in_config(&self) -> u32 {
        let mut data = [0u8; 4];
        self.dev.read_config(8, &mut data);
        u32::from_le_bytes(data)
    }
}

#[test]
fn hints_of_the_current_run_are_discarded_and_stop_is_acknowledged() {
    let mem = mem();
    let mut rig = Rig::new(&mem, HINT);
    rig.fill_pages(0..4);
    assert_eq!(rig.dev.hinting_status().unwrap(), HintingStatus::default());
    // Hints before any run are stale.
    rig.hint(0, &[Ok(7), Err((PAGES, 0x1000))]);
    assert_eq!(rig.page(0), 0x77);

    rig.dev.start_hinting(true).unwrap();
    assert_eq!(rig.hint_cmd_in_config(), 2);
    assert_eq!(
        rig.dev.active.as_ref().unwrap().queues.interrupt.status() & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    // A hint listed under the old id is ignored, the run's own discarded.
    rig.hint(
        1,
        &[Err((PAGES + 0x1000, 0x1000)), Ok(2), Err((PAGES, 0x2000))],
    );
    assert_eq!((rig.page(0), rig.page(1), rig.page(2)), (0, 0, 0x77));
    assert_eq!(rig.dev.activity().hinted_bytes, 0x2000);
    assert_eq!(
        rig.dev.hinting_status().unwrap(),
        HintingStatus {
            host_cmd: 2,
            guest_cmd: Some(2)
        }
    );
    // The guest's STOP ends the run: DONE at once, and later hints are not used.
    rig.hint(2, &[Ok(HINT_CMD_STOP), Err((PAGES + 0x2000, 0x1000))]);
    assert_eq!(rig.hint_cmd_in_config(), HINT_CMD_DONE);
    assert_eq!(rig.page(2), 0x77);
    assert_eq!(rig.used(HINT_Q), 3);

    // Without acknowledge_on_stop the run waits for the host's stop; ids keep counting.
    rig.dev.start_hinting(false).unwrap();
    assert_eq!(rig.hint_cmd_in_config(), 3);
    rig.hint(
        3,
        &[Ok(3), Err((PAGES + 0x2000, 0x1000)), Ok(HINT_CMD_STOP)],
    );
    assert_eq!(rig.page(2), 0);
    assert_eq!(rig.hint_cmd_in_config(), 3);
    rig.dev.stop_hinting().unwrap();
    assert_eq!(
        rig.dev.hinting_status().unwrap(),
        HintingStatus {
            host_cmd: HINT_CMD_DONE,
            guest_cmd: Some(HINT_CMD_STOP)
        }
    );
    // A reset forgets the run.
    rig.dev.reset();
    assert_eq!(rig.hint_cmd_in_config(), HINT_CMD_STOP);
    assert!(matches!(
        rig.dev.start_hinting(true),
        Err(BalloonError::NotActive)
    ));
}

#[test]
fn hinting_needs_the_option() {
    let mut dev = Balloon::new(BalloonOptions {
        free_page_hinting: false,
        ..options()
    })
    .unwrap();
    assert_eq!(dev.avail_features() & (1 << F_FREE_PAGE_HINT), 0);
    assert!(matches!(
        dev.start_hinting(true),
        Err(BalloonError::HintingDisabled)
    ));
    assert!(matches!(
        dev.hinting_status(),
        Err(BalloonError::HintingDisabled)
    ));
    assert!(matches!(
        dev.stop_hinting(),
        Err(BalloonError::HintingDisabled)
    ));
}
