//! Applies one layer (a tar stream) onto the staging tree, as an OCI runtime would stack it:
//! entries replace what lower layers left, `.wh.NAME` removes NAME, `.wh..wh..opq` hides all a
//! directory held below; owners, modes (setuid included), xattrs, hard links, symlinks and
//! device nodes are kept. Whiteouts apply to lower layers only: what this layer itself made
//! stays, whichever order its entries come in.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

use crate::error::LayerError;
use crate::tree::{self, Components, Tree};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
// Without CAP_CHOWN the files of an image cannot have their owners.
const OWNER: &str = "cannot set the owner (importing an image needs root)";

/// What one layer put in the tree.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Extended attributes the tree's file system would not take.
    pub xattrs_dropped: u64,
}

/// Applies the tar stream `layer` onto `tree`.
pub fn apply(tree: &Tree, layer: impl Read) -> Result<LayerStats, LayerError> {
    let mut archive = tar::Archive::new(layer);
    let mut made: HashSet<Components> = HashSet::new();
    let mut stats = LayerStats::default();
    for entry in archive.entries().map_err(LayerError::Tar)? {
        let mut entry = entry.map_err(LayerError::Tar)?;
        let raw = entry.path().map_err(LayerError::Tar)?.into_owned();
        let shown = raw.display().to_string();
        let comps = tree::components(&raw)?;
        let Some((name, parent)) = comps.split_last() else { continue };
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE.as_bytes() {
            let dir = tree.dir(&shown, parent, true)?;
            hide_lower(dir.as_fd(), &mut parent.to_vec(), &made).map_err(io(&shown, "cannot empty the opaque directory"))?;
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
            let mut target = parent.to_vec();
            target.push(OsStr::from_bytes(hidden).to_os_string());
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(LayerError::Traversal { path: shown });
            }
            if !made.contains(&target) {
                let dir = tree.dir(&shown, parent, true)?;
                tree::remove_at(dir.as_fd(), OsStr::from_bytes(hidden)).map_err(io(&shown, "cannot remove the whited-out file"))?;
            }
            continue;
        }
        for i in 1..=comps.len() {
            made.insert(comps[..i].to_vec());
        }
        stats.entries += 1;
        let dir = tree.dir(&shown, parent, true)?;
        let dir = dir.as_fd();
        let xattrs = xattrs(&mut entry)?;
        let header = entry.header().clone();
        let mode = Mode::from_raw_mode(header.mode().map_err(LayerError::Tar)? & 0o7777);
        let (uid, gid) = (header.uid().map_err(LayerError::Tar)?, header.gid().map_err(LayerError::Tar)?);
        let owner = (rustix::process::Uid::from_raw(uid as u32), rustix::process::Gid::from_raw(gid as u32));
        let mtime = header.mtime().unwrap_or(0) as i64;
        let kind = header.entry_type();
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                tree::remove_at(dir, name).map_err(io(&shown, "cannot replace what was there"))?;
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = rfs::openat(dir, name, flags, Mode::from_raw_mode(0o600)).map_err(io(&shown, "cannot create"))?;
                let mut file = File::from(fd);
                stats.bytes += std::io::copy(&mut entry, &mut file).map_err(LayerError::Tar)?;
                rfs::fchown(&file, Some(owner.0), Some(owner.1)).map_err(io(&shown, OWNER))?;
                // After the owner: chown clears setuid and setgid.
                rfs::fchmod(&file, mode).map_err(io(&shown, "cannot set the mode"))?;
                stats.xattrs_dropped += set_xattrs(file.as_fd(), &xattrs);
                let t = Timestamps { last_access: ts(mtime), last_modification: ts(mtime) };
                rfs::futimens(&file, &t).map_err(io(&shown, "cannot set the time"))?;
            }
            EntryType::Directory => {
                if tree::kind_at(dir, name).map_err(io(&shown, "cannot look up"))? != Some(FileType::Directory) {
                    tree::remove_at(dir, name).map_err(io(&shown, "cannot replace what was there"))?;
                    rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(io(&shown, "cannot make the directory"))?;
                }
                let fd = tree::open_dir_at(dir, name).map_err(io(&shown, "cannot open the directory"))?;
                rfs::fchown(&fd, Some(owner.0), Some(owner.1)).map_err(io(&shown, OWNER))?;
                rfs::fchmod(&fd, mode).map_err(io(&shown, "cannot set the mode"))?;
                stats.xattrs_dropped += set_xattrs(fd.as_fd(), &xattrs);
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| LayerError::Unsupported { path: shown.clone(), kind: "symlink without a target".into() })?;
                tree::remove_at(dir, name).map_err(io(&shown, "cannot replace what was there"))?;
                // The target is only data here: it is never followed but by Tree::dir.
                rfs::symlinkat(OsStr::from_bytes(&target), dir, name).map_err(io(&shown, "cannot make the symlink"))?;
                rfs::chownat(dir, name, Some(owner.0), Some(owner.1), AtFlags::SYMLINK_NOFOLLOW).map_err(io(&shown, OWNER))?;
            }
            EntryType::Link => {
                let target = entry.link_name().map_err(LayerError::Tar)?.ok_or_else(|| LayerError::Unsupported { path: shown.clone(), kind: "hard link without a target".into() })?;
                let target_shown = target.display().to_string();
                let tcomps = tree::components(&target).map_err(|_| LayerError::Traversal { path: format!("{shown} (hard link to {target_shown})") })?;
                let Some((tname, tparent)) = tcomps.split_last() else { return Err(LayerError::Traversal { path: shown }) };
                let tdir = tree.dir(&shown, tparent, false)?;
                if tcomps != comps {
                    tree::remove_at(dir, name).map_err(io(&shown, "cannot replace what was there"))?;
                    rfs::linkat(tdir.as_fd(), tname, dir, name, AtFlags::empty()).map_err(io(&shown, "cannot make the hard link"))?;
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major().map_err(LayerError::Tar)?.unwrap_or(0);
                let minor = header.device_minor().map_err(LayerError::Tar)?.unwrap_or(0);
                tree::remove_at(dir, name).map_err(io(&shown, "cannot replace what was there"))?;
                rfs::mknodat(dir, name, file_type, mode, rfs::makedev(major, minor)).map_err(io(&shown, "cannot make the device node"))?;
                rfs::chownat(dir, name, Some(owner.0), Some(owner.1), AtFlags::SYMLINK_NOFOLLOW).map_err(io(&shown, OWNER))?;
                rfs::chmodat(dir, name, mode, AtFlags::empty()).map_err(io(&shown, "cannot set the mode"))?;
            }
            EntryType::XGlobalHeader => {}
            other => return Err(LayerError::Unsupported { path: shown, kind: format!("{other:?}") }),
        }
    }
    Ok(stats)
}

