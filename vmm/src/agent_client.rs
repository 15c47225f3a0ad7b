//! The host side of the guest agent's protocol (guest-agent/PROTOCOL.md): reaching the agent
//! through the VMM's vsock socket, and running a command with its output streamed back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ember_agent::{read_message, write_frame, ErrorKind, ExecRequest, Reply, ReplyBody, Request, RequestBody};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VM's vsock socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("the guest has no listener on vsock port {0} (is the agent running?)")]
    NoListener(u32),
    #[error("talking to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent's reply could not be read: {0}")]
    Frame(#[from] ember_agent::FrameError),
    #[error("the agent refused the command ({kind:?}): {message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("the agent closed the connection before the command finished")]
    Closed,
}

/// Connects to guest vsock `port` through the Firecracker-style socket at `uds`:
/// `CONNECT <port>\n`, answered by `OK <host port>\n`.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(uds)
        .map_err(|source| ClientError::Connect { path: uds.display().to_string(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: whatever follows the line belongs to the agent's protocol.
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return Err(ClientError::NoListener(port)),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(ClientError::NoListener(port));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exit(i32),
    Killed(i32),
    TimedOut,
}

/// Runs `exec` and copies its stdout and stderr to `out` and `err` as they arrive.
pub fn exec(
    stream: UnixStream,
    exec: ExecRequest,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, ClientError> {
    const ID: u64 = 1;
    let mut writer = stream.try_clone()?;
    write_frame(&mut writer, &Request { id: ID, body: RequestBody::Exec(exec) })?;
    let mut reader = BufReader::new(stream);
    loop {
        if reader.fill_buf()?.is_empty() {
            return Err(ClientError::Closed);
        }
        let reply: Reply = read_message(&mut reader)?;
        match reply.body {
            ReplyBody::Stdout { data } => {
                out.write_all(&data)?;
                out.flush()?;
            }
            ReplyBody::Stderr { data } => {
                err.write_all(&data)?;
                err.flush()?;
            }
            ReplyBody::Exit { code } => return Ok(Outcome::Exit(code)),
            ReplyBody::Killed { signal } => return Ok(Outcome::Killed(signal)),
            ReplyBody::TimedOut => return Ok(Outcome::TimedOut),
            ReplyBody::Error { kind, message } => return Err(ClientError::Refused { kind, message }),
            _ => {}
        }
    }
}
