//! The hot-path exit counter: one per vCPU thread, written by that thread alone, read by the
//! window closer and by whoever else wants the totals (the VMM's metrics). Devices need no
//! recorder: their own cumulative counters go straight into the window inputs.

use super::cells::{cells, CellReader, CellTotals, CellWriter};
use serde::{Deserialize, Serialize};

/// Devices a VM can have that the counters tell apart: as many as the `Signals::devices` bit
/// mask holds.
pub const MAX_DEVICES: usize = 32;

/// Index of a device the VMM attached (in attach order, over every bus).
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

/// The direction of a port or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Why KVM_RUN returned. Kept `Copy` and small so the vCPU loop can build it for free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Io(Access, Target),
    Mmio(Access, Target),
    Hlt,
    Shutdown,
    InternalError,
    FailEntry,
    SystemEvent,
    Other,
}

const TARGET_SLOTS: usize = MAX_DEVICES + 1;
/// First slot of each (bus, direction): port reads, port writes, MMIO reads, MMIO writes.
const ACCESS_BASES: usize = 4;
const SIMPLE_BASE: usize = ACCESS_BASES * TARGET_SLOTS;
/// Number of distinct exit counters per vCPU.
pub const EXIT_SLOTS: usize = SIMPLE_BASE + 6;

impl ExitKind {
    #[inline(always)]
    const fn slot(self) -> usize {
        const fn target(bus: usize, access: Access, t: Target) -> usize {
            let base = (2 * bus + access as usize) * TARGET_SLOTS;
            match t {
                Target::Device(d) => base + d.index(),
                Target::Unknown => base + MAX_DEVICES,
            }
        }
        match self {
            ExitKind::Io(a, t) => target(0, a, t),
            ExitKind::Mmio(a, t) => target(1, a, t),
            ExitKind::Hlt => SIMPLE_BASE,
            ExitKind::Shutdown => SIMPLE_BASE + 1,
            ExitKind::InternalError => SIMPLE_BASE + 2,
            ExitKind::FailEntry => SIMPLE_BASE + 3,
            ExitKind::SystemEvent => SIMPLE_BASE + 4,
            ExitKind::Other => SIMPLE_BASE + 5,
        }
    }
}

/// Exit counts of one vCPU, over one window or since it started.
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

    /// Whether anything was counted.
    pub fn any(&self) -> bool {
        self.0.iter().any(|&n| n != 0)
    }

    /// Port (`io`) or MMIO accesses in one direction, to any device or none.
    pub fn accesses(&self, io: bool, access: Access) -> u64 {
        let base = (2 * usize::from(!io) + access as usize) * TARGET_SLOTS;
        self.0[base..base + TARGET_SLOTS].iter().sum()
    }

    fn targets(&self, t: Target) -> u64 {
        [Access::Read, Access::Write]
            .into_iter()
            .map(|a| self.get(ExitKind::Io(a, t)) + self.get(ExitKind::Mmio(a, t)))
            .sum()
    }

    /// Port plus MMIO exits that reached `device`.
    pub fn device(&self, device: DeviceId) -> u64 {
        self.targets(Target::Device(device))
    }

    /// Port plus MMIO exits no device answered.
    pub fn unknown(&self) -> u64 {
        self.targets(Target::Unknown)
    }

    pub fn add(&mut self, other: &ExitCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
}

/// Owned by one vCPU thread; called once per exit.
pub struct ExitRecorder(CellWriter<EXIT_SLOTS>);

impl ExitRecorder {
    /// A counter for one vCPU and the handle its totals are read through.
    pub fn new() -> (ExitRecorder, ExitTotals) {
        let (w, totals) = cells();
        (ExitRecorder(w), ExitTotals(totals))
    }

    /// Counts one exit: a relaxed load and store to a cache line only this thread writes; see
    /// `cells` for why that is safe against concurrent readers.
    #[inline(always)]
    pub fn record(&mut self, kind: ExitKind) {
        self.0.add(kind.slot(), 1);
    }
}

/// Read access to one vCPU's exit counts, for any number of readers.
#[derive(Clone)]
pub struct ExitTotals(CellTotals<EXIT_SLOTS>);

impl ExitTotals {
    /// Every exit counted since the vCPU started.
    pub fn counts(&self) -> ExitCounts {
        ExitCounts(self.0.current())
    }

    pub(crate) fn reader(&self) -> ExitReader {
        ExitReader(self.0.reader())
    }
}

