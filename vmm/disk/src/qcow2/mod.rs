//! qcow2 layers and chains. ember reads and writes every qcow2 layer itself (`layer.rs`):
//! standard L2 entries (qemu-img's default) and extended ones (subclusters, the overlays ember
//! creates), so any layer can sit on any other.
//!
//! ember opens every layer of a chain itself (no library is ever asked to follow a file name
//! on its own): the top layer read-write or read-only, every backing layer O_RDONLY. Before a
//! layer is used, ember checks its header against the file (`header.rs`), that the file is long
//! enough for every structure it references (reading zeros past the end of a file would turn a
//! truncated overlay into silently missing data), and that the backing file lies where the
//! [`BackingPolicy`] allows, is a regular file and is no larger than the overlay's virtual size. A backing
//! file is opened in the format the layer records for it (QEMU's backing-format header
//! extension, `qemu-img create -F`), never in one guessed from its content; a layer that
//! records none is refused.

mod compressed;
mod create;
mod header;
mod l2;
mod layer;
mod refcounts;

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

pub(crate) use create::write_overlay;
use header::Header;
use layer::Layer;

use super::overlay::LayerInfo;
use super::{check_size, disk_id, open_image_file, read_only_error, BackingPolicy, DiskBackend, DiskError, Format};

/// Cluster size of the overlays ember creates (qemu-img's default): 32 subclusters of 2 KiB.
pub const CLUSTER_SIZE: u64 = 64 << 10;

/// Longest chain ember follows (base + frozen overlays + top).
const MAX_CHAIN: usize = 64;

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads up to `buf.len()` bytes at OFFSET; returns how many there were before the end.
fn read_full(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<usize, DiskError> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(DiskError::Io { path: path.into(), op: "read", error }),
        }
    }
    Ok(got)
}

/// A whole chain seen from its top layer.
pub(crate) enum Image {
    /// A raw file, read and written directly.
    Raw(RawLayer),
    /// A qcow2 layer over its backing chain.
    Qcow2(Box<Layer>),
}

/// Where a run of guest bytes lives.
pub(crate) enum Extent<'a> {
    /// In FILE at OFFSET, stored plainly.
    Data { file: &'a File, offset: u64 },
    /// Nowhere: it reads as zeros.
    Zero,
    /// Compressed: only a read through the chain gives the bytes.
    Encoded,
}

impl Image {
    pub fn size(&self) -> u64 {
        match self {
            Image::Raw(r) => r.size(),
            Image::Qcow2(q) => q.size(),
        }
    }

    pub fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        match self {
            Image::Raw(r) => r.read_vectored(offset, bufs),
            Image::Qcow2(q) => q.read_vectored(offset, bufs),
        }
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        match self {
            Image::Raw(r) => r.write_vectored(offset, bufs),
            Image::Qcow2(q) => q.write_vectored(offset, bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Image::Raw(r) => r.flush(),
            Image::Qcow2(q) => q.flush(),
        }
    }

    /// Where the guest bytes from AT on live, and for how many bytes (at most MAX, at least
    /// one unless AT is the end of the disk).
    pub fn extent(&mut self, at: u64, max: u64) -> std::io::Result<(Extent<'_>, u64)> {
        match self {
            Image::Raw(r) => r.extent(at, max),
            Image::Qcow2(q) => q.extent(at, max),
        }
    }
}

/// A raw file as a layer of a chain (its base, normally).
pub(crate) struct RawLayer {
    file: File,
    size: u64,
    writable: bool,
}

impl RawLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        super::raw::read_file_vectored(&self.file, offset, bufs)
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        super::raw::write_file_vectored(&self.file, offset, bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.writable {
            true => self.file.sync_data(),
            false => Ok(()),
        }
    }

    fn extent(&mut self, at: u64, max: u64) -> std::io::Result<(Extent<'_>, u64)> {
        Ok((Extent::Data { file: &self.file, offset: at }, max.min(self.size.saturating_sub(at))))
    }
}

/// An opened chain: the image seen from its top layer, and what ember learnt about each layer,
/// top first.
pub(crate) struct Chain {
    pub image: Image,
    pub layers: Vec<LayerInfo>,
    pub top_id: Vec<u8>,
}

/// Opens PATH in FORMAT and its whole backing chain, each backing file where POLICY allows it;
/// only the top layer may be writable; LOCK false opens without the advisory locks
/// (inspection only).
pub(crate) fn open_chain(
    path: &Path,
    format: Format,
    writable: bool,
    lock: bool,
    policy: &BackingPolicy,
) -> Result<Chain, DiskError> {
    let file = open_image_file(path, writable, lock, true)?;
    let mut walk = Walk { lock, policy, layers: Vec::new(), top_id: Vec::new() };
    let image = open_layer(path, file, format, writable, &mut walk)?;
    Ok(Chain { image, layers: walk.layers, top_id: walk.top_id })
}

/// What [`open_layer`] collects on its way down a chain.
struct Walk<'a> {
    lock: bool,
    policy: &'a BackingPolicy,
    layers: Vec<LayerInfo>,
    top_id: Vec<u8>,
}

