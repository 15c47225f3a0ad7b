//! virtio devices and their MMIO transport (virtio 1.x, virtio-mmio version 2).
//!
//! A device is a state machine over guest memory: the transport (`mmio.rs`) feeds it the
//! driver's register writes and, once the driver is ready, the queues; the event loop calls
//! [`VirtioDevice::process_queue`] when the guest notifies a queue (an ioeventfd, so the vCPU
//! never leaves KVM for it); the device signals completions through [`Interrupt`] (an irqfd).

pub mod block;
pub mod mmio;
pub mod notify;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Bits of the InterruptStatus register.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// A device's interrupt line: the status bits the driver reads and acknowledges, and the eventfd
/// that KVM turns into an interrupt.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Self::with_status(evt, 0)
    }

    /// An interrupt line whose status bits the driver has not acknowledged yet (a restore).
    pub fn with_status(evt: EventFd, status: u32) -> Self {
        Self { status: AtomicU32::new(status), evt }
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Raises the line again if the driver has status bits left to acknowledge. After a
    /// restore, an interrupt signalled before the snapshot may never have reached the guest
    /// (KVM injects IOAPIC interrupts from an irqfd in a worker, which the snapshot can
    /// outrun), nor one signalled while the restored devices were wired before the vCPUs
    /// existed; the guest would wait for it forever.
    pub fn reassert(&self) {
        if self.status() != 0 {
            self.signal(0);
        }
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("a queue is not ready or lies outside guest memory")]
    QueueNotReady,
    #[error("the driver acknowledged {0} queues, the device needs {1}")]
    QueueCount(usize, usize),
}

/// What the transport needs of a device.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block, 19 for vsock, ...).
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    /// The features the driver accepted, a subset of [`VirtioDevice::avail_features`].
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: from now on the device serves `queues`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// The guest notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// The driver reset the device: forget the queues and the acknowledged features.
    fn reset(&mut self);
    /// The queues the device serves, with its positions in them (empty before activation).
    fn queue_states(&self) -> Vec<QueueState>;
    /// Makes what the device wrote durable before a snapshot.
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
