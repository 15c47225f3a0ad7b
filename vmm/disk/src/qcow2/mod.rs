//! qcow2 overlays: ember's own layout (extended L2 entries, `subclusters.rs`), and standard
//! qcow2 through the imago crate (`imago_layer.rs`).
//!
//! ember opens every layer of a chain itself (no library is ever asked to follow a file name
//! on its own): the top layer read-write or read-only, every backing layer O_RDONLY. Before a
//! layer is used, ember checks that the file is long enough for every structure it references
//! (imago reads zeros past the end of a file, which would turn a truncated overlay into silently
//! missing data), that the backing file exists, has the recorded format, and has the overlay's
//! virtual size.
//!
//! Overlays ember creates have subclusters, which imago 0.2 cannot open: a first 4 KiB write
//! into a cluster then writes 4 KiB instead of copying the whole cluster from the backing layer.
//! ember reads and writes those layers itself (`subclusters.rs`); older overlays and ones made
//! by qemu-img go through imago. A layer with subclusters can sit on either kind; a standard
//! layer only on standard ones (imago needs its whole chain).

mod create;
mod imago_layer;
mod refcounts;
mod subclusters;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, StorageOpenOptions};
use std::borrow::Cow;
use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

pub(crate) use create::write_overlay;
use create::EXT_BACKING_FORMAT;
use imago_layer::{complete_l2_tables, ImagoImage};
use subclusters::SubclusterLayer;

use super::overlay::LayerInfo;
use super::{check_size, disk_id, open_image_file, probe_file, read_only_error, DiskBackend, DiskError, Format};

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

