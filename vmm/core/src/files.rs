//! Files a request or a snapshot names, opened so that the name cannot turn them into something
//! else: regular files only (an `open` of a FIFO would hang the thread, a device is not guest
//! memory), opened with `O_NONBLOCK` so that even the open of a FIFO returns at once, never
//! through a symbolic link at the final component (the path is the caller's), and outputs
//! created anew rather than written through whatever already has their name.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use api::SocketHome;
use disk::regular::Refused;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{what} {}: not a regular file (a FIFO, device, socket or directory); give a regular file", path.display())]
    NotRegular { what: &'static str, path: PathBuf },
    #[error("{what} {} is a symbolic link; give the file it points to", path.display())]
    Symlink { what: &'static str, path: PathBuf },
    #[error("cannot open {what} {}: {source}", path.display())]
    Open { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what}: file descriptor {index} is not a regular file (memfds and files are)")]
    NotRegularFd { what: &'static str, index: usize },
    #[error("{what}: cannot stat file descriptor {index}: {source}")]
    StatFd { what: &'static str, index: usize, source: std::io::Error },
    #[error("metrics_path {}: the VMM has no API socket, so no directory of its own to write metrics in", path.display())]
    NoHome { path: PathBuf },
    #[error(
        "metrics_path {}: the metrics file must be in the VMM's own directory, the one holding its API socket ({})",
        path.display(), dir.display()
    )]
    OutsideHome { path: PathBuf, dir: PathBuf },
}

fn open_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| match source.raw_os_error() {
        Some(libc::ELOOP) => FileError::Symlink { what, path: path.to_owned() },
        // A FIFO opened for writing without O_NONBLOCK's reader, or a device without a driver.
        Some(libc::ENXIO) | Some(libc::ENODEV) => FileError::NotRegular { what, path: path.to_owned() },
        _ => FileError::Open { what, path: path.to_owned(), source },
    }
}

fn check_regular(file: File, what: &'static str, path: &Path) -> Result<File, FileError> {
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(file),
        Ok(_) => Err(FileError::NotRegular { what, path: path.to_owned() }),
        Err(source) => Err(FileError::Open { what, path: path.to_owned(), source }),
    }
}

/// Opens the regular file at `path` for reading (`what` names it in errors).
pub fn open_regular(path: &Path, what: &'static str) -> Result<File, FileError> {
    disk::regular::open_regular(path, false, false).map_err(|refused| match refused {
        Refused::Open(e) => open_error(what, path)(e),
        Refused::Stat(source) => FileError::Open { what, path: path.to_owned(), source },
        Refused::NotRegular(_) => FileError::NotRegular { what, path: path.to_owned() },
    })
}

/// The `index`th descriptor of a request as a file, if it is a regular one (a memfd is).
pub fn regular_fd(fd: OwnedFd, what: &'static str, index: usize) -> Result<File, FileError> {
    let file = File::from(fd);
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(file),
        Ok(_) => Err(FileError::NotRegularFd { what, index }),
        Err(source) => Err(FileError::StatFd { what, index, source }),
    }
}