fn io<'a>(path: &'a str, what: &'static str) -> impl FnOnce(Errno) -> LayerError + 'a {
    move |e| LayerError::Io { path: path.to_string(), what, error: e.into() }
}

fn ts(secs: i64) -> rustix::fs::Timespec {
    rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 }
}

/// Everything below `dir` (at `path`) that this layer did not make is removed.
fn hide_lower(dir: BorrowedFd<'_>, path: &mut Components, made: &HashSet<Components>) -> Result<(), Errno> {
    for child in tree::children(dir)? {
        path.push(child.clone());
        if !made.contains(path) {
            tree::remove_at(dir, &child)?;
        } else if tree::kind_at(dir, &child)? == Some(FileType::Directory) {
            let sub = tree::open_dir_at(dir, &child)?;
            hide_lower(sub.as_fd(), path, made)?;
        }
        path.pop();
    }
    Ok(())
}

/// The entry's extended attributes (PAX `SCHILY.xattr.NAME` records).
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(OsString, Vec<u8>)>, LayerError> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(LayerError::Tar)? {
        for ext in exts {
            let ext = ext.map_err(LayerError::Tar)?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                out.push((OsStr::from_bytes(name).to_os_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Sets what the file system takes; returns how many it would not (logged).
fn set_xattrs(fd: BorrowedFd<'_>, xattrs: &[(OsString, Vec<u8>)]) -> u64 {
    let mut dropped = 0;
    for (name, value) in xattrs {
        if let Err(e) = rfs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty()) {
            tracing::warn!("xattr {} not kept: {e}", name.to_string_lossy());
            dropped += 1;
        }
    }
    dropped
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;
