//! The agent's identity hooks: the guest's hostname, wall clock and kernel RNG, which a guest
//! restored from a snapshot would otherwise share with every other copy of that snapshot.

use std::os::unix::net::UnixStream;

use ember_agent::{ReplyBody, RequestBody};

use super::{call, ClientError};

/// sethostname in the guest.
pub fn set_hostname(stream: &mut UnixStream, name: &str) -> Result<(), ClientError> {
    unit(stream, "set the hostname", RequestBody::SetHostname { name: name.to_string() })
}

/// Sets the guest's wall clock (CLOCK_REALTIME) to `secs` + `nanos` since the Unix epoch;
/// the agent refuses `nanos` of a second or more.
pub fn set_clock(stream: &mut UnixStream, secs: i64, nanos: u32) -> Result<(), ClientError> {
    unit(stream, "set the clock", RequestBody::SetClock { secs, nanos })
}

/// Mixes `data` into the guest kernel's entropy pool crediting `entropy_bits` (at most 8 per
/// byte), then has it reseed its CRNG, so that what the guest draws from then on depends on
/// `data`.
pub fn add_entropy(stream: &mut UnixStream, data: &[u8], entropy_bits: u32) -> Result<(), ClientError> {
    unit(stream, "add entropy", RequestBody::AddEntropy { data: data.to_vec(), entropy_bits })
}

fn unit(stream: &mut UnixStream, what: &'static str, request: RequestBody) -> Result<(), ClientError> {
    match call(stream, request)? {
        ReplyBody::Ok => Ok(()),
        ReplyBody::Error { kind, message } => Err(ClientError::Failed { what, kind, message }),
        other => Err(ClientError::unexpected(&other)),
    }
}