/// Creates a new file at `path` for writing, mode 0600, replacing only a regular file or link
/// of that name (removed first, never followed): the name of a file about to be renamed into
/// place.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens the metrics file at `path` for appending, created if missing. It must be in the
/// VMM's own directory: the one that holds the API socket the server bound (`home`), wherever
/// that socket has been moved since — the directory is recognised by the socket's inode in it,
/// and the file is opened relative to the directory so checked.
pub fn open_metrics(home: Option<&SocketHome>, path: &Path) -> Result<File, FileError> {
    const WHAT: &str = "metrics_path";
    let home = home.ok_or_else(|| FileError::NoHome { path: path.to_owned() })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let outside = || FileError::OutsideHome {
        path: path.to_owned(),
        dir: home.bound_at.parent().unwrap_or(Path::new(".")).to_owned(),
    };
    let (Some(name), Some(socket_name)) = (path.file_name(), home.bound_at.file_name()) else {
        return Err(outside());
    };
    let dir_fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|source| FileError::Open { what: WHAT, path: dir.to_owned(), source })?;
    let socket = c_path(Path::new(socket_name)).map_err(|source| FileError::Open { what: WHAT, path: path.to_owned(), source })?;
    // SAFETY: a zeroed stat is valid for fstatat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat on a directory fd this function owns, a NUL-terminated name and a stat
    // to fill; the result is checked.
    let found = unsafe { libc::fstatat(dir_fd.as_raw_fd(), socket.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0;
    if !found || st.st_dev != home.dev || st.st_ino != home.ino {
        return Err(outside());
    }
    let name_c = c_path(Path::new(name)).map_err(|source| FileError::Open { what: WHAT, path: path.to_owned(), source })?;
    let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: openat on the checked directory fd with a NUL-terminated name; the result is
    // checked before it is owned.
    let fd = unsafe { libc::openat(dir_fd.as_raw_fd(), name_c.as_ptr(), flags, 0o600 as libc::c_uint) };
    if fd < 0 {
        return Err(open_error(WHAT, path)(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    check_regular(file, WHAT, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};
    use vmm_sys_util::tempdir::TempDir;

    /// What the API server records of the socket it bound.
    fn home_of(path: &Path) -> std::io::Result<SocketHome> {
        let m = path.symlink_metadata()?;
        Ok(SocketHome { bound_at: path.to_owned(), dev: m.dev(), ino: m.ino() })
    }

    fn fifo(path: &Path) {
        let c = c_path(path).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Runs `f` on a thread and fails the test unless it returns within 5 s (a FIFO would hang it).
    fn quickly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        let started = Instant::now();
        let value = rx.recv_timeout(Duration::from_secs(5)).expect("the open hung");
        assert!(started.elapsed() < Duration::from_secs(5));
        value
    }

    #[test]
    fn fifos_devices_and_links_are_refused_at_once() {
        let dir = TempDir::new().unwrap();
        let pipe = dir.as_path().join("pipe");
        fifo(&pipe);
        let p = pipe.clone();
        let err = quickly(move || open_regular(&p, "snapshot_path").unwrap_err().to_string());
        assert!(err.contains("not a regular file") && err.contains("snapshot_path"), "{err}");
        let err = open_regular(Path::new("/dev/zero"), "memory file").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let target = dir.as_path().join("real");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_regular(&link, "snapshot_path").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(open_regular(&target, "snapshot_path").is_ok());
    }

    #[test]
    fn a_new_file_replaces_a_link_without_following_it() {
        let dir = TempDir::new().unwrap();
        let victim = dir.as_path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let out = dir.as_path().join(".state.tmp");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        std::io::Write::write_all(&mut create_new(&out).unwrap(), b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert!(!out.symlink_metadata().unwrap().file_type().is_symlink());
    }

    #[test]
    fn metrics_only_in_the_vmms_own_directory() {
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let home = home_of(&socket).unwrap();
        let metrics = dir.as_path().join("metrics.json");
        std::io::Write::write_all(&mut open_metrics(Some(&home), &metrics).unwrap(), b"1\n").unwrap();
        std::io::Write::write_all(&mut open_metrics(Some(&home), &metrics).unwrap(), b"2\n").unwrap();
        assert_eq!(std::fs::read(&metrics).unwrap(), b"1\n2\n", "appended");

        let elsewhere = TempDir::new().unwrap();
        let err = open_metrics(Some(&home), &elsewhere.as_path().join("metrics.json")).unwrap_err().to_string();
        assert!(err.contains("VMM's own directory") && err.contains(&dir.as_path().display().to_string()), "{err}");
        assert!(!elsewhere.as_path().join("metrics.json").exists());
        // A socket of the same name in another directory is not this VMM's.
        let _other = std::os::unix::net::UnixListener::bind(elsewhere.as_path().join("api.sock")).unwrap();
        assert!(open_metrics(Some(&home), &elsewhere.as_path().join("m")).is_err());
        assert!(open_metrics(None, &metrics).unwrap_err().to_string().contains("no API socket"));

        // The directory moved with its socket (a spare VMM's, taken over) is still its own.
        let moved = TempDir::new().unwrap();
        std::fs::rename(&socket, moved.as_path().join("api.sock")).unwrap();
        assert!(open_metrics(Some(&home), &moved.as_path().join("metrics.json")).is_ok());
        assert!(open_metrics(Some(&home), &metrics).is_err(), "the old directory no longer holds it");

        // Not through a link, and not into a FIFO.
        let link = moved.as_path().join("link.json");
        std::os::unix::fs::symlink(elsewhere.as_path().join("target"), &link).unwrap();
        assert!(open_metrics(Some(&home), &link).unwrap_err().to_string().contains("symbolic link"));
        assert!(!elsewhere.as_path().join("target").exists());
        let pipe = moved.as_path().join("pipe");
        fifo(&pipe);
        let err = quickly(move || open_metrics(Some(&home), &pipe).unwrap_err().to_string());
        assert!(err.contains("not a regular file"), "{err}");
    }
}
