//! Reaching the agent: the Firecracker-style `CONNECT` handshake on the VM's vsock socket, the
//! version handshake, health, and waiting for a booting guest's agent to answer.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{ErrorKind, ReplyBody, RequestBody, PROTOCOL_VERSION};

use super::{call, ClientError};

/// Connects to guest vsock `port` through the Firecracker-style socket at `uds`:
/// `CONNECT <port>\n`, answered by `OK <host port>\n`. `timeout` bounds the wait for that
/// answer (the VMM closes the connection when the guest refuses, or after its own timeout).
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(uds)
        .map_err(|source| ClientError::Connect { path: uds.display().to_string(), source })?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: whatever follows the line belongs to the agent's protocol.
    let mut line = Vec::new();
    let mut byte = [0u8];
    let answer = |line: &[u8]| String::from_utf8_lossy(line).into_owned();
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            Ok(_) if line.is_empty() => return Err(ClientError::NoListener(port)),
            Ok(_) => return Err(ClientError::Handshake { port, answer: answer(&line) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(ClientError::NoAnswer { port, timeout });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ClientError::NoListener(port)),
            Err(e) => return Err(e.into()),
        }
        if line.len() > 64 {
            return Err(ClientError::Handshake { port, answer: answer(&line) });
        }
    }
    // The VMM's word for a guest that never answered (vmm/core's vsock `CONNECT_TIMED_OUT`).
    if line == b"TIMEOUT" {
        return Err(ClientError::GuestSilent(port));
    }
    let port_ok = line.strip_prefix(b"OK ").is_some_and(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit));
    if !port_ok {
        return Err(ClientError::Handshake { port, answer: answer(&line) });
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Checks that the agent speaks this protocol version; returns its version string.
pub fn hello(stream: &mut UnixStream) -> Result<String, ClientError> {
    match call(stream, RequestBody::Hello { protocol_version: PROTOCOL_VERSION })? {
        ReplyBody::Hello { agent_version, .. } => Ok(agent_version),
        ReplyBody::Error { kind: ErrorKind::VersionMismatch, message } => Err(ClientError::VersionMismatch(message)),
        ReplyBody::Error { kind, message } => Err(ClientError::Refused { kind, message }),
        other => Err(ClientError::unexpected(&other)),
    }
}

/// What `Health` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub protocol_version: u32,
    pub agent_version: String,
    pub uptime_ms: u64,
    pub running_execs: u32,
}

pub fn health(stream: &mut UnixStream) -> Result<Health, ClientError> {
    match call(stream, RequestBody::Health)? {
        ReplyBody::Health { protocol_version, agent_version, uptime_ms, running_execs } => {
            Ok(Health { protocol_version, agent_version, uptime_ms, running_execs })
        }
        ReplyBody::Error { kind, message } => Err(ClientError::Refused { kind, message }),
        other => Err(ClientError::unexpected(&other)),
    }
}

/// Longest wait for one attempt's `CONNECT` answer: the VMM answers a refused connection at
/// once and gives up on a silent guest after 2 s.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Retries connect + `Health` until the agent answers (a VM that is still booting: no socket
/// yet, no listener yet) or `timeout` has passed; then returns the last attempt's error in
/// `NotReady`. A protocol version mismatch is not retried. Returns the answer and the
/// connection, which stays usable for further requests.
pub fn wait_ready(uds: &Path, port: u32, timeout: Duration) -> Result<(Health, UnixStream), ClientError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let attempt = (|| {
            let mut s = connect(uds, port, left.min(ATTEMPT_TIMEOUT))?;
            s.set_read_timeout(Some(left.clamp(Duration::from_millis(1), ATTEMPT_TIMEOUT)))?;
            let h = health(&mut s)?;
            if h.protocol_version != PROTOCOL_VERSION {
                return Err(ClientError::VersionMismatch(format!(
                    "agent speaks protocol {}, ember {PROTOCOL_VERSION}",
                    h.protocol_version
                )));
            }
            Ok((h, s))
        })();
        match attempt {
            Ok(h) => return Ok(h),
            Err(e @ ClientError::VersionMismatch(_)) => return Err(e),
            Err(e) if start.elapsed() + pause >= timeout => {
                return Err(ClientError::NotReady { waited: start.elapsed(), last: Box::new(e) })
            }
            Err(e) => tracing::debug!("agent not ready yet: {e}"),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
