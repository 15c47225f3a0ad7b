//! What a snapshot's state file holds: the machine's shape, KVM's VM and vCPU state, and the
//! devices' states (each device's own, see `device_manager::persist`). Guest memory lives in
//! the memory file next to it.

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::device_manager::persist::DeviceStateError;
use crate::device_manager::DeviceStates;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};
use crate::vstate::vm::VmState;

#[derive(Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Guest RAM in bytes: the memory file's exact size.
    pub mem_size: u64,
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("guest memory of {0} bytes is not a positive multiple of 2 MiB")]
    MemSize(u64),
    #[error("{0} vCPUs")]
    VcpuCount(usize),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error("irqchip {id} is saved as chip {saved}")]
    Irqchip { id: u32, saved: u32 },
    #[error(transparent)]
    Devices(#[from] DeviceStateError),
}

impl SnapshotState {
    /// Checks the state's consistency, so that a bad file fails before anything is built.
    pub fn check(&self) -> Result<(), StateError> {
        if self.mem_size == 0 || self.mem_size % (2 << 20) != 0 {
            return Err(StateError::MemSize(self.mem_size));
        }
        let vcpus = u8::try_from(self.vcpus.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or(StateError::VcpuCount(self.vcpus.len()))?;
        mptable::build(vcpus)?;
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            vcpu.check(index as u8)?;
        }
        let chips = [
            (&self.vm.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.vm.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.vm.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        for (chip, id) in chips {
            if chip.chip_id != id {
                return Err(StateError::Irqchip { id, saved: chip.chip_id });
            }
        }
        Ok(self.devices.check()?)
    }
}