/// The parts of a qcow2 header ember checks and uses.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_entries: u64,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u64,
    pub snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    /// The backing file name and the format recorded for it.
    pub backing: Option<String>,
    pub backing_format: Option<String>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (subclusters).
    pub fn subclusters(&self) -> bool {
        self.incompatible & create::INCOMPAT_EXTENDED_L2 != 0
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }

    /// Reads and sanity-checks the header of the qcow2 file FILE (LEN bytes long).
    pub fn read(file: &File, path: &Path, len: u64) -> Result<Header, DiskError> {
        let bad = |reason: String| DiskError::Qcow2 { path: path.into(), reason };
        let truncated =
            |what: &str, end: u64| DiskError::Truncated { path: path.into(), what: what.into(), end, len };
        if len < 72 {
            return Err(truncated("header", 72));
        }
        let mut b = [0u8; 104];
        let n = read_full(file, &mut b[..len.min(104) as usize], 0, path)?;
        if b[..4] != super::QCOW2_MAGIC {
            return Err(bad("no qcow2 magic (QFI\\xfb) at the start of the file".into()));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!("unsupported qcow2 version {version}")));
        }
        let mut header_len = 72;
        if version == 3 {
            if n < 104 {
                return Err(truncated("header", 104));
            }
            header_len = be32(&b, 100) as u64;
            if len < header_len {
                return Err(truncated("header", header_len));
            }
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster size 2^{cluster_bits} is out of range")));
        }
        if be32(&b, 32) != 0 {
            return Err(bad("the image is encrypted".into()));
        }
        let backing_offset = be64(&b, 8);
        let backing_len = be32(&b, 16) as u64;
        if backing_offset != 0 && backing_offset.saturating_add(backing_len) > len {
            return Err(truncated("backing file name", backing_offset.saturating_add(backing_len)));
        }
        let v3 = |at: usize, v2: u64| if version == 3 { be64(&b, at) } else { v2 };
        let mut header = Header {
            cluster_bits,
            size: be64(&b, 24),
            l1_entries: be32(&b, 36) as u64,
            l1_offset: be64(&b, 40),
            reftable_offset: be64(&b, 48),
            reftable_clusters: be32(&b, 56) as u64,
            snapshots: be32(&b, 60),
            incompatible: v3(72, 0),
            autoclear: v3(88, 0),
            refcount_order: if version == 3 { be32(&b, 96) } else { 4 },
            backing: None,
            backing_format: None,
        };

        // Header extensions and the backing file name live in the first cluster.
        let first = header.cluster_size().min(len);
        if backing_offset.saturating_add(backing_len) > first || header_len > first {
            return Err(bad("its header does not fit in its first cluster".into()));
        }
        let mut c = vec![0u8; first as usize];
        read_full(file, &mut c, 0, path)?;
        let mut at = header_len.next_multiple_of(8) as usize;
        while at + 8 <= c.len() {
            let (kind, ext_len) = (be32(&c, at), be32(&c, at + 4) as usize);
            if kind == 0 {
                break;
            }
            let data = c.get(at + 8..at + 8 + ext_len).ok_or_else(|| bad("a header extension overruns the first cluster".into()))?;
            if kind == EXT_BACKING_FORMAT {
                let name = std::str::from_utf8(data).map_err(|_| bad("the backing format name is not UTF-8".into()))?;
                header.backing_format = Some(name.to_owned());
            }
            at += 8 + ext_len.next_multiple_of(8);
        }
        if backing_offset != 0 && backing_len != 0 {
            let name = &c[backing_offset as usize..(backing_offset + backing_len) as usize];
            let name = std::str::from_utf8(name).map_err(|_| bad("the backing file name is not UTF-8".into()))?;
            header.backing = Some(name.to_owned());
        }
        Ok(header)
    }

    /// Checks that every structure the image references lies inside the file: the L1 table,
    /// the refcount table and its blocks, every L2 table, and every data cluster. Returns the
    /// L1 table.
    pub fn check_structure(&self, file: &File, path: &Path, len: u64) -> Result<Vec<u64>, DiskError> {
        let truncated = |what: String, end: u64| DiskError::Truncated { path: path.into(), what, end, len };
        let cs = self.cluster_size();

        let l1_end = self.l1_offset.saturating_add(self.l1_entries * 8);
        if l1_end > len {
            return Err(truncated("L1 table".into(), l1_end));
        }
        let mut l1_bytes = vec![0u8; (self.l1_entries * 8) as usize];
        read_full(file, &mut l1_bytes, self.l1_offset, path)?;
        let l1: Vec<u64> = l1_bytes.chunks(8).map(|c| be64(c, 0)).collect();

        let rt_len = self.reftable_clusters * cs;
        let rt_end = self.reftable_offset.saturating_add(rt_len);
        if rt_end > len {
            return Err(truncated("refcount table".into(), rt_end));
        }
        let mut rt = vec![0u8; rt_len as usize];
        read_full(file, &mut rt, self.reftable_offset, path)?;
        for (i, e) in rt.chunks(8).enumerate() {
            let off = be64(e, 0) & REFTABLE_OFFSET_MASK;
            if off != 0 && off + cs > len {
                return Err(truncated(format!("refcount block {i}"), off + cs));
            }
        }

        let mut l2 = vec![0u8; cs as usize];
        for (i, e) in l1.iter().enumerate() {
            let l2_off = e & L1_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off + cs > len {
                return Err(truncated(format!("L2 table {i}"), l2_off + cs));
            }
            read_full(file, &mut l2, l2_off, path)?;
            for (j, entry) in l2.chunks(8).enumerate() {
                let entry = be64(entry, 0);
                let guest = i as u64 * self.l2_coverage() + j as u64 * cs;
                if entry & L2_COMPRESSED != 0 || guest >= self.size {
                    continue;
                }
                let host = entry & L1_OFFSET_MASK;
                let needed = cs.min(self.size - guest);
                if host != 0 && host + needed > len {
                    return Err(truncated(
                        format!("data cluster for guest offset {guest:#x}"),
                        host + needed,
                    ));
                }
            }
        }
        Ok(l1)
    }
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
    /// A standard qcow2 layer with its backing chain (all opened by imago).
    Imago(ImagoImage),
    /// A layer with subclusters over its backing chain.
    Subclusters(Box<SubclusterLayer>),
}

