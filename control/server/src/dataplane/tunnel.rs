//! `GET .../tunnel`: TCP tunnels as `langsmith/sandbox/_tunnel.py` speaks them. The WebSocket
//! carries one yamux session (the client opens the streams); each stream starts with the
//! client's 3-byte connect header (protocol version 1, then the port, big-endian), which the
//! server answers with one status byte, and then carries the bytes of a TCP connection to that
//! port in the box, each stream its own connection through the guest agent.
//!
//! Flow control is yamux's per-stream window on the WebSocket side and the agent connection's
//! own on the guest side, with one bounded buffer per direction between them; a stream's end
//! of file is passed on as a half-close either way.

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::future::poll_fn;
use futures_util::{AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::ws_io::WsIo;
use crate::boxes::Status;
use crate::error::ApiError;
use crate::lifecycle::not_ready;
use crate::ports::{dial, Via};
use crate::state::Shared;
use crate::tenants::Tenant;

pub const PROTOCOL_VERSION: u8 = 0x01;
pub const STATUS_OK: u8 = 0x00;
pub const STATUS_PORT_NOT_ALLOWED: u8 = 0x01;
pub const STATUS_DIAL_FAILED: u8 = 0x02;
pub const STATUS_UNSUPPORTED_VERSION: u8 = 0x03;

/// Streams one session may have open at once (each is an agent connection in the guest,
/// which serves 64 at most).
const MAX_STREAMS: usize = 48;
/// The copy buffer of each direction of a stream.
const BUFFER: usize = 64 << 10;

pub async fn upgrade(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let record = state.boxes.by_id(&tenant.name, &box_id)?;
    if record.status != Status::Ready {
        return Err(not_ready(&record));
    }
    Ok(ws.on_upgrade(move |socket| session(state, box_id, socket)))
}

async fn session(state: Shared, box_id: String, socket: WebSocket) {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    let mut conn = yamux::Connection::new(WsIo::new(socket), config, yamux::Mode::Server);
    // Polling for inbound streams is what drives the whole session, the open streams' bytes
    // included: it runs until the client goes.
    while let Some(next) = poll_fn(|cx| conn.poll_next_inbound(cx)).await {
        match next {
            Ok(stream) => {
                tokio::spawn(forward(state.clone(), box_id.clone(), stream));
            }
            Err(e) => {
                tracing::debug!("tunnel session of box {box_id}: {e}");
                break;
            }
        }
    }
}

/// One stream: its connect header, the status, then the splice.
async fn forward(state: Shared, box_id: String, mut stream: yamux::Stream) {
    let mut header = [0u8; 3];
    if stream.read_exact(&mut header).await.is_err() {
        return;
    }
    let port = u16::from_be_bytes([header[1], header[2]]);
    let status = if header[0] != PROTOCOL_VERSION {
        Err(STATUS_UNSUPPORTED_VERSION)
    } else if port == 0 {
        Err(STATUS_PORT_NOT_ALLOWED)
    } else {
        match dial(&state, &box_id, port, Via::Tunnel).await {
            Ok(guest) => Ok(guest),
            Err(e) => {
                tracing::debug!("tunnel to port {port} of box {box_id}: {e}");
                Err(STATUS_DIAL_FAILED)
            }
        }
    };
    let mut guest = match status {
        Ok(guest) => guest,
        Err(code) => {
            let _ = stream.write_all(&[code]).await;
            let _ = stream.close().await;
            return;
        }
    };
    if stream.write_all(&[STATUS_OK]).await.is_err() {
        return;
    }
    let mut stream = stream.compat();
    if let Err(e) = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut guest, BUFFER, BUFFER).await {
        tracing::debug!("tunnel to port {port} of box {box_id} ended: {e}");
    }
    // The stream's end is use of the box too: its idle TTL counts from here.
    state.boxes.touch(&box_id);
}
