//! The staging tree an image's layers are applied to, reached only through directory file
//! descriptors opened one component at a time with `O_NOFOLLOW`: a layer's paths and the
//! symlinks earlier layers left are resolved here, inside the tree, and never by the kernel
//! from a path string, so no entry can land outside the tree whatever links it goes through.
//!
//! A symlink met on the way is followed as the guest will see it: an absolute target from the
//! tree's root, a relative one from the link's directory; one whose `..` would climb above the
//! root points out of the tree and is refused.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::LayerError;

/// Symlinks followed while resolving one path, as the kernel's own limit.
pub(crate) const MAX_LINKS: usize = 40;

/// A path inside the tree, split into its components, with no `..`, no root and no `.`.
pub(crate) type Components = Vec<OsString>;

pub struct Tree {
    root: OwnedFd,
}

fn io_err<'a>(path: &'a str, what: &'static str) -> impl FnOnce(Errno) -> LayerError + 'a {
    move |e| LayerError::Io { path: path.to_string(), what, error: e.into() }
}

/// The components of an entry's path; `..` anywhere, or an absolute path, is refused.
pub(crate) fn components(path: &Path) -> Result<Components, LayerError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::Traversal { path: path.display().to_string() })
            }
        }
    }
    Ok(out)
}

pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    rfs::openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
}

impl Tree {
    pub fn open(root: &Path) -> std::io::Result<Tree> {
        let fd = rfs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Tree { root: fd })
    }

    /// Opens directory `dir` of the tree (`path` names the entry, for errors), following
    /// symlinks inside the tree; with `create`, missing directories are made (0755, as tar does).
    pub(crate) fn dir(&self, path: &str, dir: &[OsString], create: bool) -> Result<OwnedFd, LayerError> {
        let mut stack: Vec<OwnedFd> = vec![rustix::io::dup(&self.root).map_err(io_err(path, "cannot open the tree"))?];
        let mut pending: VecDeque<OsString> = dir.iter().cloned().collect();
        let mut links = 0;
        // The last symlink followed: a `..` above the root can only come from one.
        let mut via: Option<String> = None;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                if stack.len() == 1 {
                    return Err(LayerError::SymlinkEscape { path: path.into(), link: via.unwrap_or_default() });
                }
                stack.pop();
                continue;
            }
            if c.is_empty() || c == "." {
                continue;
            }
            let here = stack.last().expect("the root stays on the stack");
            let kind = match rfs::statat(here, &c, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(FileType::from_raw_mode(st.st_mode)),
                Err(Errno::NOENT) if create => None,
                Err(e) => return Err(io_err(path, "cannot look up a directory on its way")(e)),
            };
            match kind {
                None => match rfs::mkdirat(here, &c, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err(path, "cannot make a directory on its way")(e)),
                },
                Some(FileType::Directory) => {}
                Some(FileType::Symlink) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(LayerError::SymlinkLoop { path: path.into(), max: MAX_LINKS });
                    }
                    let target = rfs::readlinkat(here, &c, Vec::new()).map_err(io_err(path, "cannot read a symlink on its way"))?;
                    let target = OsStr::from_bytes(target.as_bytes()).to_os_string();
                    via = Some(Path::new(&c).display().to_string() + " -> " + &Path::new(&target).display().to_string());
                    if target.as_bytes().starts_with(b"/") {
                        stack.truncate(1);
                    }
                    for part in target.as_bytes().split(|&b| b == b'/').rev() {
                        pending.push_front(OsStr::from_bytes(part).to_os_string());
                    }
                    continue;
                }
                Some(_) => {
                    return Err(LayerError::NotADirectory { path: path.into(), component: Path::new(&c).display().to_string() })
                }
            }
            let fd = open_dir_at(here.as_fd(), &c).map_err(io_err(path, "cannot open a directory on its way"))?;
            stack.push(fd);
        }
        Ok(stack.pop().expect("the root stays on the stack"))
    }
}

impl Tree {
    /// Opens regular file `path` of the tree for reading, following symlinks (the last
    /// component's too) inside the tree only.
    pub(crate) fn open_file(&self, path: &str) -> Result<std::fs::File, LayerError> {
        let mut comps = components(Path::new(path))?;
        for _ in 0..MAX_LINKS {
            let Some((name, parent)) = comps.split_last() else {
                return Err(LayerError::NotADirectory { path: path.into(), component: "/".into() });
            };
            let dir = self.dir(path, parent, false)?;
            let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rfs::openat(&dir, name, flags, Mode::empty()) {
                Ok(fd) => {
                    let file = std::fs::File::from(fd);
                    let is_file = file.metadata().map_err(|e| LayerError::Io { path: path.into(), what: "cannot look at", error: e })?.is_file();
                    return if is_file { Ok(file) } else { Err(LayerError::Unsupported { path: path.into(), kind: "not a regular file".into() }) };
                }
                Err(Errno::LOOP) => {
                    let target = rfs::readlinkat(&dir, name, Vec::new()).map_err(io_err(path, "cannot read a symlink"))?;
                    let target = OsStr::from_bytes(target.as_bytes());
                    let mut next: Components = if target.as_bytes().starts_with(b"/") { Vec::new() } else { parent.to_vec() };
                    for part in target.as_bytes().split(|&b| b == b'/') {
                        match part {
                            b"" | b"." => {}
                            b".." => {
                                if next.pop().is_none() {
                                    return Err(LayerError::SymlinkEscape { path: path.into(), link: Path::new(target).display().to_string() });
                                }
                            }
                            p => next.push(OsStr::from_bytes(p).to_os_string()),
                        }
                    }
                    comps = next;
                }
                Err(e) => return Err(io_err(path, "cannot open")(e)),
            }
        }
        Err(LayerError::SymlinkLoop { path: path.into(), max: MAX_LINKS })
    }
}

/// What is at `name` in `dir`, not following a symlink; `None` when nothing is.
pub(crate) fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<FileType>, Errno> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `name` from `dir`, a directory with everything in it; never follows a symlink.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match kind_at(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            let sub = open_dir_at(dir, name)?;
            for child in children(sub.as_fd())? {
                remove_at(sub.as_fd(), &child)?;
            }
            rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        }
        Some(_) => rfs::unlinkat(dir, name, AtFlags::empty()),
    }
}

/// The names in directory `dir`, less `.` and `..`.
pub(crate) fn children(dir: BorrowedFd<'_>) -> Result<Vec<OsString>, Errno> {
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_os_string());
        }
    }
    Ok(names)
}
