//! A drive in a snapshot: what the guest knows of it (its id, flags and size) and its file's
//! format. No host path: a state file is not trusted to name host files, so a restore is given
//! the disk for every drive (a load's drive overrides, with a format of their own or the saved
//! one), and the disk's contents are not part of the snapshot.

use serde::{Deserialize, Serialize};

use super::{Block, BlockError};
use crate::config::DriveConfig;
use disk::{BackingPolicy, Format};
use crate::persist::Persist;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The API's drive_id.
    pub id: Option<String>,
    pub read_only: bool,
    pub root: bool,
    /// Bytes: a disk put in the saved one's place must have this size.
    pub size: u64,
    /// The format of the drive's file, as whoever configured it said.
    pub format: Format,
}

impl Persist for Block {
    type State = BlockState;
    /// The drive as the restore opens it (the path, flags and format the load gave for it),
    /// and where its backing files may lie.
    type ConstructorArgs = (DriveConfig, BackingPolicy);
    type Error = BlockError;

    fn save(&self) -> BlockState {
        let c = &self.config;
        BlockState { id: c.id.clone(), read_only: c.read_only, root: c.root, size: self.capacity(), format: c.format }
    }

    fn restore((drive, policy): (DriveConfig, BackingPolicy), state: &BlockState) -> Result<Self, BlockError> {
        let disk = disk::open(&drive.path, drive.format, drive.read_only, &policy)?;
        if disk.size() != state.size {
            return Err(BlockError::SavedSize { path: drive.path.clone(), len: disk.size(), expected: state.size });
        }
        Ok(Self::new(drive, disk))
    }
}
