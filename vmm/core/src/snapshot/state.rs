//! What a snapshot's state file holds: the machine's shape, KVM's VM and vCPU state, and every
//! device's state. Guest memory lives in the memory file next to it.

use std::path::PathBuf;

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use crate::arch::x86_64::mptable;
use crate::builder::check_device_count;
use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::mmio_state::MmioState;
use crate::devices::virtio::vsock::VIRTIO_ID_VSOCK;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The UART's receive FIFO holds this many bytes (vm-superio's FIFO_SIZE).
const SERIAL_FIFO: usize = 64;

#[derive(Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Guest RAM in bytes: the memory file's exact size.
    pub mem_size: u64,
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// virtio-blk devices in slot order.
    pub drives: Vec<DriveSnapshot>,
    pub vsock: Option<VsockSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSnapshot {
    /// The API's drive_id, if the drive was configured through the API.
    pub id: Option<String>,
    /// The disk the guest had; a restore may put another one with the same size in its place.
    pub path: PathBuf,
    pub read_only: bool,
    pub root: bool,
    /// Bytes: the size the guest knows, which a disk put in its place must have.
    pub size: u64,
    pub transport: MmioState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSnapshot {
    pub cid: u32,
    pub uds: PathBuf,
    pub transport: MmioState,
}

impl SnapshotState {
    /// Checks the state's consistency, so that a bad file fails before anything is built.
    pub fn check(&self) -> Result<(), String> {
        if self.mem_size == 0 || self.mem_size % (2 << 20) != 0 {
            return Err(format!("guest memory of {} bytes is not a positive multiple of 2 MiB", self.mem_size));
        }
        let vcpus = u8::try_from(self.vcpus.len()).map_err(|_| format!("{} vCPUs", self.vcpus.len()))?;
        if vcpus == 0 {
            return Err("no vCPU".into());
        }
        mptable::build(vcpus).map_err(|e| e.to_string())?;
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            vcpu.check(index as u8)?;
        }
        let chips = [(&self.vm.pic_master, KVM_IRQCHIP_PIC_MASTER), (&self.vm.pic_slave, KVM_IRQCHIP_PIC_SLAVE), (&self.vm.ioapic, KVM_IRQCHIP_IOAPIC)];
        for (chip, id) in chips {
            if chip.chip_id != id {
                return Err(format!("irqchip {id} is saved as chip {}", chip.chip_id));
            }
        }
        if self.serial.in_buffer.len() > SERIAL_FIFO {
            return Err(format!("the serial port holds {} received bytes, its FIFO {SERIAL_FIFO}", self.serial.in_buffer.len()));
        }
        check_device_count(self.drives.len() + self.vsock.is_some() as usize).map_err(|e| e.to_string())?;
        if self.drives.iter().filter(|d| d.root).count() > 1 {
            return Err("several drives are the root filesystem".into());
        }
        for (index, d) in self.drives.iter().enumerate() {
            if d.transport.device_type != VIRTIO_ID_BLOCK {
                return Err(format!("drive {index} has a device of type {}", d.transport.device_type));
            }
        }
        if let Some(v) = &self.vsock {
            if v.transport.device_type != VIRTIO_ID_VSOCK {
                return Err(format!("the vsock device has type {}", v.transport.device_type));
            }
        }
        Ok(())
    }

    /// The states of the virtio transports in slot order: drives, then vsock.
    pub fn virtio_states(&self) -> Vec<MmioState> {
        let drives = self.drives.iter().map(|d| d.transport.clone());
        drives.chain(self.vsock.iter().map(|v| v.transport.clone())).collect()
    }
}
