//! Disks: what a virtio-blk device reads and writes.
//!
//! Every sandbox boots from one shared, read-only base image (a raw ext4 file) and writes only
//! to its own thin qcow2 overlay; a fork freezes an overlay and stacks a new one on it
//! (base ← frozen overlay ← overlay). [`open`] gives the device a [`DiskBackend`] for either
//! kind of file: [`raw`] reads and writes the file directly, [`qcow2`] opens the whole backing
//! chain read-only and reads and writes every qcow2 layer itself. [`overlay`] creates,
//! inspects and flattens overlays (`ember disk ...`). `README.md` next to this file says why
//! qcow2, and why ember's own implementation of it.
//!
//! A file's format is never guessed from its content: a guest writes every byte of a raw disk,
//! and a qcow2 header it planted there would name a host file as backing. The caller says
//! which format a file is; a qcow2 layer's header says which format its backing file is; and
//! a backing file must lie under a directory of the [`BackingPolicy`].

pub mod overlay;
pub mod qcow2;
pub mod raw;
pub mod regular;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod trust_tests;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

/// A disk as the block device sees it: a flat array of bytes.
pub trait DiskBackend: Send {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Reads exactly the total length of `bufs` starting at `offset` (the caller guarantees offset+len <= size).
    fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()>;
    /// Writes exactly the total length of `bufs` at `offset`. Err on a read-only disk.
    fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()>;
    /// Makes every completed write durable (fdatasync / qcow2 metadata flush + sync).
    fn flush(&mut self) -> std::io::Result<()>;
    /// A short stable identifier of the disk for VIRTIO_BLK_T_GET_ID (max 20 bytes), e.g. derived from the file name/inode.
    fn id(&self) -> Vec<u8>;
}

/// The first bytes of every qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Disk sizes and offsets are in units of this.
pub const SECTOR_SIZE: u64 = 512;

/// On-disk formats ember reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name qemu-img uses, and the one recorded as a qcow2 backing format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a recorded backing format ("file" is QEMU's old name for raw).
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" | "file" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }

    /// The format a file name's extension says: `.qcow2`, or `.raw`, `.img` and `.ext4` for
    /// raw; None for any other name (the caller must then be told the format).
    pub fn from_extension(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "qcow2" => Some(Format::Qcow2),
            "raw" | "img" | "ext4" => Some(Format::Raw),
            _ => None,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown disk format '{s}' (expected raw or qcow2)")),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {error}")]
    Open { path: PathBuf, error: io::Error },
    #[error("disk image {path} is in use: it is open elsewhere{}", if *.writing { " for writing" } else { "" })]
    Locked { path: PathBuf, writing: bool },
    #[error("{path}: {op}: {error}")]
    Io { path: PathBuf, op: &'static str, error: io::Error },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize { path: PathBuf, size: u64 },
    #[error(
        "{path} cannot be {size} bytes: its base {base} is {base_size} bytes, and a disk is never \
         smaller than its image (ask for at least that much)"
    )]
    SmallerThanBase { path: PathBuf, size: u64, base: PathBuf, base_size: u64 },
    #[error("{path} is not a usable qcow2 image: {reason}")]
    Qcow2 { path: PathBuf, reason: String },
    #[error(
        "qcow2 image {path} is truncated: its {what} ends at byte {end}, but the file has only {len} bytes"
    )]
    Truncated { path: PathBuf, what: String, end: u64, len: u64 },
    #[error("qcow2 image {path}: cannot open its backing file {backing}: {error}")]
    MissingBacking { path: PathBuf, backing: PathBuf, error: io::Error },
    #[error(
        "qcow2 image {path} does not record the format of its backing file {backing}, and ember \
         never guesses a format from a file's content: record it with `qemu-img rebase -u -F raw \
         -b {backing} {path}` (or -F qcow2), or recreate the overlay with `qemu-img create -F`"
    )]
    NoBackingFormat { path: PathBuf, backing: PathBuf },
    #[error("qcow2 image {path} records its backing file {backing} as format '{recorded}'; ember reads raw and qcow2 only")]
    UnknownBackingFormat { path: PathBuf, backing: PathBuf, recorded: String },
    #[error(
        "qcow2 image {path}: its backing file {backing} is outside the directories allowed to hold \
         backing files ({dirs}); allow its directory (`--disk-dir`, or EMBER_DISK_DIRS for sandboxes) \
         or move the file into one of them"
    )]
    BackingNotAllowed { path: PathBuf, backing: PathBuf, dirs: String },
    #[error(
        "qcow2 image {path} has a backing file, {backing}, but no directory is allowed to hold \
         backing files: allow its directory with --disk-dir"
    )]
    NoBackingDirs { path: PathBuf, backing: PathBuf },
    #[error("disk image {path} is {kind}, not a regular file: a disk must be a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("cannot allow backing files under {dir}: {error}")]
    DiskDir { dir: PathBuf, error: io::Error },
    #[error(
        "qcow2 image {path} has a virtual size of {size} bytes, but its backing file {backing} is \
         larger, {backing_size} bytes: the backing file was changed after the overlay was made"
    )]
    BackingSize { path: PathBuf, backing: PathBuf, size: u64, backing_size: u64 },
    #[error("qcow2 image {path}: backing chain is too deep or loops back to {backing}")]
    ChainLoop { path: PathBuf, backing: PathBuf },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
}

