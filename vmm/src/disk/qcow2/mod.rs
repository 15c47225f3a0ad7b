//! qcow2 overlays on the imago crate.
//!
//! ember opens every layer of a chain itself (imago is never asked to follow a file name on
//! its own): the top layer read-write or read-only, every backing layer O_RDONLY. Before imago
//! sees a layer, ember checks what imago does not: that the file is long enough for every
//! structure it references (imago reads zeros past the end of a file, which would turn a
//! truncated overlay into silently missing data), that the backing file exists, has the
//! recorded format, and has the overlay's virtual size.
//!
//! Crash consistency: imago writes cached metadata back in a safe order (refcounts before the
//! L2 entries that use them; data before both), except when it allocates a new L2 table: it
//! writes the L1 entry at once while the table's refcount is still only in its cache, so a
//! process killed in that window leaves a cluster referenced with refcount 0 (corruption, not a
//! leak). ember therefore never lets imago allocate an L2 table at run time: `create` makes
//! every L2 table the disk needs (zeroed, hole-punched), and a writable open completes any
//! missing ones (an overlay made by qemu-img) and flushes before the guest runs.
//!
//! I/O: imago finds where each piece of a request lives; plain data, and writes into clusters
//! the overlay already holds, then move straight between guest memory and our own fd for the
//! file (`preadv`/`pwritev`); allocation and copy-on-write are imago's.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, Mapping, Storage, StorageExt, StorageOpenOptions};
use std::borrow::Cow;
use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

use super::overlay::LayerInfo;
use super::raw::{read_file_vectored, write_file_vectored};
use super::{
    check_size, disk_id, open_image_file, probe_file, read_only_error, DiskBackend, DiskError, Format,
};

/// Cluster size of the overlays ember creates (qemu-img's default).
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

