use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_msr_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use vmm_sys_util::tempdir::TempDir;

use super::format::{decode, encode, FORMAT_VERSION, HEADER_LEN};
use super::state::SnapshotState;
use super::*;
use crate::device_manager::persist::{DeviceStates, VirtioState};
use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::vsock::VsockState;
use crate::devices::virtio::mmio::{MmioState, QueueSnapshot};
use crate::vstate::vcpu_state::VcpuState;
use crate::device_manager::DeviceError;
use crate::vstate::vm::VmState;

fn transport(device_type: u32, queues: usize) -> MmioState {
    let q = QueueSnapshot {
        max_size: 256,
        size: 256,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
        next_avail: 17,
        next_used: 17,
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
    let mut lapic = kvm_bindings::kvm_lapic_state::default();
    lapic.regs[0x20] = index as _;
    VcpuState {
        index,
        cpuid: vec![kvm_cpuid_entry2 { function: 0, eax: 0xd, ebx: 0x756e_6547, ..Default::default() }],
        msrs: vec![kvm_msr_entry { index: 0x10, data: 0x1234_5678_9abc, ..Default::default() }],
        regs: kvm_bindings::kvm_regs { rip: 0x10_0000 + index as u64, rax: 41, ..Default::default() },
        sregs: Default::default(),
        xsave: (0..1024 + 40).collect(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic,
        mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
        events: Default::default(),
        tsc_khz: Some(2_400_000),
        tsc_offset: Some(u64::MAX - 5_000 + index as u64),
    }
}

pub(super) fn sample() -> SnapshotState {
    let chip = |chip_id| kvm_irqchip { chip_id, ..Default::default() };
    SnapshotState {
        mem_size: 256 << 20,
        vm: VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: Default::default(),
            clock: kvm_clock_data { clock: 123_456_789, ..Default::default() },
            clock_host_tsc: 987_654_321,
        },
        vcpus: vec![vcpu(0), vcpu(1)],
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
            device: BlockState { id: Some("rootfs".into()), read_only: false, root: true, size: 1 << 30, format: disk::Format::Qcow2 },
            transport: transport(2, 1),
        }],
        vsock: Some(VirtioState { device: VsockState { cid: 3 }, transport: transport(19, 3) }),
        },
    }
}

fn path() -> &'static Path {
    Path::new("/snap/state")
}

