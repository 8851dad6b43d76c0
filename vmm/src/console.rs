//! Host stdin to the guest's serial console, when stdin is a terminal.
//!
//! The terminal is put in raw mode (no line editing, no echo, no signal keys: Ctrl-C, Ctrl-Z
//! and Ctrl-\\ reach the guest as bytes, as in Firecracker) and put back exactly as it was when
//! the VMM ends: by [`RawTerminal`]'s drop on the VMM thread for every end the VMM loop sees
//! (guest reset, a termination signal, a VMM error, the predictor's kill), and from the panic
//! hook that `crate::cleanup::Guard` sets, on whichever thread panics. Both restore with one
//! `ioctl(0, TCSETS)` of the mode saved before any seccomp filter was installed, the one
//! terminal request every thread's filter allows (on fd 0 only). Input the 64-byte UART FIFO
//! cannot take yet is held back and stdin is not polled until the guest drains the FIFO, so
//! pasted text is delivered whole.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::{SerialDevice, SerialError};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const STDIN_FD: i32 = libc::STDIN_FILENO;

/// The terminal's mode as the VMM found it, while the VMM holds it in raw mode.
static SAVED_MODE: Mutex<Option<libc::termios>> = Mutex::new(None);

/// The mode of the terminal on stdin. The kernel's `TCGETS` fills the first 36 bytes of
/// glibc's larger `termios` (the same fields in the same places); [`set_mode`] hands the same
/// bytes back. The ioctls are made directly, not through `tcgetattr`/`tcsetattr`, so that the
/// request the seccomp filters allow does not depend on how a libc version implements them.
fn get_mode() -> std::io::Result<libc::termios> {
    // SAFETY: termios is plain integers, for which all zeroes is a valid value.
    let mut mode: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS writes at most size_of::<termios>() bytes into `mode`, which lives across
    // the call.
    if unsafe { libc::ioctl(STDIN_FD, libc::TCGETS, &mut mode) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mode)
}

/// Sets the mode of the terminal on stdin at once (`TCSETS`, as `tcsetattr(TCSANOW)`).
fn set_mode(mode: &libc::termios) -> std::io::Result<()> {
    // SAFETY: TCSETS only reads the termios behind the pointer, alive for the call.
    if unsafe { libc::ioctl(STDIN_FD, libc::TCSETS, mode) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads what stdin has, unbuffered: std's `Stdin` would read up to 8 KiB ahead into a buffer
/// epoll cannot see, and a paste longer than what the FIFO takes would then wait there forever.
fn read_fd0(buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: read(2) into a live buffer of its length.
    let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Puts the terminal back as the VMM found it, once; nothing if the VMM never changed it.
/// Safe from any thread under its seccomp filter, including a panicking one.
pub fn restore_terminal() {
    let saved = SAVED_MODE.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mode) = saved {
        if let Err(e) = set_mode(&mode) {
            // A hung-up terminal (SIGHUP) has no mode left to restore.
            tracing::warn!("cannot restore the terminal: {e}");
        }
    }
}

/// Holds the terminal in raw mode; dropping it restores the mode found.
pub struct RawTerminal;

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Option<Self> {
        // isatty(3), not `std::io::stdin().is_terminal()`: touching std's `Stdin` allocates
        // its 8 KiB read-ahead buffer for the life of the process, which `read_fd0` never uses.
        // SAFETY: isatty only queries the descriptor.
        if unsafe { libc::isatty(STDIN_FD) } != 1 {
            return None;
        }
        let found = match get_mode() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("cannot read the terminal's mode, guest input disabled: {e}");
                return None;
            }
        };
        let mut raw = found;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        // Saved first: a panic from here on restores it (the hook `cleanup::Guard` sets).
        *SAVED_MODE.lock().unwrap_or_else(|p| p.into_inner()) = Some(found);
        if let Err(e) = set_mode(&raw) {
            SAVED_MODE.lock().unwrap_or_else(|p| p.into_inner()).take();
            tracing::warn!("cannot put the terminal in raw mode, guest input disabled: {e}");
            return None;
        }
        Some(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Forwards stdin to the serial device, with flow control.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    pending: Vec<u8>,
    stdin_open: bool,
}

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
        match read_fd0(&mut buf) {
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