/// Opens PATH as FORMAT (never by its content); a qcow2 opens its backing chain read-only,
/// each backing file where POLICY allows it.
pub fn open(
    path: &Path,
    format: Format,
    read_only: bool,
    policy: &BackingPolicy,
) -> Result<Box<dyn DiskBackend>, DiskError> {
    Ok(match format {
        Format::Raw => Box::new(raw::RawDisk::open(path, read_only)?),
        Format::Qcow2 => Box::new(qcow2::Qcow2Disk::open(path, read_only, policy)?),
    })
}

/// The directories a qcow2 layer's backing file may lie under. A backing file's name comes
/// from a file ember may not have written (a template, a copied overlay, a snapshot directory
/// someone handed over): without this, such a file could have any host file read into a VM.
/// Directories are kept canonical (symlinks resolved); a backing file's path is canonicalized
/// before it is compared, whole component by whole component, and then opened by that path
/// without following a symlink, so neither a symlink nor ".." leads out. The paths are the
/// ones the opener sees (in a jail, the jail's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingPolicy {
    dirs: Vec<PathBuf>,
}

impl BackingPolicy {
    /// Backing files anywhere under DIRS, each of which must be an existing directory.
    pub fn new<P: AsRef<Path>>(dirs: impl IntoIterator<Item = P>) -> Result<BackingPolicy, DiskError> {
        let mut policy = BackingPolicy::default();
        for dir in dirs {
            policy.allow(dir.as_ref())?;
        }
        Ok(policy)
    }

