//! Guest memory to and from the snapshot's memory file: an image of guest RAM in the memfd's
//! layout (RAM below the MMIO hole, then the rest), sparse where the guest's pages are zero.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::vstate::freeze::data_extents;
use crate::vstate::memory::{self, Backing, GuestRam};

const PAGE: usize = 4096;

/// Writes `bytes` (which start at file offset `offset`) to `out`, leaving out zero pages.
fn write_nonzero_pages(out: &File, offset: u64, bytes: &[u8]) -> std::io::Result<u64> {
    let mut written = 0;
    let mut run_start = None;
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * PAGE),
            (true, Some(start)) => {
                out.write_all_at(&bytes[start..i * PAGE], offset + start as u64)?;
                written += (i * PAGE - start) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        out.write_all_at(&bytes[start..], offset + start as u64)?;
        written += (bytes.len() - start) as u64;
    }
    Ok(written)
}

/// Writes guest RAM to a new file at `path`; returns the bytes of data written (the file's
/// other pages are holes). The vCPUs must be stopped.
pub fn write(ram: &GuestRam, path: &Path) -> Result<u64, SnapshotError> {
    let io = |e| SnapshotError::Io { path: path.to_owned(), what: "write guest memory to", source: e };
    let out = crate::files::create_new(path).map_err(io)?;
    out.set_len(ram.size).map_err(io)?;
    let extents = match ram.backing {
        // Asking the memfd rather than reading the mapping keeps untouched RAM from being
        // allocated just to be found zero.
        Backing::Memfd => data_extents(&ram.file, ram.size).map_err(io)?,
        // A private mapping's written pages are in the process, not the file: read them all.
        Backing::PrivateFile => vec![(0, ram.size)],
    };
    let mut written = 0;
    for region in ram.memory.iter() {
        let region_start = region.file_offset().map(|f| f.start()).unwrap_or(0);
        let region_end = region_start + region.len();
        for &(start, end) in &extents {
            let (start, end) = (start.max(region_start), end.min(region_end));
            if start >= end {
                continue;
            }
            // SAFETY: the range lies inside the region's live mapping, which `ram` keeps alive;
            // with the vCPUs stopped nothing writes it while it is read.
            let bytes = unsafe {
                std::slice::from_raw_parts(region.as_ptr().add((start - region_start) as usize), (end - start) as usize)
            };
            written += write_nonzero_pages(&out, start, bytes).map_err(io)?;
        }
    }
    out.sync_all().map_err(io)?;
    Ok(written)
}

/// Maps the memory file `file` (`name` in errors) as `size` bytes of guest RAM, privately,
/// after checking its size; then each of `layers` over it where the layer holds data (a fork's
/// frozen RAM; each is checked to be as large as RAM).
pub fn map(file: File, name: &str, layers: Vec<File>, size: u64) -> Result<GuestRam, SnapshotError> {
    let len = file
        .metadata()
        .map_err(|e| SnapshotError::Io { path: name.into(), what: "stat", source: e })?
        .len();
    if len != size {
        return Err(SnapshotError::MemorySize { name: name.to_owned(), len, expected: size });
    }
    let mut ram = memory::map_private(file, size)?;
    ram.map_layers(layers)?;
    Ok(ram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn memory_round_trips_sparsely_and_restores_privately() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let ram = memory::create(64).unwrap();
        ram.memory.write_obj(0xfeed_u64, GuestAddress(0x1000)).unwrap();
        ram.memory.write_obj(0xbeef_u64, GuestAddress(0x3ff_fff8)).unwrap();
        // A touched page that is zero again is left out too.
        ram.memory.write_obj(1u8, GuestAddress(0x20_0000)).unwrap();
        ram.memory.write_obj(0u8, GuestAddress(0x20_0000)).unwrap();
        let written = write(&ram, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);
        assert!(allocated_bytes(&path) < 1 << 20, "the file is sparse");

        let open = |p: &Path| File::open(p).unwrap();
        let restored = map(open(&path), "memory", Vec::new(), 64 << 20).unwrap();
        assert_eq!(restored.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);
        assert_eq!(restored.memory.read_obj::<u64>(GuestAddress(0x3ff_fff8)).unwrap(), 0xbeef);
        restored.memory.write_obj(0x77u64, GuestAddress(0x5000)).unwrap();

        // A restored VM's own snapshot includes what it wrote since.
        let again = dir.as_path().join("memory2");
        assert_eq!(write(&restored, &again).unwrap(), 3 * PAGE as u64);
        let second = map(open(&again), "memory2", Vec::new(), 64 << 20).unwrap();
        assert_eq!(second.memory.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0x77);
        assert_eq!(second.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = map(File::open(&path).unwrap(), "memory", Vec::new(), 64 << 20).err().unwrap().to_string();
        assert!(err.contains("memory file memory is 4096 bytes") && err.contains("67108864"), "{err}");
    }
}
