//! A drive in a snapshot: what it was configured as (its file's format included) and the size
//! the guest knows. The disk's contents are not part of it: a restore reopens the disk by path
//! (or the override's), in the saved format (or the override's).

use serde::{Deserialize, Serialize};

use super::{Block, BlockError};
use crate::config::DriveConfig;
use disk::BackingPolicy;
use crate::persist::Persist;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive: DriveConfig,
    /// Bytes: a disk put in the saved one's place must have this size.
    pub size: u64,
}

impl Persist for Block {
    type State = BlockState;
    /// Where the disk's backing files may lie.
    type ConstructorArgs = BackingPolicy;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState { drive: self.config.clone(), size: self.capacity() }
    }

    fn restore(policy: BackingPolicy, state: &BlockState) -> Result<Self, BlockError> {
        let drive = &state.drive;
        let disk = disk::open(&drive.path, drive.format, drive.read_only, &policy)?;
        if disk.size() != state.size {
            return Err(BlockError::SavedSize { path: drive.path.clone(), len: disk.size(), expected: state.size });
        }
        Ok(Self::new(drive.clone(), disk))
    }
}
