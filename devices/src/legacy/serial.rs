//! The 16550 UART at COM1, the guest's console.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::{Serial, SerialEvents};
use vmm_sys_util::eventfd::EventFd;

use super::IrqTrigger;
use crate::bus::BusDevice;

/// Errors of the serial device's host side.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The guest's receive FIFO is full; the host keeps the input for later.
    #[error("the serial receive FIFO is full")]
    FifoFull,
    /// The receive interrupt could not be raised.
    #[error("cannot raise the serial interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// What the UART has done, for the VMM's metrics.
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Bytes the guest wrote that reached the host writer.
    pub bytes_out: AtomicU64,
    /// Bytes the guest wrote that the host writer refused (lost).
    pub bytes_lost: AtomicU64,
    /// Reads of the receive buffer by the guest.
    pub reads: AtomicU64,
}

/// The UART's event hooks: counts its traffic and tells the VMM, through an eventfd, that the
/// guest emptied the receive FIFO, so host input that did not fit earlier can now be delivered.
pub struct SerialHooks {
    pub input_drained: EventFd,
    pub counters: Arc<SerialCounters>,
}

impl SerialEvents for SerialHooks {
    fn buffer_read(&self) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
    }
    fn out_byte(&self) {
        self.counters.bytes_out.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.counters.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.input_drained.write(1) {
            tracing::warn!("serial: cannot signal an empty receive FIFO: {e}");
        }
    }
}

/// A 16550 whose output goes to a host writer (stdout or a file) and whose input the VMM feeds.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, SerialHooks, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART that raises its interrupt through `irq`, writes what the guest sends to `out`, and
    /// reports to `hooks`.
    pub fn new(irq: IrqTrigger, hooks: SerialHooks, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(irq, hooks, out),
        }
    }

    /// Free room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fitted in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        self.uart.enqueue_raw_bytes(input).map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
            vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
            vm_superio::serial::Error::IOError(e) => SerialError::Interrupt(e),
        })
    }
}

/// The UART's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState(#[serde(with = "SerialStateDef")] pub vm_superio::serial::SerialState);

/// `vm_superio::serial::SerialState` for serde's remote derive (vm-superio has no serde).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "vm_superio::serial::SerialState")]
struct SerialStateDef {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl crate::persist::Persist for SerialDevice {
    type State = SerialDeviceState;

    fn save(&mut self) -> SerialDeviceState {
        SerialDeviceState(self.uart.state())
    }

    fn restore(&mut self, s: SerialDeviceState) -> Result<(), crate::persist::PersistError> {
        use crate::persist::PersistError;
        let state = s.0;
        let fd = |e: std::io::Error| PersistError::Restore(format!("serial: {e}"));
        let irq = IrqTrigger(self.uart.interrupt_evt().0.try_clone().map_err(fd)?);
        let events = self.uart.events();
        let hooks = SerialHooks {
            input_drained: events.input_drained.try_clone().map_err(fd)?,
            counters: events.counters.clone(),
        };
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(std::io::sink()));
        self.uart = Serial::from_state(&state, irq, hooks, out).map_err(|e| {
            PersistError::Mismatch(format!("serial: {e:?} (receive FIFO too long)"))
        })?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // A host writer that fails (a closed pipe, a full disk) loses console bytes but must
            // not stop the guest.
            if let Err(e) = self.uart.write(offset, value) {
                tracing::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A writer the test can inspect after handing it to the device.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_writer_and_input_raises_the_irq() {
        let out = SharedBuf::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(EFD_NONBLOCK).unwrap();
        let counters = Arc::new(SerialCounters::default());
        let mut dev = SerialDevice::new(
            IrqTrigger(irq.try_clone().unwrap()),
            SerialHooks {
                input_drained: drained.try_clone().unwrap(),
                counters: counters.clone(),
            },
            Box::new(out.clone()),
        );
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert_eq!(counters.bytes_out.load(Ordering::Relaxed), 3);

        // Enable the received-data interrupt (IER bit 0), then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"x").unwrap(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "LSR reports data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr, *b"x");
        assert_eq!(
            drained.read().unwrap(),
            1,
            "reading the last byte signals an empty FIFO"
        );

        let capacity = dev.input_capacity();
        assert_eq!(
            dev.enqueue_input(&vec![b'y'; capacity + 10]).unwrap(),
            capacity
        );
        assert!(matches!(
            dev.enqueue_input(b"z"),
            Err(SerialError::FifoFull)
        ));
    }
}