/// Where a run of guest bytes lives.
pub(crate) enum Extent<'a> {
    /// In FILE at OFFSET, stored plainly.
    Data { file: &'a File, offset: u64 },
    /// Nowhere: it reads as zeros.
    Zero,
    /// Encoded (compressed): only a read through the chain gives the bytes.
    Encoded,
}

impl Image {
    pub fn size(&self) -> u64 {
        match self {
            Image::Raw(r) => r.size(),
            Image::Imago(i) => i.size(),
            Image::Subclusters(s) => s.size(),
        }
    }

    pub fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        match self {
            Image::Raw(r) => r.read_vectored(offset, bufs),
            Image::Imago(i) => i.read_vectored(offset, bufs),
            Image::Subclusters(s) => s.read_vectored(offset, bufs),
        }
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        match self {
            Image::Raw(r) => r.write_vectored(offset, bufs),
            Image::Imago(i) => i.write_vectored(offset, bufs),
            Image::Subclusters(s) => s.write_vectored(offset, bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Image::Raw(r) => r.flush(),
            Image::Imago(i) => i.flush(),
            Image::Subclusters(s) => s.flush(),
        }
    }

    /// Where the guest bytes from AT on live, and for how many bytes (at most MAX, at least
    /// one unless AT is the end of the disk).
    pub fn extent(&mut self, at: u64, max: u64) -> std::io::Result<(Extent<'_>, u64)> {
        match self {
            Image::Raw(r) => r.extent(at, max),
            Image::Imago(i) => i.extent(at, max),
            Image::Subclusters(s) => s.extent(at, max),
        }
    }
}

/// A raw file as a layer of a chain (its base, normally).
pub(crate) struct RawLayer {
    file: File,
    path: PathBuf,
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

    /// The same file as imago sees it, to go under a standard qcow2 layer.
    fn into_imago(self) -> std::io::Result<ImagoImage> {
        let opts = StorageOpenOptions::new().filename(&self.path).write(self.writable);
        let fds = vec![(self.path, self.file.try_clone()?)];
        let raw = Raw::open_image(ImagoFile::from_open_file(self.file, opts)?, self.writable)?;
        Ok(ImagoImage::new(FormatAccess::new(raw), fds))
    }
}

/// An opened chain: the image seen from its top layer, and what ember learnt about each layer,
/// top first.
pub(crate) struct Chain {
    pub image: Image,
    pub layers: Vec<LayerInfo>,
    pub top_id: Vec<u8>,
}

/// Opens PATH (in FORMAT, or probed) and its whole backing chain; only the top layer may be
/// writable; LOCK false opens without the advisory locks (inspection only).
pub(crate) fn open_chain(
    path: &Path,
    format: Option<Format>,
    writable: bool,
    lock: bool,
) -> Result<Chain, DiskError> {
    let file = open_image_file(path, writable, lock)?;
    let format = match format {
        Some(f) => f,
        None => probe_file(&file, path)?,
    };
    let mut walk = Walk { lock, layers: Vec::new(), top_id: Vec::new() };
    let image = open_layer(path, file, format, writable, &mut walk)?;
    Ok(Chain { image, layers: walk.layers, top_id: walk.top_id })
}

/// What [`open_layer`] collects on its way down a chain.
struct Walk {
    lock: bool,
    layers: Vec<LayerInfo>,
    top_id: Vec<u8>,
}

