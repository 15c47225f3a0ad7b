//! File descriptors carried with the API's requests and responses (`SCM_RIGHTS`): how a fork's
//! children get the parent's frozen memory without any access to the parent's `/proc`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most descriptors one request or response carries: a fork's memory file and its layers
/// (one per generation of forks of a restored VM), with room to spare. The kernel's own limit
/// per message is 253.
pub const MAX_FDS: usize = 64;

/// Control-message room for `MAX_FDS` descriptors, aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; 512]);

const _: () = assert!(std::mem::size_of::<libc::cmsghdr>() + MAX_FDS * std::mem::size_of::<RawFd>() <= 512);

/// Sends `bytes` (some of them: the count is returned, as `write` would) with `fds` attached to
/// the first of them.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!("{} file descriptors, at most {MAX_FDS} go with one message", fds.len())));
    }
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut cmsg = CmsgBuf([0; 512]);
    // SAFETY: a zeroed msghdr is a valid empty one; its pointers are set below to buffers that
    // outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as _;
        // SAFETY: msg_control points at a buffer of msg_controllen bytes (checked above to
        // hold MAX_FDS descriptors), aligned for cmsghdr; CMSG_FIRSTHDR is then non-null and
        // CMSG_DATA has room for `fds.len()` descriptors.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(data_len) as _;
            let data = libc::CMSG_DATA(header).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg is fully set up over live buffers; the result is checked.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What one [`recv`] got.
#[derive(Debug, Default)]
pub struct Received {
    pub bytes: usize,
    /// Descriptors came that did not fit (more than `MAX_FDS` in one message): the kernel
    /// closed those, so the message cannot be what its sender meant.
    pub truncated: bool,
}

/// Reads into `buf`, appending the descriptors that came with the bytes to `fds` (close-on-exec,
/// owned: dropping them closes them).
pub fn recv(socket: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cmsg = CmsgBuf([0; 512]);
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: msg is set up over live buffers; the result is checked.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed control
    // messages; each SCM_RIGHTS one holds (cmsg_len - CMSG_LEN(0)) / 4 new descriptors, which
    // this process now owns.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let len = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    Ok(Received { bytes: n as usize, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_the_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(b"shared").unwrap();
        assert_eq!(send(a.as_fd(), b"hello", &[file.as_fd(), file.as_fd()]).unwrap(), 5);
        let (mut buf, mut fds) = ([0u8; 16], Vec::new());
        let got = recv(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((&buf[..got.bytes], got.truncated, fds.len()), (&b"hello"[..], false, 2));
        let mut received = std::fs::File::from(fds.remove(0));
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared");
        // SAFETY: F_GETFD on a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "received descriptors are close-on-exec");
        let too_many = vec![file.as_fd(); MAX_FDS + 1];
        assert!(send(a.as_fd(), b"x", &too_many).is_err());
    }
}
