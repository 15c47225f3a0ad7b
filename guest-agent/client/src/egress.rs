//! Giving a sandbox's guest its egress (see PROTOCOL.md, "EnableEgress").

use std::os::unix::net::UnixStream;

use agent_protocol::{EgressConfig, ErrorKind, ReplyBody, RequestBody};

use super::{call, ClientError};

/// Has the agent on `stream` forward `127.0.0.1:listen_port` in the guest to the host's vsock
/// port `host_port`, trust `ca_pem`, and give every exec the proxy variables from now on.
/// Idempotent.
pub fn enable_egress(stream: &mut UnixStream, config: &EgressConfig) -> Result<(), ClientError> {
    match call(stream, RequestBody::EnableEgress(config.clone()))? {
        ReplyBody::Ok => Ok(()),
        // An agent from before `EnableEgress` cannot decode the request.
        ReplyBody::Error { kind: ErrorKind::MalformedFrame, .. } => Err(ClientError::EgressUnsupported),
        ReplyBody::Error { kind, message } => Err(ClientError::Failed { what: "enable egress", kind, message }),
        other => Err(ClientError::unexpected(&other)),
    }
}
