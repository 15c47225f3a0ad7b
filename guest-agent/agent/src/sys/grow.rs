//! Growing the root file system to the end of its disk. A sandbox may get a disk larger than
//! its image (`ember run --disk-gib`); the kernel grows a mounted ext4 online
//! (`EXT4_IOC_RESIZE_FS`, what resize2fs does), so the image needs no e2fsprogs. The ioctl is
//! only made when the disk is larger than the file system: even a no-op resize flushes the
//! journal, which would be a write at every boot (see ember-init on why a boot writes nothing).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use rustix::fs::{fstatfs, major, minor};

const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: u32 = 0x4008_6610;

/// What the superblock says of an ext4 file system's size.
#[derive(Debug, PartialEq, Eq)]
pub struct Ext4Size {
    pub block_size: u64,
    pub blocks: u64,
}

/// Reads the size from the 1024-byte ext4 superblock `sb` (it starts 1024 bytes into the
/// device): `s_blocks_count_lo`, `s_log_block_size`, and with the 64bit feature
/// `s_blocks_count_hi`. None when it is not an ext4 superblock.
pub fn ext4_size(sb: &[u8; 1024]) -> Option<Ext4Size> {
    let u16_at = |at: usize| u16::from_le_bytes([sb[at], sb[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().expect("4 bytes"));
    if u16_at(0x38) != EXT4_SUPER_MAGIC as u16 {
        return None;
    }
    let log = u32_at(0x18);
    // ext4 blocks are 1 KiB to 64 KiB.
    if log > 6 {
        return None;
    }
    const INCOMPAT_64BIT: u32 = 0x80;
    let hi = if u32_at(0x60) & INCOMPAT_64BIT != 0 { u64::from(u32_at(0x150)) } else { 0 };
    Some(Ext4Size { block_size: 1024 << log, blocks: hi << 32 | u64::from(u32_at(0x4)) })
}

/// Grows the ext4 file system mounted at `/` to the end of its disk, if the disk is larger.
/// Returns the old and new sizes in blocks when it grew it.
pub fn grow_root() -> io::Result<Option<(u64, u64)>> {
    let root = File::open("/")?;
    if fstatfs(&root)?.f_type as i64 != EXT4_SUPER_MAGIC {
        return Ok(None);
    }
    let dev = root.metadata()?.dev();
    let sysfs = format!("/sys/dev/block/{}:{}", major(dev), minor(dev));
    let sectors: u64 = std::fs::read_to_string(format!("{sysfs}/size"))?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{sysfs}/size: {e}")))?;
    let name = std::fs::read_to_string(format!("{sysfs}/uevent"))?
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{sysfs}/uevent names no device")))?;
    let mut sb = [0u8; 1024];
    File::open(format!("/dev/{name}"))?.read_exact_at(&mut sb, 1024)?;
    let Some(fs) = ext4_size(&sb) else {
        return Ok(None);
    };
    let want = sectors.saturating_mul(512) / fs.block_size;
    if want <= fs.blocks {
        return Ok(None);
    }
    let arg: u64 = want;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) from the pointer, which
    // points at `arg`, alive for the call; the fd is an open file of the file system.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&root), EXT4_IOC_RESIZE_FS as _, &arg as *const u64) };
    super::cvt(r)?;
    Ok(Some((fs.blocks, want)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks: u64, log: u32, bit64: bool) -> [u8; 1024] {
        let mut sb = [0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x4..0x8].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
        if bit64 {
            sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
            sb[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        }
        sb
    }

    #[test]
    fn superblock_sizes() {
        assert_eq!(ext4_size(&superblock(524_288, 2, true)), Some(Ext4Size { block_size: 4096, blocks: 524_288 }));
        assert_eq!(ext4_size(&superblock(5 << 32 | 7, 2, true)), Some(Ext4Size { block_size: 4096, blocks: 5 << 32 | 7 }));
        // Without the 64bit feature the high word is not part of the count.
        let mut no64 = superblock(1000, 0, false);
        no64[0x150] = 9;
        assert_eq!(ext4_size(&no64), Some(Ext4Size { block_size: 1024, blocks: 1000 }));
        assert_eq!(ext4_size(&[0u8; 1024]), None, "no magic");
        assert_eq!(ext4_size(&superblock(1000, 31, false)), None, "absurd block size");
    }
}
