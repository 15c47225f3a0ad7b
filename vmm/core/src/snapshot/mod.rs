//! Snapshots of a whole VM, and restoring them into a fresh VMM.
//!
//! A snapshot is two files (by default `state` and `memory` in one directory, see
//! [`SnapshotFiles`]): the state ([`format`]: versioned, checksummed; holds
//! [`SnapshotState`]) and `memory` (guest RAM, sparse). [`create`] writes both from a VM whose
//! vCPUs are stopped; [`restore`] checks everything it can before touching KVM, then maps the
//! memory file privately (copy-on-write, read lazily by page faults, never read whole) and sets
//! the state of a new VM, its devices and its vCPUs. Many VMs can restore from one snapshot:
//! their writes to memory stay their own, and [`Overrides`] give each its own disks and vsock.

pub mod format;
pub mod memory;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use self::state::{DriveSnapshot, SnapshotState, VsockSnapshot};
use crate::builder::{self, AttachedVirtio, BuildError, BuiltVm, DeviceSetup, VirtioKind};
use crate::config::{DriveConfig, VsockConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialDevice;
use disk::{self, DiskBackend};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::{Vm, VmError};
use crate::vstate::tsc;
use crate::arch::x86_64::msr::MSR_KVM_SYSTEM_TIME_NEW;
use api::snapshot_meta::{meta_path, SnapshotDrive, SnapshotMeta, META_VERSION};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Where a snapshot's two files are (Firecracker's `snapshot_path` and `mem_file_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// The files of a snapshot directory: `DIR/state` and `DIR/memory`.
    pub fn in_dir(dir: &Path) -> Self {
        Self { state: dir.join(STATE_FILE), memory: dir.join(MEMORY_FILE) }
    }
}

/// `.NAME.tmp` next to `path`: where a file is written before it is renamed into place.
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

fn create_parent(path: &Path) -> Result<(), SnapshotError> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::create_dir_all(parent).map_err(io_err(parent, "create")),
        None => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("{0} is not an ember snapshot state file")]
    NotAStateFile(PathBuf),
    #[error("state file {path} is format version {version}, this ember reads version {}", format::FORMAT_VERSION)]
    Version { path: PathBuf, version: u32 },
    #[error("state file {path} is truncated: {len} bytes, its header says {expected}")]
    Truncated { path: PathBuf, len: u64, expected: u64 },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state file {path} is inconsistent: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    #[error("memory file {path} is {len} bytes, the snapshot's guest has {expected}")]
    MemorySize { path: PathBuf, len: u64, expected: u64 },
    #[error("{0}")]
    Request(String),
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    #[error("drive override for drive {index}, but the snapshot has {count} drives")]
    NoSuchDrive { index: usize, count: usize },
    #[error("a vsock override, but the snapshot has no vsock device")]
    NoVsock,
    #[error("disk {path} is {len} bytes, but the snapshot's guest knows drive {index} as {expected} bytes")]
    DiskSize { index: usize, path: PathBuf, len: u64, expected: u64 },
    #[error("cannot flush drive {index} before the snapshot: {source}")]
    Flush { index: usize, source: std::io::Error },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// What a restore changes from the snapshot, so that many VMs can restore from one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Disk files by drive index (the order of the guest's /dev/vdX). A disk put in place must
    /// have the snapshot's size, and should hold what the snapshot's disk held when it was made
    /// (e.g. a new overlay on a frozen copy of it): the guest's page cache remembers that.
    pub drives: BTreeMap<usize, PathBuf>,
    pub vsock_uds: Option<PathBuf>,
    pub vsock_cid: Option<u32>,
}

/// What [`create`] needs of a VM; its vCPUs must be stopped, their states already read (on
/// their own threads, with [`Vcpu::save_state`]).
pub struct SnapshotParts<'a> {
    pub vm: &'a Vm,
    pub ram: &'a GuestRam,
    pub vcpus: Vec<VcpuState>,
    pub serial: &'a Arc<Mutex<SerialDevice>>,
    pub virtio: &'a [AttachedVirtio],
}

/// What [`create`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub state_bytes: u64,
    /// Guest memory that holds data; the memory file is this much plus holes.
    pub memory_bytes: u64,
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { path, what, source }
}

/// Writes a snapshot of the VM into `files` (their directories created if missing). The files
/// are written under temporary names and renamed into place, the state file last: VMs already
/// restored from an earlier snapshot at the same paths keep their mappings of the old memory
/// file, and a crash midway never leaves a state file without its memory.
pub fn create(files: &SnapshotFiles, parts: SnapshotParts) -> Result<SnapshotInfo, SnapshotError> {
    create_parent(&files.memory)?;
    let ram = parts.ram;
    let (state, bytes) = encode_state(&files.state, parts)?;
    let memory_tmp = temporary(&files.memory);
    let memory_bytes = memory::write(ram, &memory_tmp)?;
    std::fs::rename(&memory_tmp, &files.memory).map_err(io_err(&files.memory, "rename into place"))?;
    write_state(&files.state, &state, &bytes)?;
    Ok(SnapshotInfo { state_bytes: bytes.len() as u64, memory_bytes })
}

/// Writes the state file alone (a fork freezes guest memory in place instead of writing it);
/// returns its size.
pub fn create_state(path: &Path, parts: SnapshotParts) -> Result<u64, SnapshotError> {
    let (state, bytes) = encode_state(path, parts)?;
    write_state(path, &state, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Flushes the disks and encodes the state of everything but guest memory.
fn encode_state(path: &Path, parts: SnapshotParts) -> Result<(SnapshotState, Vec<u8>), SnapshotError> {
    create_parent(path)?;
    let mut drives = Vec::new();
    let mut vsock = None;
    for attached in parts.virtio {
        let mut transport = lock(&attached.transport);
        match &attached.kind {
            VirtioKind::Block(drive) => {
                let index = drives.len();
                transport.device_mut().sync().map_err(|source| SnapshotError::Flush { index, source })?;
                let mut capacity = [0u8; 8];
                transport.device_mut().read_config(0, &mut capacity);
                drives.push(DriveSnapshot {
                    id: drive.id.clone(),
                    path: drive.path.clone(),
                    read_only: drive.read_only,
                    root: drive.root,
                    size: u64::from_le_bytes(capacity) * 512,
                    transport: transport.save_state(),
                });
            }
            VirtioKind::Vsock(config, _) => {
                vsock = Some(VsockSnapshot { cid: config.cid, uds: config.uds.clone(), transport: transport.save_state() })
            }
        }
    }
    let mut vm = parts.vm.save_state()?;
    if let Some(ns) = guest_kvmclock(&parts, vm.clock_host_tsc) {
        vm.clock.clock = ns;
    }
    let state = SnapshotState {
        mem_size: parts.ram.size,
        vm,
        vcpus: parts.vcpus,
        serial: lock(parts.serial).save_state(),
        drives,
        vsock,
    };
    let bytes = format::encode(&state)?;
    Ok((state, bytes))
}

/// What the control plane may know of a snapshot (`api::snapshot_meta`).
fn meta(state: &SnapshotState) -> SnapshotMeta {
    SnapshotMeta {
        meta_version: META_VERSION,
        ember_version: env!("CARGO_PKG_VERSION").to_owned(),
        state_format: format::FORMAT_VERSION,
        mem_size_bytes: state.mem_size,
        vcpu_count: state.vcpus.len() as u8,
        drives: state
            .drives
            .iter()
            .map(|d| SnapshotDrive {
                drive_id: d.id.clone(),
                is_root_device: d.root,
                is_read_only: d.read_only,
                size_bytes: d.size,
            })
            .collect(),
        vsock_cid: state.vsock.as_ref().map(|v| v.cid),
    }
}

/// The guest's own kvmclock (vCPU 0's) when the host TSC read `host_tsc`: what its clock goes
/// on from after a restore (see `vstate::tsc`).
fn guest_kvmclock(parts: &SnapshotParts, host_tsc: u64) -> Option<u64> {
    let vcpu = parts.vcpus.first()?;
    let msr = vcpu.msrs.iter().find(|m| m.index == MSR_KVM_SYSTEM_TIME_NEW)?;
    tsc::guest_kvmclock_ns(&parts.ram.memory, msr.data, host_tsc.wrapping_add(vcpu.tsc_offset?))
}

/// Writes the metadata, then the state file: the state's rename is the moment the snapshot
/// exists, with everything it needs already in place.
fn write_state(path: &Path, state: &SnapshotState, bytes: &[u8]) -> Result<(), SnapshotError> {
    let meta_path = meta_path(path);
    let meta_tmp = temporary(&meta_path);
    write_synced(&meta_tmp, &meta(state).to_json()).map_err(io_err(&meta_tmp, "write"))?;
    std::fs::rename(&meta_tmp, &meta_path).map_err(io_err(&meta_path, "rename into place"))?;
    let tmp = temporary(path);
    write_synced(&tmp, bytes).map_err(io_err(&tmp, "write"))?;
    std::fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Reads, verifies and checks the state file at `path`.
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err(path, "read"))?;
    let state = format::decode(path, &bytes)?;
    state.check().map_err(|reason| SnapshotError::Inconsistent { path: path.to_owned(), reason })?;
    Ok(state)
}

/// Maps the memory file at `path` for `state`, with a fork's memory `layers` over it.
pub fn map_memory(path: &Path, layers: &[PathBuf], state: &SnapshotState) -> Result<GuestRam, SnapshotError> {
    memory::map(path, layers, state.mem_size)
}

/// A KVM VM made before the snapshot to load is known: /dev/kvm opened, the VM with its irqchip
/// and PIT, KVM's one-time memory-slot set-up paid. A VMM process that waits for a load request
/// makes one at start; [`restore_vm`] then does only the snapshot's part.
pub struct PreparedVm {
    kvm: kvm_ioctls::Kvm,
    vm: Vm,
}

pub fn prepare() -> Result<PreparedVm, SnapshotError> {
    let kvm = kvm::open(1).map_err(BuildError::from)?;
    let vm = Vm::create(&kvm)?;
    vm.warm_memory_slots()?;
    Ok(PreparedVm { kvm, vm })
}

/// A VM restored from the snapshot in `files`, ready for its vCPU threads: every vCPU's state
/// is set. Console output goes to `console_sink`. Everything is checked before KVM is touched.
pub fn restore(
    files: &SnapshotFiles,
    overrides: &Overrides,
    console_sink: Box<dyn std::io::Write + Send>,
) -> Result<BuiltVm, SnapshotError> {
    let state = read_state(&files.state)?;
    let devices = open_devices(&state, overrides)?;
    let ram = map_memory(&files.memory, &[], &state)?;
    restore_vm(prepare()?, &state, ram, devices, console_sink)
}

/// The snapshot's disks and vsock socket with the overrides applied, opened and checked.
pub struct OpenedDevices {
    drives: Vec<(DriveConfig, Box<dyn DiskBackend>)>,
    vsock: Option<(VsockConfig, crate::devices::virtio::vsock::VsockHandle)>,
}

/// Applies `overrides` and opens the disks and the vsock socket.
pub fn open_devices(state: &SnapshotState, overrides: &Overrides) -> Result<OpenedDevices, SnapshotError> {
    if let Some((&index, _)) = overrides.drives.range(state.drives.len()..).next() {
        return Err(SnapshotError::NoSuchDrive { index, count: state.drives.len() });
    }
    if state.vsock.is_none() && (overrides.vsock_cid.is_some() || overrides.vsock_uds.is_some()) {
        return Err(SnapshotError::NoVsock);
    }
    let mut drives = Vec::with_capacity(state.drives.len());
    for (index, d) in state.drives.iter().enumerate() {
        let path = overrides.drives.get(&index).unwrap_or(&d.path).clone();
        let disk = disk::open(&path, d.read_only).map_err(BuildError::from)?;
        if disk.size() != d.size {
            return Err(SnapshotError::DiskSize { index, path, len: disk.size(), expected: d.size });
        }
        drives.push((DriveConfig { id: d.id.clone(), path, read_only: d.read_only, root: d.root }, disk));
    }
    let vsock = match &state.vsock {
        Some(v) => {
            let config = VsockConfig {
                cid: overrides.vsock_cid.unwrap_or(v.cid),
                uds: overrides.vsock_uds.clone().unwrap_or_else(|| v.uds.clone()),
            };
            let handle = builder::open_vsock(&config)?;
            Some((config, handle))
        }
        None => None,
    };
    Ok(OpenedDevices { drives, vsock })
}

/// Builds the VM of `state` on `ram`: the KVM VM and its state, the devices in their saved
/// states, the vCPUs with theirs. Open vsock connections belonged to the old VMM, so the guest
/// gets a transport reset for them.
pub fn restore_vm(
    prepared: PreparedVm,
    state: &SnapshotState,
    ram: GuestRam,
    devices: OpenedDevices,
    console_sink: Box<dyn std::io::Write + Send>,
) -> Result<BuiltVm, SnapshotError> {
    let PreparedVm { kvm, vm } = prepared;
    let max = kvm.get_max_vcpus();
    if state.vcpus.len() > max {
        return Err(BuildError::from(KvmError::TooManyVcpus { requested: state.vcpus.len() as u64, max }).into());
    }
    vm.register_ram(&ram)?;
    let tsc_shift = vm.restore_state(&state.vm)?;
    let vsock = devices.vsock.as_ref().map(|(_, handle)| handle.clone());
    let virtio_states = state.virtio_states();
    let setup = DeviceSetup {
        drives: devices.drives,
        vsock: devices.vsock,
        serial_state: Some(&state.serial),
        virtio_states: Some(&virtio_states),
    };
    let wired = builder::wire_devices(&vm, &ram, console_sink, setup)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for vcpu_state in &state.vcpus {
        let vcpu = Vcpu::new(&vm, vcpu_state.index)?;
        vcpu.restore_state(vcpu_state, tsc_shift)?;
        vcpus.push(vcpu);
    }
    // Now that the vCPUs have their local APICs (an interrupt raised before would be wiped by
    // their state): the interrupts the guest had not taken yet, then the vsock reset.
    for device in &wired.virtio {
        lock(&device.transport).reassert_interrupt();
    }
    if let Some(vsock) = vsock {
        lock(&vsock.0).send_transport_reset();
    }
    Ok(BuiltVm::new(vcpus, vm, ram, kvm, wired))
}

/// Reads the state of every vCPU of a VM whose vCPUs are not running (tests, benchmarks, and
/// VMMs that stop their vCPU threads before a snapshot).
pub fn save_vcpus(vcpus: &[Vcpu]) -> Result<Vec<VcpuState>, SnapshotError> {
    Ok(vcpus.iter().map(Vcpu::save_state).collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests;
