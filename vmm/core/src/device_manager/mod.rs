//! The devices of a VM: the COM1 UART, the i8042 reset line and the virtio devices in their
//! MMIO slots (drives first, then vsock), the two buses that route vCPU exits to them, and
//! their event handlers. The same wiring serves a booted VM and a restored one, which differ
//! only in the states the devices start from ([`persist`]).

mod events;
pub mod mmio;
pub mod persist;

use std::path::Path;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::events::{EventLoop, Subscriber};
pub use self::mmio::virtio_slot;
use self::mmio::check_device_count;
pub use self::persist::{DeviceStates, DriveOverride, Overrides};
use self::events::DeviceEvents;
use self::mmio::MmioSlots;
use crate::config::{DriveConfig, VsockConfig};
use crate::devices::bus::{lock, Bus, BusError};
use crate::devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORTS};
use crate::devices::legacy::serial::{
    ConsoleOut, ConsoleWatch, SerialDevice, SerialInput, SerialRestoreError, COM1_IRQ, COM1_PORT, COM1_PORTS,
};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioRestoreError, MmioTransport};
use crate::devices::virtio::vsock::{VsockError, VsockHandle};
use crate::persist::Persist;
use crate::vstate::vm::{Vm, VmError};
use disk::{BackingPolicy, DiskError, Format};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Irq(#[from] VmError),
    #[error("cannot register the notification of virtio queue {queue} at {addr:#x}: {source}")]
    IoEvent { queue: usize, addr: u64, source: kvm_ioctls::Error },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("drive {index}: {source}")]
    Drive { index: usize, source: BlockError },
    #[error("cannot set up the vsock device: {0}")]
    Vsock(#[from] VsockError),
    #[error("cannot restore the serial port: {0}")]
    Serial(#[from] SerialRestoreError),
    #[error("cannot restore the {name} device at {base:#x}: {source}")]
    VirtioState { name: &'static str, base: u64, source: MmioRestoreError },
    #[error("{0} virtio devices requested; ember has interrupt lines for at most {1}")]
    TooMany(usize, usize),
    #[error("only one drive can be the root filesystem, but {0} are marked root=on")]
    SeveralRoots(usize),
    #[error("drive override for drive {index}, but the snapshot has {count} drives")]
    NoDriveToOverride { index: usize, count: usize },
    #[error("a vsock override, but the snapshot has no vsock device")]
    NoVsock,
    #[error(
        "drive {index} ({id}) has no drive override: snapshot state files carry no host paths, so a load \
         needs drive_overrides with the path_on_host of every drive"
    )]
    NoDriveOverride { index: usize, id: String },
    #[error(
        "the snapshot has a vsock device but the load has no vsock_override.uds_path: snapshot state files \
         carry no host paths"
    )]
    NoVsockOverride,
    #[error("cannot flush drive {index} before the snapshot: {source}")]
    Flush { index: usize, source: std::io::Error },
    #[error("there is no such drive")]
    UnknownDrive,
    #[error(transparent)]
    Update(BlockError),
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// Checks what a set of drives and a vsock device ask of the machine.
pub fn check_devices(drives: impl Iterator<Item = bool>, vsock: bool) -> Result<(), DeviceError> {
    let (mut count, mut roots) = (vsock as usize, 0);
    for root in drives {
        count += 1;
        roots += root as usize;
    }
    if roots > 1 {
        return Err(DeviceError::SeveralRoots(roots));
    }
    check_device_count(count)
}

/// The virtio devices of a VM, opened (disks, sockets) but not yet wired.
pub struct DeviceSet {
    pub(crate) drives: Vec<Block>,
    vsock: Option<VsockHandle>,
}

impl DeviceSet {
    /// Opens the devices a VM is configured with, the drives' backing files where `backing`
    /// allows.
    pub fn open(drives: &[DriveConfig], vsock: Option<&VsockConfig>, backing: &BackingPolicy) -> Result<Self, DeviceError> {
        check_devices(drives.iter().map(|d| d.root), vsock.is_some())?;
        let drives = drives
            .iter()
            .map(|d| Ok(Block::new(d.clone(), disk::open(&d.path, d.format, d.read_only, backing)?)))
            .collect::<Result<_, DeviceError>>()?;
        let vsock = vsock.map(VsockHandle::open).transpose()?;
        Ok(Self { drives, vsock })
    }
}

