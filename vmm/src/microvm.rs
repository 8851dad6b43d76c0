//! A running microVM: its vCPU threads and the VMM thread's event loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use crate::console::RawTerminal;
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle, VcpuResponse};
use crate::vstate::vm::Vm;

/// Every fd the VMM thread serves is a subscriber of one event manager.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a vCPU gets to acknowledge a pause or resume.
const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Drains the exit eventfd; the loop reads the reason from the signal itself.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event_fd(), EventSet::IN)) {
            // Without it the loop would never wake for the VM's end.
            self.0.request(ExitReason::VmmError(format!(
                "cannot watch the exit event: {e}"
            )));
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event_fd().read();
    }
}

/// A booted microVM.
pub struct MicroVm {
    // Field order is drop order: vCPU threads are joined in `run` before memory and the VM go.
    vcpus: Vec<VcpuHandle>,
    exit: Arc<ExitSignal>,
    event_manager: EventManager<Subscriber>,
    _terminal: Option<RawTerminal>,
    _vm: Vm,
    _mem: GuestMemoryMmap,
}

impl MicroVm {
    pub(crate) fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        vcpus: Vec<VcpuHandle>,
        exit: Arc<ExitSignal>,
        mut event_manager: EventManager<Subscriber>,
        terminal: Option<RawTerminal>,
    ) -> Self {
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
        Self {
            vcpus,
            exit,
            event_manager,
            _terminal: terminal,
            _vm: vm,
            _mem: mem,
        }
    }

    /// Serves events until the VM ends, then stops every vCPU and returns why it ended.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = self.event_manager.run() {
                break ExitReason::VmmError(format!("event loop failed: {e}"));
            }
        };
        for vcpu in self.vcpus.drain(..) {
            vcpu.finish();
        }
        reason
    }

    /// Stops every vCPU at its next exit; they keep their state.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.for_each_vcpu(VcpuEvent::Pause, VcpuResponse::Paused)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.for_each_vcpu(VcpuEvent::Resume, VcpuResponse::Resumed)
    }

    fn for_each_vcpu(&self, event: VcpuEvent, expect: VcpuResponse) -> Result<(), VcpuError> {
        // Send to all first so they stop together, then collect the answers.
        for vcpu in &self.vcpus {
            vcpu.send(event)?;
        }
        for vcpu in &self.vcpus {
            vcpu.await_response(expect, VCPU_RESPONSE_TIMEOUT, event)?;
        }
        Ok(())
    }

    /// The VM's end signal, for code that wants to end it from outside (tests, later the API).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }
}
