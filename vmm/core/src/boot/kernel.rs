//! Loading an ELF `vmlinux` and an initramfs into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::layout::HIMEM_START;

const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel { path: PathBuf, source: std::io::Error },
    #[error("kernel {0} is not an ELF vmlinux (ember boots the uncompressed ELF image, not a bzImage)")]
    NotElf(PathBuf),
    #[error("kernel {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("guest memory ({mem_mib} MiB) is too small for kernel {path}, which needs {needed_mib} MiB")]
    TooSmall { path: PathBuf, mem_mib: u64, needed_mib: u64 },
    #[error("cannot load kernel {path}: {source}")]
    Load { path: PathBuf, source: linux_loader::loader::Error },
    #[error("cannot open initramfs {path}: {source}")]
    OpenInitrd { path: PathBuf, source: std::io::Error },
    #[error("initramfs {path} ({size_mib} MiB) does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooLarge { path: PathBuf, size_mib: u64 },
    #[error("cannot read initramfs {path} into guest memory: {reason}")]
    LoadInitrd { path: PathBuf, reason: String },
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    pub entry: u64,
    /// First byte above the loaded image.
    pub end: u64,
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The highest physical address the kernel's loadable segments reach, from its program headers
/// (ELF64 field offsets), so that a too-small VM is reported as such rather than as a failed
/// copy. Loading itself is linux-loader's.
fn image_end(file: &mut File, path: &Path) -> Result<u64, KernelError> {
    const EHDR_LEN: usize = 64;
    const PHDR_LEN: usize = 56;
    const PT_LOAD: u32 = 1;
    let malformed = |reason: String| KernelError::Malformed { path: path.to_owned(), reason };
    let mut ehdr = [0u8; EHDR_LEN];
    read_at(file, 0, &mut ehdr).map_err(|_| KernelError::NotElf(path.to_owned()))?;
    if ehdr[..4] != *b"\x7fELF" {
        return Err(KernelError::NotElf(path.to_owned()));
    }
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(malformed("not a 64-bit little-endian ELF file".into()));
    }
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 0x20), u16_at(&ehdr, 0x36), u16_at(&ehdr, 0x38));
    if phentsize as usize != PHDR_LEN {
        return Err(malformed(format!("program header size {phentsize}")));
    }
    let mut end = 0u64;
    for i in 0..phnum as u64 {
        let mut ph = [0u8; PHDR_LEN];
        read_at(file, phoff + i * PHDR_LEN as u64, &mut ph)
            .map_err(|e| malformed(format!("program header {i}: {e}")))?;
        if u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes")) == PT_LOAD {
            let seg_end = u64_at(&ph, 0x18)
                .checked_add(u64_at(&ph, 0x28))
                .ok_or_else(|| malformed(format!("segment {i} wraps around the address space")))?;
            end = end.max(seg_end);
        }
    }
    if end == 0 {
        return Err(malformed("no loadable segment".into()));
    }
    Ok(end)
}

/// Loads the ELF kernel at the physical addresses it names.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::OpenKernel { path: path.to_owned(), source })?;
    let end = image_end(&mut file, path)?;
    let mem_size = mem.last_addr().0 + 1;
    if end > mem_size {
        return Err(KernelError::TooSmall {
            path: path.to_owned(),
            mem_mib: mem_size >> 20,
            needed_mib: end.div_ceil(1 << 20),
        });
    }
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| KernelError::Load { path: path.to_owned(), source })?;
    Ok(LoadedKernel { entry: result.kernel_load.0, end: result.kernel_end })
}

/// Places the initramfs at the top of the RAM below 4 GiB that holds the kernel, page aligned,
/// where the kernel will not decompress over it. Returns (guest address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    low_ram_end: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), KernelError> {
    let mut file = File::open(path).map_err(|source| KernelError::OpenInitrd { path: path.to_owned(), source })?;
    let size = file
        .metadata()
        .map_err(|source| KernelError::OpenInitrd { path: path.to_owned(), source })?
        .len();
    let too_large = || KernelError::InitrdTooLarge { path: path.to_owned(), size_mib: size.div_ceil(1 << 20) };
    let addr = low_ram_end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| KernelError::LoadInitrd { path: path.to_owned(), reason: e.to_string() })?;
    Ok((addr, size))
}
