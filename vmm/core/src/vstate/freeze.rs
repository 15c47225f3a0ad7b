//! Freezing guest RAM for a fork, and mapping frozen RAM in the children.
//!
//! A fork must not copy guest memory. A VM booted cold has its RAM in a memfd mapped shared:
//! freezing remaps that memfd privately in place (`MAP_FIXED` at the same addresses, so KVM's
//! memory slots stay valid and its MMU notifiers drop the old translations) and seals it
//! against writes; parent and children then all map the one sealed memfd copy-on-write. A VM
//! that already runs on a private mapping (restored, or forked before) has written some pages
//! since its files were frozen: those pages alone are written to a new sealed memfd, a layer,
//! which the parent remaps in their place; children map the base and then each layer where it
//! holds data. Either way the cost follows the pages written, not the size of RAM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{memfd, Backing, GuestRam, MemoryError};

const PAGE: u64 = 4096;

/// More separate runs of written pages than this make a layer that would cost too many
/// mappings (the kernel allows 65530 per process by default, and every fork adds its layers).
const MAX_LAYER_RUNS: usize = 16384;

/// The files that together hold a frozen RAM image: `base` over all of it, then each of
/// `layers` where it holds data. All are sealed (or, for a snapshot's memory file, never
/// written by ember).
pub struct FrozenRam {
    pub base: Arc<File>,
    pub layers: Vec<Arc<File>>,
}

fn freeze_err(what: &'static str) -> impl FnOnce(std::io::Error) -> MemoryError {
    move |source| MemoryError::Freeze { what, source }
}

/// Byte ranges of `file` (of `size` bytes) that hold data; holes read as zeros.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on an fd this function borrows; the result is checked.
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r as u64) }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let start = match seek(offset, libc::SEEK_DATA) {
            Ok(start) => start,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.min(size);
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

/// Calls `f(host address, file offset, length)` for the part of each RAM region that the file
/// byte range `[start, end)` covers.
fn for_each_mapped(
    ram: &GuestRam,
    (start, end): (u64, u64),
    mut f: impl FnMut(*mut u8, u64, u64) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    for region in ram.memory.iter() {
        let region_start = region.file_offset().map(|o| o.start()).unwrap_or(0);
        let (s, e) = (start.max(region_start), end.min(region_start + region.len()));
        if s < e {
            // SAFETY: `s - region_start` lies inside the region's mapping.
            let host = unsafe { region.as_ptr().add((s - region_start) as usize) };
            f(host, s, e - s)?;
        }
    }
    Ok(())
}

/// Replaces the mapping at `host` with a private mapping of `file` at `offset`.
fn map_private_at(host: *mut u8, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: `host..host+len` lies inside a mapping of guest RAM that this process owns and
    // keeps; MAP_FIXED replaces it there with the same length, so no other mapping is touched.
    // The vCPUs and devices are stopped (or not started), so nothing uses the range meanwhile.
    let r = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if r == libc::MAP_FAILED { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn seal(file: &File) -> std::io::Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd we borrow; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs of pages of the private mapping that the process wrote (copied on write: anonymous
/// pages, present or swapped out), as file byte ranges, from /proc/self/pagemap.
fn written_runs(ram: &GuestRam) -> std::io::Result<Vec<(u64, u64)>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    const CHUNK: usize = 8192;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut entries = vec![0u8; CHUNK * 8];
    for region in ram.memory.iter() {
        let region_start = region.file_offset().map(|o| o.start()).unwrap_or(0);
        let first_page = region.as_ptr() as u64 / PAGE;
        let pages = region.len() / PAGE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK as u64) as usize;
            pagemap.read_exact_at(&mut entries[..n * 8], (first_page + done) * 8)?;
            for (i, entry) in entries[..n * 8].chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(entry.try_into().expect("8-byte chunk"));
                let written = (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) || e & SWAPPED != 0;
                if !written {
                    continue;
                }
                let offset = region_start + (done + i as u64) * PAGE;
                match runs.last_mut() {
                    Some((_, end)) if *end == offset => *end += PAGE,
                    _ => runs.push((offset, offset + PAGE)),
                }
            }
            done += n as u64;
        }
    }
    Ok(runs)
}

