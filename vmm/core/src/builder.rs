//! Builds a bootable [`Vmm`] from a [`VmConfig`]: guest RAM with the kernel, initramfs,
//! command line, zero page, page tables, GDT and MP table in it; the KVM VM; its devices (the
//! device manager's); its vCPUs.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::load_cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{boot_params, gdt, layout, mptable, paging};
use crate::boot::{cmdline, kernel};
use crate::config::VmConfig;
use crate::device_manager::{check_devices, virtio_slot, DeviceError, DeviceManager, DeviceSet};
use crate::vmm::Vmm;
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{self, MemoryError, GuestRam};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error("{0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("cannot write {what} into guest memory: {reason}")]
    GuestWrite { what: &'static str, reason: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
}

fn guest_write<T: AsRef<[u8]>>(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: T) -> Result<(), BuildError> {
    mem.write_slice(bytes.as_ref(), GuestAddress(addr))
        .map_err(|e| BuildError::GuestWrite { what, reason: e.to_string() })
}

/// Writes everything the kernel expects to find in memory at its 64-bit entry point.
/// Returns the entry address.
fn load_guest(cfg: &VmConfig, ram: &GuestRam, cmdline: &linux_loader::cmdline::Cmdline) -> Result<u64, BuildError> {
    let mem = &ram.memory;
    let loaded = kernel::load_kernel(mem, &cfg.kernel)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline)
        .map_err(|e| BuildError::GuestWrite { what: "the command line", reason: e.to_string() })?;
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    let initrd = match &cfg.initrd {
        Some(path) => {
            let low_ram_end = ram.size.min(layout::MMIO_HOLE_START);
            Some(kernel::load_initrd(mem, low_ram_end, loaded.end, path)?)
        }
        None => None,
    };
    let params = boot_params::build(&boot_params::BootParamsConfig {
        mem_size: ram.size,
        cmdline_addr: layout::CMDLINE_ADDR,
        cmdline_len,
        initrd,
    });
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)), mem)
        .map_err(|e| BuildError::GuestWrite { what: "the zero page", reason: e.to_string() })?;
    for (addr, table) in paging::identity_tables() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        guest_write(mem, "the page tables", addr, bytes)?;
    }
    let gdt_bytes: Vec<u8> = gdt::BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    guest_write(mem, "the GDT", layout::GDT_ADDR, gdt_bytes)?;
    guest_write(mem, "the IDT", layout::IDT_ADDR, 0u64.to_le_bytes())?;
    guest_write(mem, "the MP table", mptable::MPTABLE_START, mptable::build(cfg.vcpus)?)?;
    Ok(loaded.entry)
}

/// Block device name the guest gives the n-th virtio-blk device (vda, vdb, ..., vdz, vdaa).
fn vd_name(index: usize) -> String {
    let letter = |i: usize| (b'a' + i as u8) as char;
    if index < 26 {
        format!("vd{}", letter(index))
    } else {
        format!("vd{}{}", letter(index / 26 - 1), letter(index % 26))
    }
}

/// Builds the VM; console output goes to `console_sink`.
pub fn build(cfg: &VmConfig, console_sink: Box<dyn std::io::Write + Send>) -> Result<Vmm, BuildError> {
    // Cheap checks first, so that bad input fails before memory is allocated; the disks are
    // opened before it too, so that a bad disk fails fast.
    mptable::build(cfg.vcpus)?;
    check_devices(cfg.drives.iter().map(|d| d.root), cfg.vsock.is_some())?;
    let kvm = kvm::open(cfg.vcpus)?;
    let devices = DeviceSet::open(&cfg.drives, cfg.vsock.as_ref(), &cfg.backing)?;
    let slots: Vec<_> = (0..cfg.drives.len() + cfg.vsock.is_some() as usize).map(virtio_slot).collect();
    let root = cfg.drives.iter().position(|d| d.root).map(|i| cmdline::RootDevice {
        name: vd_name(i),
        read_only: cfg.drives[i].read_only,
    });
    let cmdline = cmdline::build(cfg.cmdline.as_deref(), &slots, root.as_ref())?;

    let ram = memory::create(cfg.mem_mib)?;
    let entry = load_guest(cfg, &ram, &cmdline)?;
    let vm = Vm::new(&kvm, &ram)?;
    let devices = DeviceManager::new(&vm, &ram.memory, console_sink, devices, None)?;

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure(&kvm, cfg.vcpus, entry)?;
        vcpus.push(vcpu);
    }
    Ok(Vmm::new(vm, ram, devices, vcpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vd_names() {
        assert_eq!([0, 1, 25, 26, 27].map(vd_name), ["vda", "vdb", "vdz", "vdaa", "vdab"]);
    }
}