#[test]
fn the_state_round_trips_through_the_file_format() {
    let state = sample();
    let bytes = encode(&state).unwrap();
    assert_eq!(&bytes[..8], b"EMBERSNP");
    let back = decode(path(), &bytes).unwrap();
    assert_eq!(encode(&back).unwrap(), bytes, "decoding then encoding gives the same file");
    assert_eq!(back.vcpus[1].regs.rip, 0x10_0001);
    assert_eq!(back.vcpus[1].lapic.regs[0x20], 1);
    assert_eq!(back.vcpus[0].xsave.len(), 1064);
    assert_eq!(back.vcpus[0].msrs[0].data, 0x1234_5678_9abc);
    assert_eq!(back.vm.clock.clock, 123_456_789);
    assert_eq!(back.vm.clock_host_tsc, 987_654_321);
    assert_eq!(back.vcpus[1].tsc_offset, Some(u64::MAX - 4_999));
    assert_eq!(back.vm.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
    assert_eq!(back.devices, state.devices);
    back.check().unwrap();
}

#[test]
fn another_format_version_is_named_as_such() {
    let mut bytes = encode(&sample()).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let err = decode(path(), &bytes).err().unwrap();
    assert!(matches!(err, SnapshotError::Version { version: 2, .. }));
    assert_eq!(
        err.to_string(),
        format!("state file /snap/state is format version 2, this ember reads version {FORMAT_VERSION}")
    );
}

#[test]
fn a_flipped_bit_anywhere_in_the_body_is_a_checksum_mismatch() {
    let bytes = encode(&sample()).unwrap();
    for offset in [HEADER_LEN, HEADER_LEN + 100, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[offset] ^= 0x10;
        let err = decode(path(), &bad).err().unwrap();
        assert_eq!(err.to_string(), "state file /snap/state is corrupt: checksum mismatch", "offset {offset}");
    }
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    assert!(decode(path(), &bad).err().unwrap().to_string().contains("checksum mismatch"));
}

#[test]
fn truncated_and_padded_files_are_refused() {
    let bytes = encode(&sample()).unwrap();
    for len in [0, 5, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
        let err = decode(path(), &bytes[..len]).err().unwrap();
        assert!(matches!(err, SnapshotError::Truncated { .. }), "{len}: {err}");
        assert!(err.to_string().starts_with("state file /snap/state is truncated"), "{err}");
    }
    let mut long = bytes.clone();
    long.push(0);
    let err = decode(path(), &long).err().unwrap().to_string();
    assert!(err.contains("is corrupt") && err.contains("1 bytes follow"), "{err}");
}

#[test]
fn other_files_are_not_state_files() {
    for bytes in [&b"#!/bin/sh\necho hello world, this is long enough"[..], b"{}"] {
        let err = decode(path(), bytes).err().unwrap();
        assert_eq!(err.to_string(), "/snap/state is not an ember snapshot state file");
    }
}

#[test]
fn a_well_formed_but_inconsistent_state_is_refused_by_its_check() {
    let mut s = sample();
    s.mem_size = 3 << 20;
    assert!(s.check().err().unwrap().to_string().contains("multiple of 2 MiB"));
    let mut s = sample();
    s.vcpus.swap(0, 1);
    assert!(s.check().err().unwrap().to_string().contains("vCPU state 0 is for vCPU 1"));
    let mut s = sample();
    s.vcpus.clear();
    assert!(s.check().is_err());
    let mut s = sample();
    s.vcpus[0].xsave.truncate(10);
    assert!(s.check().err().unwrap().to_string().contains("XSAVE"));
    let mut s = sample();
    s.vm.ioapic.chip_id = 0;
    assert!(s.check().err().unwrap().to_string().contains("irqchip"));
    let mut s = sample();
    s.devices.drives[0].transport.device_type = 19;
    assert!(s.check().err().unwrap().to_string().contains("drive 0"));
    let mut s = sample();
    s.devices.serial.in_buffer = vec![0; 65];
    assert!(s.check().err().unwrap().to_string().contains("FIFO"));
}

#[test]
fn restore_reports_missing_and_bad_files_before_building_anything() {
    let dir = TempDir::new().unwrap();
    let err = read_state(&dir.as_path().join(STATE_FILE)).err().unwrap().to_string();
    assert!(err.starts_with("cannot open snapshot_path") && err.contains("state"), "{err}");

    let mut s = sample();
    s.vcpus.swap(0, 1);
    std::fs::write(dir.as_path().join(STATE_FILE), encode(&s).unwrap()).unwrap();
    let err = read_state(&dir.as_path().join(STATE_FILE)).err().unwrap().to_string();
    assert!(err.contains("is inconsistent: vCPU state 0 is for vCPU 1"), "{err}");

    let state = sample();
    std::fs::write(dir.as_path().join(MEMORY_FILE), vec![0u8; 1 << 20]).unwrap();
    let err = map_memory(MemoryFiles::Path(dir.as_path().join(MEMORY_FILE)), &state).err().unwrap().to_string();
    assert!(err.contains("is 1048576 bytes, the snapshot's guest has 268435456"), "{err}");
}

/// Runs `f` on a thread and fails the test unless it returns within 5 s (an open of a FIFO
/// without O_NONBLOCK would hang it).
fn quickly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the load hung")
}

