//! The host side of the guest agent's protocol (guest-agent/PROTOCOL.md): reaching the agent
//! through the VMM's vsock socket (`connect`, `wait_ready`), running commands with their output
//! streamed back and stdin passed through (`exec`, `Exec`), moving files (`upload`,
//! `download`, `stat`, ...), dialing a TCP port in the guest (`dial`), the identity hooks for restored guests (`set_identity`),
//! and the guest's egress (`enable_egress`).
//!
//! Each call takes a fresh request id, and replies for any other id are skipped: an operation
//! that ended early (a local write failed mid-download, say) leaves frames behind that the next
//! call on the same connection does not mistake for its own. Data moves in large frames with no
//! per-chunk acknowledgement; the only flow control is the connection's own.

mod connect;
mod dial;
mod egress;
mod exec;
mod files;
mod identity;

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agent_protocol::{decode, read_frame, write_frame, ErrorKind, FrameError, Reply, ReplyBody, Request, RequestBody};

pub use connect::{connect, health, hello, wait_ready, Health};
pub use dial::dial;
pub use egress::enable_egress;
pub use exec::{exec, spawn_detached, Exec, ExecControl, Outcome};
pub use files::{download, list_dir, mkdir, remove, stat, upload};
pub use identity::{set_identity, Identity};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VM's vsock socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("the guest has no listener on vsock port {0} (is the agent running?)")]
    NoListener(u32),
    #[error(
        "the guest did not answer a connection to its vsock port {0} within the VMM's 2 s: \
         it is stalled or starved of CPU (see the sandbox's vmm.log and console.log)"
    )]
    GuestSilent(u32),
    #[error("the VM's vsock socket did not answer CONNECT {port} within {timeout:?}")]
    NoAnswer { port: u32, timeout: Duration },
    #[error("the VM's vsock socket answered CONNECT {port} with {answer:?} instead of OK")]
    Handshake { port: u32, answer: String },
    #[error("the agent did not answer within {waited:?} (last attempt: {last})")]
    NotReady { waited: Duration, last: Box<ClientError> },
    #[error("the agent speaks another protocol version: {0}")]
    VersionMismatch(String),
    #[error("talking to the agent failed: {0}")]
    Io(#[from] io::Error),
    #[error("the agent's reply could not be read: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent closed the connection before replying")]
    Closed,
    #[error("the agent rejected a frame on this connection: {message}")]
    Protocol { kind: ErrorKind, message: String },
    #[error("unexpected reply from the agent: {0}")]
    Unexpected(String),
    /// The agent's message is written for people (`no directory /x in the sandbox`); `kind`
    /// is for programs, and not shown.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("the agent could not {what}: {message}")]
    Failed { what: &'static str, kind: ErrorKind, message: String },
    #[error("{path} (in the guest): no such file or directory")]
    NotFound { path: String },
    #[error("{path} (in the guest): is a directory")]
    IsADirectory { path: String },
    #[error("{path} (in the guest): a component of the path is not a directory")]
    NotADirectory { path: String },
    #[error("{path} (in the guest): permission denied")]
    PermissionDenied { path: String },
    #[error("{path} (in the guest): {message}")]
    File { path: String, kind: ErrorKind, message: String },
    #[error("{path} (in the guest): the agent sent {got} bytes but announced {announced}")]
    SizeMismatch { path: String, got: u64, announced: u64 },
    #[error("cannot reach port {port} in the sandbox: {message}")]
    DialFailed { port: u16, message: String },
    #[error("the sandbox's agent is too old to dial ports (update its image)")]
    DialUnsupported,
    #[error("the sandbox's agent is too old for egress (update its image)")]
    EgressUnsupported,
    #[error("local {what} failed: {source}")]
    Local { what: &'static str, source: io::Error },
}

impl ClientError {
    /// An agent's error about a file request, naming the path.
    fn file(path: &str, kind: ErrorKind, message: String) -> ClientError {
        let path = path.to_string();
        match kind {
            ErrorKind::NotFound => ClientError::NotFound { path },
            ErrorKind::IsADirectory => ClientError::IsADirectory { path },
            ErrorKind::NotADirectory => ClientError::NotADirectory { path },
            ErrorKind::PermissionDenied => ClientError::PermissionDenied { path },
            kind => ClientError::File { path, kind, message },
        }
    }

    fn unexpected(body: &ReplyBody) -> ClientError {
        // Data-carrying replies would print their whole payload: name the variant only.
        let text = format!("{body:?}");
        ClientError::Unexpected(text.split(['{', '(']).next().unwrap_or("").trim().to_string())
    }
}

/// A request id no other call in this process uses.
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn send(stream: &mut UnixStream, id: u64, body: RequestBody) -> Result<(), ClientError> {
    write_frame(stream, &Request { id, body })?;
    Ok(())
}

/// Reads replies until one for `id` arrives. Replies for other ids are left over from an
/// earlier call that ended early and are skipped; an error about the connection itself
/// (a frame the agent could not read) is returned.
fn recv(stream: &mut UnixStream, buf: &mut Vec<u8>, id: u64) -> Result<ReplyBody, ClientError> {
    loop {
        match read_frame(stream, buf) {
            Ok(()) => {}
            Err(FrameError::Closed) => return Err(ClientError::Closed),
            Err(e) => return Err(e.into()),
        }
        let reply: Reply = decode(buf)?;
        if reply.id == id {
            return Ok(reply.body);
        }
        if reply.id == agent_protocol::CONNECTION_ID {
            if let ReplyBody::Error { kind, message } = reply.body {
                return Err(ClientError::Protocol { kind, message });
            }
        }
        tracing::debug!("skipping a reply for request {} while waiting for {id}", reply.id);
    }
}

/// One request, one reply.
fn call(stream: &mut UnixStream, body: RequestBody) -> Result<ReplyBody, ClientError> {
    let id = next_id();
    send(stream, id, body)?;
    recv(stream, &mut Vec::new(), id)
}
