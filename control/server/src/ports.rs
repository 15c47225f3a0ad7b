//! Reaching a TCP port inside a box, for the data plane's tunnels and the service URLs: the
//! box must be running (a stopped box is not started for it: its tunnels and URLs fail with
//! `NotReady` until the box is started again), each dial counts as use of the box (its idle
//! TTL starts again; a stream that stays open long does not by itself), and every dial, refused or not, goes to the
//! box's event trace (a host sandbox's, see `host_sandboxes`, to the server's log).

use serde_json::json;
use tokio::net::UnixStream;

use crate::boxes::Status;
use crate::error::ApiError;
use crate::host_sandboxes;
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
    let (name, label, traced) = match state.boxes.find(box_id) {
        Some(record) => {
            let name = match (&record.backend, record.status) {
                (Some(name), Status::Ready) => name.clone(),
                _ => return Err(not_ready(&record)),
            };
            // A connection is use of the box, for its idle TTL.
            state.boxes.touch(box_id);
            (name, format!("sandbox '{}'", record.name), true)
        }
        None => match host_sandboxes::resolve(state, box_id).await? {
            Some(name) => (name.clone(), format!("host sandbox '{name}'"), false),
            None => return Err(ApiError::NotFound(format!("Sandbox '{box_id}' not found"))),
        },
    };
    let backend = state.backend.clone();
    let dialed = blocking(move || backend.dial(&name, port)).await?;
    let outcome = |outcome: &str| {
        if traced {
            state.events.record(box_id, json!({"kind": "port", "via": via.as_str(), "port": port, "outcome": outcome}));
        } else {
            tracing::info!("{label}: port {port} by {}: {outcome}", via.as_str());
        }
    };
    match dialed {
        Ok(stream) => {
            outcome("connected");
            stream
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(stream))
                .map_err(|e| ApiError::Internal(format!("port {port}: {e}")))
        }
        Err(e) => {
            outcome("refused");
            Err(ApiError::from_backend(&format!("cannot reach port {port} of {label}"), e))
        }
    }
}
