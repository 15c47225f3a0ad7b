//! The VM: its KVM fd, memory slots, and the in-kernel interrupt controllers and PIT; their
//! state for snapshots.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDR;
use crate::arch::x86_64::msr::snapshot_msr_list;
use crate::vstate::memory::GuestRam;
use crate::vstate::tsc::{self, TscShift};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Setup { what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot map a placeholder page: {0}")]
    Placeholder(String),
}

pub struct Vm {
    pub fd: VmFd,
    /// Bytes of a vCPU's XSAVE state (KVM_CAP_XSAVE2; 0 where KVM lacks it).
    pub xsave_size: usize,
    /// The MSRs a vCPU snapshot saves on this host.
    pub snapshot_msrs: Arc<[u32]>,
}

/// The VM-wide state KVM holds: interrupt controllers, PIT, kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// The host TSC when `clock` was read: with each vCPU's TSC offset, what keeps the guest's
    /// TSC and kvmclock together on restore (see `vstate::tsc`).
    pub clock_host_tsc: u64,
}

impl Vm {
    /// Creates the VM with its irqchip (PIC + IOAPIC), PIT and the guest RAM slots.
    pub fn new(kvm: &Kvm, ram: &GuestRam) -> Result<Self, VmError> {
        let vm = Self::create(kvm)?;
        vm.register_ram(ram)?;
        Ok(vm)
    }

    /// Creates the VM with its irqchip (PIC + IOAPIC) and PIT, without memory.
    pub fn create(kvm: &Kvm) -> Result<Self, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        let xsave_size = usize::try_from(fd.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        let msr_index_list = kvm.get_msr_index_list().map_err(setup("KVM_GET_MSR_INDEX_LIST"))?;
        let snapshot_msrs = snapshot_msr_list(msr_index_list.as_slice()).into();
        fd.set_tss_address(KVM_TSS_ADDR).map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;
        Ok(Self { fd, xsave_size, snapshot_msrs })
    }

    /// Gives the guest its RAM: one KVM memory slot per region.
    pub fn register_ram(&self, ram: &GuestRam) -> Result<(), VmError> {
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
            unsafe { self.fd.set_user_memory_region(slot_def) }
                .map_err(|source| VmError::Setup { what: "KVM_SET_USER_MEMORY_REGION", source })?;
        }
        Ok(())
    }

    /// Pays now what KVM charges for a VM's first memory slot (measured at 5–8 ms on the
    /// development hosts, whatever the slot's size; later slots cost well under 0.1 ms), by
    /// adding and removing a one-page slot. For a VM made ahead of a snapshot restore, so that
    /// the restore itself does not wait for it.
    pub fn warm_memory_slots(&self) -> Result<(), VmError> {
        let page = vm_memory::mmap::MmapRegion::<()>::new(4096).map_err(|e| VmError::Placeholder(e.to_string()))?;
        let mut slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 4096,
            userspace_addr: page.as_ptr() as u64,
        };
        let setup = |what| move |source| VmError::Setup { what, source };
        // SAFETY: `page` outlives the slot, which is deleted (size 0) before `page` is dropped.
        unsafe { self.fd.set_user_memory_region(slot) }.map_err(setup("KVM_SET_USER_MEMORY_REGION"))?;
        slot.memory_size = 0;
        // SAFETY: deleting the slot.
        unsafe { self.fd.set_user_memory_region(slot) }.map_err(setup("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        Ok(())
    }

    /// Reads the irqchip, PIT and clock state; the vCPUs must be outside KVM_RUN.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut chip).map_err(setup("KVM_GET_IRQCHIP"))?;
            Ok(chip)
        };
        let (mut clock, clock_host_tsc) = tsc::clock_and_host_tsc(&self.fd).map_err(setup("KVM_GET_CLOCK"))?;
        // The flags KVM_GET_CLOCK reports (TSC_STABLE, REALTIME, HOST_TSC) describe this host at
        // this moment; KVM_SET_CLOCK on another host must set the clock value alone.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(setup("KVM_GET_PIT2"))?,
            clock,
            clock_host_tsc,
        })
    }

    /// Sets the state [`Vm::save_state`] read, on a VM made by [`Vm::new`]. Returns how the
    /// vCPUs' TSC offsets must move to stay in step with the restored kvmclock.
    pub fn restore_state(&self, state: &VmState) -> Result<TscShift, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        self.fd.set_pit2(&state.pit).map_err(setup("KVM_SET_PIT2"))?;
        self.fd.set_clock(&state.clock).map_err(setup("KVM_SET_CLOCK"))?;
        let (now, now_tsc) = tsc::clock_and_host_tsc(&self.fd).map_err(setup("KVM_GET_CLOCK"))?;
        let shift = TscShift::between((state.clock.clock, state.clock_host_tsc), (now.clock, now_tsc));
        tracing::info!("kvmclock restored: {} ns from the set value at the reading after; TSC offsets move by {} host ticks", -shift.clock_ns, shift.host_tsc);
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(setup("KVM_SET_IRQCHIP"))?;
        }
        Ok(shift)
    }

    /// Wires `evt` to interrupt line `gsi` of the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Setup { what: "KVM_IRQFD", source })
    }
}
