//! A drive in a snapshot: what it was configured as and the size the guest knows. The disk's
//! contents are not part of it: a restore reopens the disk by path (or the override's).

use serde::{Deserialize, Serialize};

use super::{Block, BlockError};
use crate::config::DriveConfig;
use crate::persist::Persist;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive: DriveConfig,
    /// Bytes: a disk put in the saved one's place must have this size.
    pub size: u64,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = ();
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState { drive: self.config.clone(), size: self.capacity() }
    }

    fn restore(_: (), state: &BlockState) -> Result<Self, BlockError> {
        let drive = &state.drive;
        let disk = disk::open(&drive.path, drive.read_only)?;
        if disk.size() != state.size {
            return Err(BlockError::SavedSize { path: drive.path.clone(), len: disk.size(), expected: state.size });
        }
        Ok(Self::new(drive.clone(), disk))
    }
}
