//! A raw disk image: the file is the disk, byte for byte. Reads and writes go straight between
//! the file and guest memory with `preadv`/`pwritev` (no bounce buffer), through the page
//! cache, so many sandboxes reading one base image share its pages.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

use super::{check_size, disk_id, open_image_file, read_only_error, DiskBackend, DiskError};

pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
    id: Vec<u8>,
}

impl RawDisk {
    /// Opens PATH; read-only opens it O_RDONLY.
    pub fn open(path: &Path, read_only: bool) -> Result<RawDisk, DiskError> {
        let file = open_image_file(path, !read_only, true, true)?;
        let meta = file.metadata().map_err(|error| DiskError::Io { path: path.into(), op: "stat", error })?;
        let size = meta.len();
        check_size(path, size)?;
        Ok(RawDisk { id: disk_id(path, &meta), file, size, read_only })
    }
}

/// Most iovecs one `preadv`/`pwritev` takes (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

/// Drops the first `n` bytes from `iovs`.
fn advance(iovs: &mut &mut [libc::iovec], mut n: usize) {
    while n > 0 {
        let first = &mut iovs[0];
        if n < first.iov_len {
            // SAFETY: stays within the buffer the iovec describes.
            first.iov_base = unsafe { (first.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            first.iov_len -= n;
            return;
        }
        n -= first.iov_len;
        let rest = std::mem::take(iovs);
        *iovs = &mut rest[1..];
    }
    while iovs.first().is_some_and(|v| v.iov_len == 0) {
        let rest = std::mem::take(iovs);
        *iovs = &mut rest[1..];
    }
}

/// Runs `op` (preadv or pwritev) until every byte of `iovs` is transferred.
fn transfer_all(
    mut iovs: &mut [libc::iovec],
    mut offset: u64,
    what: &str,
    op: impl Fn(*const libc::iovec, libc::c_int, libc::off_t) -> libc::ssize_t,
) -> io::Result<()> {
    advance(&mut iovs, 0);
    while !iovs.is_empty() {
        let cnt = iovs.len().min(IOV_MAX);
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset overflow"))?;
        let n = op(iovs.as_ptr(), cnt as libc::c_int, off);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{what} at byte {offset} hit the end of the file (was it truncated?)"),
            ));
        }
        advance(&mut iovs, n as usize);
        offset += n as u64;
    }
    Ok(())
}

/// Reads `bufs.len()` bytes of FILE at OFFSET straight into guest memory.
pub(crate) fn read_file_vectored(file: &File, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
    let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec { iov_base: g.as_ptr() as *mut libc::c_void, iov_len: g.len() })
        .collect();
    let fd = file.as_raw_fd();
    // SAFETY: every iovec describes guest memory kept mapped by `guards` for the whole call.
    transfer_all(&mut iovs, offset, "read", |iov, cnt, off| unsafe { libc::preadv(fd, iov, cnt, off) })?;
    for b in bufs {
        b.bitmap().mark_dirty(0, b.len());
    }
    Ok(())
}

/// Writes all of `bufs` from guest memory to FILE at OFFSET.
pub(crate) fn write_file_vectored(file: &File, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
    let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec { iov_base: g.as_ptr() as *mut libc::c_void, iov_len: g.len() })
        .collect();
    let fd = file.as_raw_fd();
    // SAFETY: every iovec describes guest memory kept mapped by `guards`; pwritev only reads it.
    transfer_all(&mut iovs, offset, "write", |iov, cnt, off| unsafe { libc::pwritev(fd, iov, cnt, off) })
}

impl DiskBackend for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        read_file_vectored(&self.file, offset, bufs)
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        write_file_vectored(&self.file, offset, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn round_trip_through_scattered_guest_memory() {
        let dir = tmpdir();
        let path = make_base(dir.as_path(), "disk.raw", 1 << 20);
        let before = std::fs::read(&path).unwrap();
        let mut disk = RawDisk::open(&path, false).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        let mem = guest_memory(1 << 20);

        // Three odd-sized segments scattered through guest memory, 5 sectors in all.
        let segs = [(0x1000u64, 700usize), (0x9000, 1200), (0x20000, 660)];
        let data: Vec<u8> = (0..2560u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut at = 0;
        for (addr, len) in segs {
            mem.write_slice(&data[at..at + len], GuestAddress(addr)).unwrap();
            at += len;
        }
        let bufs = slices(&mem, &segs);
        disk.write_vectored(0x3_0200, &bufs).unwrap();
        disk.flush().unwrap();

        let mut on_disk = vec![0u8; 2560];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut on_disk, 0x3_0200).unwrap();
        assert_eq!(on_disk, data);
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after[..0x3_0200], before[..0x3_0200]);
        assert_eq!(after[0x3_0200 + 2560..], before[0x3_0200 + 2560..]);

        // Read it back into other scattered places.
        let segs2 = [(0x40000u64, 512usize), (0x50003, 2048)];
        let bufs = slices(&mem, &segs2);
        disk.read_vectored(0x3_0200, &bufs).unwrap();
        let mut back = vec![0u8; 2560];
        mem.read_slice(&mut back[..512], GuestAddress(0x40000)).unwrap();
        mem.read_slice(&mut back[512..], GuestAddress(0x50003)).unwrap();
        assert_eq!(back, data);

        // The last sector of the disk, and an empty request.
        let bufs = slices(&mem, &[(0x60000, 512)]);
        disk.read_vectored((1 << 20) - 512, &bufs).unwrap();
        let mut last = vec![0u8; 512];
        mem.read_slice(&mut last, GuestAddress(0x60000)).unwrap();
        assert_eq!(last, before[(1 << 20) - 512..]);
        disk.read_vectored(0, &[]).unwrap();
    }

    #[test]
    fn many_segments_beyond_iov_max() {
        let dir = tmpdir();
        let path = make_base(dir.as_path(), "disk.raw", 4 << 20);
        let mut disk = RawDisk::open(&path, false).unwrap();
        let mem = guest_memory(4 << 20);
        let segs: Vec<(u64, usize)> = (0..1500).map(|i| (i * 1024, 512)).collect();
        for (i, (addr, len)) in segs.iter().enumerate() {
            mem.write_slice(&vec![(i % 251) as u8; *len], GuestAddress(*addr)).unwrap();
        }
        disk.write_vectored(512, &slices(&mem, &segs)).unwrap();
        let mut on_disk = vec![0u8; 1500 * 512];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut on_disk, 512).unwrap();
        for (i, chunk) in on_disk.chunks(512).enumerate() {
            assert!(chunk.iter().all(|b| *b == (i % 251) as u8), "segment {i}");
        }
    }

    #[test]
    fn read_only_refuses_writes_and_never_opens_for_writing() {
        let dir = tmpdir();
        let path = make_base(dir.as_path(), "disk.raw", 1 << 20);
        let sum = checksum(&path);
        let mut disk = RawDisk::open(&path, true).unwrap();
        let mem = guest_memory(1 << 20);
        let e = disk.write_vectored(0, &slices(&mem, &[(0, 512)])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        disk.flush().unwrap();
        // SAFETY: F_GETFL on an fd the disk owns; no memory is passed.
        let flags = unsafe { libc::fcntl(disk.file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(checksum(&path), sum);
    }

    #[test]
    fn reading_past_a_truncated_file_is_an_error() {
        let dir = tmpdir();
        let path = make_base(dir.as_path(), "disk.raw", 1 << 20);
        let mut disk = RawDisk::open(&path, true).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let mem = guest_memory(1 << 20);
        let e = disk.read_vectored(8192, &slices(&mem, &[(0, 512)])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
