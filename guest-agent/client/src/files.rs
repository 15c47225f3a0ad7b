//! Files in the guest: streamed upload and download (any size, constant memory, no per-chunk
//! acknowledgement), stat, listing, mkdir, remove.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use agent_protocol::{DirEntry, FileStat, ReplyBody, RequestBody, MAX_FRAME};

use super::{call, next_id, recv, send, ClientError};

/// Payload of the `FileData` frames an upload sends: large, so that the agent's reader wakes
/// up rarely, and well under the frame limit.
const UPLOAD_CHUNK: usize = 256 << 10;
const _: () = assert!(UPLOAD_CHUNK + 64 <= MAX_FRAME);

/// Writes everything `reader` yields to `remote_path` in the guest (created or truncated; its
/// mode set to exactly `mode`; its parent must exist), and returns the size written once the
/// agent has it on disk (fsync'ed). On a local read error the connection is shut down, so the
/// agent drops the write; the guest file then holds what had arrived.
pub fn upload<R: Read + Send>(
    stream: &mut UnixStream,
    mut reader: R,
    remote_path: &str,
    mode: u32,
) -> Result<u64, ClientError> {
    let id = next_id();
    let mut writer = stream.try_clone()?;
    let request = RequestBody::WriteFile { path: remote_path.to_string(), mode, create_parents: false };
    send(&mut writer, id, request)?;
    // The agent answers only at the end or at the first failure: data is sent from a thread
    // while this one waits for that answer, and a failure stops the sending early.
    let failed = AtomicBool::new(false);
    let (sent, reply) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let r = send_data(&mut writer, &mut reader, id, &failed);
            if matches!(r, Err(ClientError::Local { .. })) {
                let _ = writer.shutdown(Shutdown::Both);
            }
            r
        });
        let reply = recv(stream, &mut Vec::new(), id);
        failed.store(true, Ordering::Relaxed);
        (sender.join().expect("upload sender panicked"), reply)
    });
    match (sent, reply) {
        (Err(e @ ClientError::Local { .. }), _) => Err(e),
        (_, Ok(ReplyBody::Error { kind, message })) => Err(ClientError::file(remote_path, kind, message)),
        (Ok(sent), Ok(ReplyBody::FileWritten { size })) if size == sent => Ok(size),
        (Ok(sent), Ok(ReplyBody::FileWritten { size })) => {
            Err(ClientError::SizeMismatch { path: remote_path.to_string(), got: size, announced: sent })
        }
        (_, Ok(other)) => Err(ClientError::unexpected(&other)),
        (_, Err(e)) => Err(e),
    }
}

/// Sends the reader's bytes as `FileData` frames and then `FileEnd`, unless `failed` is set
/// meanwhile (the agent refused the write: it ignores the data, but still expects the end).
fn send_data<R: Read>(
    writer: &mut UnixStream,
    reader: &mut R,
    id: u64,
    failed: &AtomicBool,
) -> Result<u64, ClientError> {
    let mut buf = vec![0u8; UPLOAD_CHUNK];
    let mut sent = 0u64;
    while !failed.load(Ordering::Relaxed) {
        let n = read_full(reader, &mut buf).map_err(|source| ClientError::Local { what: "read", source })?;
        if n == 0 {
            break;
        }
        send(writer, id, RequestBody::FileData { data: buf[..n].to_vec() })?;
        sent += n as u64;
    }
    send(writer, id, RequestBody::FileEnd)?;
    Ok(sent)
}

/// Fills `buf` unless the reader ends first (a pipe hands out a few KiB per read).
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies `remote_path` from the guest into `writer`; returns its size.
pub fn download(stream: &mut UnixStream, remote_path: &str, writer: &mut dyn Write) -> Result<u64, ClientError> {
    let id = next_id();
    send(stream, id, RequestBody::ReadFile { path: remote_path.to_string() })?;
    let mut buf = Vec::new();
    let mut got = 0u64;
    loop {
        match recv(stream, &mut buf, id)? {
            ReplyBody::FileData { data } => {
                writer.write_all(&data).map_err(|source| ClientError::Local { what: "write", source })?;
                got += data.len() as u64;
            }
            ReplyBody::FileEnd { size } if size == got => {
                writer.flush().map_err(|source| ClientError::Local { what: "write", source })?;
                return Ok(size);
            }
            ReplyBody::FileEnd { size } => {
                return Err(ClientError::SizeMismatch { path: remote_path.to_string(), got, announced: size })
            }
            ReplyBody::Error { kind, message } => return Err(ClientError::file(remote_path, kind, message)),
            other => return Err(ClientError::unexpected(&other)),
        }
    }
}

/// The path's own metadata (a symlink is not followed).
pub fn stat(stream: &mut UnixStream, path: &str) -> Result<FileStat, ClientError> {
    match call(stream, RequestBody::Stat { path: path.to_string() })? {
        ReplyBody::Stat(s) => Ok(s),
        ReplyBody::Error { kind, message } => Err(ClientError::file(path, kind, message)),
        other => Err(ClientError::unexpected(&other)),
    }
}

/// A directory's entries, in the order the guest's file system lists them.
pub fn list_dir(stream: &mut UnixStream, path: &str) -> Result<Vec<DirEntry>, ClientError> {
    let id = next_id();
    send(stream, id, RequestBody::ListDir { path: path.to_string() })?;
    let mut buf = Vec::new();
    let mut all = Vec::new();
    loop {
        match recv(stream, &mut buf, id)? {
            ReplyBody::DirEntries { entries, last } => {
                all.extend(entries);
                if last {
                    return Ok(all);
                }
            }
            ReplyBody::Error { kind, message } => return Err(ClientError::file(path, kind, message)),
            other => return Err(ClientError::unexpected(&other)),
        }
    }
}

/// `mkdir` (`mkdir -p` with `parents`).
pub fn mkdir(stream: &mut UnixStream, path: &str, mode: u32, parents: bool) -> Result<(), ClientError> {
    expect_ok(stream, path, RequestBody::Mkdir { path: path.to_string(), mode, parents })
}

/// Removes a file or an empty directory, or with `recursive` a whole tree.
pub fn remove(stream: &mut UnixStream, path: &str, recursive: bool) -> Result<(), ClientError> {
    expect_ok(stream, path, RequestBody::Remove { path: path.to_string(), recursive })
}

fn expect_ok(stream: &mut UnixStream, path: &str, body: RequestBody) -> Result<(), ClientError> {
    match call(stream, body)? {
        ReplyBody::Ok => Ok(()),
        ReplyBody::Error { kind, message } => Err(ClientError::file(path, kind, message)),
        other => Err(ClientError::unexpected(&other)),
    }
}