    /// Allows backing files under DIR too.
    pub fn allow(&mut self, dir: &Path) -> Result<(), DiskError> {
        let err = |error| DiskError::DiskDir { dir: dir.into(), error };
        let canonical = dir.canonicalize().map_err(err)?;
        if !canonical.is_dir() {
            return Err(err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory")));
        }
        if !self.dirs.contains(&canonical) {
            self.dirs.push(canonical);
        }
        Ok(())
    }

    /// The allowed directories, canonical.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Whether the canonical path PATH lies under an allowed directory.
    pub fn allows(&self, path: &Path) -> bool {
        self.dirs.iter().any(|d| path.starts_with(d))
    }

    /// The canonical path of BACKING, the backing file the layer at LAYER names (relative to
    /// the layer's directory), if it lies under an allowed directory. Nothing is opened.
    fn resolve(&self, layer: &Path, backing: &Path) -> Result<PathBuf, DiskError> {
        let named = match backing {
            p if p.is_absolute() => p.to_path_buf(),
            p => layer.parent().unwrap_or(Path::new(".")).join(p),
        };
        let canonical = named.canonicalize().map_err(|error| DiskError::MissingBacking {
            path: layer.into(),
            backing: named.clone(),
            error,
        })?;
        if self.dirs.is_empty() {
            return Err(DiskError::NoBackingDirs { path: layer.into(), backing: named });
        }
        // Refused before any open: opening a device can have effects of its own.
        if std::fs::metadata(&canonical).is_ok_and(|m| !m.is_file()) {
            return Err(DiskError::NotRegular { path: canonical, kind: "not a regular file" });
        }
        if !self.allows(&canonical) {
            let dirs = self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(DiskError::BackingNotAllowed { path: layer.into(), backing: named, dirs });
        }
        Ok(canonical)
    }
}

/// Opens an image file: read-only (O_RDONLY) or read-write, close-on-exec, with an advisory
/// lock so that no two processes write one image, and no image is written while another
/// process reads it as a backing layer (exclusive for writing, shared for reading).
/// LOCK false skips the lock, for read-only inspection of an image a VM may be using.
/// FOLLOW false refuses a symlink as the last component (for a path already canonical, where
/// one can only be a swap since). Only a regular file is accepted: the open is non-blocking so
/// that a FIFO cannot hang it (O_NONBLOCK changes nothing for a regular file), and fstat says
/// what was opened.
pub(crate) fn open_image_file(path: &Path, writable: bool, lock: bool, follow: bool) -> Result<File, DiskError> {
    let file = regular::open_regular(path, writable, follow).map_err(|refused| match refused {
        regular::Refused::Open(error) => DiskError::Open { path: path.into(), error },
        regular::Refused::Stat(error) => DiskError::Io { path: path.into(), op: "stat", error },
        regular::Refused::NotRegular(kind) => DiskError::NotRegular { path: path.into(), kind },
    })?;
    if !lock {
        return Ok(file);
    }
    let op = if writable { libc::LOCK_EX } else { libc::LOCK_SH };
    let started = std::time::Instant::now();
    loop {
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(DiskError::Io { path: path.into(), op: "lock", error: err });
        }
        // A lock belongs to the open file description, and a process another thread is
        // spawning holds a copy of every one until its exec closes them: a lock released by
        // closing its fd can outlive the close by that moment. Only a lock still held after
        // LOCK_GRACE is another user of the image.
        if started.elapsed() >= LOCK_GRACE {
            return Err(DiskError::Locked { path: path.into(), writing: !writable });
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// How long a lock conflict may last before it counts (see [`open_image_file`]).
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// VIRTIO_BLK_T_GET_ID bytes: up to 11 characters of the file name, a dash, and 8 hex digits
/// of a hash of the device and inode numbers (stable while the file exists, distinct between
/// two sandboxes' overlays of the same name).
pub(crate) fn disk_id(path: &Path, meta: &std::fs::Metadata) -> Vec<u8> {
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .take(11)
        .collect();
    // FNV-1a over dev and ino.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in meta.dev().to_le_bytes().into_iter().chain(meta.ino().to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let id = format!("{stem}-{:08x}", (h ^ (h >> 32)) as u32);
    debug_assert!(id.len() <= 20);
    id.into_bytes()
}

/// Checks that a disk's size is usable by a block device.
pub(crate) fn check_size(path: &Path, size: u64) -> Result<(), DiskError> {
    if size % SECTOR_SIZE != 0 {
        return Err(DiskError::BadSize { path: path.into(), size });
    }
    Ok(())
}

/// The first offset at or after POS where FILE holds data (SEEK_DATA), or None when only a hole
/// follows. A shared reference is enough: lseek moves the file position, which ember never
/// uses (all its I/O is positioned).
pub fn seek_data(file: &File, pos: u64) -> io::Result<Option<u64>> {
    seek(file, pos, libc::SEEK_DATA)
}

/// The first offset at or after POS where FILE has a hole (SEEK_HOLE; the end counts as one).
pub fn seek_hole(file: &File, pos: u64) -> io::Result<Option<u64>> {
    seek(file, pos, libc::SEEK_HOLE)
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::other("offset overflow"))?;
    // SAFETY: lseek on an fd we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// The error a write to a read-only disk gets.
pub(crate) fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only")
}

#[cfg(test)]
mod tests {
    use super::test_util::{open, *};
    use super::*;

    #[test]
    fn the_format_comes_from_the_caller_or_the_name() {
        assert_eq!(Format::from_extension(Path::new("/x/top.qcow2")), Some(Format::Qcow2));
        for name in ["a.raw", "b.img", "rootfs.ext4"] {
            assert_eq!(Format::from_extension(Path::new(name)), Some(Format::Raw), "{name}");
        }
        for name in ["disk", "disk.qcow", "x.QCOW2", "raw"] {
            assert_eq!(Format::from_extension(Path::new(name)), None, "{name}");
        }
        assert_eq!("qcow2".parse::<Format>(), Ok(Format::Qcow2));
        assert!("vmdk".parse::<Format>().unwrap_err().contains("raw or qcow2"));
        let dir = tmpdir();
        let base = make_base(dir.as_path(), "base.raw", 4 << 20);
        let top = dir.as_path().join("top.qcow2");
        ov::create(&base, &top).unwrap();
        let d = open(&top, false).unwrap();
        assert_eq!(d.size(), 4 << 20);
        assert!(!d.read_only());
        drop(d);
        // The caller's word wins over the content: a qcow2 file opened as raw is its bytes.
        let d = super::open(&top, Format::Raw, true, &BackingPolicy::default()).unwrap();
        assert_eq!(d.size(), std::fs::metadata(&top).unwrap().len());
        let d = open(&base, true).unwrap();
        assert!(d.read_only());
    }

    #[test]
    fn ids_are_short_stable_and_distinct() {
        let dir = tmpdir();
        let a = make_base(dir.as_path(), "a-very-long-file-name.raw", 1 << 20);
        let b = make_base(dir.as_path(), "b.raw", 1 << 20);
        let ida = open(&a, true).unwrap().id();
        assert!(ida.len() <= 20, "{}", String::from_utf8_lossy(&ida));
        assert!(ida.starts_with(b"a-very-long-"));
        assert_eq!(ida, open(&a, true).unwrap().id());
        assert_ne!(ida, open(&b, true).unwrap().id());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tmpdir();
        let missing = dir.as_path().join("nope.raw");
        let e = open(&missing, true).err().unwrap().to_string();
        assert!(e.contains("nope.raw") && e.contains("No such file"), "{e}");
        let odd = dir.as_path().join("odd.raw");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let e = open(&odd, true).err().unwrap().to_string();
        assert!(e.contains("odd.raw") && e.contains("not a multiple of 512"), "{e}");
    }

    #[test]
    fn a_writer_excludes_other_writers_and_readers() {
        let dir = tmpdir();
        let base = make_base(dir.as_path(), "base.raw", 1 << 20);
        let top = dir.as_path().join("top.qcow2");
        ov::create(&base, &top).unwrap();
        let w = open(&top, false).unwrap();
        let e = open(&top, false).err().unwrap();
        assert!(matches!(e, DiskError::Locked { .. }), "{e}");
        assert!(open(&top, true).is_err());
        drop(w);
        let r1 = open(&top, true).unwrap();
        let _r2 = open(&top, true).unwrap();
        assert!(matches!(open(&top, false).err().unwrap(), DiskError::Locked { .. }));
        drop(r1);
    }
}
