//! The AF_VSOCK listener the host connects to, its streams, and the streams the guest opens
//! to the host (egress).

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::net::{
    accept_with, bind, connect, listen, send, shutdown, socket_with, AddressFamily, SendFlags,
    Shutdown, SocketFlags, SocketType,
};

use crate::Connection;

/// A connected AF_VSOCK stream.
pub struct VsockStream(OwnedFd);

/// The host's CID, the one every VM reaches its host at.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

impl VsockStream {
    /// A stream to `port` of `cid` (the host: [`HOST_CID`]). The kernel bounds the wait for
    /// the peer's answer (2 s by default); a port nobody serves is refused at once.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket_with(AddressFamily::VSOCK, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        loop {
            match connect(&fd, &VsockAddr::new(cid, port)) {
                Ok(()) => return Ok(VsockStream(fd)),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(rustix::io::read(&self.0, buf)?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A host that went away must be an error here, not a SIGPIPE that kills the agent.
        Ok(send(&self.0, buf, SendFlags::NOSIGNAL)?)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream(self.0.try_clone()?))
    }
    fn shutdown(&self) {
        let _ = shutdown(&self.0, Shutdown::Both);
    }
    fn shutdown_write(&self) {
        let _ = shutdown(&self.0, Shutdown::Write);
    }
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_socket_timeout(&self.0, rustix::net::sockopt::Timeout::Recv, timeout)?)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        Ok(rustix::io::ioctl_fionbio(&self.0, nonblocking)?)
    }
}

/// A listening AF_VSOCK socket bound to any CID on `port`.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket_with(
            AddressFamily::VSOCK,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        bind(&fd, &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, 64)?;
        Ok(VsockListener(fd))
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            match accept_with(&self.0, SocketFlags::CLOEXEC) {
                Ok(fd) => return Ok(VsockStream(fd)),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A `sockaddr_vm`, which rustix has no type for.
struct VsockAddr(libc::sockaddr_vm);

impl VsockAddr {
    fn new(cid: u32, port: u32) -> Self {
        // SAFETY: sockaddr_vm is plain integers (and padding), for which all zeroes is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = cid;
        VsockAddr(addr)
    }
}

// SAFETY: `f` gets a pointer to the whole sockaddr_vm, which lives for the call, with its
// size as the length: readable for that length and a valid AF_VSOCK address.
unsafe impl SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        let len = std::mem::size_of::<libc::sockaddr_vm>() as SocketAddrLen;
        f((&self.0 as *const libc::sockaddr_vm).cast(), len)
    }
}
