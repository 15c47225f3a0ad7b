//! A VM into a snapshot and back: the VM's and vCPUs' KVM state here, the devices' in the
//! device manager, the files in `crate::snapshot`.

use std::path::Path;

use super::{Vmm, VmmError};
use crate::arch::x86_64::msr::MSR_KVM_SYSTEM_TIME_NEW;
use crate::device_manager::{DeviceManager, DeviceSet};
use crate::snapshot::state::SnapshotState;
use crate::snapshot::{self, PreparedVm, SnapshotError, SnapshotFiles, SnapshotInfo};
use crate::vstate::freeze::FrozenRam;
use crate::vstate::kvm::KvmError;
use crate::vstate::memory::GuestRam;
use crate::vstate::tsc;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vcpu_state::VcpuState;

/// The guest's own kvmclock (vCPU 0's) when the host TSC read `host_tsc`: what its clock goes
/// on from after a restore (see `vstate::tsc`).
fn guest_kvmclock(vcpus: &[VcpuState], ram: &GuestRam, host_tsc: u64) -> Option<u64> {
    let vcpu = vcpus.first()?;
    let msr = vcpu.msrs.iter().find(|m| m.index == MSR_KVM_SYSTEM_TIME_NEW)?;
    tsc::guest_kvmclock_ns(&ram.memory, msr.data, host_tsc.wrapping_add(vcpu.tsc_offset?))
}

impl Vmm {
    /// The state of everything but guest memory, the disks flushed first; `vcpus` are the
    /// stopped vCPUs' states ([`Vmm::save_vcpus`]).
    pub fn save_state(&self, vcpus: Vec<VcpuState>) -> Result<SnapshotState, SnapshotError> {
        let devices = self.devices.save()?;
        let mut vm = self.vm.save_state()?;
        match guest_kvmclock(&vcpus, &self.ram, vm.clock_host_tsc) {
            Some(ns) => {
                let drift_us = (i128::from(ns) - i128::from(vm.clock.clock)) / 1000;
                tracing::info!("kvmclock at the snapshot: the guest's {ns} ns, {drift_us} µs from KVM's");
                vm.clock.clock = ns;
            }
            None => tracing::warn!("the guest's kvmclock page is unreadable: the snapshot keeps KVM's clock"),
        }
        Ok(SnapshotState { mem_size: self.ram.size, vm, vcpus, devices })
    }

    /// Writes a snapshot of the stopped VM into `files`.
    pub fn snapshot(&self, files: &SnapshotFiles, vcpus: Vec<VcpuState>) -> Result<SnapshotInfo, SnapshotError> {
        snapshot::create(files, &self.save_state(vcpus)?, &self.ram)
    }

    /// Writes the state file of the stopped VM, then freezes guest memory in place instead of
    /// writing it (a fork): the files that hold it, for the children to map.
    pub fn snapshot_frozen(&mut self, state_path: &Path, vcpus: Vec<VcpuState>) -> Result<FrozenRam, VmmError> {
        snapshot::create_state(state_path, &self.save_state(vcpus)?)?;
        self.ram.freeze().map_err(VmmError::Freeze)
    }

    /// Builds the VM of `state` on `ram`: the KVM VM and its state, the devices in their saved
    /// states, the vCPUs with theirs.
    pub fn restore(
        prepared: PreparedVm,
        state: &SnapshotState,
        ram: GuestRam,
        devices: DeviceSet,
        console_sink: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, SnapshotError> {
        let PreparedVm { kvm, vm } = prepared;
        let max = kvm.get_max_vcpus();
        if state.vcpus.len() > max {
            return Err(KvmError::TooManyVcpus { requested: state.vcpus.len() as u64, max }.into());
        }
        vm.register_ram(&ram)?;
        let tsc_shift = vm.restore_state(&state.vm)?;
        let devices = DeviceManager::new(&vm, &ram.memory, console_sink, devices, Some(&state.devices))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for vcpu_state in &state.vcpus {
            let vcpu = Vcpu::new(&vm, vcpu_state.index)?;
            vcpu.restore_state(vcpu_state, tsc_shift)?;
            vcpus.push(vcpu);
        }
        devices.after_vcpus_restored();
        Ok(Self::new(vm, ram, devices, vcpus))
    }
}
