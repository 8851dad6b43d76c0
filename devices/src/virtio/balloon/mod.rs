//! virtio-balloon: the guest gives pages back (inflate) and takes them again (deflate) to meet a
//! target the host sets; it reports its memory statistics on request, with free page reporting
//! hands over memory it freed on its own, and with free page hinting lists its free memory when
//! the host starts a run. Inflated, reported and hinted pages are discarded on the host at once.
//!
//! Queues, in the order the driver finds them: inflate, deflate, then stats if STATS_VQ was
//! negotiated, hinting if FREE_PAGE_HINT was, then reporting if REPORTING was. Every PFN and range is checked against guest
//! memory; bad entries are counted and skipped, the rest of the request still counts.

pub mod stats;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::Serialize;
use virtio_queue::{DescriptorChain, QueueT, Reader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::stats::{GuestStats, StatsReport, MAX_REPORT_SIZE};
use super::discard::{discard, DiscardError, PAGE_SIZE};
use super::{
    pop_chain, read_config_bytes, watch_fds, ActivateContext, ActivateError, ActiveQueues,
    DeviceCounters, VirtioDevice, TYPE_BALLOON, VIRTIO_F_VERSION_1,
};
use crate::persist::{Persist, PersistError};

pub const QUEUE_SIZE: u16 = 256;
/// Pages per MiB.
pub const PAGES_PER_MIB: u32 = (1 << 20) / PAGE_SIZE as u32;

const F_STATS_VQ: u32 = 1;
const F_DEFLATE_ON_OOM: u32 = 2;
const F_FREE_PAGE_HINT: u32 = 3;
const F_REPORTING: u32 = 5;
const QUEUES: usize = 5;
/// The longest page list served: Linux sends at most 256 PFNs a request. Longer ones are refused
/// whole, so one request cannot hold the VMM thread for a chain of RAM-sized descriptors' worth
/// of PFNs (billions, read one by one).
const MAX_PFNS: usize = 4096;
/// Config space: `le32 num_pages` (device), `le32 actual` (driver), `le32
/// free_page_hint_cmd_id` (device).
const CONFIG_ACTUAL: u64 = 4;
/// Hinting command ids: STOP (no run; the guest ends its list with it), DONE (the guest may
/// reuse the pages it hinted); runs are numbered from 2.
pub const HINT_CMD_STOP: u32 = 0;
pub const HINT_CMD_DONE: u32 = 1;

/// Errors of creating the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("cannot create an eventfd for a balloon queue: {0}")]
    EventFd(std::io::Error),
    #[error("cannot create the balloon statistics timer: {0}")]
    Timer(std::io::Error),
    #[error("statistics were disabled when the VM started; they cannot be turned on or off now")]
    StatsToggle,
    #[error("free page hinting was not enabled when the balloon was configured")]
    HintingDisabled,
    #[error("the guest has not set up the balloon device yet")]
    NotActive,
}

/// What the balloon is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    pub target_pages: u32,
    pub deflate_on_oom: bool,
    /// How often the guest is asked for statistics; zero: no statistics queue.
    pub stats_interval: Duration,
    pub free_page_hinting: bool,
    pub free_page_reporting: bool,
}

/// `GET /balloon/hinting/status`: the command the host last gave and the last the guest sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HintingStatus {
    pub host_cmd: u32,
    pub guest_cmd: Option<u32>,
}

/// The current free page hinting run.
#[derive(Debug, Clone, Copy, Default)]
struct Hinting {
    status: HintingStatus,
    /// The id of the latest run started (the next one takes the following id).
    last_run: u32,
    /// Whether the guest's STOP at the end of its list makes the host answer DONE at once.
    acknowledge_on_stop: bool,
}

/// `GET /balloon/statistics`: Firecracker's shape, plus how old the guest's report is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(flatten)]
    pub guest: GuestStats,
    /// Milliseconds since the guest's last report; absent before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_age_ms: Option<u64>,
}

/// What the host has seen the guest do, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BalloonActivity {
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_bytes: u64,
    pub hinted_bytes: u64,
    pub stats_reports: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Hinting,
    Reporting,
}

