//! The i8042 PS/2 controller with a keyboard behind it: enough of the protocol for Linux's i8042
//! and atkbd drivers to find a keyboard, the CPU-reset command (how `reboot=k` ends the VM), and
//! key injection for Ctrl-Alt-Del (Firecracker's SendCtrlAltDel).

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::IrqTrigger;
use crate::bus::BusDevice;

/// Port offsets from 0x60.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYS_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;

/// Control byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYS_FLAG: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;

/// Controller commands (port 0x64).
const CMD_READ_CTRL: u8 = 0x20;
const CMD_WRITE_CTRL: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard commands (port 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const CTRL_SELF_TEST_OK: u8 = 0x55;

/// Scancode set 2 make codes of Ctrl, Alt and Del, the sequence Firecracker sends.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Bytes the controller holds for the guest; a real one holds one, we let a key sequence queue.
const OUT_CAPACITY: usize = 16;

/// Errors of injecting keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the i8042 output buffer is full: the guest is not reading its keyboard")]
    BufferFull,
}

/// i8042 at ports 0x60..=0x64: `reset` is told of the guest's CPU-reset command; keyboard
/// interrupts go out through `irq` (IRQ 1).
pub struct I8042<T: Trigger> {
    reset: T,
    irq: IrqTrigger,
    status: u8,
    control: u8,
    out: VecDeque<u8>,
    /// A controller command waiting for its data byte.
    pending_command: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    pending_kbd: Option<u8>,
}

impl<T: Trigger> I8042<T> {
    pub fn new(reset: T, irq: IrqTrigger) -> Self {
        Self {
            reset,
            irq,
            status: SB_SYS_FLAG,
            control: CB_KBD_INT | CB_SYS_FLAG,
            out: VecDeque::with_capacity(OUT_CAPACITY),
            pending_command: None,
            pending_kbd: None,
        }
    }

    /// Queues bytes for the guest, all or none, and raises IRQ 1 if it is enabled.
    fn push(&mut self, bytes: &[u8]) -> Result<(), I8042Error> {
        if self.out.len() + bytes.len() > OUT_CAPACITY {
            return Err(I8042Error::BufferFull);
        }
        self.out.extend(bytes);
        self.status |= SB_OUT_FULL;
        self.notify();
        Ok(())
    }

    /// A controller reply: losing one when the guest floods us with commands is harmless.
    fn reply(&mut self, bytes: &[u8]) {
        if self.push(bytes).is_err() {
            tracing::debug!("i8042: reply dropped, output buffer full");
        }
    }

    fn notify(&self) {
        if self.control & CB_KBD_INT != 0 && !self.out.is_empty() {
            if let Err(e) = self.irq.0.write(1) {
                tracing::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Injects Ctrl-Alt-Del.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        self.push(&CTRL_ALT_DEL)
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTRL => self.reply(&[self.control]),
            CMD_WRITE_CTRL | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_KBD_OUTPUT => {
                self.pending_command = Some(cmd)
            }
            CMD_SELF_TEST => self.reply(&[CTRL_SELF_TEST_OK]),
            CMD_KBD_TEST => self.reply(&[0x00]),
            // No auxiliary (mouse) port: its interface test reports a stuck clock line.
            CMD_AUX_TEST => self.reply(&[0x01]),
            CMD_KBD_DISABLE => self.control |= CB_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CB_KBD_DISABLED,
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.trigger() {
                    tracing::error!("i8042: cannot signal the guest's reset request: {e:?}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTRL) => {
                self.control = value;
                self.notify();
                return;
            }
            Some(CMD_WRITE_KBD_OUTPUT) => return self.reply(&[value]),
            Some(_) => return, // the output port: the A20 gate and reset lines need no emulation
            None => {}
        }
        // A byte for the keyboard itself.
        if self.pending_kbd.take().is_some() {
            return self.reply(&[KBD_ACK]);
        }
        match value {
            KBD_RESET => self.reply(&[KBD_ACK, KBD_SELF_TEST_OK]),
            KBD_IDENTIFY => self.reply(&[KBD_ACK, 0xab, 0x83]),
            KBD_ECHO => self.reply(&[KBD_ECHO]),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_TYPEMATIC => {
                self.pending_kbd = Some(value);
                self.reply(&[KBD_ACK]);
            }
            _ => self.reply(&[KBD_ACK]),
        }
    }
}

/// The controller's registers and the bytes waiting for the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub out: Vec<u8>,
    pub pending_command: Option<u8>,
    pub pending_kbd: Option<u8>,
}

impl<T: Trigger> crate::persist::Persist for I8042<T> {
    type State = I8042State;

