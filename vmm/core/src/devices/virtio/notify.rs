//! Queue notifications: the guest's writes to QueueNotify land on ioeventfds inside KVM; the
//! event loop wakes up here and lets the device serve the queue, off the vCPU threads.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::devices::bus::lock;

pub struct QueueNotifier<D: VirtioDevice> {
    pub transport: Arc<Mutex<MmioTransport<D>>>,
    /// One eventfd per queue, in queue order.
    pub queue_evts: Vec<EventFd>,
}

impl<D: VirtioDevice> MutEventSubscriber for QueueNotifier<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!("cannot watch virtio queue {index}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.read();
        }
        let mut transport = lock(&self.transport);
        if transport.is_active() {
            transport.device_mut().process_queue(index);
        }
    }
}