/// Which queue does what under the negotiated features (absent queues take no index).
fn roles(acked: u64) -> [Option<Role>; QUEUES] {
    let mut roles = [Some(Role::Inflate), Some(Role::Deflate), None, None, None];
    let mut next = 2;
    for (bit, role) in [
        (F_STATS_VQ, Role::Stats),
        (F_FREE_PAGE_HINT, Role::Hinting),
        (F_REPORTING, Role::Reporting),
    ] {
        if acked & (1 << bit) != 0 {
            roles[next] = Some(role);
            next += 1;
        }
    }
    roles
}

struct Active {
    queues: ActiveQueues<QUEUES>,
    roles: [Option<Role>; QUEUES],
}

/// The balloon device.
pub struct Balloon {
    options: BalloonOptions,
    actual_pages: u32,
    queue_events: [EventFd; QUEUES],
    /// Runs only on the VMM thread (armed by the first report, stopped when a tick finds the
    /// device reset): activation and reset come on vCPU threads, whose seccomp filter has no
    /// timer calls.
    stats_timer: TimerFd,
    stats_timer_armed: bool,
    stats: Option<StatsReport>,
    /// The stats buffer the guest lent us: given back to ask for a new report.
    stats_head: Option<u16>,
    hinting: Hinting,
    activity: BalloonActivity,
    counters: Arc<DeviceCounters>,
    config_generation: u32,
    active: Option<Active>,
    /// The PFNs of the inflate request being served (kept for its allocation).
    pfns: Vec<u32>,
}

/// The address ranges `pfns` cover, each run of consecutive pages as one range: one discard
/// (one madvise, one split of a host huge page at most) per run instead of per page. Linux
/// hands its pages over in descending order, so they are sorted first.
fn page_ranges(pfns: &mut [u32]) -> impl Iterator<Item = (u64, u64)> + '_ {
    pfns.sort_unstable();
    let mut rest: &[u32] = pfns;
    std::iter::from_fn(move || {
        let (&first, _) = rest.split_first()?;
        let mut last = first;
        let mut n = 0;
        // Duplicates fold into their run: a page listed twice is discarded once.
        while n < rest.len() && u64::from(rest[n]) <= u64::from(last) + 1 {
            last = rest[n];
            n += 1;
        }
        rest = &rest[n..];
        let start = u64::from(first) * PAGE_SIZE;
        Some((start, (u64::from(last) - u64::from(first) + 1) * PAGE_SIZE))
    })
}