/// The window closer's side of an [`ExitRecorder`]: counts since the previous window.
pub(crate) struct ExitReader(CellReader<EXIT_SLOTS>);

impl ExitReader {
    /// Writes the counts since the previous call into `out`.
    pub(crate) fn take_into(&mut self, out: &mut ExitCounts) {
        self.0.delta_into(&mut out.0);
    }
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
    /// The machine's own devices (the i8042, ACPI's event and CPU hot-plug registers, the boot
    /// timer): a healthy guest may touch one first at any point of its life (a reset, a vCPU
    /// plugged by the predictor, a driver loaded late), so first use is no sign of anything.
    Platform,
    /// Ports of hardware the VM does not have, which guests probe (the CMOS, the POST port,
    /// PCI configuration): its exits are known, but they are no I/O and no device in use.
    Absent,
}

/// A device's cumulative request counters, as the VMM reads them at window close (requests
/// completed, and bytes moved from and to the guest's point of view of the device: a block read
/// is `read_bytes`, a net TX is `written_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTotals {
    pub ops: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Times the device's rate limiter made a queue wait.
    pub throttled: u64,
}

impl DeviceTotals {
    pub(crate) fn since(&self, earlier: &DeviceTotals) -> DeviceTotals {
        DeviceTotals {
            ops: self.ops.wrapping_sub(earlier.ops),
            read_bytes: self.read_bytes.wrapping_sub(earlier.read_bytes),
            written_bytes: self.written_bytes.wrapping_sub(earlier.written_bytes),
            throttled: self.throttled.wrapping_sub(earlier.throttled),
        }
    }
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
        assert_eq!(dev(31).index(), 31);
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
        ];
        for a in [Access::Read, Access::Write] {
            kinds.push(ExitKind::Io(a, Target::Unknown));
            kinds.push(ExitKind::Mmio(a, Target::Unknown));
            for i in 0..MAX_DEVICES as u8 {
                kinds.push(ExitKind::Io(a, Target::Device(dev(i))));
                kinds.push(ExitKind::Mmio(a, Target::Device(dev(i))));
            }
        }
        let mut slots: Vec<usize> = kinds.iter().map(|k| k.slot()).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), EXIT_SLOTS);
        assert!(slots.iter().all(|&s| s < EXIT_SLOTS));
    }

    #[test]
    fn recorder_counts_by_reason_for_every_reader() {
        let (mut rec, totals) = ExitRecorder::new();
        rec.record(ExitKind::Hlt);
        let mut reader = totals.reader();
        rec.record(ExitKind::Io(Access::Write, Target::Device(dev(2))));
        rec.record(ExitKind::Mmio(Access::Read, Target::Device(dev(2))));
        rec.record(ExitKind::Mmio(Access::Write, Target::Unknown));
        rec.record(ExitKind::Io(Access::Read, Target::Unknown));
        rec.record(ExitKind::Hlt);
        let mut c = ExitCounts::default();
        reader.take_into(&mut c);
        assert_eq!(c.total(), 5);
        assert_eq!(c.device(dev(2)), 2);
        assert_eq!(c.device(dev(3)), 0);
        assert_eq!(c.unknown(), 2);
        assert_eq!(c.get(ExitKind::Hlt), 1);
        assert_eq!(c.accesses(true, Access::Write), 1);
        assert_eq!(c.accesses(true, Access::Read), 1);
        assert_eq!(c.accesses(false, Access::Read), 1);
        assert_eq!(c.accesses(false, Access::Write), 1);
        reader.take_into(&mut c);
        assert_eq!(c.total(), 0);
        // The totals count from the start, whatever the window reader took.
        assert_eq!(totals.counts().total(), 6);
        assert_eq!(totals.counts().get(ExitKind::Hlt), 2);
    }

    #[test]
    fn device_totals_subtract_fieldwise_and_wrap() {
        let a = DeviceTotals {
            ops: u64::MAX,
            read_bytes: 10,
            written_bytes: 5,
            throttled: 3,
        };
        let b = DeviceTotals {
            ops: 1,
            read_bytes: 4106,
            written_bytes: 5,
            throttled: 4,
        };
        assert_eq!(
            b.since(&a),
            DeviceTotals {
                ops: 2,
                read_bytes: 4096,
                written_bytes: 0,
                throttled: 1
            }
        );
    }
}
