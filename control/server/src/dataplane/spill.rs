//! Output a command wrote past its log's memory bound while no client kept up, kept on disk
//! (`ember serve`'s `spill` directory) instead of holding the command back: an unnamed file
//! (`O_TMPFILE`, mode 0600, gone with the command) of at most its capacity, appended to in the
//! order the output came. The log moves its oldest unsent pieces here and reads them back from
//! here; once clients have all of it, it is emptied for reuse.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::Stream;

/// Where one piece lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spilled {
    pub stream: Stream,
    pub offset: u64,
    pub len: u64,
    at: u64,
}

pub struct Spill {
    file: File,
    pieces: VecDeque<Spilled>,
    len: u64,
    capacity: u64,
}

impl Spill {
    /// An empty spill of at most `capacity` bytes in directory `dir`.
    pub fn create(dir: &Path, capacity: u64) -> std::io::Result<Spill> {
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe {
            libc::open(path.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Spill { file, pieces: VecDeque::new(), len: 0, capacity })
    }

    /// Whether `len` more bytes fit.
    pub fn has_room(&self, len: u64) -> bool {
        self.len.saturating_add(len) <= self.capacity
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Appends `data`, `stream`'s bytes from `offset`.
    pub fn put(&mut self, stream: Stream, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, self.len)?;
        let len = data.len() as u64;
        self.pieces.push_back(Spilled { stream, offset, len, at: self.len });
        self.len += len;
        Ok(())
    }

    /// The pieces, oldest first.
    pub fn pieces(&self) -> impl Iterator<Item = &Spilled> {
        self.pieces.iter()
    }

    /// `len` bytes of `piece` from `skip` on.
    pub fn read(&self, piece: &Spilled, skip: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut data = vec![0; len];
        self.file.read_exact_at(&mut data, piece.at + skip)?;
        Ok(data)
    }

    /// Forgets every piece and gives the file's space back.
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.len = 0;
        let _ = self.file.set_len(0);
    }
}
