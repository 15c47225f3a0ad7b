//! The vsock device in a snapshot: its CID and socket path. Its connections belonged to the
//! process that made the snapshot; a restored device starts without any and, once the
//! vCPUs exist, tells the guest so with a transport reset.

use super::{VsockError, VsockHandle};
use crate::config::VsockConfig;
use crate::devices::bus::lock;
use crate::persist::Persist;

impl Persist for VsockHandle {
    type State = VsockConfig;
    type ConstructorArgs = ();
    type Error = VsockError;

    fn save(&self) -> VsockConfig {
        let vsock = lock(&self.0);
        // The CID was checked to fit in 32 bits when the device was made.
        VsockConfig { cid: vsock.cid() as u32, uds: vsock.uds_path().to_owned() }
    }

    /// A device listening on `state.uds` (a socket of its own, not the saved process's).
    fn restore(_: (), state: &VsockConfig) -> Result<Self, VsockError> {
        VsockHandle::open(state)
    }
}
