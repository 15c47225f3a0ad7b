//! The devices' part of a snapshot. Each device saves and restores itself ([`Persist`]); the
//! device manager only keeps them in slot order, with their transports' states, and applies a
//! restore's [`Overrides`]. A new kind of device is one more field here.
//!
//! A state file names no host files: every disk and the vsock socket of a restored VM come from
//! the overrides, so a state file (checksummed, not authenticated) cannot attach a host file to
//! a guest or make a read-only drive writable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::{check_devices, DeviceError, DeviceManager, DeviceSet};
use crate::config::DriveConfig;
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::block::{Block, BlockState};
use crate::devices::virtio::mmio::{MmioState, MmioTransport};
use crate::devices::virtio::vsock::{VsockHandle, VsockState, VIRTIO_ID_VSOCK};
use crate::devices::virtio::VirtioDevice;
use crate::persist::Persist;
use disk::{BackingPolicy, Format};

/// A virtio device's state and its transport's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState<S> {
    pub device: S,
    pub transport: MmioState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialSnapshot,
    /// virtio-blk devices in slot order.
    pub drives: Vec<VirtioState<BlockState>>,
    pub vsock: Option<VirtioState<VsockState>>,
}

/// The disk a restored VM's drive is opened on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveOverride {
    pub path: PathBuf,
    /// Read-only whatever the snapshot says; `None` keeps the snapshot's flag. A drive the
    /// snapshot had read-only stays read-only either way.
    pub read_only: Option<bool>,
}

/// What a restore is given besides the state: the host files, which a state file does not
/// name, and what many VMs restored from one snapshot need of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Disk files by drive index (the order of the guest's /dev/vdX), one for every drive. A
    /// disk put in place must have the snapshot's size, and should hold what the snapshot's
    /// disk held when it was made (e.g. a new overlay on a frozen copy of it): the guest's page
    /// cache remembers that.
    pub drives: BTreeMap<usize, DriveOverride>,
    /// The formats of the files put in place, by drive index; a drive without one keeps the
    /// saved format.
    pub drive_formats: BTreeMap<usize, Format>,
    /// The vsock socket; needed when the snapshot has a vsock device.
    pub vsock_uds: Option<PathBuf>,
    pub vsock_cid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error(transparent)]
    Serial(#[from] crate::devices::legacy::serial::SerialRestoreError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("{what} has a device of type {found}")]
    DeviceType { what: String, found: u32 },
}

impl DeviceStates {
    /// Checks what can be checked before anything is opened or built.
    pub fn check(&self) -> Result<(), DeviceStateError> {
        self.serial.check()?;
        check_devices(self.drives.iter().map(|d| d.device.root), self.vsock.is_some())?;
        for (index, d) in self.drives.iter().enumerate() {
            if d.transport.device_type != VIRTIO_ID_BLOCK {
                return Err(DeviceStateError::DeviceType { what: format!("drive {index}"), found: d.transport.device_type });
            }
        }
        if let Some(v) = &self.vsock {
            if v.transport.device_type != VIRTIO_ID_VSOCK {
                return Err(DeviceStateError::DeviceType { what: "the vsock device".into(), found: v.transport.device_type });
            }
        }
        Ok(())
    }
}

fn save_virtio<D: VirtioDevice + Persist>(transport: &Mutex<MmioTransport<D>>) -> VirtioState<D::State> {
    let transport = lock(transport);
    VirtioState { device: transport.device().save(), transport: transport.save() }
}

impl DeviceManager {
    /// The devices' states, the disks flushed first: a snapshot does not copy them.
    pub fn save(&self) -> Result<DeviceStates, DeviceError> {
        let mut drives = Vec::with_capacity(self.blocks.len());
        for (index, block) in self.blocks.iter().enumerate() {
            lock(block).device_mut().sync().map_err(|source| DeviceError::Flush { index, source })?;
            drives.push(save_virtio(block));
        }
        Ok(DeviceStates {
            serial: lock(&self.serial).save(),
            drives,
            vsock: self.vsock.as_deref().map(save_virtio),
        })
    }
}

impl DeviceSet {
    /// Applies `overrides` to the saved devices and opens them (disks, sockets), the disks'
    /// backing files where `backing` allows.
    pub fn restore(states: &DeviceStates, overrides: &Overrides, backing: &BackingPolicy) -> Result<Self, DeviceError> {
        let count = states.drives.len();
        if let Some((&index, _)) = overrides.drives.range(count..).next() {
            return Err(DeviceError::NoDriveToOverride { index, count });
        }
        if states.vsock.is_none() && (overrides.vsock_cid.is_some() || overrides.vsock_uds.is_some()) {
            return Err(DeviceError::NoVsock);
        }
        // Every override is checked before anything is opened.
        for (index, saved) in states.drives.iter().enumerate() {
            if !overrides.drives.contains_key(&index) {
                return Err(DeviceError::NoDriveOverride { index, id: saved.device.id.clone().unwrap_or_default() });
            }
        }
        let uds = match (&states.vsock, &overrides.vsock_uds) {
            (Some(_), None) => return Err(DeviceError::NoVsockOverride),
            (_, uds) => uds,
        };
        let mut drives = Vec::with_capacity(count);
        for (index, saved) in states.drives.iter().enumerate() {
            let o = &overrides.drives[&index];
            let drive = DriveConfig {
                id: saved.device.id.clone(),
                path: o.path.clone(),
                read_only: o.read_only.unwrap_or(false) || saved.device.read_only,
                root: saved.device.root,
                format: overrides.drive_formats.get(&index).copied().unwrap_or(saved.device.format),
            };
            drives.push(Block::restore((drive, backing.clone()), &saved.device).map_err(|source| DeviceError::Drive { index, source })?);
        }
        let vsock = match (&states.vsock, uds) {
            (Some(saved), Some(uds)) => Some(VsockHandle::restore((uds.clone(), overrides.vsock_cid), &saved.device)?),
            _ => None,
        };
        Ok(Self { drives, vsock })
    }
}
