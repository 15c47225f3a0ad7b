//! Builds a bootable VM from a [`VmConfig`]: guest RAM with the kernel, initramfs, command
//! line, zero page, page tables, GDT and MP table in it; the KVM VM; its devices; its vCPUs.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, Kvm};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::load_cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{boot_params, gdt, layout, mptable, paging};
use crate::boot::{cmdline, kernel};
use crate::config::{DriveConfig, VmConfig, VsockConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORTS};
use crate::devices::legacy::serial::{
    ConsoleOut, ConsoleWatch, SerialDevice, SerialSnapshot, COM1_IRQ, COM1_PORT, COM1_PORTS,
};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::mmio_state::{MmioRestoreError, MmioState};
use crate::devices::virtio::notify::QueueNotifier;
use crate::devices::virtio::vsock::{Vsock, VsockError, VsockHandle};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use disk::{self, DiskBackend, DiskError};
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
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot set up the vsock device: {0}")]
    Vsock(#[from] VsockError),
    #[error("only one drive can be the root filesystem, but {0} are marked root=on")]
    SeveralRoots(usize),
    #[error("{0} virtio devices requested; ember has interrupt lines for at most {1}")]
    TooManyDevices(usize, usize),
    #[error("cannot register the notification of virtio queue {queue} at {addr:#x}: {source}")]
    IoEvent { queue: usize, addr: u64, source: kvm_ioctls::Error },
    #[error("cannot restore the serial port: {0}")]
    SerialState(String),
    #[error("cannot restore the {name} device at {base:#x}: {source}")]
    VirtioState { name: &'static str, base: u64, source: MmioRestoreError },
}

/// A VM ready for its first KVM_RUN.
pub struct BuiltVm {
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    pub vcpus: Vec<Vcpu>,
    pub vm: Vm,
    pub ram: GuestRam,
    pub kvm: Kvm,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Device event handlers for the VMM's event loop.
    pub subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    pub console: Arc<ConsoleWatch>,
    pub reset_evt: EventFd,
    /// The virtio devices in slot order (drives, then vsock), for snapshots.
    pub virtio: Vec<AttachedVirtio>,
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

/// Where the n-th virtio device lives and which interrupt line it raises.
pub(crate) fn virtio_slot(index: usize) -> cmdline::MmioDevice {
    cmdline::MmioDevice {
        base: layout::VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW,
        size: MMIO_WINDOW,
        irq: layout::VIRTIO_IRQ_FIRST + index as u32,
    }
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

/// Wires a virtio device into the VM at `slot`: its interrupt through an irqfd, its queue
/// notifications through ioeventfds, its registers on the MMIO bus. With `state`, the transport
/// resumes from a snapshot instead of starting reset.
fn attach_virtio(
    vm: &Vm,
    ram: &GuestRam,
    mmio: &mut Bus,
    name: &'static str,
    slot: cmdline::MmioDevice,
    device: Box<dyn VirtioDevice>,
    state: Option<&MmioState>,
) -> Result<QueueNotifier, BuildError> {
    let irq_evt = eventfd()?;
    vm.register_irqfd(&irq_evt, slot.irq)?;
    let mut queue_evts = Vec::new();
    for queue in 0..device.queue_max_sizes().len() {
        let evt = eventfd()?;
        let addr = slot.base + QUEUE_NOTIFY;
        vm.fd
            .register_ioevent(&evt, &IoEventAddress::Mmio(addr), queue as u32)
            .map_err(|source| BuildError::IoEvent { queue, addr, source })?;
        queue_evts.push(evt);
    }
    let transport = match state {
        None => MmioTransport::new(device, ram.memory.clone(), Arc::new(Interrupt::new(irq_evt))),
        Some(state) => {
            let interrupt = Arc::new(Interrupt::with_status(irq_evt, state.interrupt_status));
            MmioTransport::restore(device, ram.memory.clone(), interrupt, state)
                .map_err(|source| BuildError::VirtioState { name, base: slot.base, source })?
        }
    };
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(name, slot.base, slot.size, transport.clone())?;
    Ok(QueueNotifier { transport, queue_evts })
}

/// A virtio device of the VM, for snapshots: what it was made from and its transport.
#[derive(Clone)]
pub struct AttachedVirtio {
    pub kind: VirtioKind,
    pub transport: Arc<Mutex<MmioTransport>>,
}

#[derive(Clone)]
pub enum VirtioKind {
    Block(DriveConfig),
    Vsock(VsockConfig, VsockHandle),
}

/// The devices of a VM, opened but not yet wired; with the saved states when restoring.
pub(crate) struct DeviceSetup<'a> {
    pub drives: Vec<(DriveConfig, Box<dyn DiskBackend>)>,
    pub vsock: Option<(VsockConfig, VsockHandle)>,
    pub serial_state: Option<&'a SerialSnapshot>,
    /// One per virtio device, drives first, then the vsock device.
    pub virtio_states: Option<&'a [MmioState]>,
}

/// The devices wired into a VM.
pub(crate) struct Wired {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub console: Arc<ConsoleWatch>,
    pub reset_evt: EventFd,
    pub subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    pub virtio: Vec<AttachedVirtio>,
}

/// Wires the COM1 UART, the i8042 reset line and the virtio devices into `vm`: the same for a
/// booted VM and a restored one, which differ only in the states the devices start from.
pub(crate) fn wire_devices(
    vm: &Vm,
    ram: &GuestRam,
    console_sink: Box<dyn std::io::Write + Send>,
    setup: DeviceSetup,
) -> Result<Wired, BuildError> {
    let console = Arc::new(ConsoleWatch::default());
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial_out = ConsoleOut::new(console_sink, console.clone());
    let serial = match setup.serial_state {
        None => SerialDevice(Serial::new(EventFdTrigger(serial_irq), serial_out)),
        Some(state) => SerialDevice::restore(state, EventFdTrigger(serial_irq), serial_out).map_err(BuildError::SerialState)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let reset_evt = eventfd()?;
    let reset_trigger = EventFdTrigger(reset_evt.try_clone().map_err(BuildError::EventFd)?);
    let i8042 = Arc::new(Mutex::new(I8042(I8042Device::new(reset_trigger))));
    let mut pio = Bus::default();
    pio.insert("serial", COM1_PORT, COM1_PORTS, serial.clone())?;
    pio.insert("i8042", I8042_PORT, I8042_PORTS, i8042)?;

    let mut mmio = Bus::default();
    let mut subscribers: Vec<Box<dyn MutEventSubscriber + Send>> = Vec::new();
    let mut virtio = Vec::new();
    let state = |index: usize| setup.virtio_states.and_then(|s| s.get(index));
    let drive_count = setup.drives.len();
    for (index, (drive, disk)) in setup.drives.into_iter().enumerate() {
        let device = Box::new(Block::new(disk));
        let notifier = attach_virtio(vm, ram, &mut mmio, "virtio-blk", virtio_slot(index), device, state(index))?;
        virtio.push(AttachedVirtio { kind: VirtioKind::Block(drive), transport: notifier.transport.clone() });
        subscribers.push(Box::new(notifier));
    }
    if let Some((config, vsock)) = setup.vsock {
        let slot = virtio_slot(drive_count);
        let device = Box::new(vsock.clone());
        let notifier = attach_virtio(vm, ram, &mut mmio, "virtio-vsock", slot, device, state(drive_count))?;
        virtio.push(AttachedVirtio { kind: VirtioKind::Vsock(config, vsock.clone()), transport: notifier.transport.clone() });
        subscribers.push(Box::new(notifier));
        subscribers.push(Box::new(vsock.host_events()));
    }
    Ok(Wired { pio, mmio, serial, console, reset_evt, subscribers, virtio })
}

/// Checks the device count against the interrupt lines ember has for virtio devices.
pub(crate) fn check_device_count(devices: usize) -> Result<(), BuildError> {
    let max_devices = (layout::VIRTIO_IRQ_LAST - layout::VIRTIO_IRQ_FIRST + 1) as usize;
    if devices > max_devices {
        return Err(BuildError::TooManyDevices(devices, max_devices));
    }
    Ok(())
}

/// Opens the vsock device's socket.
pub(crate) fn open_vsock(cfg: &VsockConfig) -> Result<VsockHandle, BuildError> {
    Ok(VsockHandle::new(Vsock::new(cfg.cid as u64, &cfg.uds)?))
}

/// Builds the VM; console output goes to `console_sink`.
pub fn build(cfg: &VmConfig, console_sink: Box<dyn std::io::Write + Send>) -> Result<BuiltVm, BuildError> {
    // Cheap checks first, so that bad input fails before memory is allocated.
    mptable::build(cfg.vcpus)?;
    let roots = cfg.drives.iter().filter(|d| d.root).count();
    if roots > 1 {
        return Err(BuildError::SeveralRoots(roots));
    }
    let devices = cfg.drives.len() + cfg.vsock.is_some() as usize;
    check_device_count(devices)?;
    let kvm = kvm::open(cfg.vcpus)?;
    let drives = cfg
        .drives
        .iter()
        .map(|d| Ok((d.clone(), disk::open(&d.path, d.read_only)?)))
        .collect::<Result<Vec<_>, BuildError>>()?;
    let vsock = match &cfg.vsock {
        Some(v) => Some((v.clone(), open_vsock(v)?)),
        None => None,
    };
    let slots: Vec<_> = (0..devices).map(virtio_slot).collect();
    let root = cfg.drives.iter().position(|d| d.root).map(|i| cmdline::RootDevice {
        name: vd_name(i),
        read_only: cfg.drives[i].read_only,
    });
    let cmdline = cmdline::build(cfg.cmdline.as_deref(), &slots, root.as_ref())?;

    let ram = memory::create(cfg.mem_mib)?;
    let entry = load_guest(cfg, &ram, &cmdline)?;
    let vm = Vm::new(&kvm, &ram)?;
    let setup = DeviceSetup { drives, vsock, serial_state: None, virtio_states: None };
    let wired = wire_devices(&vm, &ram, console_sink, setup)?;

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure(&kvm, cfg.vcpus, entry)?;
        vcpus.push(vcpu);
    }
    Ok(BuiltVm::new(vcpus, vm, ram, kvm, wired))
}

impl BuiltVm {
    pub(crate) fn new(vcpus: Vec<Vcpu>, vm: Vm, ram: GuestRam, kvm: Kvm, wired: Wired) -> Self {
        Self {
            vcpus,
            vm,
            ram,
            kvm,
            pio: Arc::new(wired.pio),
            mmio: Arc::new(wired.mmio),
            serial: wired.serial,
            subscribers: wired.subscribers,
            console: wired.console,
            reset_evt: wired.reset_evt,
            virtio: wired.virtio,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_and_names() {
        assert_eq!(virtio_slot(0), cmdline::MmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 });
        assert_eq!(virtio_slot(2).base, 0xd000_2000);
        assert_eq!(virtio_slot(18).irq, 23);
        assert_eq!([0, 1, 25, 26, 27].map(vd_name), ["vda", "vdb", "vdz", "vdaa", "vdab"]);
    }
}