/// The parts of a qcow2 header ember checks before handing the file to imago.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_entries: u64,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u64,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
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
        if version == 3 {
            if n < 104 {
                return Err(truncated("header", 104));
            }
            let header_len = be32(&b, 100) as u64;
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
        Ok(Header {
            cluster_bits,
            size: be64(&b, 24),
            l1_entries: be32(&b, 36) as u64,
            l1_offset: be64(&b, 40),
            reftable_offset: be64(&b, 48),
            reftable_clusters: be32(&b, 56) as u64,
        })
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

/// An opened chain: imago's view of the top layer (with all its backing layers attached) and
/// what ember learnt about each layer, top first.
pub(crate) struct Chain {
    pub image: FormatAccess<ImagoFile>,
    pub layers: Vec<LayerInfo>,
    /// A read-only duplicate of every layer's fd, by the file name imago knows it by.
    pub fds: Vec<(PathBuf, File)>,
    /// The top layer's header and L1 table, when it is qcow2.
    pub top_qcow2: Option<(Header, Vec<u64>)>,
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
    let mut walk = Walk { lock, layers: Vec::new(), fds: Vec::new(), top_qcow2: None, top_id: Vec::new() };
    let image = open_layer(path, file, format, writable, &mut walk)?;
    Ok(Chain { image, layers: walk.layers, fds: walk.fds, top_qcow2: walk.top_qcow2, top_id: walk.top_id })
}

/// What [`open_layer`] collects on its way down a chain.
struct Walk {
    lock: bool,
    layers: Vec<LayerInfo>,
    fds: Vec<(PathBuf, File)>,
    top_qcow2: Option<(Header, Vec<u64>)>,
    top_id: Vec<u8>,
}

/// Opens the layer in FILE (at PATH, in FORMAT), then its backing chain (locked like FILE).
fn open_layer(
    path: &Path,
    file: File,
    format: Format,
    writable: bool,
    walk: &mut Walk,
) -> Result<FormatAccess<ImagoFile>, DiskError> {
    let imago_err = |e: std::io::Error| DiskError::Qcow2 { path: path.into(), reason: e.to_string() };
    let meta = file.metadata().map_err(|error| DiskError::Io { path: path.into(), op: "stat", error })?;
    let len = meta.len();
    let is_top = walk.layers.is_empty();
    let mut info = LayerInfo {
        path: std::path::absolute(path).unwrap_or_else(|_| path.into()),
        format,
        virtual_size: len,
        file_size: len,
        allocated_bytes: meta.blocks() * 512,
        backing: None,
        backing_format: None,
    };
    let opts = StorageOpenOptions::new().filename(path).write(writable);
    walk.fds.push((
        path.to_path_buf(),
        file.try_clone().map_err(|error| DiskError::Io { path: path.into(), op: "dup", error })?,
    ));

    if format == Format::Raw {
        let storage = ImagoFile::from_open_file(file, opts).map_err(imago_err)?;
        let raw = Raw::open_image(storage, writable).map_err(imago_err)?;
        if is_top {
            walk.top_id = disk_id(path, &meta);
        }
        walk.layers.push(info);
        return Ok(FormatAccess::new(raw));
    }

    let header = Header::read(&file, path, len)?;
    let l1 = header.check_structure(&file, path, len)?;
    if is_top {
        walk.top_qcow2 = Some((header.clone(), l1));
        walk.top_id = disk_id(path, &meta);
    }
    let storage = ImagoFile::from_open_file(file, opts).map_err(imago_err)?;
    let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, writable).map_err(imago_err)?;
    if qcow2.requires_external_data_file() {
        return Err(DiskError::Qcow2 {
            path: path.into(),
            reason: "external data files are not supported".into(),
        });
    }
    qcow2.set_data_file(None);
    info.virtual_size = header.size;
    let backing = qcow2.implicit_backing_file().cloned();
    let recorded = qcow2.implicit_backing_format().cloned();
    info.backing = backing.as_ref().map(PathBuf::from);
    info.backing_format = recorded.clone();
    walk.layers.push(info);

    let Some(backing) = backing else {
        qcow2.set_backing(None);
        return Ok(FormatAccess::new(qcow2));
    };
    let backing_path = match Path::new(&backing) {
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
    if let Some(recorded) = &recorded {
        if Format::from_name(recorded) != Some(actual) {
            return Err(DiskError::BackingFormat {
                path: path.into(),
                backing: backing_path,
                recorded: recorded.clone(),
                actual,
            });
        }
    }
    let backing_image = open_layer(&backing_path, backing_file, actual, false, walk)?;
    if backing_image.size() != header.size {
        return Err(DiskError::BackingSize {
            path: path.into(),
            backing: backing_path,
            size: header.size,
            backing_size: backing_image.size(),
        });
    }
    qcow2.set_backing(Some(backing_image));
    Ok(FormatAccess::new(qcow2))
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

/// A qcow2 disk: a writable (or read-only) top layer over its read-only backing chain.
pub struct Qcow2Disk {
    image: FormatAccess<ImagoFile>,
    files: LayerFiles,
    size: u64,
    read_only: bool,
    id: Vec<u8>,
}

impl Qcow2Disk {
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2Disk, DiskError> {
        let chain = open_chain(path, Some(Format::Qcow2), !read_only, true)?;
        let mut image = chain.image;
        let size = image.size();
        check_size(path, size)?;
        if !read_only {
            let (header, l1) = chain.top_qcow2.as_ref().expect("a qcow2 top layer has a header");
            complete_l2_tables(&mut image, header, l1).map_err(|e| DiskError::Qcow2 {
                path: path.into(),
                reason: format!("cannot add L2 tables: {e}"),
            })?;
        }
        Ok(Qcow2Disk {
            image,
            files: LayerFiles { fds: chain.fds, known: Vec::new() },
            size,
            read_only,
            id: chain.top_id,
        })
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
                Mapping::Zero { .. } => {
                    for s in part.iter() {
                        zero(s);
                    }
                }
                _ => {
                    let (iov, _mapped) = IoVectorMut::from_volatile_slice(&part[..]);
                    self.image.readv(iov, at)?;
                }
            }
            done += len;
        }
        Ok(())
    }

    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
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

    fn flush(&mut self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Metadata caches to the file (refcounts before L2 tables), then fsync the file.
        self.image.flush()?;
        self.image.sync()
    }

    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
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
mod tests;
