//! One KVM exit: port and MMIO accesses go to the device the bus resolves, the fatal ones end
//! the VM, and every exit is told, with the device that answered, to the vCPU's
//! [`ExitObserver`].

use devices::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;
use predictor::telemetry::{Access, DeviceId, ExitKind, Target};

use crate::exit::ExitReason;

/// The devices a vCPU's exits reach, each known by the id it was attached under.
#[derive(Default)]
pub struct IoBuses {
    pub pio: Bus<DeviceId>,
    pub mmio: Bus<DeviceId>,
}

/// Told of every exit, on the vCPU's own thread, once the exit was handled. It runs on every
/// exit: it must not block, allocate, or take a lock another vCPU takes.
pub trait ExitObserver: Send {
    fn observe(&mut self, exit: ExitKind);
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Continue,
    /// The VM ends for this reason.
    End(ExitReason),
}

/// Acts on one KVM exit of vCPU `index` and tells `observer` what it was. Unclaimed port and
/// MMIO reads see all-ones, as on a bus with nothing attached; unclaimed writes are dropped.
pub(super) fn handle_exit(
    index: u8,
    exit: VcpuExit<'_>,
    buses: &IoBuses,
    observer: &mut dyn ExitObserver,
) -> Next {
    let vcpu = index;
    let target = |answered: Option<DeviceId>| answered.map_or(Target::Unknown, Target::Device);
    let (kind, next) = match exit {
        VcpuExit::IoIn(port, data) => {
            let answered = buses.pio.read(u64::from(port), data);
            if answered.is_none() {
                tracing::trace!("vCPU {index}: unclaimed PIO read of port {port:#x}");
                data.fill(0xff);
            }
            (ExitKind::Io(Access::Read, target(answered)), Next::Continue)
        }
        VcpuExit::IoOut(port, data) => {
            let answered = buses.pio.write(u64::from(port), data);
            if answered.is_none() {
                tracing::trace!("vCPU {index}: unclaimed PIO write of port {port:#x}");
            }
            (
                ExitKind::Io(Access::Write, target(answered)),
                Next::Continue,
            )
        }
        VcpuExit::MmioRead(addr, data) => {
            let answered = buses.mmio.read(addr, data);
            if answered.is_none() {
                tracing::trace!("vCPU {index}: unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
            (
                ExitKind::Mmio(Access::Read, target(answered)),
                Next::Continue,
            )
        }
        VcpuExit::MmioWrite(addr, data) => {
            let answered = buses.mmio.write(addr, data);
            if answered.is_none() {
                tracing::trace!("vCPU {index}: unclaimed MMIO write at {addr:#x}");
            }
            (
                ExitKind::Mmio(Access::Write, target(answered)),
                Next::Continue,
            )
        }
        VcpuExit::Intr => (ExitKind::Other, Next::Continue),
        VcpuExit::Hlt => (ExitKind::Hlt, Next::End(ExitReason::GuestHalted { vcpu })),
        VcpuExit::Shutdown => (
            ExitKind::Shutdown,
            Next::End(ExitReason::TripleFault { vcpu, regs: None }),
        ),
        VcpuExit::SystemEvent(kind, _)
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
        {
            (
                ExitKind::SystemEvent,
                Next::End(ExitReason::GuestSystemEvent { vcpu, kind }),
            )
        }
        VcpuExit::FailEntry(reason, cpu) => (
            ExitKind::FailEntry,
            Next::End(ExitReason::GuestCrashed {
                vcpu,
                detail: format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
                ),
            }),
        ),
        VcpuExit::InternalError => (
            ExitKind::InternalError,
            Next::End(ExitReason::GuestCrashed {
                vcpu,
                detail: "KVM internal error (the guest ran an instruction KVM cannot emulate)"
                    .to_string(),
            }),
        ),
        other => (
            ExitKind::InternalError,
            Next::End(ExitReason::GuestCrashed {
                vcpu,
                detail: format!("unexpected KVM exit {other:?}"),
            }),
        ),
    };
    observer.observe(kind);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A port device that counts writes, to see exits reach the bus.
    struct Count(Arc<Mutex<Vec<u8>>>);
    impl devices::BusDevice for Count {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    /// Keeps every exit it is told of.
    #[derive(Default)]
    struct Seen(Vec<ExitKind>);
    impl ExitObserver for Seen {
        fn observe(&mut self, exit: ExitKind) {
            self.0.push(exit);
        }
    }

    #[test]
    fn exits_reach_the_device_the_bus_resolves_and_the_observer_hears_who_answered() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let port = DeviceId::new(3).unwrap();
        let window = DeviceId::new(7).unwrap();
        let mut buses = IoBuses::default();
        buses
            .pio
            .insert(Arc::new(Mutex::new(Count(seen.clone()))), port, 0x80, 1)
            .unwrap();
        buses
            .mmio
            .insert(
                Arc::new(Mutex::new(Count(seen.clone()))),
                window,
                0xd000_0000,
                0x1000,
            )
            .unwrap();

        let mut o = Seen::default();
        let mut data = [0u8; 2];
        let next = handle_exit(0, VcpuExit::IoIn(0x81, &mut data), &buses, &mut o);
        assert_eq!(next, Next::Continue);
        assert_eq!(data, [0xff, 0xff]);
        handle_exit(0, VcpuExit::IoIn(0x80, &mut data), &buses, &mut o);
        assert_eq!(data, [0x42, 0x42]);
        handle_exit(0, VcpuExit::IoOut(0x80, &[7]), &buses, &mut o);
        assert_eq!(*seen.lock().unwrap(), vec![7]);
        let mut mmio = [0u8; 4];
        handle_exit(
            0,
            VcpuExit::MmioRead(0xd000_1000, &mut mmio),
            &buses,
            &mut o,
        );
        assert_eq!(mmio, [0xff; 4]);
        handle_exit(0, VcpuExit::MmioWrite(0xd000_0ffc, &[1]), &buses, &mut o);
        assert_eq!(
            o.0,
            [
                ExitKind::Io(Access::Read, Target::Unknown),
                ExitKind::Io(Access::Read, Target::Device(port)),
                ExitKind::Io(Access::Write, Target::Device(port)),
                ExitKind::Mmio(Access::Read, Target::Unknown),
                ExitKind::Mmio(Access::Write, Target::Device(window)),
            ]
        );
    }

    #[test]
    fn fatal_exits_end_the_vm_with_their_reason() {
        let buses = IoBuses::default();
        let mut o = Seen::default();
        assert_eq!(
            handle_exit(2, VcpuExit::Shutdown, &buses, &mut o),
            Next::End(ExitReason::TripleFault {
                vcpu: 2,
                regs: None
            })
        );
        assert!(matches!(
            handle_exit(1, VcpuExit::InternalError, &buses, &mut o),
            Next::End(ExitReason::GuestCrashed { vcpu: 1, .. })
        ));
        assert_eq!(
            handle_exit(0, VcpuExit::Hlt, &buses, &mut o),
            Next::End(ExitReason::GuestHalted { vcpu: 0 })
        );
        assert_eq!(
            o.0,
            [ExitKind::Shutdown, ExitKind::InternalError, ExitKind::Hlt]
        );
    }
}
