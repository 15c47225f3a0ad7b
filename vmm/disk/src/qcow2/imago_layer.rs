//! Raw files and standard qcow2 layers (no subclusters), through the imago crate.
//!
//! Crash consistency: imago writes cached metadata back in a safe order (refcounts before the
//! L2 entries that use them; data before both), except when it allocates a new L2 table: it
//! writes the L1 entry at once while the table's refcount is still only in its cache, so a
//! process killed in that window leaves a cluster referenced with refcount 0 (corruption, not a
//! leak). ember therefore never lets imago allocate an L2 table at run time: a writable open
//! completes any missing ones (an overlay made by qemu-img, or by ember before it made
//! overlays with subclusters) and flushes before the guest runs.
//!
//! I/O: imago finds where each piece of a request lives; plain data, and writes into clusters
//! the overlay already holds, then move straight between guest memory and our own fd for the
//! file (`preadv`/`pwritev`); allocation and copy-on-write are imago's.

use std::fs::File;
use std::path::PathBuf;

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::{FormatAccess, Mapping, Storage, StorageExt};
use vm_memory::VolatileSlice;

use super::{sub_slices, zero, Extent, Header, L1_OFFSET_MASK};
use crate::raw::{read_file_vectored, write_file_vectored};

/// imago's view of a chain, with our own fd for each of its files.
pub(crate) struct ImagoImage {
    image: FormatAccess<ImagoFile>,
    files: LayerFiles,
}

impl ImagoImage {
    /// IMAGE, whose files are FDS (by the name imago knows each by).
    pub fn new(image: FormatAccess<ImagoFile>, fds: Vec<(PathBuf, File)>) -> ImagoImage {
        ImagoImage { image, files: LayerFiles { fds, known: Vec::new() } }
    }

    /// The image and the fds, to put the chain under another imago layer.
    pub fn into_parts(self) -> (FormatAccess<ImagoFile>, Vec<(PathBuf, File)>) {
        (self.image, self.files.fds)
    }

    pub fn size(&self) -> u64 {
        self.image.size()
    }

    pub fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        // imago says where each piece lives; plain data is read with preadv straight into
        // guest memory (imago's own read path costs more per request), the rest through imago.
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        while done < total {
            let at = offset + done as u64;
            let (mapping, len) = self.image.get_mapping(at, (total - done) as u64)?;
            let len = (len as usize).min(total - done);
            if len == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("read at {at} beyond the disk"),
                ));
            }
            let part = sub_slices(bufs, done, len);
            match mapping {
                Mapping::Raw { storage, offset: host, .. } => {
                    read_file_vectored(self.files.get(storage)?, host, &part)?;
                }
                Mapping::Zero { .. } => part.iter().for_each(zero),
                _ => {
                    let (iov, _mapped) = IoVectorMut::from_volatile_slice(&part[..]);
                    self.image.readv(iov, at)?;
                }
            }
            done += len;
        }
        Ok(())
    }

    pub fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        // Like imago's writev, but a write into clusters the overlay already holds goes
        // straight from guest memory to our fd; new clusters (allocation, copy-on-write from
        // the backing file) are left to imago.
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        while done < total {
            let at = offset + done as u64;
            let mapping = self.image.prepare_data_mapping(at, (total - done) as u64, true)?;
            let len = (mapping.length() as usize).min(total - done);
            let part = sub_slices(bufs, done, len);
            if mapping.is_nonblocking() {
                write_file_vectored(self.files.get(mapping.storage())?, mapping.offset(), &part)?;
            } else {
                let (iov, _mapped) = IoVector::from_volatile_slice(&part[..]);
                mapping.storage().writev(iov, mapping.offset())?;
            }
            self.image.commit_data_mapping(mapping)?;
            done += len;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        // Metadata caches to the file (refcounts before L2 tables), then fsync the file.
        self.image.flush()?;
        self.image.sync()
    }

    pub fn extent(&mut self, at: u64, max: u64) -> std::io::Result<(Extent<'_>, u64)> {
        let (mapping, len) = self.image.get_mapping(at, max)?;
        let extent = match mapping {
            Mapping::Raw { storage, offset, .. } => Extent::Data { file: self.files.get(storage)?, offset },
            Mapping::Zero { .. } | Mapping::Eof { .. } => Extent::Zero,
            _ => Extent::Encoded,
        };
        Ok((extent, len.min(max)))
    }
}

/// Makes sure every L2 table the disk needs exists, so that writes never make imago allocate
/// one (see the module comment); flushes and syncs when it had to add any. Returns the guest
/// offsets of the L2 ranges it added tables for.
pub(crate) fn complete_l2_tables(
    image: &mut FormatAccess<ImagoFile>,
    header: &Header,
    l1: &[u64],
) -> std::io::Result<Vec<u64>> {
    let mut added = Vec::new();
    let cov = header.l2_coverage();
    let mut start = 0;
    let mut i = 0;
    while start < header.size {
        if l1.get(i).is_none_or(|e| e & L1_OFFSET_MASK == 0) {
            // The range has no L2 table, so nothing in it is allocated: discarding its first
            // cluster back to the backing file changes no data, but creates the table.
            image.discard_to_backing(start, header.cluster_size().min(header.size - start))?;
            added.push(start);
        }
        start += cov;
        i += 1;
    }
    if !added.is_empty() {
        image.flush()?;
        image.sync()?;
    }
    Ok(added)
}

/// Our own fds for the files of a chain, found by the address of imago's storage object.
struct LayerFiles {
    fds: Vec<(PathBuf, File)>,
    /// (storage object address, index into `fds`)
    known: Vec<(usize, usize)>,
}

impl LayerFiles {
    fn get(&mut self, storage: &ImagoFile) -> std::io::Result<&File> {
        let key = storage as *const ImagoFile as usize;
        if let Some((_, i)) = self.known.iter().find(|(k, _)| *k == key) {
            return Ok(&self.fds[*i].1);
        }
        let name = storage.get_filename();
        let i = self
            .fds
            .iter()
            .position(|(p, _)| Some(p) == name.as_ref())
            .ok_or_else(|| std::io::Error::other(format!("imago maps to an unknown file {name:?}")))?;
        self.known.push((key, i));
        Ok(&self.fds[i].1)
    }
}