impl GuestRam {
    /// Freezes RAM as it is now into files a fork's children can map, and has this VM run on
    /// on a private mapping of them. The vCPUs and devices must be stopped.
    pub fn freeze(&mut self) -> Result<FrozenRam, MemoryError> {
        match self.backing {
            Backing::Memfd => {
                let file = self.file.clone();
                for_each_mapped(self, (0, self.size), |host, offset, len| {
                    map_private_at(host, &file, offset, len).map_err(freeze_err("remap guest RAM privately"))
                })?;
                self.backing = Backing::PrivateFile;
                seal(&self.file).map_err(freeze_err("seal the guest memory file"))?;
            }
            Backing::PrivateFile => {
                let runs = written_runs(self).map_err(freeze_err("read /proc/self/pagemap"))?;
                if runs.len() > MAX_LAYER_RUNS {
                    return Err(MemoryError::Freeze {
                        what: "too fragmented",
                        source: std::io::Error::other(format!(
                            "the guest wrote {} separate runs of pages since it was restored or forked, more than {MAX_LAYER_RUNS}",
                            runs.len()
                        )),
                    });
                }
                if !runs.is_empty() {
                    let layer = memfd(c"ember-guest-ram-layer").map_err(freeze_err("create a memory layer"))?;
                    layer.set_len(self.size).map_err(freeze_err("size a memory layer"))?;
                    for &run in &runs {
                        for_each_mapped(self, run, |host, offset, len| {
                            // SAFETY: the range lies inside a live mapping of guest RAM, which
                            // nothing writes while the vCPUs and devices are stopped.
                            let bytes = unsafe { std::slice::from_raw_parts(host, len as usize) };
                            layer.write_all_at(bytes, offset).map_err(freeze_err("write a memory layer"))
                        })?;
                    }
                    seal(&layer).map_err(freeze_err("seal a memory layer"))?;
                    for &run in &runs {
                        for_each_mapped(self, run, |host, offset, len| {
                            map_private_at(host, &layer, offset, len).map_err(freeze_err("map a memory layer"))
                        })?;
                    }
                    self.layers.push(Arc::new(layer));
                }
            }
        }
        Ok(FrozenRam { base: self.file.clone(), layers: self.layers.clone() })
    }

