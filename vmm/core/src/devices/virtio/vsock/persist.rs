//! The vsock device in a snapshot: its CID. Not its socket path: a state file is not trusted to
//! name host files, so a restore is given the socket to listen on. Its connections belonged to
//! the process that made the snapshot; a restored device starts without any and, once the
//! vCPUs exist, tells the guest so with a transport reset.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{VsockError, VsockHandle};
use crate::config::VsockConfig;
use crate::devices::bus::lock;
use crate::persist::Persist;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u32,
}

impl Persist for VsockHandle {
    type State = VsockState;
    /// The socket to listen on, and the CID if it is to change.
    type ConstructorArgs = (PathBuf, Option<u32>);
    type Error = VsockError;

    fn save(&self) -> VsockState {
        // The CID was checked to fit in 32 bits when the device was made.
        VsockState { cid: lock(&self.0).cid() as u32 }
    }

    /// A device listening on a socket of its own, not the saved process's.
    fn restore((uds, cid): (PathBuf, Option<u32>), state: &VsockState) -> Result<Self, VsockError> {
        VsockHandle::open(&VsockConfig { cid: cid.unwrap_or(state.cid), uds })
    }
}
