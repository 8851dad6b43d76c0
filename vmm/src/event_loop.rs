//! What every part of the VMM thread's event loop shares: the subscriber type the loop serves,
//! and the subscriber that only wakes it. A leaf: it knows nothing of what subscribes.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Every fd the VMM thread serves is a subscriber of one event manager.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Drains an eventfd whose only job is to wake the loop; the loop then looks at the queue or
/// signal behind it.
pub struct Wakeup(pub EventFd);

impl MutEventSubscriber for Wakeup {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch wakeup eventfd {}: {e}", self.0.as_raw_fd());
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}
