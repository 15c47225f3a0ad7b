//! Reaching a TCP port inside a box, for the data plane's tunnels and the service URLs: the
//! box must be running (a stopped box is not started for it: its tunnels and URLs fail with
//! `NotReady` until the box is started again), each dial counts as use of the box (its idle
//! TTL starts again; a stream that stays open long does not by itself), and every dial, refused or not, goes to the
//! box's event trace.

use serde_json::json;
use tokio::net::UnixStream;

use crate::boxes::Status;
use crate::error::ApiError;
use crate::lifecycle::not_ready;
use crate::state::{blocking, Shared};

/// How a box's port was reached, for its event trace.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    Tunnel,
    ServiceUrl,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Tunnel => "tunnel",
            Via::ServiceUrl => "service_url",
        }
    }
}

/// Connects to `port` in box `box_id` (which the caller already found for its tenant). A
/// port nothing listens on is `BadGateway` naming it.
pub async fn dial(state: &Shared, box_id: &str, port: u16, via: Via) -> Result<UnixStream, ApiError> {
    let record = state.boxes.find(box_id).ok_or_else(|| ApiError::NotFound(format!("Sandbox '{box_id}' not found")))?;
    let name = match (&record.backend, record.status) {
        (Some(name), Status::Ready) => name.clone(),
        _ => return Err(not_ready(&record)),
    };
    // A connection is use of the box, for its idle TTL.
    state.boxes.touch(box_id);
    let backend = state.backend.clone();
    let dialed = blocking(move || backend.dial(&name, port)).await?;
    let event = |outcome: &str| json!({"kind": "port", "via": via.as_str(), "port": port, "outcome": outcome});
    match dialed {
        Ok(stream) => {
            state.events.record(box_id, event("connected"));
            stream
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(stream))
                .map_err(|e| ApiError::Internal(format!("port {port}: {e}")))
        }
        Err(e) => {
            state.events.record(box_id, event("refused"));
            Err(ApiError::from_backend(&format!("cannot reach port {port} of sandbox '{}'", record.name), e))
        }
    }
}