impl Balloon {
    pub fn new(options: BalloonOptions) -> Result<Self, BalloonError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd);
        Ok(Self {
            options,
            actual_pages: 0,
            queue_events: [evt()?, evt()?, evt()?, evt()?, evt()?],
            stats_timer: TimerFd::new().map_err(|e| BalloonError::Timer(e.into()))?,
            stats_timer_armed: false,
            stats: None,
            stats_head: None,
            hinting: Hinting::default(),
            activity: BalloonActivity::default(),
            counters: Arc::default(),
            config_generation: 0,
            active: None,
            pfns: Vec::new(),
        })
    }

    pub fn options(&self) -> BalloonOptions {
        self.options
    }

    /// Asks the guest to hold `pages` pages in the balloon.
    pub fn set_target_pages(&mut self, pages: u32) {
        if pages == self.options.target_pages {
            return;
        }
        self.options.target_pages = pages;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.queues.interrupt.signal_config_change();
        }
    }

    /// Changes how often statistics are asked for. The stats queue exists only if statistics
    /// were on when the VM started, so this cannot turn them on or off.
    pub fn set_stats_interval(&mut self, interval: Duration) -> Result<(), BalloonError> {
        if interval.is_zero() != self.options.stats_interval.is_zero() {
            return Err(BalloonError::StatsToggle);
        }
        self.options.stats_interval = interval;
        if self.stats_timer_armed {
            self.set_stats_timer(true);
        }
        Ok(())
    }

    /// Starts a free page hinting run: the guest is asked to list its free memory under a new
    /// command id; with `acknowledge_on_stop` the run ends (DONE) as soon as the guest's list
    /// does, otherwise at [`Self::stop_hinting`].
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<(), BalloonError> {
        self.hinting_active()?;
        let id = self.hinting.last_run.wrapping_add(1).max(2);
        self.hinting.last_run = id;
        self.hinting.acknowledge_on_stop = acknowledge_on_stop;
        self.set_hint_cmd(id);
        Ok(())
    }

    /// Ends the run: the guest may use the pages it hinted again.
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        self.hinting_active()?;
        self.set_hint_cmd(HINT_CMD_DONE);
        Ok(())
    }

    pub fn hinting_status(&self) -> Result<HintingStatus, BalloonError> {
        if !self.options.free_page_hinting {
            return Err(BalloonError::HintingDisabled);
        }
        Ok(self.hinting.status)
    }

    fn hinting_active(&self) -> Result<(), BalloonError> {
        if !self.options.free_page_hinting {
            return Err(BalloonError::HintingDisabled);
        }
        if self.active.is_none() {
            return Err(BalloonError::NotActive);
        }
        Ok(())
    }

    fn set_hint_cmd(&mut self, cmd: u32) {
        self.hinting.status.host_cmd = cmd;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.queues.interrupt.signal_config_change();
        }
    }

    /// Pages the guest says it holds in the balloon.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    pub fn activity(&self) -> BalloonActivity {
        self.activity
    }

    /// The target, the guest's count and its latest statistics.
    pub fn stats(&self) -> BalloonStats {
        BalloonStats {
            target_pages: self.options.target_pages,
            actual_pages: self.actual_pages,
            target_mib: self.options.target_pages / PAGES_PER_MIB,
            actual_mib: self.actual_pages / PAGES_PER_MIB,
            guest: self.stats.map(|r| r.stats).unwrap_or_default(),
            stats_age_ms: self
                .stats
                .map(|r| r.at.elapsed().as_millis().try_into().unwrap_or(u64::MAX)),
        }
    }

    /// The guest's latest report and when it arrived.
    pub fn latest_report(&self) -> Option<StatsReport> {
        self.stats
    }

    fn set_stats_timer(&mut self, on: bool) {
        let interval = self.options.stats_interval;
        let result = if on && !interval.is_zero() {
            self.stats_timer.reset(interval, Some(interval))
        } else {
            self.stats_timer.clear()
        };
        match result {
            Ok(()) => self.stats_timer_armed = on,
            Err(e) => tracing::warn!("balloon: cannot set the statistics timer: {e}"),
        }
    }

    fn invalid(&self, what: std::fmt::Arguments<'_>) {
        DeviceCounters::inc(&self.counters.invalid_requests, 1);
        tracing::debug!("balloon: {what}");
    }

    /// Serves every request waiting in queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_ref() else {
            // Linux's driver primes the stats queue and notifies before DRIVER_OK; the transport
            // signals every ready queue again once the device is active.
            return tracing::debug!("balloon: notification of queue {index} before activation");
        };
        let Some(role) = active.roles[index] else {
            return self.invalid(format_args!("notification of unused queue {index}"));
        };
        let mut completed = false;
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            if !active.queues.queues[index].ready() {
                return self.invalid(format_args!("notification of queue {index}, not ready"));
            }
            let mem = active.queues.mem.clone();
            let Some(chain) = pop_chain(&mut active.queues.queues[index], &mem, &self.counters)
            else {
                break;
            };
            let head = chain.head_index();
            DeviceCounters::inc(&self.counters.requests, 1);
            match role {
                Role::Inflate | Role::Deflate => self.page_list(&mem, chain, role),
                Role::Reporting => self.report_free(&mem, chain),
                Role::Hinting => self.hint_free(&mem, chain),
                Role::Stats => {
                    // Held until the next poll: returning it is how we ask for the next report.
                    self.take_stats(&mem, chain);
                    if let Some(old) = self.stats_head.replace(head) {
                        self.invalid(format_args!("a second stats buffer while one was held"));
                        self.complete(index, old);
                        completed = true;
                    }
                    continue;
                }
            }
            self.complete(index, head);
            completed = true;
        }
        if completed {
            if let Some(active) = self.active.as_mut() {
                active.queues.notify(index);
            }
        }
    }

    fn complete(&mut self, index: usize, head: u16) {
        if let Some(active) = self.active.as_mut() {
            active.queues.add_used(index, head, 0, "balloon");
        }
    }

    /// An inflate or deflate request: little-endian u32 page frame numbers.
    fn page_list(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        role: Role,
    ) {
        let mut reader = match Reader::new(mem, chain) {
            Ok(r) => r,
            Err(e) => return self.invalid(format_args!("unreadable page list: {e}")),
        };
        let len = reader.available_bytes();
        if len > MAX_PFNS * 4 {
            return self.invalid(format_args!(
                "page list of {len} bytes (at most {MAX_PFNS} PFNs are served)"
            ));
        }
        if len % 4 != 0 {
            self.invalid(format_args!("page list of {len} bytes (not whole PFNs)"));
        }
        let mut pfns = std::mem::take(&mut self.pfns);
        pfns.clear();
        while reader.available_bytes() >= 4 {
            let pfn: u32 = match reader.read_obj() {
                Ok(p) => p,
                Err(e) => {
                    self.pfns = pfns;
                    return self.invalid(format_args!("page list read: {e}"));
                }
            };
            if !mem.address_in_range(GuestAddress(u64::from(pfn) * PAGE_SIZE)) {
                self.invalid(format_args!("PFN {pfn:#x} is not guest memory"));
                continue;
            }
            match role {
                Role::Deflate => self.activity.deflated_pages += 1,
                _ => {
                    self.activity.inflated_pages += 1;
                    pfns.push(pfn);
                }
            }
        }
        for range in page_ranges(&mut pfns) {
            self.discard_range(mem, range);
        }
        self.pfns = pfns;
    }

    /// A free page report: device-writable ranges the guest no longer uses.
    fn report_free(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        for desc in chain {
            let range = (desc.addr().0, u64::from(desc.len()));
            if self.discard_range(mem, range) {
                self.activity.reported_bytes += range.1;
            }
        }
    }

    /// A hinting chain: 4-byte buffers carry the guest's command id (the run's id at its start,
    /// STOP at its end), every other buffer is free memory, discarded while the run it was
    /// listed under is the host's current one (hints of an older or ended run are stale: the
    /// guest may already be using those pages again).
    fn hint_free(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let mut ended = false;
        for desc in chain {
            if desc.len() == 4 {
                match mem.read_obj::<u32>(desc.addr()) {
                    Ok(cmd) => {
                        self.hinting.status.guest_cmd = Some(cmd);
                        ended = cmd == HINT_CMD_STOP || cmd == HINT_CMD_DONE;
                    }
                    Err(e) => self.invalid(format_args!("unreadable hinting command: {e}")),
                }
                continue;
            }
            let run = self.hinting.status.host_cmd;
            if run == HINT_CMD_STOP || run == HINT_CMD_DONE {
                continue;
            }
            if self.hinting.status.guest_cmd != Some(run) {
                tracing::debug!("balloon: a free page hint outside the current run, ignored");
                continue;
            }
            let range = (desc.addr().0, u64::from(desc.len()));
            if self.discard_range(mem, range) {
                self.activity.hinted_bytes += range.1;
            }
        }
        if ended && self.hinting.acknowledge_on_stop {
            self.set_hint_cmd(HINT_CMD_DONE);
        }
    }

    fn discard_range(&mut self, mem: &GuestMemoryMmap, (addr, len): (u64, u64)) -> bool {
        match discard(mem, GuestAddress(addr), len) {
            Ok(()) => true,
            Err(e @ DiscardError::Madvise { .. }) => {
                DeviceCounters::inc(&self.counters.io_errors, 1);
                tracing::warn!("balloon: {e}");
                false
            }
            Err(e) => {
                self.invalid(format_args!("{e}"));
                false
            }
        }
    }

    fn take_stats(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let mut reader = match Reader::new(mem, chain) {
            Ok(r) => r,
            Err(e) => return self.invalid(format_args!("unreadable stats buffer: {e}")),
        };
        let len = reader.available_bytes();
        if len > MAX_REPORT_SIZE {
            return self.invalid(format_args!(
                "stats buffer of {len} bytes (at most {MAX_REPORT_SIZE} are read)"
            ));
        }
        let mut bytes = vec![0u8; len];
        if let Err(e) = std::io::Read::read_exact(&mut reader, &mut bytes) {
            return self.invalid(format_args!("stats buffer read: {e}"));
        }
        match GuestStats::parse(&bytes) {
            Some((stats, _unknown)) => {
                self.stats = Some(StatsReport {
                    stats,
                    at: Instant::now(),
                });
                self.activity.stats_reports += 1;
                if !self.stats_timer_armed {
                    self.set_stats_timer(true);
                }
            }
            None => self.invalid(format_args!("stats buffer of {} bytes", bytes.len())),
        }
    }

    /// The stats timer fired: give the guest its buffer back so it sends a fresh report.
    fn poll_stats(&mut self) {
        let _ = self.stats_timer.wait();
        let Some(index) = self
            .active
            .as_ref()
            .and_then(|a| a.roles.iter().position(|r| *r == Some(Role::Stats)))
        else {
            // Reset since the last tick: the next driver's first report re-arms the timer.
            return self.set_stats_timer(false);
        };
        if let Some(head) = self.stats_head.take() {
            self.complete(index, head);
            if let Some(active) = self.active.as_mut() {
                active.queues.notify(index);
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1;
        if !self.options.stats_interval.is_zero() {
            f |= 1 << F_STATS_VQ;
        }
        if self.options.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.options.free_page_hinting {
            f |= 1 << F_FREE_PAGE_HINT;
        }
        if self.options.free_page_reporting {
            f |= 1 << F_REPORTING;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[..4].copy_from_slice(&self.options.target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        config[8..].copy_from_slice(&self.hinting.status.host_cmd.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (CONFIG_ACTUAL, Ok(bytes)) => self.actual_pages = u32::from_le_bytes(bytes),
            _ => {
                DeviceCounters::inc(&self.counters.invalid_register_access, 1);
                tracing::debug!(
                    "balloon: config write of {} bytes at {offset} (only `actual` is writable)",
                    data.len()
                );
            }
        }
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let roles = roles(ctx.acked_features);
        let queues = ActiveQueues::new(ctx)?;
        for (i, role) in roles.iter().enumerate() {
            if role.is_some() && !queues.queues[i].ready() {
                return Err(ActivateError::Other(format!(
                    "balloon queue {i} ({role:?}) was not set up"
                )));
            }
        }
        self.active = Some(Active { queues, roles });
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, |a| a.queues.states())
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_head = None;
        self.hinting = Hinting::default();
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

/// The guest's page count, the statistics buffer it lent us (by descriptor index) and whether
/// statistics were being polled. The guest's last report is not kept: the next poll brings one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BalloonState {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub stats_head: Option<u16>,
    pub stats_polling: bool,
    pub activity: BalloonActivity,
    pub config_generation: u32,
}

impl Persist for Balloon {
    type State = BalloonState;

    fn save(&mut self) -> BalloonState {
        BalloonState {
            target_pages: self.options.target_pages,
            actual_pages: self.actual_pages,
            stats_head: self.stats_head,
            stats_polling: self.stats_timer_armed,
            activity: self.activity,
            config_generation: self.config_generation,
        }
    }

    /// Runs on the VMM thread, which may arm the statistics timer.
    fn restore(&mut self, s: BalloonState) -> Result<(), PersistError> {
        let queue_size = self
            .active
            .as_ref()
            .and_then(|a| a.roles.iter().position(|r| *r == Some(Role::Stats)))
            .and_then(|i| self.active.as_ref().map(|a| a.queues.queues[i].size()));
        if let Some(head) = s.stats_head {
            if queue_size.is_none_or(|size| head >= size) {
                return Err(PersistError::Mismatch(format!(
                    "balloon: held statistics buffer {head} is not in the statistics queue"
                )));
            }
        }
        self.options.target_pages = s.target_pages;
        self.actual_pages = s.actual_pages;
        self.stats_head = s.stats_head;
        self.activity = s.activity;
        self.config_generation = s.config_generation;
        if s.stats_polling {
            self.set_stats_timer(true);
        }
        Ok(())
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = self
            .queue_events
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain([self.stats_timer.as_raw_fd()]);
        watch_fds(ops, "balloon", fds);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.stats_timer.as_raw_fd() {
            return self.poll_stats();
        }
        if let Some(i) = self
            .queue_events
            .iter()
            .position(|e| e.as_raw_fd() == events.fd())
        {
            let _ = self.queue_events[i].read();
            self.process_queue(i);
        }
    }
}

#[cfg(test)]
mod tests;
