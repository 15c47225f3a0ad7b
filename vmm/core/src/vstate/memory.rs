//! Guest RAM, backed by a memfd from the first instruction on: a snapshot can then write it
//! out, and a fork can freeze it and map it copy-on-write, without copying. A restored VM's RAM
//! is the snapshot's memory file mapped privately: pages are read in as the guest touches them,
//! and its writes stay in the process (copy-on-write), never reaching the file. A fork freezes
//! RAM in place ([`freeze`](crate::vstate::freeze)): the memfd is sealed and mapped privately,
//! and parent and children share it copy-on-write.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
    #[error("cannot freeze guest memory: {what}: {source}")]
    Freeze { what: &'static str, source: std::io::Error },
    #[error("memory layer {index}: {reason}")]
    Layer { index: usize, reason: String },
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// The base file, mapped over all of RAM.
    pub file: Arc<File>,
    pub size: u64,
    pub backing: Backing,
    /// Files mapped privately over `file` where they hold data, in order: what forks of a
    /// restored VM froze (the pages it had written by then).
    pub layers: Vec<Arc<File>>,
}

/// What the file behind guest RAM holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A memfd mapped shared: the file is the guest's memory.
    Memfd,
    /// A snapshot's memory file (or a frozen memfd, with its layers) mapped privately: the
    /// files hold the memory as the snapshot or fork left it; pages the guest wrote since live
    /// only in the mapping.
    PrivateFile,
}

/// A memfd that can be sealed, so that a frozen one is known never to change.
pub(crate) fn memfd(name: &std::ffi::CStr) -> std::io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Where the host keeps the policy for huge pages in shared memory.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Whether the host gives a shared mapping that asks for huge pages any, from its
/// `shmem_enabled` (the chosen value in brackets): none for `never` and `deny`.
pub fn shmem_huge_pages(setting: &str) -> Option<bool> {
    let chosen = setting.split_whitespace().find(|w| w.starts_with('['))?;
    Some(!matches!(chosen.trim_matches(|c| c == '[' || c == ']'), "never" | "deny"))
}

/// What to tell the user of a host that gives guest RAM no huge pages (boots are slower), if
/// that is this host (a jailed VMM cannot tell: it sees no /sys).
pub fn huge_page_hint() -> Option<String> {
    let setting = std::fs::read_to_string(SHMEM_THP).ok()?;
    (shmem_huge_pages(&setting) == Some(false)).then(|| {
        format!("guest RAM gets no huge pages on this host ({SHMEM_THP} is never); `advise` there makes boots faster")
    })
}

/// Creates `mem_mib` MiB of guest RAM, laid out around the MMIO hole, in one memfd.
pub fn create(mem_mib: u64) -> Result<GuestRam, MemoryError> {
    if mem_mib == 0 || mem_mib % 2 != 0 {
        return Err(MemoryError::BadSize(mem_mib));
    }
    if let Some(hint) = huge_page_hint() {
        tracing::info!("{hint}");
    }
    let size = mem_mib << 20;
    let file = memfd(c"ember-guest-ram").map_err(MemoryError::Memfd)?;
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { mib: mem_mib, source })?;
    map(Arc::new(file), size, Backing::Memfd)
}

/// Maps `file` (a snapshot's memory file of exactly `size` bytes, checked by the caller) as
/// guest RAM, privately and without reading it.
pub fn map_private(file: File, size: u64) -> Result<GuestRam, MemoryError> {
    if size == 0 || size % (2 << 20) != 0 {
        return Err(MemoryError::BadSize(size >> 20));
    }
    map(Arc::new(file), size, Backing::PrivateFile)
}

/// Maps the guest's RAM ranges from consecutive offsets of `file`.
fn map(file: Arc<File>, size: u64, backing: Backing) -> Result<GuestRam, MemoryError> {
    let flags = match backing {
        Backing::Memfd => libc::MAP_SHARED | libc::MAP_NORESERVE,
        // NORESERVE: a private mapping would otherwise charge the whole size against the
        // commit limit up front, though most of it is never written.
        Backing::PrivateFile => libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    };
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let len_bytes = usize::try_from(len).map_err(|_| MemoryError::Mmap(format!("a region of {len} bytes")))?;
        let mapping = MmapRegionBuilder::new(len_bytes)
            .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        if backing == Backing::Memfd {
            // Huge pages where the host gives shared memory any (shmem_enabled `advise` or
            // `within_size`): a booting guest then faults its RAM in 2 MiB at a time, and KVM
            // maps it so. A fork does not pay for them: once frozen, this file is mapped
            // privately, and a write to a huge page of a private file mapping copies 4 KiB.
            // SAFETY: the range is the mapping just made; MADV_HUGEPAGE only sets a policy on it.
            let rc = unsafe { libc::madvise(mapping.as_ptr().cast(), len_bytes, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                tracing::debug!("guest RAM at {start:#x}: madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
            }
        }
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Mmap(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        file_offset = file_offset
            .checked_add(len)
            .ok_or_else(|| MemoryError::Mmap(format!("the region at {start:#x} ends past the file's largest offset")))?;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Mmap(e.to_string()))?;
    Ok(GuestRam { memory, file, size, backing, layers: Vec::new() })
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
    fn a_private_mapping_reads_the_file_and_keeps_its_writes_to_itself() {
        let ram = create(4).unwrap();
        ram.memory.write_obj(0x1122_3344u32, GuestAddress(0x2000)).unwrap();
        let copy = memfd(c"copy").unwrap();
        copy.set_len(4 << 20).unwrap();
        let mut page = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut page, 0x2000).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&copy, &page, 0x2000).unwrap();
        let restored = map_private(copy.try_clone().unwrap(), 4 << 20).unwrap();
        assert_eq!(restored.backing, Backing::PrivateFile);
        assert_eq!(restored.memory.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x1122_3344);
        restored.memory.write_obj(7u32, GuestAddress(0x2000)).unwrap();
        assert_eq!(restored.memory.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 7);
        std::os::unix::fs::FileExt::read_exact_at(&copy, &mut page, 0x2000).unwrap();
        assert_eq!(u32::from_le_bytes(page), 0x1122_3344, "the file is untouched");
    }

    #[test]
    fn the_hosts_shmem_setting_is_read_from_its_brackets() {
        assert_eq!(shmem_huge_pages("always within_size advise [never] deny force"), Some(false));
        assert_eq!(shmem_huge_pages("always within_size [advise] never deny force"), Some(true));
        assert_eq!(shmem_huge_pages("[deny] never"), Some(false));
        assert_eq!(shmem_huge_pages("always advise never"), None);
    }

    #[test]
    fn odd_sizes_are_rejected() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(3), Err(MemoryError::BadSize(3))));
    }
}
