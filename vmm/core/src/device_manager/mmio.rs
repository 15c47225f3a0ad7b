//! The MMIO slots of virtio devices: one 4 KiB window and one interrupt line each, in the
//! order the devices are attached, and the wiring of a device into its slot.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;

use super::DeviceError;
use crate::arch::x86_64::layout;
use crate::boot::cmdline::MmioDevice;
use crate::devices::bus::Bus;
use crate::devices::virtio::mmio::{MmioState, MmioTransport, TransportArgs, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::notify::QueueNotifier;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::persist::Persist;
use crate::vstate::vm::Vm;

/// Where the n-th virtio device lives and which interrupt line it raises.
pub fn virtio_slot(index: usize) -> MmioDevice {
    MmioDevice {
        base: layout::VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW,
        size: MMIO_WINDOW,
        irq: layout::VIRTIO_IRQ_FIRST + index as u32,
    }
}

/// Checks a device count against the interrupt lines ember has for virtio devices.
pub(super) fn check_device_count(devices: usize) -> Result<(), DeviceError> {
    let max_devices = (layout::VIRTIO_IRQ_LAST - layout::VIRTIO_IRQ_FIRST + 1) as usize;
    if devices > max_devices {
        return Err(DeviceError::TooMany(devices, max_devices));
    }
    Ok(())
}

/// Hands out the slots in order while the devices are attached.
pub(super) struct MmioSlots<'a> {
    pub vm: &'a Vm,
    pub mem: &'a GuestMemoryMmap,
    pub bus: Bus,
    pub next: usize,
}

impl MmioSlots<'_> {
    /// Wires `device` into the next slot: its interrupt through an irqfd, its queue
    /// notifications through ioeventfds, its registers on the MMIO bus. With `state`, the
    /// transport resumes from a snapshot instead of starting reset.
    pub fn attach<D: VirtioDevice + 'static>(
        &mut self,
        name: &'static str,
        device: D,
        state: Option<&MmioState>,
    ) -> Result<QueueNotifier<D>, DeviceError> {
        let slot = virtio_slot(self.next);
        self.next += 1;
        let irq = super::eventfd()?;
        self.vm.register_irqfd(&irq, slot.irq)?;
        let mut queue_evts = Vec::new();
        for queue in 0..device.queue_max_sizes().len() {
            let evt = super::eventfd()?;
            let addr = slot.base + QUEUE_NOTIFY;
            self.vm
                .fd
                .register_ioevent(&evt, &IoEventAddress::Mmio(addr), queue as u32)
                .map_err(|source| DeviceError::IoEvent { queue, addr, source })?;
            queue_evts.push(evt);
        }
        let mem = self.mem.clone();
        let transport = match state {
            None => MmioTransport::new(device, mem, Arc::new(Interrupt::new(irq))),
            Some(state) => MmioTransport::restore(TransportArgs { device, mem, irq }, state)
                .map_err(|source| DeviceError::VirtioState { name, base: slot.base, source })?,
        };
        let transport = Arc::new(Mutex::new(transport));
        self.bus.insert(name, slot.base, slot.size, transport.clone())?;
        Ok(QueueNotifier { transport, queue_evts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots() {
        assert_eq!(virtio_slot(0), MmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 });
        assert_eq!(virtio_slot(2).base, 0xd000_2000);
        assert_eq!(virtio_slot(18).irq, 23);
    }
}
