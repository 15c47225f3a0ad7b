//! The agent's identity hooks: the guest's hostname, wall clock and kernel RNG, which a guest
//! restored from a snapshot would otherwise share with every other copy of that snapshot.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{SystemTime, UNIX_EPOCH};

use agent_protocol::{write_frame, ReplyBody, Request, RequestBody};

use super::{next_id, recv, ClientError};

/// What makes a guest a machine of its own.
pub struct Identity<'a> {
    /// Mixed into the guest kernel's entropy pool, crediting `entropy_bits` (at most 8 per
    /// byte); the kernel then reseeds its CRNG, so that what the guest draws from then on
    /// depends on it.
    pub entropy: &'a [u8],
    pub entropy_bits: u32,
    pub hostname: &'a str,
}

/// Gives the guest `identity` and sets its wall clock (CLOCK_REALTIME) to the host's. The
/// three requests go out in one write and are answered in order, in one round trip rather than
/// three: every sandbox start waits for this. One write is one packet to the guest, which in a
/// restored or forked sandbox means fewer pages of guest memory written (each packet fills a
/// receive buffer that the guest then replaces).
pub fn set_identity(stream: &mut UnixStream, identity: &Identity) -> Result<(), ClientError> {
    let (entropy_id, clock_id, hostname_id) = (next_id(), next_id(), next_id());
    // The RNG first: whatever runs in the guest meanwhile draws from the shared state.
    let entropy = RequestBody::AddEntropy { data: identity.entropy.to_vec(), entropy_bits: identity.entropy_bits };
    let mut requests = Vec::new();
    write_frame(&mut requests, &Request { id: entropy_id, body: entropy })?;
    // Read as late as possible: the guest's clock starts from this reading.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let clock = RequestBody::SetClock { secs: now.as_secs() as i64, nanos: now.subsec_nanos() };
    write_frame(&mut requests, &Request { id: clock_id, body: clock })?;
    let hostname = RequestBody::SetHostname { name: identity.hostname.to_string() };
    write_frame(&mut requests, &Request { id: hostname_id, body: hostname })?;
    stream.write_all(&requests)?;
    let mut buf = Vec::new();
    for (id, what) in [(entropy_id, "add entropy"), (clock_id, "set the clock"), (hostname_id, "set the hostname")] {
        match recv(stream, &mut buf, id)? {
            ReplyBody::Ok => {}
            ReplyBody::Error { kind, message } => return Err(ClientError::Failed { what, kind, message }),
            other => return Err(ClientError::unexpected(&other)),
        }
    }
    Ok(())
}
