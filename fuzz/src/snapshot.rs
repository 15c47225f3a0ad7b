//! A snapshot's state file: the header checks (magic, version, length, checksum), the postcard
//! body, the state's consistency checks, then what a restore builds from a state that passed:
//! the UART from its registers, and every virtio transport (block and vsock) from its
//! registers and queues over guest memory, activating the devices a running guest had.
//!
//! The input is the body; the target writes the header with the right checksum so that
//! mutations reach the decoder, and also decodes the input itself as a whole file.

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use vmm::device_manager::persist::{DeviceStates, VirtioState};
use vmm::devices::legacy::serial::{ConsoleOut, ConsoleWatch, SerialDevice, SerialSnapshot};
use vmm::devices::legacy::EventFdTrigger;
use vmm::devices::virtio::block::{Block, BlockState};
use vmm::devices::virtio::mmio::{MmioState, MmioTransport, QueueSnapshot, TransportArgs};
use vmm::devices::virtio::vsock::{VsockHandle, VsockState};
use vmm::persist::Persist;
use vmm::snapshot::format::{decode, FORMAT_VERSION, HEADER_LEN, MAGIC};
use vmm::snapshot::state::SnapshotState;
use vmm::vstate::vcpu_state::VcpuState;
use vmm::vstate::vm::VmState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use crate::guest;
use crate::memdisk::MemDisk;
use crate::virtio_blk::drive;

/// A state file holding `body`, with a header that passes.
pub fn file(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + body.len());
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    f.extend_from_slice(&(body.len() as u64).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    f.extend_from_slice(body);
    f
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// Builds the devices a restore builds from `devices`, on memory of the fuzz guest's size.
fn restore_devices(devices: &DeviceStates) {
    let out = ConsoleOut::new(Box::new(std::io::sink()), Arc::new(ConsoleWatch::default()));
    let _ = SerialDevice::restore((EventFdTrigger(eventfd()), out), &devices.serial);
    let mem = guest::memory();
    for saved in &devices.drives {
        // What `Block::restore` does once it has opened the drive's disk, which must have the
        // saved size: here a disk in memory of that size.
        let disk = MemDisk::new(saved.device.size, saved.device.read_only);
        let block = Block::new(drive(saved.device.read_only), Box::new(disk));
        let _ =
            MmioTransport::restore(TransportArgs { device: block, mem: mem.clone(), irq: eventfd() }, &saved.transport);
    }
    if let Some(saved) = &devices.vsock {
        let Ok(dir) = TempDir::new_in(Path::new("/dev/shm")).or_else(|_| TempDir::new()) else { return };
        if let Ok(handle) = VsockHandle::restore((dir.as_path().join("v.sock"), None), &saved.device) {
            let _ = MmioTransport::restore(TransportArgs { device: handle, mem, irq: eventfd() }, &saved.transport);
        }
    }
}

pub fn run(data: &[u8]) {
    let path = Path::new("/fuzz/state");
    let _ = decode(path, data);
    let Ok(state) = decode(path, &file(data)) else { return };
    if state.check().is_ok() {
        restore_devices(&state.devices);
    }
}

fn transport(device_type: u32, queues: usize) -> MmioState {
    let q = QueueSnapshot {
        max_size: 256,
        size: 256,
        ready: true,
        desc_table: guest::DESC,
        avail_ring: 0x1000,
        used_ring: 0x2000,
        next_avail: 3,
        next_used: 3,
        event_idx: true,
    };
    MmioState {
        device_type,
        status: 0xf,
        device_features_sel: 1,
        driver_features_sel: 1,
        driver_features: 1 << 32,
        queue_sel: 0,
        config_generation: 0,
        interrupt_status: 1,
        queues: vec![q; queues],
    }
}

fn vcpu(index: u8) -> VcpuState {
    VcpuState {
        index,
        cpuid: vec![kvm_cpuid_entry2 { function: 0, eax: 0xd, ..Default::default() }],
        msrs: vec![kvm_bindings::kvm_msr_entry { index: 0x10, data: 0x1234, ..Default::default() }],
        regs: kvm_bindings::kvm_regs { rip: 0x10_0000, ..Default::default() },
        sregs: Default::default(),
        xsave: vec![0; 1024],
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
        events: Default::default(),
        tsc_khz: Some(2_400_000),
        tsc_offset: Some(5_000),
    }
}

/// A consistent state with `vcpus` vCPUs, a drive and (with `vsock`) a vsock device, as the
/// seeds' bodies.
pub fn sample(vcpus: u8, vsock: bool) -> SnapshotState {
    let chip = |chip_id| kvm_irqchip { chip_id, ..Default::default() };
    SnapshotState {
        mem_size: 2 << 20,
        vm: VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: Default::default(),
            clock: kvm_clock_data { clock: 123_456_789, ..Default::default() },
            clock_host_tsc: 987_654_321,
        },
        vcpus: (0..vcpus).map(vcpu).collect(),
        devices: DeviceStates {
            serial: SerialSnapshot {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 2,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"ls\n".to_vec(),
            },
            drives: vec![VirtioState {
                device: BlockState {
                    id: Some("rootfs".into()),
                    read_only: false,
                    root: true,
                    size: 64 << 10,
                    format: disk::Format::Raw,
                },
                transport: transport(2, 1),
            }],
            vsock: vsock.then(|| VirtioState { device: VsockState { cid: 3 }, transport: transport(19, 3) }),
        },
    }
}
