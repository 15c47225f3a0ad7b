//! The devices' part of a snapshot. Each device saves and restores itself ([`Persist`]); the
//! device manager only keeps them in slot order, with their transports' states, and applies a
//! restore's [`Overrides`]. A new kind of device is one more field here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::{check_devices, DeviceError, DeviceManager, DeviceSet};
use crate::config::VsockConfig;
use crate::devices::bus::lock;
use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::block::{Block, BlockState};
use crate::devices::virtio::mmio::{MmioState, MmioTransport};
use crate::devices::virtio::vsock::{VsockHandle, VIRTIO_ID_VSOCK};
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
    pub vsock: Option<VirtioState<VsockConfig>>,
}

/// What a restore changes from the snapshot, so that many VMs can restore from one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Disk files by drive index (the order of the guest's /dev/vdX). A disk put in place must
    /// have the snapshot's size, and should hold what the snapshot's disk held when it was made
    /// (e.g. a new overlay on a frozen copy of it): the guest's page cache remembers that.
    pub drives: BTreeMap<usize, PathBuf>,
    /// The formats of the files put in place, by drive index; a drive without one keeps the
    /// saved format.
    pub drive_formats: BTreeMap<usize, Format>,
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
        check_devices(self.drives.iter().map(|d| d.device.drive.root), self.vsock.is_some())?;
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
        let mut drives = Vec::with_capacity(count);
        for (index, saved) in states.drives.iter().enumerate() {
            let mut state = saved.device.clone();
            if let Some(path) = overrides.drives.get(&index) {
                state.drive.path = path.clone();
            }
            if let Some(&format) = overrides.drive_formats.get(&index) {
                state.drive.format = format;
            }
            drives.push(Block::restore(backing.clone(), &state).map_err(|source| DeviceError::Drive { index, source })?);
        }
        let vsock = match &states.vsock {
            Some(saved) => {
                let state = VsockConfig {
                    cid: overrides.vsock_cid.unwrap_or(saved.device.cid),
                    uds: overrides.vsock_uds.clone().unwrap_or_else(|| saved.device.uds.clone()),
                };
                Some(VsockHandle::restore((), &state)?)
            }
            None => None,
        };
        Ok(Self { drives, vsock })
    }
}
