//! The i8042 keyboard controller, kept only for its CPU-reset command: it is how a Linux guest with
//! `reboot=k` (and the test guest) asks to end the VM.

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;

/// i8042 at ports 0x60..=0x64; `T` is told when the guest requests a CPU reset.
pub struct I8042<T: Trigger>(I8042Device<T>);

impl<T: Trigger> I8042<T> {
    /// A controller that fires `reset` on the guest's reset command.
    pub fn new(reset: T) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.0.write(offset as u8, value) {
                tracing::error!("i8042: cannot signal the guest's reset request: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    struct Counter(Arc<AtomicU32>);
    impl Trigger for Counter {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn reset_command_on_the_command_port_fires_once() {
        let fired = Arc::new(AtomicU32::new(0));
        let mut dev = I8042::new(Counter(fired.clone()));
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xd1]); // another command
        assert_eq!(fired.load(Ordering::Relaxed), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(fired.load(Ordering::Relaxed), 1);
        let mut status = [0xffu8; 1];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "an idle controller reports empty buffers");
    }
}