/// Opens the layer in FILE (at PATH, in FORMAT), then its backing chain (locked like FILE).
fn open_layer(path: &Path, file: File, format: Format, writable: bool, walk: &mut Walk<'_>) -> Result<Image, DiskError> {
    let meta = file.metadata().map_err(|error| DiskError::Io { path: path.into(), op: "stat", error })?;
    let len = meta.len();
    if walk.layers.is_empty() {
        walk.top_id = disk_id(path, &meta);
    }
    let mut info = LayerInfo {
        path: std::path::absolute(path).unwrap_or_else(|_| path.into()),
        format,
        virtual_size: len,
        file_size: len,
        allocated_bytes: meta.blocks() * 512,
        backing: None,
        backing_format: None,
        cluster_size: None,
        subclusters: false,
    };

    if format == Format::Raw {
        walk.layers.push(info);
        return Ok(Image::Raw(RawLayer { file, size: len, writable }));
    }

    let header = Header::read(&file, path, len)?;
    info.virtual_size = header.size;
    info.cluster_size = Some(header.cluster_size());
    info.subclusters = header.extended_l2();
    info.backing = header.backing.as_ref().map(PathBuf::from);
    info.backing_format = header.backing_format.clone();
    walk.layers.push(info);

    let backing_image = match &header.backing {
        None => None,
        Some(backing) => Some(open_backing(path, &header, backing, walk)?),
    };
    Ok(Image::Qcow2(Box::new(Layer::open(file, path, &header, len, writable, backing_image)?)))
}

/// Opens BACKING, the backing file of the layer at PATH, read-only, in the format the layer
/// records for it, once the walk's policy allows where it lies; checks its size.
fn open_backing(path: &Path, header: &Header, backing: &str, walk: &mut Walk<'_>) -> Result<Image, DiskError> {
    let named = PathBuf::from(backing);
    let format = match &header.backing_format {
        None => return Err(DiskError::NoBackingFormat { path: path.into(), backing: named }),
        Some(recorded) => Format::from_name(recorded).ok_or_else(|| DiskError::UnknownBackingFormat {
            path: path.into(),
            backing: named.clone(),
            recorded: recorded.clone(),
        })?,
    };
    let backing_path = walk.policy.resolve(path, &named)?;
    if walk.layers.len() >= MAX_CHAIN || walk.layers.iter().any(|l| l.path == backing_path) {
        return Err(DiskError::ChainLoop { path: path.into(), backing: backing_path });
    }
    let backing_file = match open_image_file(&backing_path, false, walk.lock, false) {
        Err(DiskError::Open { error, .. }) => {
            return Err(DiskError::MissingBacking { path: path.into(), backing: backing_path, error })
        }
        other => other?,
    };
    let image = open_layer(&backing_path, backing_file, format, false, walk)?;
    // Smaller is how a disk is made larger than its image (the rest reads as zeros, as in
    // QEMU); larger means the backing file changed after the overlay was made.
    if image.size() > header.size {
        return Err(DiskError::BackingSize {
            path: path.into(),
            backing: backing_path,
            size: header.size,
            backing_size: image.size(),
        });
    }
    Ok(image)
}

/// A qcow2 disk: a writable (or read-only) top layer over its read-only backing chain.
pub struct Qcow2Disk {
    image: Image,
    size: u64,
    read_only: bool,
    id: Vec<u8>,
}

impl Qcow2Disk {
    /// Opens the qcow2 image at PATH, its backing files where POLICY allows them.
    pub fn open(path: &Path, read_only: bool, policy: &BackingPolicy) -> Result<Qcow2Disk, DiskError> {
        let chain = open_chain(path, Format::Qcow2, !read_only, true, policy)?;
        let size = chain.image.size();
        check_size(path, size)?;
        Ok(Qcow2Disk { image: chain.image, size, read_only, id: chain.top_id })
    }
}

impl DiskBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        self.image.read_vectored(offset, bufs)
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.image.write_vectored(offset, bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.image.flush()
    }

    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
}

/// BUFS[from..from+len] as slices: borrowed when that is all of BUFS.
fn sub_slices<'a, 'b>(
    bufs: &'a [VolatileSlice<'b>],
    from: usize,
    len: usize,
) -> Cow<'a, [VolatileSlice<'b>]> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if from == 0 && len == total {
        return Cow::Borrowed(bufs);
    }
    let mut out = Vec::new();
    let (mut pos, end) = (0, from + len);
    for b in bufs {
        let (start, stop) = (pos.max(from), (pos + b.len()).min(end));
        if start < stop {
            out.push(b.subslice(start - pos, stop - start).expect("within the slice"));
        }
        pos += b.len();
    }
    Cow::Owned(out)
}

fn zero(s: &VolatileSlice<'_>) {
    let g = s.ptr_guard_mut();
    // SAFETY: the guard keeps the guest memory mapped; it is `len` bytes long.
    unsafe { std::ptr::write_bytes(g.as_ptr(), 0, g.len()) };
    s.bitmap().mark_dirty(0, s.len());
}

#[cfg(test)]
mod subcluster_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod standard_tests;
#[cfg(test)]
mod header_tests;