fn fifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifos_as_state_or_memory_files_are_refused_at_once() {
    let dir = TempDir::new().unwrap();
    let pipe = dir.as_path().join("pipe");
    fifo(&pipe);
    let p = pipe.clone();
    let err = quickly(move || read_state(&p).err().unwrap().to_string());
    assert!(err.contains("snapshot_path") && err.contains("not a regular file"), "{err}");
    let err = quickly(move || map_memory(MemoryFiles::Path(pipe), &sample()).err().unwrap().to_string());
    assert!(err.contains("memory file") && err.contains("not a regular file"), "{err}");
    let link = dir.as_path().join("link");
    std::fs::write(dir.as_path().join(STATE_FILE), encode(&sample()).unwrap()).unwrap();
    std::os::unix::fs::symlink(dir.as_path().join(STATE_FILE), &link).unwrap();
    assert!(read_state(&link).err().unwrap().to_string().contains("symbolic link"));
}

#[test]
fn memory_descriptors_must_be_regular_files_of_the_guests_size() {
    let state = sample();
    let memfd = |len: u64| {
        let f = crate::vstate::memory::memfd(c"test").unwrap();
        f.set_len(len).unwrap();
        OwnedFd::from(f)
    };
    let err = map_memory(MemoryFiles::Fds(vec![memfd(4096)]), &state).err().unwrap().to_string();
    assert!(err.contains("file descriptor 0") && err.contains("is 4096 bytes"), "{err}");
    let err = map_memory(MemoryFiles::Fds(vec![memfd(state.mem_size), memfd(4096)]), &state).err().unwrap().to_string();
    assert!(err.contains("memory layer 0") && err.contains("4096 bytes"), "{err}");
    let (read, _write) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = map_memory(MemoryFiles::Fds(vec![OwnedFd::from(read)]), &state).err().unwrap().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let ram = map_memory(MemoryFiles::Fds(vec![memfd(state.mem_size), memfd(state.mem_size)]), &state).unwrap();
    assert_eq!((ram.size, ram.layers.len()), (state.mem_size, 1));
}

#[test]
fn sizes_from_the_state_are_checked_against_the_host() {
    let mut s = sample();
    s.mem_size = 1 << 40;
    s.check().unwrap();
    let err = check_limits(&s, 255).err().unwrap().to_string();
    assert!(err.contains("1048576 MiB of memory, more than this host's"), "{err}");
    let s = sample();
    check_limits(&s, 2).unwrap();
    let err = check_limits(&s, 1).err().unwrap().to_string();
    assert!(err.contains("2 vCPUs requested but KVM allows at most 1"), "{err}");
}

fn disk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

fn over(path: &Path, read_only: Option<bool>) -> DriveOverride {
    DriveOverride { path: path.to_owned(), read_only }
}

#[test]
fn a_load_needs_an_override_for_every_host_file() {
    let dir = TempDir::new().unwrap();
    let mut state = sample();
    state.devices.drives[0].device.size = 1 << 20;
    state.devices.drives[0].device.format = disk::Format::Raw;
    let err = open_devices(&state, &Overrides::default(), &Default::default()).err().unwrap().to_string();
    assert!(err.contains("drive 0 (rootfs) has no drive override") && err.contains("carry no host paths"), "{err}");
    let overrides = Overrides { drives: [(0, over(&disk(dir.as_path(), "d"), None))].into(), ..Default::default() };
    let err = open_devices(&state, &overrides, &Default::default()).err().unwrap().to_string();
    assert!(err.contains("no vsock_override.uds_path") && err.contains("carry no host paths"), "{err}");
    let with_vsock = Overrides { vsock_uds: Some(dir.as_path().join("v.sock")), ..overrides };
    assert!(open_devices(&state, &with_vsock, &Default::default()).is_ok());
}