/// Opens the layer in FILE (at PATH, in FORMAT), then its backing chain (locked like FILE).
fn open_layer(path: &Path, file: File, format: Format, writable: bool, walk: &mut Walk) -> Result<Image, DiskError> {
    let imago_err = |e: std::io::Error| DiskError::Qcow2 { path: path.into(), reason: e.to_string() };
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
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    let dup = || file.try_clone().map_err(|error| DiskError::Io { path: path.into(), op: "dup", error });

    if format == Format::Raw {
        walk.layers.push(info);
        return Ok(Image::Raw(RawLayer { file, path: path.into(), size: len, writable }));
    }

    let header = Header::read(&file, path, len)?;
    info.virtual_size = header.size;
    info.cluster_size = Some(header.cluster_size());
    info.subclusters = header.subclusters();
    info.backing = header.backing.as_ref().map(PathBuf::from);
    info.backing_format = header.backing_format.clone();
    walk.layers.push(info);

    // A standard layer is handed to imago before its backing chain is opened; a layer with
    // subclusters takes its backing image when it opens.
    let mut standard = None;
    if !header.subclusters() {
        let l1 = header.check_structure(&file, path, len)?;
        let fds = vec![(path.to_path_buf(), dup()?)];
        let storage = ImagoFile::from_open_file(dup()?, opts).map_err(imago_err)?;
        let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, writable).map_err(imago_err)?;
        if qcow2.requires_external_data_file() {
            return Err(DiskError::Qcow2 { path: path.into(), reason: "external data files are not supported".into() });
        }
        qcow2.set_data_file(None);
        standard = Some((qcow2, fds, l1));
    }

    let backing_image = match &header.backing {
        None => None,
        Some(backing) => Some(open_backing(path, &header, backing, walk)?),
    };

    let Some((mut qcow2, mut fds, l1)) = standard else {
        let layer = SubclusterLayer::open(file, path, &header, len, writable, backing_image)?;
        return Ok(Image::Subclusters(Box::new(layer)));
    };
    let backing_image = match backing_image {
        None => None,
        Some(Image::Raw(r)) => Some(r.into_imago().map_err(imago_err)?),
        Some(Image::Imago(b)) => Some(b),
        Some(Image::Subclusters(_)) => {
            return Err(DiskError::Qcow2 {
                path: path.into(),
                reason: format!(
                    "its backing file {} has subclusters (extended L2 entries), which ember reads only \
                     under a layer that has them too; make the overlay with `ember disk create`",
                    header.backing.as_deref().unwrap_or_default()
                ),
            })
        }
    };
    match backing_image {
        None => qcow2.set_backing(None),
        Some(b) => {
            let (image, backing_fds) = b.into_parts();
            qcow2.set_backing(Some(image));
            fds.extend(backing_fds);
        }
    }
    let mut image = FormatAccess::new(qcow2);
    if writable {
        complete_l2_tables(&mut image, &header, &l1)
            .map_err(|e| DiskError::Qcow2 { path: path.into(), reason: format!("cannot add L2 tables: {e}") })?;
    }
    Ok(Image::Imago(ImagoImage::new(image, fds)))
}

/// Opens BACKING, the backing file of the layer at PATH, read-only, and checks it against what
/// the layer recorded.
fn open_backing(path: &Path, header: &Header, backing: &str, walk: &mut Walk) -> Result<Image, DiskError> {
    let backing_path = match Path::new(backing) {
        p if p.is_absolute() => p.to_path_buf(),
        p => path.parent().unwrap_or(Path::new(".")).join(p),
    };
    let abs = std::path::absolute(&backing_path).unwrap_or_else(|_| backing_path.clone());
    if walk.layers.len() >= MAX_CHAIN || walk.layers.iter().any(|l| l.path == abs) {
        return Err(DiskError::ChainLoop { path: path.into(), backing: backing_path });
    }
    let backing_file = match open_image_file(&backing_path, false, walk.lock) {
        Err(DiskError::Open { error, .. }) => {
            return Err(DiskError::MissingBacking { path: path.into(), backing: backing_path, error })
        }
        other => other?,
    };
    let actual = probe_file(&backing_file, &backing_path)?;
    if let Some(recorded) = &header.backing_format {
        if Format::from_name(recorded) != Some(actual) {
            return Err(DiskError::BackingFormat {
                path: path.into(),
                backing: backing_path,
                recorded: recorded.clone(),
                actual,
            });
        }
    }
    let image = open_layer(&backing_path, backing_file, actual, false, walk)?;
    if image.size() != header.size {
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
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2Disk, DiskError> {
        let chain = open_chain(path, Some(Format::Qcow2), !read_only, true)?;
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
