//! Dialing a TCP port in the guest: a connection given to [`dial`] becomes that TCP
//! connection's bytes, for a tunnel or a proxy to copy.

use std::os::unix::net::UnixStream;

use agent_protocol::{ErrorKind, ReplyBody, RequestBody};

use super::{call, ClientError};

/// Asks the agent on `stream` (a fresh connection: `Dial` must be its first request) to
/// connect to `port` on the guest's loopback. On success the stream carries that TCP
/// connection's bytes both ways; shutting down its write side is the guest service's end of
/// file. Nothing listening there is [`ClientError::DialFailed`].
pub fn dial(mut stream: UnixStream, port: u16) -> Result<UnixStream, ClientError> {
    match call(&mut stream, RequestBody::Dial { port })? {
        ReplyBody::Ok => Ok(stream),
        ReplyBody::Error { kind: ErrorKind::DialFailed, message } => Err(ClientError::DialFailed { port, message }),
        // An agent from before `Dial` cannot decode the request.
        ReplyBody::Error { kind: ErrorKind::MalformedFrame, .. } => Err(ClientError::DialUnsupported),
        ReplyBody::Error { kind, message } => Err(ClientError::Refused { kind, message }),
        other => Err(ClientError::unexpected(&other)),
    }
}
