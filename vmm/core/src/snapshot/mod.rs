//! Snapshots of a whole VM, and restoring them into a fresh VMM.
//!
//! A snapshot is two files (by default `state` and `memory` in one directory, see
//! [`SnapshotFiles`]): the state ([`format`]: versioned, checksummed; holds
//! [`SnapshotState`]) and `memory` (guest RAM, sparse). [`create`] writes both, from the state
//! a [`Vmm`] whose vCPUs are stopped assembles ([`Vmm::save_state`]); [`restore`] checks
//! everything it can before touching KVM, then maps the memory file privately (copy-on-write,
//! read lazily by page faults, never read whole) and has [`Vmm::restore`] set the state of a new
//! VM, its devices and its vCPUs. Many VMs can restore from one snapshot: their writes to
//! memory stay their own, and [`Overrides`] give each its own disks and vsock.

pub mod format;
pub mod memory;
pub mod state;

use std::path::{Path, PathBuf};

use self::state::{SnapshotState, StateError};
pub use crate::device_manager::Overrides;
use crate::device_manager::{DeviceError, DeviceSet};
use crate::vmm::Vmm;
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::{Vm, VmError};
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
    Inconsistent { path: PathBuf, reason: StateError },
    #[error("memory file {path} is {len} bytes, the snapshot's guest has {expected}")]
    MemorySize { path: PathBuf, len: u64, expected: u64 },
    #[error(transparent)]
    Request(#[from] api::models::RequestError),
    #[error("cannot encode the snapshot state: {0}")]
    Encode(postcard::Error),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
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

/// Writes the snapshot `state` of the VM with memory `ram` into `files` (their directories
/// created if missing). The files are written under temporary names and renamed into place, the
/// state file last: VMs already restored from an earlier snapshot at the same paths keep their
/// mappings of the old memory file, and a crash midway never leaves a state file without its
/// memory.
pub fn create(files: &SnapshotFiles, state: &SnapshotState, ram: &GuestRam) -> Result<SnapshotInfo, SnapshotError> {
    create_parent(&files.memory)?;
    create_parent(&files.state)?;
    let bytes = format::encode(state)?;
    let memory_tmp = temporary(&files.memory);
    let memory_bytes = memory::write(ram, &memory_tmp)?;
    std::fs::rename(&memory_tmp, &files.memory).map_err(io_err(&files.memory, "rename into place"))?;
    write_state(&files.state, state, &bytes)?;
    Ok(SnapshotInfo { state_bytes: bytes.len() as u64, memory_bytes })
}

/// Writes the state file alone (a fork freezes guest memory in place instead of writing it);
/// returns its size.
pub fn create_state(path: &Path, state: &SnapshotState) -> Result<u64, SnapshotError> {
    create_parent(path)?;
    let bytes = format::encode(state)?;
    write_state(path, state, &bytes)?;
    Ok(bytes.len() as u64)
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
            .devices
            .drives
            .iter()
            .map(|d| SnapshotDrive {
                drive_id: d.device.drive.id.clone(),
                is_root_device: d.device.drive.root,
                is_read_only: d.device.drive.read_only,
                size_bytes: d.device.size,
                format: crate::config::api_format(d.device.drive.format),
            })
            .collect(),
        vsock_cid: state.devices.vsock.as_ref().map(|v| v.device.cid),
    }
}

/// Writes the metadata, then the state file: the state's rename is the moment the snapshot
/// exists, with everything it needs already in place.
fn write_state(path: &Path, state: &SnapshotState, bytes: &[u8]) -> Result<(), SnapshotError> {
    write_into_place(&meta_path(path), &meta(state).to_json())?;
    write_into_place(path, bytes)
}

/// Writes `bytes` under a temporary name, synced, then renames them to `path`.
fn write_into_place(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let tmp = temporary(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp, "write"))?;
    std::fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))
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
/// makes one at start; [`Vmm::restore`] then does only the snapshot's part.
pub struct PreparedVm {
    pub(crate) kvm: kvm_ioctls::Kvm,
    pub(crate) vm: Vm,
}

pub fn prepare() -> Result<PreparedVm, SnapshotError> {
    let kvm = kvm::open(1)?;
    let vm = Vm::create(&kvm)?;
    vm.warm_memory_slots()?;
    Ok(PreparedVm { kvm, vm })
}

/// A VM restored from the snapshot in `files`, ready for its vCPU threads: every vCPU's state
/// is set; the disks' backing files lie where `backing` allows. Console output goes to
/// `console_sink`. Everything is checked before KVM is touched.
pub fn restore(
    files: &SnapshotFiles,
    overrides: &Overrides,
    backing: &disk::BackingPolicy,
    console_sink: Box<dyn std::io::Write + Send>,
) -> Result<Vmm, SnapshotError> {
    let state = read_state(&files.state)?;
    let devices = open_devices(&state, overrides, backing)?;
    let ram = map_memory(&files.memory, &[], &state)?;
    Vmm::restore(prepare()?, &state, ram, devices, console_sink)
}

/// Applies `overrides` and opens the snapshot's disks (their backing files where `backing`
/// allows) and vsock socket.
pub fn open_devices(
    state: &SnapshotState,
    overrides: &Overrides,
    backing: &disk::BackingPolicy,
) -> Result<DeviceSet, SnapshotError> {
    Ok(DeviceSet::restore(&state.devices, overrides, backing)?)
}

#[cfg(test)]
mod tests;
