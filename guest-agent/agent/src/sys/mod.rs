//! The Linux calls the agent needs: the process reaper, ptys, users, identity hooks, init
//! mode, growing the root file system and AF_VSOCK sockets. Through rustix wherever it
//! has the call; libc is left for what it lacks (the passwd/group databases, `waitid`'s pid,
//! signals by raw number, the ext4 resize and random-device ioctls, the vsock address).

mod grow;
mod identity;
mod init;
mod pty;
mod reaper;
mod user;
mod vsock;

use std::io;

use agent_protocol::ErrorKind;
use rustix::io::Errno;

pub use grow::{ext4_size, grow_root, Ext4Size};
pub use identity::{add_entropy, power_off, set_clock, set_hostname};
pub use init::{init_mounts, set_subreaper};
pub use pty::{eof_char, make_controlling_tty, open_pty, set_pty_size};
pub use reaper::{kill, pidfd_open, Reaper, SpawnGuard};
pub use user::lookup_user;
pub use vsock::{VsockListener, VsockStream, HOST_CID};

/// Maps an I/O error to the protocol's error kind.
pub fn error_kind(e: &io::Error) -> ErrorKind {
    match Errno::from_io_error(e) {
        Some(Errno::NOENT) => ErrorKind::NotFound,
        Some(Errno::ACCESS) | Some(Errno::PERM) => ErrorKind::PermissionDenied,
        Some(Errno::EXIST) => ErrorKind::AlreadyExists,
        Some(Errno::ISDIR) => ErrorKind::IsADirectory,
        Some(Errno::NOTDIR) => ErrorKind::NotADirectory,
        _ => ErrorKind::Io,
    }
}

/// A libc call's `-1`-and-errno result as an `io::Result`.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
