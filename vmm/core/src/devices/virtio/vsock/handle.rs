//! Sharing the device between the MMIO transport and the event loop.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice};
use crate::config::VsockConfig;
use crate::devices::bus::lock;
use super::*;

/// The device shared between the MMIO transport (which owns a `Box<dyn VirtioDevice>`) and the
/// event loop's [`VsockHostEvents`].
#[derive(Clone)]
pub struct VsockHandle(pub Arc<Mutex<Vsock>>);

impl VsockHandle {
    pub fn new(vsock: Vsock) -> Self {
        Self(Arc::new(Mutex::new(vsock)))
    }

    /// The device `config` asks for, listening on its socket.
    pub fn open(config: &VsockConfig) -> Result<Self, VsockError> {
        Ok(Self::new(Vsock::new(config.cid as u64, &config.uds)?))
    }

    /// The event-loop subscriber for this device's host sockets.
    pub fn host_events(&self) -> VsockHostEvents {
        let fd = lock(&self.0).host_event_fd();
        VsockHostEvents { vsock: self.0.clone(), fd }
    }
}

impl VirtioDevice for VsockHandle {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn avail_features(&self) -> u64 {
        lock(&self.0).avail_features()
    }
    fn set_acked_features(&mut self, features: u64) {
        lock(&self.0).set_acked_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.0).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).write_config(offset, data)
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), ActivateError> {
        lock(&self.0).activate(mem, queues, interrupt)
    }
    fn process_queue(&mut self, index: usize) {
        lock(&self.0).process_queue(index)
    }
    fn reset(&mut self) {
        lock(&self.0).reset()
    }
    fn queue_states(&self) -> Vec<QueueState> {
        lock(&self.0).queue_states()
    }
}

/// Event-loop subscriber: watches the device's epoll fd and lets it serve its host sockets.
/// Lock order: the transport's lock, then the device's (this subscriber takes only the latter).
pub struct VsockHostEvents {
    vsock: Arc<Mutex<Vsock>>,
    fd: RawFd,
}

impl MutEventSubscriber for VsockHostEvents {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::error!("cannot watch the vsock device's sockets: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        lock(&self.vsock).process_host_events();
    }
}
