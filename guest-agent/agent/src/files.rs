//! File requests.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::server::{spawn_thread, Out};
use agent_protocol::{DirEntry, ErrorKind, FileKind, FileStat, ReplyBody, CHUNK};

/// Files being written on one connection: `None` once a write failed (its error was sent;
/// later `FileData` for it is dropped until its `FileEnd`).
#[derive(Default)]
pub(crate) struct Writes(HashMap<u64, Option<(File, u64)>>);

impl Writes {
    pub(crate) fn open(&mut self, id: u64, path: &str, mode: u32, parents: bool, out: &Out) {
        if self.0.contains_key(&id) {
            out.error(
                id,
                ErrorKind::InvalidRequest,
                "a write with this id is open",
            );
            return;
        }
        let r = (|| {
            if parents {
                if let Some(dir) = Path::new(path).parent() {
                    fs::create_dir_all(dir)?;
                }
            }
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)?;
            // `mode` applies on creation only (and through the umask): set it exactly.
            f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
            Ok::<_, io::Error>(f)
        })();
        match r {
            Ok(f) => {
                self.0.insert(id, Some((f, 0)));
            }
            Err(e) => {
                out.io_error(id, path, &e);
                self.0.insert(id, None);
            }
        }
    }

    pub(crate) fn data(&mut self, id: u64, data: &[u8], out: &Out) {
        match self.0.get_mut(&id) {
            None => {
                out.error(id, ErrorKind::UnknownId, "no open write with this id");
            }
            Some(None) => {}
            Some(Some((f, size))) => {
                if let Err(e) = f.write_all(data) {
                    out.io_error(id, "write", &e);
                    self.0.insert(id, None);
                } else {
                    *size += data.len() as u64;
                }
            }
        }
    }

    pub(crate) fn end(&mut self, id: u64, out: &Out) {
        match self.0.remove(&id) {
            None => {
                out.error(id, ErrorKind::UnknownId, "no open write with this id");
            }
            Some(None) => {}
            Some(Some((f, size))) => {
                // Written data reaches the disk before the host hears "written".
                match f.sync_data() {
                    Ok(()) => out.send(id, ReplyBody::FileWritten { size }),
                    Err(e) => out.io_error(id, "fsync", &e),
                };
            }
        }
    }
}

pub(crate) fn read(id: u64, path: String, out: &Arc<Out>) {
    let f = match File::open(&path).and_then(|f| {
        if f.metadata()?.is_dir() {
            Err(rustix::io::Errno::ISDIR.into())
        } else {
            Ok(f)
        }
    }) {
        Ok(f) => f,
        Err(e) => {
            out.io_error(id, &path, &e);
            return;
        }
    };
    let out2 = out.clone();
    let r = spawn_thread("read-file", 64 << 10, move || {
        let mut f = f;
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            match f.read(&mut buf) {
                Ok(0) => {
                    out2.send(id, ReplyBody::FileEnd { size });
                    return;
                }
                Ok(n) => {
                    size += n as u64;
                    if !out2.send(
                        id,
                        ReplyBody::FileData {
                            data: buf[..n].to_vec(),
                        },
                    ) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    out2.io_error(id, "read", &e);
                    return;
                }
            }
        }
    });
    if let Err(e) = r {
        out.io_error(id, "spawn reader thread", &e);
    }
}

fn to_stat(m: &fs::Metadata) -> FileStat {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: m.size(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec()),
    }
}

pub(crate) fn stat(path: &str) -> io::Result<FileStat> {
    fs::symlink_metadata(path).map(|m| to_stat(&m))
}

/// Entries per `DirEntries` frame: names are at most 255 bytes, so a frame stays well under
/// the frame limit.
const ENTRIES_PER_FRAME: usize = 512;

pub(crate) fn list(id: u64, path: &str, out: &Out) {
    let rd = match fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => {
            out.io_error(id, path, &e);
            return;
        }
    };
    let mut entries = Vec::new();
    for e in rd {
        let e = match e {
            Ok(e) => e,
            Err(e) => {
                out.io_error(id, path, &e);
                return;
            }
        };
        // An entry removed meanwhile is skipped.
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        entries.push(DirEntry {
            name: e.file_name().to_string_lossy().into_owned(),
            stat: to_stat(&m),
        });
        if entries.len() == ENTRIES_PER_FRAME {
            let batch = std::mem::take(&mut entries);
            if !out.send(
                id,
                ReplyBody::DirEntries {
                    entries: batch,
                    last: false,
                },
            ) {
                return;
            }
        }
    }
    out.send(
        id,
        ReplyBody::DirEntries {
            entries,
            last: true,
        },
    );
}

pub(crate) fn mkdir(path: &str, mode: u32, parents: bool) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(parents).mode(mode);
    b.create(path)
}

pub(crate) fn remove(path: &str, recursive: bool) -> io::Result<()> {
    let m = fs::symlink_metadata(path)?;
    if m.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    }
}
