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
//!
//! Nothing in a state file is trusted as a path or a size: it names no host files (the
//! overrides give every disk and the vsock socket), and its memory size and vCPU count are
//! checked against the host ([`check_limits`]) and the memory file before anything is mapped.

pub mod format;
pub mod memory;
pub mod state;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use self::state::{SnapshotState, StateError};
pub use crate::device_manager::{DriveOverride, Overrides};
use crate::files::{self, FileError};
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
    #[error("memory file {name} is {len} bytes, the snapshot's guest has {expected}")]
    MemorySize { name: String, len: u64, expected: u64 },
    #[error(
        "the snapshot's guest has {mem_mib} MiB of memory, more than this host's {host_mib} MiB: \
         refusing to map it (a state file is not trusted to size anything)"
    )]
    TooMuchMemory { mem_mib: u64, host_mib: u64 },
    #[error("cannot find this host's memory size: {0}")]
    HostMemory(std::io::Error),
    #[error(transparent)]
    File(#[from] FileError),
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
                drive_id: d.device.id.clone(),
                is_root_device: d.device.root,
                is_read_only: d.device.read_only,
                size_bytes: d.device.size,
                format: crate::config::api_format(d.device.format),
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

/// Writes `bytes` under a temporary name (created anew: never written through a link
/// planted there), synced, then renames them to `path`.
fn write_into_place(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let tmp = temporary(path);
    let write = || -> std::io::Result<()> {
        let mut f = files::create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp, "write"))?;
    std::fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))
}

/// A state file is a few hundred KiB at most (vCPU states and device registers); a larger
/// one is not read whole.
const MAX_STATE_FILE: u64 = 16 << 20;

/// Reads, verifies and checks the state file at `path` (a regular file, not through a link).
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let file = files::open_regular(path, "snapshot_path")?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes).map_err(io_err(path, "read"))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(SnapshotError::Corrupt { path: path.to_owned(), reason: format!("it is larger than {MAX_STATE_FILE} bytes") });
    }
    let state = format::decode(path, &bytes)?;
    state.check().map_err(|reason| SnapshotError::Inconsistent { path: path.to_owned(), reason })?;
    Ok(state)
}

/// This host's RAM in bytes.
fn host_memory() -> Result<u64, SnapshotError> {
    // SAFETY: a zeroed sysinfo is valid for sysinfo(2) to fill.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo writes one struct; the result is checked.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Err(SnapshotError::HostMemory(std::io::Error::last_os_error()));
    }
    Ok((info.totalram as u64).saturating_mul(u64::from(info.mem_unit.max(1))))
}

/// Checks the sizes a state file declares against this host, before anything is opened or
/// mapped: guest memory no larger than the host's RAM, no more vCPUs than KVM allows
/// (`max_vcpus`).
pub fn check_limits(state: &SnapshotState, max_vcpus: usize) -> Result<(), SnapshotError> {
    let host = host_memory()?;
    if state.mem_size > host {
        return Err(SnapshotError::TooMuchMemory { mem_mib: state.mem_size >> 20, host_mib: host >> 20 });
    }
    if state.vcpus.len() > max_vcpus {
        return Err(KvmError::TooManyVcpus { requested: state.vcpus.len() as u64, max: max_vcpus }.into());
    }
    Ok(())
}

/// Where a restore's guest memory comes from.
#[derive(Debug)]
pub enum MemoryFiles {
    /// A snapshot's memory file, by path.
    Path(PathBuf),
    /// The descriptors a load request carried: the memory file, then each layer to map over it
    /// where it holds data (a fork's frozen memory).
    Fds(Vec<OwnedFd>),
}

/// Maps the memory of `state` from `source`: each file must be a regular file (a memfd is) of
/// exactly the guest's memory size.
pub fn map_memory(source: MemoryFiles, state: &SnapshotState) -> Result<GuestRam, SnapshotError> {
    match source {
        MemoryFiles::Path(path) => {
            let file = files::open_regular(&path, "memory file")?;
            memory::map(file, &path.display().to_string(), Vec::new(), state.mem_size)
        }
        MemoryFiles::Fds(fds) => {
            let mut files = fds
                .into_iter()
                .enumerate()
                .map(|(index, fd)| files::regular_fd(fd, "mem_fds", index))
                .collect::<Result<Vec<_>, _>>()?;
            if files.is_empty() {
                return Err(api::models::RequestError::NoMemFds.into());
            }
            let base = files.remove(0);
            memory::map(base, "(file descriptor 0 of the request)", files, state.mem_size)
        }
    }
}

/// A KVM VM made before the snapshot to load is known: /dev/kvm opened, the VM with its irqchip
/// and PIT, KVM's one-time memory-slot set-up paid. A VMM process that waits for a load request
/// makes one at start; [`Vmm::restore`] then does only the snapshot's part.
pub struct PreparedVm {
    pub(crate) kvm: kvm_ioctls::Kvm,
    pub(crate) vm: Vm,
}

impl PreparedVm {
    /// The most vCPUs KVM allows this VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
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
    let prepared = prepare()?;
    check_limits(&state, prepared.max_vcpus())?;
    let devices = open_devices(&state, overrides, backing)?;
    let ram = map_memory(MemoryFiles::Path(files.memory.clone()), &state)?;
    Vmm::restore(prepared, &state, ram, devices, console_sink)
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