    fn save(&mut self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            out: self.out.iter().copied().collect(),
            pending_command: self.pending_command,
            pending_kbd: self.pending_kbd,
        }
    }

    fn restore(&mut self, s: I8042State) -> Result<(), crate::persist::PersistError> {
        if s.out.len() > OUT_CAPACITY {
            return Err(crate::persist::PersistError::Mismatch(format!(
                "i8042: {} bytes waiting, it holds {OUT_CAPACITY}",
                s.out.len()
            )));
        }
        self.status = s.status;
        self.control = s.control;
        self.out = s.out.into_iter().collect();
        self.pending_command = s.pending_command;
        self.pending_kbd = s.pending_kbd;
        Ok(())
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            DATA => {
                let byte = self.out.pop_front().unwrap_or(0);
                if self.out.is_empty() {
                    self.status &= !SB_OUT_FULL;
                } else {
                    self.notify();
                }
                byte
            }
            COMMAND => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA => self.data(value),
            COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Counter(Arc<AtomicU32>);
    impl Trigger for Counter {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn device() -> (I8042<Counter>, Arc<AtomicU32>, EventFd) {
        let resets = Arc::new(AtomicU32::new(0));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            Counter(resets.clone()),
            IrqTrigger(irq.try_clone().unwrap()),
        );
        (dev, resets, irq)
    }

    fn read(dev: &mut I8042<Counter>, offset: u64) -> u8 {
        let mut b = [0xffu8];
        dev.read(offset, &mut b);
        b[0]
    }

    fn drain(dev: &mut I8042<Counter>) -> Vec<u8> {
        let mut out = Vec::new();
        while read(dev, COMMAND) & SB_OUT_FULL != 0 {
            out.push(read(dev, DATA));
        }
        out
    }

    #[test]
    fn reset_command_fires_once_and_data_port_bytes_do_not() {
        let (mut dev, resets, _) = device();
        dev.write(DATA, &[CMD_RESET_CPU]); // to the keyboard: just acknowledged
        dev.write(COMMAND, &[0xd0]);
        assert_eq!(resets.load(Ordering::Relaxed), 0);
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn linux_probe_sequence_gets_the_expected_replies() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut dev), vec![CTRL_SELF_TEST_OK]);
        dev.write(COMMAND, &[CMD_READ_CTRL]);
        let ctrl = drain(&mut dev)[0];
        dev.write(COMMAND, &[CMD_WRITE_CTRL]);
        dev.write(DATA, &[ctrl | 0x40]);
        dev.write(COMMAND, &[CMD_READ_CTRL]);
        assert_eq!(drain(&mut dev), vec![ctrl | 0x40]);
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_SELF_TEST_OK]);
        dev.write(DATA, &[KBD_SET_LEDS]);
        dev.write(DATA, &[0x07]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_ACK]);
        dev.write(DATA, &[KBD_IDENTIFY]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, 0xab, 0x83]);
        dev.write(COMMAND, &[CMD_WRITE_KBD_OUTPUT]);
        dev.write(DATA, &[0x42]);
        assert_eq!(drain(&mut dev), vec![0x42]);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);
    }

    #[test]
    fn ctrl_alt_del_is_queued_whole_with_an_interrupt() {
        let (mut dev, _, irq) = device();
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL.to_vec());
        for _ in 0..OUT_CAPACITY / CTRL_ALT_DEL.len() {
            dev.send_ctrl_alt_del().unwrap();
        }
        assert_eq!(dev.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
        assert_eq!(
            drain(&mut dev).len(),
            OUT_CAPACITY,
            "a refused sequence adds nothing"
        );
    }

    #[test]
    fn no_interrupt_while_keyboard_interrupts_are_off() {
        let (mut dev, _, irq) = device();
        dev.write(COMMAND, &[CMD_WRITE_CTRL]);
        dev.write(DATA, &[CB_SYS_FLAG]);
        let _ = irq.read();
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err(), "eventfd stays empty (EAGAIN)");
    }
}
