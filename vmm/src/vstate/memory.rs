//! Guest RAM, backed by a memfd from the first instruction on: a snapshot can then write it
//! out, and a fork can freeze it and map it copy-on-write, without copying.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::arch::x86_64::boot_params::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a positive multiple of 2 MiB, got {0} MiB")]
    BadSize(u64),
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {mib} MiB: {source}")]
    Truncate { mib: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub file: Arc<File>,
    pub size: u64,
}

fn memfd(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Creates `mem_mib` MiB of guest RAM, laid out around the MMIO hole, in one memfd.
pub fn create(mem_mib: u64) -> Result<GuestRam, MemoryError> {
    if mem_mib == 0 || mem_mib % 2 != 0 {
        return Err(MemoryError::BadSize(mem_mib));
    }
    let size = mem_mib << 20;
    let file = memfd(c"ember-guest-ram").map_err(MemoryError::Memfd)?;
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { mib: mem_mib, source })?;
    let file = Arc::new(file);
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let mapping = MmapRegion::from_file(FileOffset::from_arc(file.clone(), file_offset), len as usize)
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Mmap(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        file_offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Mmap(e.to_string()))?;
    Ok(GuestRam { memory, file, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_backed_by_the_memfd() {
        let ram = create(4).unwrap();
        ram.memory.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory.last_addr(), GuestAddress((4 << 20) - 1));
    }

    #[test]
    fn odd_sizes_are_rejected() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(3), Err(MemoryError::BadSize(3))));
    }
}
