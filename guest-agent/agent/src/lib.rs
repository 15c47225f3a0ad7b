//! ember's guest agent: serves exec, files, identity and dial requests from the host over vsock,
//! and forwards the guest's egress to the host's proxy once the host enables it.
//!
//! The protocol it speaks is the `agent_protocol` crate (`guest-agent/PROTOCOL.md`); this
//! crate is the server ([`server`]) and the system calls it needs ([`sys`]).

mod dial;
pub mod egress;
mod exec;
mod files;
pub mod server;
pub mod sys;
pub mod trust;
pub mod workers;

use std::io::{self, Read, Write};
use std::time::Duration;

/// A connected byte stream the server can run over: `UnixStream`, or the vsock stream.
pub trait Connection: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts down both directions (unblocks a reader on another handle).
    fn shutdown(&self);
    /// Shuts down the write side only: the peer reads end of file, and may still send.
    fn shutdown_write(&self);
    /// SO_RCVTIMEO: a read that waits longer fails with `WouldBlock`; `None` waits forever.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()>;
}

impl Connection for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn shutdown_write(&self) {
        let _ = std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Write);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_nonblocking(self, nonblocking)
    }
}