    /// Maps `layers` over RAM where each holds data, in order: RAM becomes what a frozen VM's
    /// RAM was. Each layer must be exactly as large as RAM.
    pub fn map_layers(&mut self, layers: Vec<File>) -> Result<(), MemoryError> {
        for (index, layer) in layers.into_iter().enumerate() {
            let bad = |reason: String| MemoryError::Layer { index, reason };
            let len = layer.metadata().map_err(|e| bad(format!("cannot stat it: {e}")))?.len();
            if len != self.size {
                return Err(bad(format!("it is {len} bytes, guest RAM is {}", self.size)));
            }
            let extents = data_extents(&layer, len).map_err(|e| bad(format!("cannot find its data: {e}")))?;
            for extent in extents {
                for_each_mapped(self, extent, |host, offset, len| {
                    map_private_at(host, &layer, offset, len).map_err(|e| bad(format!("cannot map it: {e}")))
                })?;
            }
            self.layers.push(Arc::new(layer));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create, map_private};
    use vm_memory::{Bytes, GuestAddress};

    fn reopen(file: &File) -> File {
        File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap()
    }

    /// A child as a fork makes one: the frozen files opened anew, base then layers.
    fn child(frozen: &FrozenRam, size: u64) -> GuestRam {
        let mut ram = map_private(reopen(&frozen.base), size).unwrap();
        ram.map_layers(frozen.layers.iter().map(|l| reopen(l)).collect()).unwrap();
        ram
    }

    fn read(ram: &GuestRam, addr: u64) -> u64 {
        ram.memory.read_obj::<u64>(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn a_frozen_memfd_is_shared_copy_on_write_by_parent_and_children() {
        let size = 64 << 20;
        let mut parent = create(64).unwrap();
        parent.memory.write_obj(11u64, GuestAddress(0x1000)).unwrap();
        parent.memory.write_obj(12u64, GuestAddress(0x3ff_f000)).unwrap();
        let frozen = parent.freeze().unwrap();
        assert_eq!(parent.backing, Backing::PrivateFile);
        assert!(frozen.layers.is_empty(), "a memfd freezes in place, without a copy");
        assert!(
            frozen.base.write_at(b"x", 0).is_err(),
            "the frozen memfd is sealed against writes"
        );

        let a = child(&frozen, size);
        let b = child(&frozen, size);
        assert_eq!((read(&a, 0x1000), read(&a, 0x3ff_f000)), (11, 12), "a child sees the parent's RAM");
        parent.memory.write_obj(21u64, GuestAddress(0x1000)).unwrap();
        a.memory.write_obj(31u64, GuestAddress(0x1000)).unwrap();
        assert_eq!(read(&parent, 0x1000), 21);
        assert_eq!(read(&a, 0x1000), 31);
        assert_eq!(read(&b, 0x1000), 11, "one's write is invisible to the others");
    }

    #[test]
    fn a_private_mapping_freezes_its_written_pages_into_a_layer() {
        let size = 64 << 20;
        let mut parent = create(64).unwrap();
        parent.memory.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        parent.memory.write_obj(2u64, GuestAddress(0x2000)).unwrap();
        let first = parent.freeze().unwrap();

        parent.memory.write_obj(3u64, GuestAddress(0x2000)).unwrap();
        parent.memory.write_obj(4u64, GuestAddress(0x3000)).unwrap();
        parent.memory.write_obj(5u64, GuestAddress(0x200_0000)).unwrap();
        let second = parent.freeze().unwrap();
        assert_eq!(second.layers.len(), 1);
        let extents = data_extents(&second.layers[0], size).unwrap();
        assert_eq!(extents, vec![(0x2000, 0x4000), (0x200_0000, 0x200_1000)], "only the written pages");

        let old = child(&first, size);
        let new = child(&second, size);
        assert_eq!((read(&old, 0x1000), read(&old, 0x2000), read(&old, 0x3000)), (1, 2, 0));
        assert_eq!(
            (read(&new, 0x1000), read(&new, 0x2000), read(&new, 0x3000), read(&new, 0x200_0000)),
            (1, 3, 4, 5)
        );
        // The parent's pages now come from the layer, and it writes on copy-on-write again.
        assert!(written_runs(&parent).unwrap().is_empty());
        parent.memory.write_obj(6u64, GuestAddress(0x2000)).unwrap();
        assert_eq!(read(&new, 0x2000), 3);
        // A grandchild: a child frozen in turn.
        let mut grand_parent = child(&second, size);
        grand_parent.memory.write_obj(7u64, GuestAddress(0x5000)).unwrap();
        let third = grand_parent.freeze().unwrap();
        assert_eq!(third.layers.len(), 2);
        let grandchild = child(&third, size);
        assert_eq!((read(&grandchild, 0x2000), read(&grandchild, 0x5000)), (3, 7));
    }

    #[test]
    fn a_layer_of_the_wrong_size_is_refused() {
        let mut ram = create(4).unwrap();
        let small = memfd(c"small").unwrap();
        small.set_len(4096).unwrap();
        let err = ram.map_layers(vec![small]).unwrap_err().to_string();
        assert!(err.contains("memory layer 0") && err.contains("4096 bytes"), "{err}");
    }
}
