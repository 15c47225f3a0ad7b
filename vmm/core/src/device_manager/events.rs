//! The devices' event handlers: in the event loop while the VM runs, taken out of it while
//! the VM is paused, so that no device touches guest memory or its queues.

use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};

pub type Subscriber = Box<dyn MutEventSubscriber + Send>;
/// The VMM's event loop.
pub type EventLoop = EventManager<Subscriber>;

#[derive(Default)]
pub struct DeviceEvents {
    ids: Vec<SubscriberId>,
    parked: Vec<Subscriber>,
}

impl DeviceEvents {
    /// A handler, out of the event loop until [`DeviceEvents::resume`].
    pub fn add(&mut self, subscriber: Subscriber) {
        self.parked.push(subscriber);
    }

    pub fn resume(&mut self, events: &mut EventLoop) {
        for subscriber in self.parked.drain(..) {
            self.ids.push(events.add_subscriber(subscriber));
        }
    }

    pub fn pause(&mut self, events: &mut EventLoop) {
        for id in self.ids.drain(..) {
            match events.remove_subscriber(id) {
                Ok(subscriber) => self.parked.push(subscriber),
                Err(e) => tracing::error!("cannot quiesce a device: {e:?}"),
            }
        }
    }
}