#[test]
fn the_state_can_only_make_a_drive_more_restrictive() {
    let dir = TempDir::new().unwrap();
    let mut state = sample();
    state.devices.vsock = None;
    state.devices.drives[0].device.size = 1 << 20;
    state.devices.drives[0].device.format = disk::Format::Raw;
    let path = disk(dir.as_path(), "d");
    let read_only = |state: &SnapshotState, flag| {
        let overrides = Overrides { drives: [(0, over(&path, flag))].into(), ..Default::default() };
        open_devices(state, &overrides, &Default::default()).unwrap().drives[0].config().read_only
    };
    assert!(read_only(&state, Some(true)), "a drive the snapshot had writable, loaded read-only");
    assert!(!read_only(&state, Some(false)));
    state.devices.drives[0].device.read_only = true;
    assert!(read_only(&state, Some(false)), "a drive the snapshot had read-only stays so");
    assert!(read_only(&state, None));
}

#[test]
fn overrides_must_name_devices_the_snapshot_has() {
    let mut state = sample();
    state.devices.drives.clear();
    let overrides = Overrides { drives: [(0, over(Path::new("/x"), None))].into(), ..Default::default() };
    let err = open_devices(&state, &overrides, &Default::default()).err().unwrap();
    assert_eq!(err.to_string(), "drive override for drive 0, but the snapshot has 0 drives");
    state.devices.vsock = None;
    let overrides = Overrides { vsock_cid: Some(9), ..Default::default() };
    assert!(matches!(open_devices(&state, &overrides, &Default::default()), Err(SnapshotError::Devices(DeviceError::NoVsock))));
}

#[test]
fn a_replacement_disk_must_have_the_size_the_guest_knows() {
    let dir = TempDir::new().unwrap();
    let disk = dir.as_path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut state = sample();
    state.devices.vsock = None;
    // The saved drive is qcow2: without a format of its own, the raw replacement is opened so.
    let overrides = Overrides { drives: [(0, over(&disk, Some(false)))].into(), ..Default::default() };
    let err = open_devices(&state, &overrides, &Default::default()).err().unwrap().to_string();
    assert!(err.contains("disk.raw is not a usable qcow2 image: no qcow2 magic"), "{err}");
    let overrides = Overrides { drive_formats: [(0, disk::Format::Raw)].into(), ..overrides };
    let err = open_devices(&state, &overrides, &Default::default()).err().unwrap().to_string();
    assert!(err.starts_with("drive 0: disk") && err.contains("is 1048576 bytes") && err.contains("as 1073741824 bytes"), "{err}");
    state.devices.drives[0].device.size = 1 << 20;
    assert!(open_devices(&state, &overrides, &Default::default()).is_ok());
}

#[test]
fn a_saved_raw_drive_stays_raw_whatever_its_first_bytes_say() {
    let dir = TempDir::new().unwrap();
    // What a guest could write at the start of its raw disk: a qcow2 header naming a host file.
    let secret = dir.as_path().join("secret.raw");
    std::fs::write(&secret, vec![7u8; 4 << 20]).unwrap();
    let planted = dir.as_path().join("planted.qcow2");
    let policy = disk::BackingPolicy::new([dir.as_path()]).unwrap();
    disk::overlay::create(disk::overlay::Base { path: &secret, format: disk::Format::Raw, policy: &policy }, &planted)
        .unwrap();
    let mut bytes = std::fs::read(&planted).unwrap();
    bytes.resize(2 << 20, 0);
    let disk = dir.as_path().join("disk.raw");
    std::fs::write(&disk, &bytes).unwrap();

    let mut state = sample();
    state.devices.vsock = None;
    state.devices.drives[0].device.format = disk::Format::Raw;
    state.devices.drives[0].device.size = 2 << 20;
    let overrides = Overrides { drives: [(0, over(&disk, None))].into(), ..Default::default() };
    // Even with the secret's directory allowed: a raw disk has no backing file.
    assert!(open_devices(&state, &overrides, &policy).is_ok());
    // Read as qcow2 it would be a 4 MiB disk over the secret, not the 2 MiB the guest knows.
    state.devices.drives[0].device.format = disk::Format::Qcow2;
    let err = open_devices(&state, &overrides, &policy).err().unwrap().to_string();
    assert!(err.contains("is 4194304 bytes"), "{err}");
}
