//! The VM: its KVM fd, memory slots, and the in-kernel interrupt controllers and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDR;
use crate::vstate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Setup { what: &'static str, source: kvm_ioctls::Error },
}

pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    /// Creates the VM with its irqchip (PIC + IOAPIC), PIT and the guest RAM slots.
    pub fn new(kvm: &Kvm, ram: &GuestRam) -> Result<Self, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDR).map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;
        for (slot, region) in ram.memory.iter().enumerate() {
            let slot_def = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping behind `region` lives as long as `ram`, which outlives the VM
            // in every caller (both are owned by the built VM and dropped together, VM first).
            unsafe { fd.set_user_memory_region(slot_def) }.map_err(setup("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self { fd })
    }

    /// Wires `evt` to interrupt line `gsi` of the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Setup { what: "KVM_IRQFD", source })
    }
}