pub struct DeviceManager {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    console: Arc<ConsoleWatch>,
    reset_evt: EventFd,
    /// Typed handles, for what only one kind of device does (a drive's disk swap).
    blocks: Vec<Arc<Mutex<MmioTransport<Block>>>>,
    vsock: Option<Arc<Mutex<MmioTransport<VsockHandle>>>>,
    events: DeviceEvents,
}

impl DeviceManager {
    /// Wires `devices` into `vm`, each in the state `states` saved for it, or reset.
    pub fn new(
        vm: &Vm,
        mem: &GuestMemoryMmap,
        console_sink: Box<dyn std::io::Write + Send>,
        devices: DeviceSet,
        states: Option<&DeviceStates>,
    ) -> Result<Self, DeviceError> {
        let console = Arc::new(ConsoleWatch::default());
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial_out = ConsoleOut::new(console_sink, console.clone());
        let serial = match states {
            None => SerialDevice(Serial::new(EventFdTrigger(serial_irq), serial_out)),
            Some(s) => SerialDevice::restore((EventFdTrigger(serial_irq), serial_out), &s.serial)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let reset_evt = eventfd()?;
        let reset_trigger = EventFdTrigger(reset_evt.try_clone().map_err(DeviceError::EventFd)?);
        let i8042 = Arc::new(Mutex::new(I8042(I8042Device::new(reset_trigger))));
        let mut pio = Bus::default();
        pio.insert("serial", COM1_PORT, COM1_PORTS, serial.clone())?;
        pio.insert("i8042", I8042_PORT, I8042_PORTS, i8042)?;

        let mut slots = MmioSlots { vm, mem, bus: Bus::default(), next: 0 };
        let mut events = DeviceEvents::default();
        let mut blocks = Vec::with_capacity(devices.drives.len());
        for (index, block) in devices.drives.into_iter().enumerate() {
            let state = states.and_then(|s| s.drives.get(index)).map(|s| &s.transport);
            let notifier = slots.attach("virtio-blk", block, state)?;
            blocks.push(notifier.transport.clone());
            events.add(Box::new(notifier));
        }
        let vsock = match devices.vsock {
            Some(handle) => {
                let state = states.and_then(|s| s.vsock.as_ref()).map(|s| &s.transport);
                let host_events = handle.host_events();
                let notifier = slots.attach("virtio-vsock", handle, state)?;
                let transport = notifier.transport.clone();
                events.add(Box::new(notifier));
                events.add(Box::new(host_events));
                Some(transport)
            }
            None => None,
        };
        Ok(Self {
            pio: Arc::new(pio),
            mmio: Arc::new(slots.bus),
            serial,
            console,
            reset_evt,
            blocks,
            vsock,
            events,
        })
    }

    pub fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    pub fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// What the console has shown that tells how the guest ended.
    pub fn console(&self) -> &ConsoleWatch {
        &self.console
    }

    /// Readable once the guest has asked for a reset.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }

    /// Feeds `input` to the UART's receive FIFO from the event loop.
    pub fn add_console_input(&mut self, input: std::fs::File) {
        self.events.add(Box::new(SerialInput { serial: self.serial.clone(), input }));
    }

    /// Puts the devices' handlers into the event loop.
    pub fn resume(&mut self, events: &mut EventLoop) {
        self.events.resume(events);
    }

    /// Takes the devices' handlers out of the event loop.
    pub fn pause(&mut self, events: &mut EventLoop) {
        self.events.pause(events);
    }

    /// Puts the disk at `path` (in `format`, else the drive's) behind the drive the API knows
    /// as `id`, its backing files where `backing` allows.
    pub fn update_drive(
        &mut self,
        id: &str,
        path: &Path,
        format: Option<Format>,
        backing: &BackingPolicy,
    ) -> Result<(), DeviceError> {
        let block = self
            .blocks
            .iter()
            .find(|b| lock(b).device().config().id.as_deref() == Some(id))
            .ok_or(DeviceError::UnknownDrive)?;
        lock(block).device_mut().update_disk(path, format, backing).map_err(DeviceError::Update)
    }

    /// Once the restored vCPUs have their local APICs (an interrupt raised before would be
    /// wiped by their state): the interrupts the guest had not taken yet, then the vsock
    /// device's transport reset for the connections of the process that made the snapshot.
    pub fn after_vcpus_restored(&self) {
        for block in &self.blocks {
            lock(block).reassert_interrupt();
        }
        if let Some(vsock) = &self.vsock {
            let transport = lock(vsock);
            transport.reassert_interrupt();
            lock(&transport.device().0).send_transport_reset();
        }
    }
}
