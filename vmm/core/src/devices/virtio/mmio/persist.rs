//! The virtio-mmio transport's state for snapshots: the register file, the interrupt status and
//! the queues with the device's positions in them. A restored transport whose driver had set
//! DRIVER_OK activates its device again on the same queues, so it resumes where it stopped.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, S_ACK, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::persist::Persist;

/// virtio-queue's `QueueState`, in a form serde can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error("the snapshot has a device of type {saved} where this VM has one of type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the device has {here} queues, the snapshot {saved}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("device status {0:#x} is not one the transport can reach")]
    Status(u32),
    #[error("the driver's features {features:#x} include some the device does not offer ({offered:#x})")]
    Features { features: u64, offered: u64 },
    #[error("cannot activate the device again: {0}")]
    Activate(#[from] crate::devices::virtio::ActivateError),
}

/// What a transport is restored with: its device (itself restored) and the VM's side of it.
pub struct TransportArgs<D> {
    pub device: D,
    pub mem: GuestMemoryMmap,
    /// The eventfd KVM turns into the device's interrupt (an irqfd).
    pub irq: EventFd,
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    type ConstructorArgs = TransportArgs<D>;
    type Error = MmioRestoreError;

    /// The transport's state; the device must not be serving a queue meanwhile (the caller
    /// holds the transport's lock, which queue processing also takes).
    fn save(&self) -> MmioState {
        let live = self.device.queue_states();
        // Once active, the device's copies of the queues hold the positions that matter.
        let queues = if self.is_active() && live.len() == self.queues.len() {
            live.into_iter().map(QueueSnapshot::from).collect()
        } else {
            self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect()
        };
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// A transport for `args.device` in the state `state`; an active device is activated again.
    fn restore(args: TransportArgs<D>, state: &MmioState) -> Result<Self, MmioRestoreError> {
        let TransportArgs { device, mem, irq } = args;
        let here = device.device_type();
        if state.device_type != here {
            return Err(MmioRestoreError::DeviceType { saved: state.device_type, here });
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioRestoreError::QueueCount { saved: state.queues.len(), here: max_sizes.len() });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            let bad = |reason: String| MmioRestoreError::Queue { index, reason };
            if q.max_size != max {
                return Err(bad(format!("its maximum size is {}, the device's {max}", q.max_size)));
            }
            queues.push(Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?);
        }
        check_status(state.status)?;
        let offered = device.avail_features();
        let features_ok = state.status & S_FEATURES_OK != 0;
        if features_ok && state.driver_features & !offered != 0 {
            return Err(MmioRestoreError::Features { features: state.driver_features, offered });
        }
        let mut transport = Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::with_status(irq, state.interrupt_status)),
            queues,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            config_generation: state.config_generation,
        };
        if features_ok {
            transport.device.set_acked_features(state.driver_features);
        }
        if transport.is_active() {
            transport.reactivate()?;
        }
        Ok(transport)
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    fn reactivate(&mut self) -> Result<(), MmioRestoreError> {
        for (index, q) in self.queues.iter().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                return Err(MmioRestoreError::Queue { index, reason: "not ready or outside guest memory".into() });
            }
        }
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).expect("a queue that passed is_valid rebuilds"))
            .collect();
        self.device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .map_err(MmioRestoreError::from)
    }
}

/// The statuses the transport's state machine can be in: a prefix of the handshake, maybe with
/// NEEDS_RESET once DRIVER_OK was asked for, maybe with FAILED.
fn check_status(status: u32) -> Result<(), MmioRestoreError> {
    let steps = [0, S_ACK, S_ACK | S_DRIVER, S_ACK | S_DRIVER | S_FEATURES_OK, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK];
    let failed = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
    let base = status & !(failed | S_NEEDS_RESET);
    let needs_reset_ok = status & S_NEEDS_RESET == 0 || base & S_DRIVER_OK != 0;
    if steps.contains(&base) && needs_reset_ok {
        Ok(())
    } else {
        Err(MmioRestoreError::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{negotiate, rd, setup_queue, transport, wr, FakeDevice, Probe};
    use super::*;
    use crate::devices::virtio::{INT_VRING, VIRTIO_F_VERSION_1};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn restore(state: &MmioState) -> Result<(MmioTransport<FakeDevice>, Arc<Mutex<Probe>>), MmioRestoreError> {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::restore(TransportArgs { device: FakeDevice(probe.clone()), mem, irq }, state)?;
        Ok((t, probe))
    }

    fn active_transport() -> (MmioTransport<FakeDevice>, Arc<Mutex<Probe>>) {
        let (mut t, probe, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        wr(&mut t, 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        (t, probe)
    }

    #[test]
    fn an_active_transport_restores_active_with_the_device_positions() {
        let (t, probe) = active_transport();
        // The device has served two requests on queue 1 since activation.
        probe.lock().unwrap().activated.as_mut().unwrap()[1].set_next_avail(2);
        t.interrupt.signal(INT_VRING);
        let state = t.save();
        assert_eq!(state.queues[1].next_avail, 2);
        assert_eq!(state.interrupt_status, INT_VRING);

        let (mut restored, probe) = restore(&state).unwrap();
        assert!(restored.is_active());
        assert_eq!(rd(&mut restored, 0x70), state.status);
        assert_eq!(rd(&mut restored, 0x60), INT_VRING);
        let p = probe.lock().unwrap();
        assert_eq!(p.acked, VIRTIO_F_VERSION_1 | 0b100);
        let queues = p.activated.as_ref().expect("the device is active again");
        assert_eq!(queues[1].next_avail(), 2);
        assert_eq!(queues[1].desc_table(), 0x2000);
        drop(p);
        assert_eq!(restored.save(), state, "a restored transport saves the same state");
    }

    #[test]
    fn a_transport_in_setup_restores_without_activating() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1000);
        let state = t.save();
        let (mut restored, probe) = restore(&state).unwrap();
        assert!(!restored.is_active());
        assert!(probe.lock().unwrap().activated.is_none());
        wr(&mut restored, 0x30, 0);
        assert_eq!(rd(&mut restored, 0x44), 1, "queue 0 is still ready");
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let (t, _) = active_transport();
        let good = t.save();

        let mut s = good.clone();
        s.device_type = 2;
        assert!(matches!(restore(&s), Err(MmioRestoreError::DeviceType { saved: 2, here: 42 })));
        let mut s = good.clone();
        s.queues.pop();
        assert!(matches!(restore(&s), Err(MmioRestoreError::QueueCount { saved: 1, here: 2 })));
        let mut s = good.clone();
        s.queues[0].size = 3;
        assert!(matches!(restore(&s), Err(MmioRestoreError::Queue { index: 0, .. })));
        let mut s = good.clone();
        s.queues[1].desc_table = 0x4000_0000;
        assert!(matches!(restore(&s), Err(MmioRestoreError::Queue { index: 1, .. })));
        let mut s = good.clone();
        s.status = S_ACK | S_DRIVER_OK;
        assert!(matches!(restore(&s), Err(MmioRestoreError::Status(_))));
        let mut s = good.clone();
        s.driver_features |= 0b10;
        assert!(matches!(restore(&s), Err(MmioRestoreError::Features { .. })));
    }
}
