//! Opening a file that a user, a request or a snapshot named, so that the name cannot turn it
//! into something else: `O_NONBLOCK` (the open of a FIFO returns at once instead of hanging
//! the thread), `O_NOFOLLOW` unless the caller resolved the name itself, and a regular file
//! or nothing (a FIFO, device, socket or directory is refused by kind). The VMM, the disk code
//! and the control plane all open what they are handed this way, each naming its own errors.

use std::fs::{File, FileType};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why [`open_regular`] gave no file.
#[derive(Debug)]
pub enum Refused {
    /// The open failed (`ELOOP`: a symbolic link, with `follow` false).
    Open(io::Error),
    /// The file opened but could not be looked at.
    Stat(io::Error),
    /// Not a regular file; what it is instead.
    NotRegular(&'static str),
}

/// Opens the regular file at `path` for reading, and for writing too if `writable`; through a
/// symbolic link at its last component only if `follow`.
pub fn open_regular(path: &Path, writable: bool, follow: bool) -> Result<File, Refused> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | nofollow)
        .open(path)
        .map_err(Refused::Open)?;
    let kind = file.metadata().map_err(Refused::Stat)?.file_type();
    match kind.is_file() {
        true => Ok(file),
        false => Err(Refused::NotRegular(kind_name(kind))),
    }
}

/// What a file that is not a regular one is, for an error message.
fn kind_name(kind: FileType) -> &'static str {
    if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}
