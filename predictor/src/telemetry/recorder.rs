//! Hot-path recorders: one per vCPU thread for exits, one per device thread for virtio I/O.

use super::cells::{cells, CellReader, CellWriter};
use serde::{Deserialize, Serialize};

/// Devices a VM can have that the counters tell apart; more would not fit the
/// `Signals::devices` bit mask.
pub const MAX_DEVICES: usize = 16;

/// Index of a device the VMM registered (its virtio-mmio slot, or a legacy device number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceId(u8);

impl DeviceId {
    pub const fn new(index: u8) -> Option<Self> {
        if (index as usize) < MAX_DEVICES {
            Some(DeviceId(index))
        } else {
            None
        }
    }

    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a port or MMIO exit went, as the VMM's bus resolved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Device(DeviceId),
    /// No device claims the address: a probe, a bug, or an escape attempt.
    Unknown,
}

/// Why KVM_RUN returned. Kept `Copy` and two bytes so the vCPU loop can build it for free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Io(Target),
    Mmio(Target),
    Hlt,
    Shutdown,
    InternalError,
    FailEntry,
    SystemEvent,
    Other,
}

const TARGET_SLOTS: usize = MAX_DEVICES + 1;
const IO_BASE: usize = 0;
const MMIO_BASE: usize = TARGET_SLOTS;
const SIMPLE_BASE: usize = 2 * TARGET_SLOTS;
/// Number of distinct exit counters per vCPU.
pub const EXIT_SLOTS: usize = SIMPLE_BASE + 6;
/// Cell after the exit counters that holds the time of the last exit (a gauge).
const LAST_EXIT_CELL: usize = EXIT_SLOTS;
const VCPU_CELLS: usize = EXIT_SLOTS + 1;

impl ExitKind {
    #[inline(always)]
    const fn slot(self) -> usize {
        const fn target(base: usize, t: Target) -> usize {
            match t {
                Target::Device(d) => base + d.index(),
                Target::Unknown => base + MAX_DEVICES,
            }
        }
        match self {
            ExitKind::Io(t) => target(IO_BASE, t),
            ExitKind::Mmio(t) => target(MMIO_BASE, t),
            ExitKind::Hlt => SIMPLE_BASE,
            ExitKind::Shutdown => SIMPLE_BASE + 1,
            ExitKind::InternalError => SIMPLE_BASE + 2,
            ExitKind::FailEntry => SIMPLE_BASE + 3,
            ExitKind::SystemEvent => SIMPLE_BASE + 4,
            ExitKind::Other => SIMPLE_BASE + 5,
        }
    }
}

/// Exit counts of one vCPU over one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCounts([u64; EXIT_SLOTS]);

impl Default for ExitCounts {
    fn default() -> Self {
        ExitCounts([0; EXIT_SLOTS])
    }
}

impl ExitCounts {
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.0[kind.slot()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Port plus MMIO exits that reached `device`.
    pub fn device(&self, device: DeviceId) -> u64 {
        self.get(ExitKind::Io(Target::Device(device)))
            + self.get(ExitKind::Mmio(Target::Device(device)))
    }

    pub fn unknown(&self) -> u64 {
        self.get(ExitKind::Io(Target::Unknown)) + self.get(ExitKind::Mmio(Target::Unknown))
    }

    pub fn add(&mut self, other: &ExitCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
}

/// Owned by one vCPU thread; called once per exit.
pub struct ExitRecorder(CellWriter<VCPU_CELLS>);

impl ExitRecorder {
    /// Counts one exit. Two relaxed stores to a cache line only this thread writes; see
    /// `cells` for why that is safe against the concurrent reader.
    #[inline(always)]
    pub fn record(&mut self, kind: ExitKind, now_ns: u64) {
        self.0.add(kind.slot(), 1);
        self.0.set(LAST_EXIT_CELL, now_ns);
    }
}

/// The window closer's side of an [`ExitRecorder`].
pub(crate) struct ExitReader(CellReader<VCPU_CELLS>);

impl ExitReader {
    pub(crate) fn take(&mut self) -> (ExitCounts, u64) {
        let d = self.0.delta();
        let mut counts = [0; EXIT_SLOTS];
        counts.copy_from_slice(&d[..EXIT_SLOTS]);
        (ExitCounts(counts), self.0.current(LAST_EXIT_CELL))
    }
}

pub(crate) fn exit_recorder() -> (ExitRecorder, ExitReader) {
    let (w, r) = cells();
    (ExitRecorder(w), ExitReader(r))
}

/// What a device is, which decides the resource its bytes count against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Block,
    Net,
    Vsock,
    Balloon,
    Mem,
    Console,
    Other,
}

const OPS: usize = 0;
const READ: usize = 1;
const WRITTEN: usize = 2;
const DEVICE_CELLS: usize = 3;

/// Owned by the thread that completes a device's virtio requests.
pub struct DeviceRecorder(CellWriter<DEVICE_CELLS>);

impl DeviceRecorder {
    /// Counts one completed request moving `read` bytes from and `written` bytes to the
    /// guest's point of view of the device (a block read is `read`, a net TX is `written`).
    #[inline(always)]
    pub fn record(&mut self, read: u64, written: u64) {
        self.0.add(OPS, 1);
        self.0.add(READ, read);
        self.0.add(WRITTEN, written);
    }

