//! Builds a bootable VM from a [`VmConfig`]: guest RAM with the kernel, initramfs, command
//! line, zero page, page tables, GDT and MP table in it; the KVM VM; its devices; its vCPUs.

use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::load_cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{boot_params, gdt, layout, mptable, paging};
use crate::boot::{cmdline, kernel};
use crate::config::VmConfig;
use crate::devices::bus::{BusError, PioBus};
use crate::devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORTS};
use crate::devices::legacy::serial::{ConsoleOut, ConsoleWatch, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORTS};
use crate::devices::legacy::EventFdTrigger;
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{self, GuestRam, MemoryError};
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
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A VM ready for its first KVM_RUN.
pub struct BuiltVm {
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    pub vcpus: Vec<Vcpu>,
    pub vm: Vm,
    pub ram: GuestRam,
    pub kvm: Kvm,
    pub bus: Arc<PioBus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub console: Arc<ConsoleWatch>,
    pub reset_evt: EventFd,
}

fn guest_write<T: AsRef<[u8]>>(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: T) -> Result<(), BuildError> {
    mem.write_slice(bytes.as_ref(), GuestAddress(addr))
        .map_err(|e| BuildError::GuestWrite { what, reason: e.to_string() })
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

/// Writes everything the kernel expects to find in memory at its 64-bit entry point.
/// Returns the entry address.
fn load_guest(cfg: &VmConfig, ram: &GuestRam) -> Result<u64, BuildError> {
    let mem = &ram.memory;
    let loaded = kernel::load_kernel(mem, &cfg.kernel)?;
    let cmdline = cmdline::build(cfg.cmdline.as_deref())?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline)
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

/// Builds the VM; console output goes to `console_sink`.
pub fn build(cfg: &VmConfig, console_sink: Box<dyn std::io::Write + Send>) -> Result<BuiltVm, BuildError> {
    // Cheap checks first, so that bad input fails before memory is allocated.
    mptable::build(cfg.vcpus)?;
    let kvm = kvm::open(cfg.vcpus)?;
    let ram = memory::create(cfg.mem_mib)?;
    let entry = load_guest(cfg, &ram)?;
    let vm = Vm::new(&kvm, &ram)?;

    let console = Arc::new(ConsoleWatch::default());
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice(Serial::new(
        EventFdTrigger(serial_irq),
        ConsoleOut::new(console_sink, console.clone()),
    ))));
    let reset_evt = eventfd()?;
    let reset_trigger = EventFdTrigger(reset_evt.try_clone().map_err(BuildError::EventFd)?);
    let i8042 = Arc::new(Mutex::new(I8042(I8042Device::new(reset_trigger))));
    let mut bus = PioBus::default();
    bus.insert("serial", COM1_PORT, COM1_PORTS, serial.clone())?;
    bus.insert("i8042", I8042_PORT, I8042_PORTS, i8042)?;

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm.fd, index)?;
        vcpu.configure(&kvm, cfg.vcpus, entry)?;
        vcpus.push(vcpu);
    }
    Ok(BuiltVm { vcpus, vm, ram, kvm, bus: Arc::new(bus), serial, console, reset_evt })
}
