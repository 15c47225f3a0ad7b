//! The `ember` commands that talk to a sandbox's guest agent (exec, cp, tunnel), `expose` (through `ember serve`), those on
//! templates and images, and egress (the run flags, `ember egress`, the proxy process).

pub mod cp;
pub mod egress;
pub mod egress_proxy;
pub mod exec;
pub mod expose;
pub mod image;
pub mod serve;
pub mod start;
pub mod template;
pub mod tunnel;
mod terminal;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use sandbox::Store;

/// Exit status for ember's own failures in `exec` and `cp`, as distinct from a command's.
pub const EXIT_EMBER_ERROR: u8 = 125;

/// Where a command reaches the guest agent: a sandbox by name, or a VM's vsock socket.
pub fn agent_socket(store: &Store, name: Option<&str>, uds: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match (uds, name) {
        (Some(uds), _) => Ok(uds.clone()),
        (None, Some(name)) => Ok(store.vsock_socket(name)?),
        (None, None) => anyhow::bail!("name a sandbox or pass --uds"),
    }
}

pub fn connect(socket: &std::path::Path, port: u32) -> anyhow::Result<UnixStream> {
    Ok(agent_client::connect(socket, port, Duration::from_secs(10))?)
}