    /// Adds `ops` requests at once: for a writer that samples a device's own cumulative
    /// counters (the VMM thread, once a window) instead of sitting on its request path.
    #[inline(always)]
    pub fn record_many(&mut self, ops: u64, read: u64, written: u64) {
        self.0.add(OPS, ops);
        self.0.add(READ, read);
        self.0.add(WRITTEN, written);
    }
}

pub(crate) struct DeviceReader(CellReader<DEVICE_CELLS>);

impl DeviceReader {
    /// (ops, bytes read, bytes written) since the previous call.
    pub(crate) fn take(&mut self) -> (u64, u64, u64) {
        let d = self.0.delta();
        (d[OPS], d[READ], d[WRITTEN])
    }
}

pub(crate) fn device_recorder() -> (DeviceRecorder, DeviceReader) {
    let (w, r) = cells();
    (DeviceRecorder(w), DeviceReader(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(i: u8) -> DeviceId {
        DeviceId::new(i).unwrap()
    }

    #[test]
    fn device_id_rejects_out_of_range() {
        assert!(DeviceId::new(MAX_DEVICES as u8).is_none());
        assert_eq!(dev(15).index(), 15);
    }

    #[test]
    fn every_kind_has_its_own_slot() {
        let mut kinds = vec![
            ExitKind::Hlt,
            ExitKind::Shutdown,
            ExitKind::InternalError,
            ExitKind::FailEntry,
            ExitKind::SystemEvent,
            ExitKind::Other,
            ExitKind::Io(Target::Unknown),
            ExitKind::Mmio(Target::Unknown),
        ];
        for i in 0..MAX_DEVICES as u8 {
            kinds.push(ExitKind::Io(Target::Device(dev(i))));
            kinds.push(ExitKind::Mmio(Target::Device(dev(i))));
        }
        let mut slots: Vec<usize> = kinds.iter().map(|k| k.slot()).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), EXIT_SLOTS);
        assert!(slots.iter().all(|&s| s < EXIT_SLOTS));
    }

    #[test]
    fn recorder_counts_by_reason() {
        let (mut rec, mut reader) = exit_recorder();
        rec.record(ExitKind::Io(Target::Device(dev(2))), 10);
        rec.record(ExitKind::Mmio(Target::Device(dev(2))), 11);
        rec.record(ExitKind::Mmio(Target::Unknown), 12);
        rec.record(ExitKind::Hlt, 13);
        let (c, last) = reader.take();
        assert_eq!(last, 13);
        assert_eq!(c.total(), 4);
        assert_eq!(c.device(dev(2)), 2);
        assert_eq!(c.device(dev(3)), 0);
        assert_eq!(c.unknown(), 1);
        assert_eq!(c.get(ExitKind::Hlt), 1);
        let (c, _) = reader.take();
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn device_recorder_sums_bytes() {
        let (mut rec, mut reader) = device_recorder();
        rec.record(4096, 0);
        rec.record(0, 512);
        assert_eq!(reader.take(), (2, 4096, 512));
        assert_eq!(reader.take(), (0, 0, 0));
        rec.record_many(5, 100, 7);
        assert_eq!(reader.take(), (5, 100, 7));
    }
}
