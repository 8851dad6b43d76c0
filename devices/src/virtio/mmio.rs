//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2): the register window through
//! which a driver discovers a device, negotiates features, sets up queues and starts it.
//!
//! Accesses the spec forbids (wrong width, queue setup after DRIVER_OK, unknown offsets) are
//! ignored and counted; a driver that breaks the protocol gets a device that does not start, never
//! a VMM that stops.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device_writes::DeviceWrites;
use super::{ActivateContext, DeviceCounters, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::persist::{Persist, PersistError};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where KVM ioeventfds are attached.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5052_4553; // "PRES"
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// A virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    /// The pages the device wrote, for Diff snapshots (shared by every device of the VM).
    writes: Arc<DeviceWrites>,
    /// Clones of the device's queue eventfds, for notifications that reach us instead of KVM.
    queue_events: Vec<EventFd>,
    counters: Arc<DeviceCounters>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl MmioTransport {
    /// Errors only if the device's eventfds cannot be duplicated.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        writes: Arc<DeviceWrites>,
    ) -> std::io::Result<Self> {
        let (queues, queue_events, counters) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).expect("device queue sizes are valid powers of two"))
                .collect();
            let events = d
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            (queues, events, d.counters())
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            writes,
            queue_events,
            counters,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            status: 0,
            config_generation: 0,
        })
    }

    fn invalid(&self, what: std::fmt::Arguments<'_>) {
        DeviceCounters::inc(&self.counters.invalid_register_access, 1);
        tracing::debug!("virtio-mmio: {what}");
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = lock(&self.device).avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self
                .config_generation
                .wrapping_add(lock(&self.device).config_generation()),
            _ => {
                self.invalid(format_args!(
                    "read of write-only or unknown register {offset:#x}"
                ));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => {
                if self.status & (STATUS_FEATURES_OK | STATUS_FAILED) != 0
                    || self.status & STATUS_DRIVER == 0
                {
                    return self.invalid(format_args!(
                        "DriverFeatures written in status {:#x}",
                        self.status
                    ));
                }
                match self.driver_features_select {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => self.invalid(format_args!(
                        "DriverFeaturesSel {}",
                        self.driver_features_select
                    )),
                }
            }
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if !setup => {
                self.invalid(format_args!(
                    "queue register {offset:#x} written in status {:#x}",
                    self.status
                ))
            }
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let Some(q) = self.selected_queue() else {
                    return self
                        .invalid(format_args!("queue {} does not exist", self.queue_select));
                };
                match offset {
                    0x38 => q.set_size(value as u16),
                    0x44 => q.set_ready(value == 1),
                    0x80 => q.set_desc_table_address(Some(value), None),
                    0x84 => q.set_desc_table_address(None, Some(value)),
                    0x90 => q.set_avail_ring_address(Some(value), None),
                    0x94 => q.set_avail_ring_address(None, Some(value)),
                    0xa0 => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            0x50 => self.notify(value),
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            _ => self.invalid(format_args!(
                "write of read-only or unknown register {offset:#x}"
            )),
        }
    }

    /// A queue notification that came through the MMIO exit (no ioeventfd): forward it.
    fn notify(&self, queue: u32) {
        match self.queue_events.get(queue as usize) {
            Some(evt) if self.status & STATUS_DRIVER_OK != 0 => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: cannot forward a queue notification: {e}");
                }
            }
            _ => self.invalid(format_args!(
                "notify of queue {queue} in status {:#x}",
                self.status
            )),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        // Status bits only accumulate until a reset; FAILED is the driver giving up.
        if value & self.status != self.status {
            return self.invalid(format_args!(
                "status {value:#x} clears bits of {:#x}",
                self.status
            ));
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = lock(&self.device).avail_features();
            if self.acked_features & !offered != 0
                || self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                // Leaving FEATURES_OK unset tells the driver the features were not accepted.
                self.invalid(format_args!(
                    "driver features {:#x} not acceptable (offered {offered:#x})",
                    self.acked_features
                ));
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & STATUS_FEATURES_OK == 0 {
            self.invalid(format_args!("DRIVER_OK before FEATURES_OK"));
            return self.needs_reset();
        }
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            self.invalid(format_args!(
                "queue {i} is ready but invalid (size or addresses)"
            ));
            return self.needs_reset();
        }
        // The device gets its own copies; the transport keeps the configuration for a reset.
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>();
        let queues = match queues {
            Ok(q) => q,
            Err(e) => {
                self.invalid(format_args!("queue state cannot be copied: {e}"));
                return self.needs_reset();
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
            writes: self.writes.clone(),
        };
        let result = lock(&self.device).activate(ctx);
        if let Err(e) = result {
            tracing::warn!("virtio-mmio: device refused to start: {e}");
            return self.needs_reset();
        }
        // Drivers may make buffers available (and notify) before DRIVER_OK: Linux's balloon
        // primes its statistics queue that way. A notification the device was not active to see
        // is gone, so every ready queue is looked at once now, on the device's own thread.
        for (queue, evt) in self.queues.iter().zip(&self.queue_events) {
            if queue.ready() {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: cannot signal a queue at activation: {e}");
                }
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.clear();
    }

    /// The device's counters.
    pub fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    /// Counter of forbidden register accesses (for tests).
    pub fn invalid_register_accesses(&self) -> &AtomicU64 {
        &self.counters.invalid_register_access
    }
}

/// One queue's registers and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegisters(#[serde(with = "QueueStateDef")] pub virtio_queue::QueueState);

/// `virtio_queue::QueueState` for serde's remote derive (virtio-queue has no serde).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "virtio_queue::QueueState")]
struct QueueStateDef {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// The transport's registers, its queues, the pending interrupt bits and the device's own
/// state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub queues: Vec<QueueRegisters>,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub device: Vec<u8>,
}

impl Persist for MmioTransport {
    type State = TransportState;

    fn save(&mut self) -> TransportState {
        // The device's rings advanced past the transport's copy: its queues are the truth.
        let device = lock(&self.device).save_bytes();
        let device = device.unwrap_or_else(|e| {
            tracing::error!("virtio-mmio: device state not saved: {e}");
            Vec::new()
        });
        let active = lock(&self.device).queue_states();
        TransportState {
            device_type: lock(&self.device).device_type(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueRegisters(active.get(i).copied().unwrap_or_else(|| q.state())))
                .collect(),
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            device,
        }
    }

    /// Registers first, then the device starts on the saved queues (as at DRIVER_OK), then it
    /// takes back its own state; a pending interrupt is raised again.
    fn restore(&mut self, s: TransportState) -> Result<(), PersistError> {
        let device_type = lock(&self.device).device_type();
        if s.device_type != device_type || s.queues.len() != self.queues.len() {
            return Err(PersistError::Mismatch(format!(
                "saved virtio type {} with {} queues, this device is type {device_type} with {}",
                s.device_type,
                s.queues.len(),
                self.queues.len()
            )));
        }
        self.queues = s
            .queues
            .iter()
            .map(|q| Queue::try_from(q.0))
            .collect::<Result<_, _>>()
            .map_err(|e| PersistError::Mismatch(format!("queue: {e}")))?;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.acked_features = s.acked_features;
        self.queue_select = s.queue_select;
        self.status = s.status;
        self.config_generation = s.config_generation;
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.activate();
            if self.status & STATUS_DEVICE_NEEDS_RESET != 0 {
                return Err(PersistError::Restore(format!(
                    "virtio type {device_type} did not start on its saved queues"
                )));
            }
        }
        lock(&self.device).restore_bytes(&s.device)?;
        if s.interrupt_status != 0 {
            self.interrupt.raise(s.interrupt_status);
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            return lock(&self.device).read_config(offset - CONFIG_SPACE, data);
        }
        if data.len() != 4 {
            data.fill(0);
            return self.invalid(format_args!(
                "{}-byte read of register {offset:#x}",
                data.len()
            ));
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return lock(&self.device).write_config(offset - CONFIG_SPACE, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.invalid(format_args!(
                "{}-byte write of register {offset:#x}",
                data.len()
            ));
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A device that records activation, for transport tests.
    pub struct Dummy {
        pub activated: Option<u64>,
        pub resets: u32,
        events: Vec<EventFd>,
        counters: Arc<DeviceCounters>,
    }

    impl Dummy {
        pub fn new() -> Self {
            Self {
                activated: None,
                resets: 0,
                events: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
                counters: Arc::default(),
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xaa, 0xbb], offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), super::super::ActivateError> {
            self.activated = Some(ctx.acked_features);
            Ok(())
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn counters(&self) -> Arc<DeviceCounters> {
            self.counters.clone()
        }
    }

    impl crate::persist::Persist for Dummy {
        type State = u32;
        fn save(&mut self) -> u32 {
            self.resets
        }
        fn restore(&mut self, resets: u32) -> Result<(), crate::persist::PersistError> {
            self.resets = resets;
            Ok(())
        }
    }

    pub fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            dev.clone(),
            mem,
            Arc::new(VirtioInterrupt::new(irq)),
            Arc::default(),
        )
        .unwrap();
        (t, dev)
    }

    pub fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// The driver side of initialisation, per the spec's order.
    pub fn driver_init(t: &mut MmioTransport, features_hi: u32, features_lo: u32) {
        w32(t, 0x70, STATUS_ACKNOWLEDGE);
        w32(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(t, 0x24, 0);
        w32(t, 0x20, features_lo);
        w32(t, 0x24, 1);
        w32(t, 0x20, features_hi);
        w32(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        w32(t, 0x30, 0);
        w32(t, 0x38, 16);
        w32(t, 0x80, 0x1000);
        w32(t, 0x90, 0x2000);
        w32(t, 0xa0, 0x3000);
        w32(t, 0x44, 1);
    }

    #[test]
    fn identity_registers_and_config_space() {
        let (mut t, _) = transport();
        assert_eq!(r32(&mut t, 0x00), MAGIC_VALUE);
        assert_eq!(r32(&mut t, 0x04), 2);
        assert_eq!(r32(&mut t, 0x08), 42);
        assert_eq!(r32(&mut t, 0x34), 16);
        w32(&mut t, 0x14, 1);
        assert_eq!(r32(&mut t, 0x10), 1, "VERSION_1 is bit 32");
        let mut b = [0u8; 2];
        t.read(0x100, &mut b);
        assert_eq!(b, [0xaa, 0xbb]);
    }

    #[test]
    fn full_initialisation_activates_with_the_acked_features() {
        let (mut t, dev) = transport();
        driver_init(&mut t, 1, 0b100);
        assert_ne!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activated, Some((1 << 32) | 0b100));
        // After DRIVER_OK queue registers are frozen.
        let before = t.invalid_register_accesses().load(Ordering::Relaxed);
        w32(&mut t, 0x38, 8);
        assert_eq!(
            t.invalid_register_accesses().load(Ordering::Relaxed),
            before + 1
        );
        // Reset returns everything to the start.
        w32(&mut t, 0x70, 0);
        assert_eq!(r32(&mut t, 0x70), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r32(&mut t, 0x44), 0, "queue no longer ready");
    }

    #[test]
    fn activation_signals_every_ready_queue_for_buffers_made_available_before() {
        let (mut t, dev) = transport();
        let evt = dev.lock().unwrap().events[0].try_clone().unwrap();
        driver_init(&mut t, 1, 0);
        setup_queue(&mut t);
        // A notification before DRIVER_OK (what Linux's balloon does with its stats buffer) is
        // not forwarded, so the device would never look at that buffer by itself.
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(evt.read().is_err(), "nothing forwarded before DRIVER_OK");
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(dev.lock().unwrap().activated.is_some());
        assert_eq!(evt.read().unwrap(), 1, "the ready queue is signalled once");
    }

    #[test]
    fn a_restored_transport_starts_its_device_on_the_saved_queues() {
        let (mut t, dev) = transport();
        driver_init(&mut t, 1, 0b100);
        setup_queue(&mut t);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        dev.lock().unwrap().resets = 7;
        t.interrupt.raise(crate::virtio::INTERRUPT_USED_RING);
        let saved = crate::persist::Snapshottable::save_bytes(&mut t).unwrap();

        let (mut fresh, fresh_dev) = transport();
        crate::persist::Snapshottable::restore_bytes(&mut fresh, &saved).unwrap();
        assert_eq!(fresh_dev.lock().unwrap().activated, Some((1 << 32) | 0b100));
        assert_eq!(
            fresh_dev.lock().unwrap().resets,
            7,
            "the device's own state"
        );
        assert_eq!(r32(&mut fresh, 0x70) & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        assert_eq!(r32(&mut fresh, 0x44), 1, "queue 0 ready");
        assert_eq!(r32(&mut fresh, 0x60), crate::virtio::INTERRUPT_USED_RING);

        // A state for a device of another type is refused.
        let mut state: TransportState = crate::persist::decode(&saved).unwrap();
        state.device_type = 2;
        let (mut other, _) = transport();
        let e = other.restore(state).unwrap_err();
        assert!(e.to_string().contains("type 2"), "{e}");
    }

    #[test]
    fn features_without_version_1_or_unknown_bits_are_refused() {
        let (mut t, _) = transport();
        driver_init(&mut t, 0, 0b1);
        assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0, "no VERSION_1");
        let (mut t, _) = transport();
        driver_init(&mut t, 1, 0b10);
        assert_eq!(
            r32(&mut t, 0x70) & STATUS_FEATURES_OK,
            0,
            "bit 1 not offered"
        );
    }

    #[test]
    fn protocol_violations_are_counted_and_never_activate() {
        let (mut t, dev) = transport();
        // Queue setup before FEATURES_OK, DRIVER_OK without features, odd widths.
        setup_queue(&mut t);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(r32(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
        t.write(0x70, &[1, 2]);
        let mut b = [0u8; 1];
        t.read(0x00, &mut b);
        w32(&mut t, 0x30, 7); // no such queue
        w32(&mut t, 0x70, 0);
        driver_init(&mut t, 1, 0);
        w32(&mut t, 0x30, 7);
        w32(&mut t, 0x38, 8);
        w32(&mut t, 0x50, 3);
        w32(&mut t, 0x400, 1);
        assert!(t.invalid_register_accesses().load(Ordering::Relaxed) >= 8);
    }

    #[test]
    fn config_space_writes_to_a_read_only_config_are_counted() {
        let (mut t, _) = transport();
        let before = t.invalid_register_accesses().load(Ordering::Relaxed);
        t.write(0x100, &[1]);
        t.write(0xfff, &[1, 2, 3, 4]);
        assert_eq!(
            t.invalid_register_accesses().load(Ordering::Relaxed),
            before + 2
        );
        let mut b = [0u8; 2];
        t.read(0x100, &mut b);
        assert_eq!(b, [0xaa, 0xbb], "the config is unchanged");
    }

    #[test]
    fn a_ready_queue_outside_memory_fails_activation() {
        let (mut t, dev) = transport();
        driver_init(&mut t, 1, 0);
        w32(&mut t, 0x30, 0);
        w32(&mut t, 0x38, 16);
        w32(&mut t, 0x80, 0xffff_0000); // beyond the 1 MiB of RAM
        w32(&mut t, 0x44, 1);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(r32(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(r32(&mut t, 0x60) & super::super::INTERRUPT_CONFIG_CHANGE, 2);
    }
}
