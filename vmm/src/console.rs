//! Host stdin to the guest's serial console, when stdin is a terminal.
//!
//! The terminal is put in raw mode so keystrokes (Ctrl-C included) reach the guest, and restored
//! when the VMM ends. Input the 64-byte UART FIFO cannot take yet is held back and stdin is not
//! polled until the guest drains the FIFO, so pasted text is delivered whole.

use std::io::{IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::{SerialDevice, SerialError};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

/// Restores the terminal's canonical mode when dropped.
pub struct RawTerminal;

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                tracing::warn!("cannot put the terminal in raw mode, guest input disabled: {e}");
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = std::io::stdin().lock().set_canon_mode() {
            tracing::warn!("cannot restore the terminal: {e}");
        }
    }
}

/// Forwards stdin to the serial device, with flow control.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    pending: Vec<u8>,
    stdin_open: bool,
}

const STDIN_FD: i32 = libc::STDIN_FILENO;

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, drained: EventFd) -> Self {
        Self {
            serial,
            drained,
            pending: Vec::new(),
            stdin_open: true,
        }
    }

    /// Moves held-back input into the FIFO; true when nothing is left.
    fn flush_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        match serial.enqueue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(SerialError::FifoFull) => {}
            Err(e) => tracing::warn!("serial input: {e}"),
        }
        self.pending.is_empty()
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) => {
                self.stdin_open = false;
                let _ = ops.remove(Events::empty_raw(STDIN_FD));
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.flush_pending() {
                    // Stop polling stdin until the guest makes room.
                    let _ = ops.remove(Events::empty_raw(STDIN_FD));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("stdin: {e}; guest input disabled");
                self.stdin_open = false;
                let _ = ops.remove(Events::empty_raw(STDIN_FD));
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (STDIN_FD, "stdin"),
            (self.drained.as_raw_fd(), "serial input"),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::warn!("cannot watch {what}: {e}; guest input disabled");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == STDIN_FD {
            self.read_stdin(ops);
        } else {
            let _ = self.drained.read();
            let was_blocked = !self.pending.is_empty();
            if was_blocked && self.flush_pending() && self.stdin_open {
                let _ = ops.add(Events::new_raw(STDIN_FD, EventSet::IN));
            }
        }
    }
}
