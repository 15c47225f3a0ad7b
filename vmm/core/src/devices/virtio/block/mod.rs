//! virtio-blk: a disk for the guest, over a [`DiskBackend`] (raw file or copy-on-write overlay).
//! Requests are served on the event loop thread when the guest notifies the queue, never on a
//! vCPU thread.

mod persist;
pub mod request;

pub use self::persist::BlockState;

use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use self::request::{execute, Limits, SECTOR_SIZE};
use super::{ActivateError, Interrupt, VirtioDevice, INT_VRING, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX};
use crate::config::DriveConfig;
use disk::{overlay, BackingPolicy, DiskBackend, DiskError, Format};

pub const QUEUE_SIZE: u16 = 256;
/// Two descriptors of every chain hold the header and the status byte.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const SIZE_MAX: u32 = 1 << 20;
const CONFIG_LEN: usize = 24;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot flush the current disk: {0}")]
    Flush(std::io::Error),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("the new disk is {size} bytes{}, the drive is {drive_size} bytes{}", ro(*read_only), ro(*drive_read_only))]
    Mismatch { size: u64, read_only: bool, drive_size: u64, drive_read_only: bool },
    #[error("disk {path} is {len} bytes, but the snapshot's guest knows the drive as {expected} bytes")]
    SavedSize { path: std::path::PathBuf, len: u64, expected: u64 },
}

fn ro(read_only: bool) -> &'static str {
    if read_only {
        " read-only"
    } else {
        ""
    }
}

pub struct Block {
    /// What the drive was configured as; its path follows disk swaps.
    config: DriveConfig,
    disk: Box<dyn DiskBackend>,
    id: Vec<u8>,
    avail_features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_LEN],
    active: Option<Active>,
}

impl Block {
    pub fn new(drive: DriveConfig, disk: Box<dyn DiskBackend>) -> Self {
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if disk.read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        // struct virtio_blk_config: capacity (sectors), size_max, seg_max, geometry, blk_size.
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[0..8].copy_from_slice(&(disk.size() / SECTOR_SIZE).to_le_bytes());
        config_space[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config_space[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let id = disk.id();
        Self { config: drive, disk, id, avail_features, acked_features: 0, config_space, active: None }
    }

    pub fn config(&self) -> &DriveConfig {
        &self.config
    }

    /// The disk's size in bytes, which the guest knows as the drive's capacity.
    pub fn capacity(&self) -> u64 {
        self.disk.size()
    }

    /// Serves every request the guest has made available, then interrupts it if it wants.
    fn serve(active: &mut Active, disk: &mut dyn DiskBackend, id: &[u8]) -> Result<(), virtio_queue::Error> {
        let limits = Limits { seg_max: SEG_MAX, size_max: SIZE_MAX };
        let mem = &active.mem;
        let mut served = false;
        loop {
            active.queue.disable_notification(mem)?;
            while let Some(chain) = active.queue.iter(mem)?.next() {
                let head = chain.head_index();
                let done = execute(mem, chain, disk, id, limits);
                active.queue.add_used(mem, head, done.used_len)?;
                served = true;
            }
            if !active.queue.enable_notification(mem)? {
                break;
            }
        }
        // Nothing served, nothing to tell (activation serves a queue that is usually empty).
        if served && active.queue.needs_notification(mem)? {
            active.interrupt.signal(INT_VRING);
        }
        Ok(())
    }
}

/// Stands behind the device while its disk is being replaced, and after a failed replacement:
/// every request fails with an I/O error rather than reaching a file.
struct Detached {
    size: u64,
    read_only: bool,
}

impl DiskBackend for Detached {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&mut self, _: u64, _: &[vm_memory::VolatileSlice<'_>]) -> std::io::Result<()> {
        Err(std::io::Error::other("the drive has no disk"))
    }

    fn write_vectored(&mut self, _: u64, _: &[vm_memory::VolatileSlice<'_>]) -> std::io::Result<()> {
        Err(std::io::Error::other("the drive has no disk"))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::other("the drive has no disk"))
    }

    fn id(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl Block {
    /// Puts the disk at `path` (in `format`, else the drive's current one) behind the device
    /// (PATCH /drives/{id}), its backing files where `policy` allows. The chain is checked
    /// first without taking locks; then the current disk is flushed and closed, so that its
    /// locks are gone when the new chain, which may hold its file as a backing layer, is
    /// opened. The new disk must have the same size and writability, since the guest already
    /// knows them; its id stays the old one for the same reason. If it cannot be opened, the
    /// old file goes back.
    pub fn update_disk(&mut self, path: &Path, format: Option<Format>, policy: &BackingPolicy) -> Result<(), BlockError> {
        let format = format.unwrap_or(self.config.format);
        overlay::info(path, format, policy)?;
        self.disk.flush().map_err(BlockError::Flush)?;
        let (size, read_only) = (self.disk.size(), self.disk.read_only());
        self.disk = Box::new(Detached { size, read_only });
        if let Err(e) = self.attach(path, format, policy) {
            let old = self.config.path.clone();
            if let Err(back) = self.attach(&old, self.config.format, policy) {
                let id = self.config.id.as_deref().unwrap_or_default();
                tracing::error!("drive {id}: cannot reopen {} either, its requests fail: {back}", old.display());
            }
            return Err(e);
        }
        self.config.path = path.to_owned();
        self.config.format = format;
        Ok(())
    }

    /// Puts the disk at `path` behind a device whose disk was detached.
    fn attach(&mut self, path: &Path, format: Format, policy: &BackingPolicy) -> Result<(), BlockError> {
        let (drive_size, drive_read_only) = (self.disk.size(), self.disk.read_only());
        let disk = disk::open(path, format, self.config.read_only, policy)?;
        if disk.size() != drive_size || disk.read_only() != drive_read_only {
            return Err(BlockError::Mismatch { size: disk.size(), read_only: disk.read_only(), drive_size, drive_read_only });
        }
        self.disk = disk;
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.config_space.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: write to read-only config at {offset:#x} ignored");
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), ActivateError> {
        let n = queues.len();
        let Some(mut queue) = queues.into_iter().next().filter(|_| n == 1) else {
            return Err(ActivateError::QueueCount(n, 1));
        };
        queue.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.active = Some(Active { mem, queue, interrupt });
        // Activated from a snapshot, the queue may hold requests the guest notified just before
        // the VM was paused and that were never served; the guest will not notify them again
        // (with EVENT_IDX, not even for later ones), so its disk would hang.
        self.process_queue(0);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut().filter(|_| index == 0) else {
            return;
        };
        if let Err(e) = Self::serve(active, self.disk.as_mut(), &self.id) {
            // A ring the guest corrupted: stop serving it until the driver resets the device.
            tracing::warn!("virtio-blk: queue broken by the guest, device stopped: {e}");
            self.active = None;
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.disk.flush()
    }
}

#[cfg(test)]
mod tests;
