//! `POST .../execute/stream/start` and `.../resume`: a command over Server-Sent Events, as
//! `langsmith/sandbox/_sse_execute.py` reads them (`LANGSMITH_FEATURES=sandbox_sse_exec`).
//! Events: `started`, `stdout`/`stderr` with base64 data and the offset of its first byte,
//! `stream_end` per stream and `exit` at the end, `error`. The transport is one way, so what a
//! response carries counts as delivered only when the client resumes from past it: once the
//! command is held back for want of that, the response ends with `ack_required` and the
//! client's resume (its offsets) is the acknowledgement. A comment line every 15 s keeps an
//! idle stream alive.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::commands::{Command, Ending};
use super::execute::{get_or_start, ExecuteRequest};
use crate::backend::Stream;
use crate::error::ApiError;
use crate::routes::Body;
use crate::state::Shared;
use crate::tenants::Tenant;

const HEARTBEAT: Duration = Duration::from_secs(15);
const READ_AT_ONCE: usize = 256 << 10;

#[derive(Debug, Deserialize)]
pub struct ResumeRequest {
    command_id: String,
    #[serde(default)]
    stdout_offset: u64,
    #[serde(default)]
    stderr_offset: u64,
}

fn event(name: &str, data: serde_json::Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

pub async fn start(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    Body(mut request): Body<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let record = super::running_box(&state, &tenant, &box_id).await?;
    // Over SSE a command gets no stdin.
    request.close_stdin = true;
    request.pty = false;
    let command =
        get_or_start(&state, &record, &request)
            .await
            .map_err(|e| ApiError::BadRequest {
                kind: if e.kind == "InvalidRequest" {
                    "InvalidRequest"
                } else {
                    "CommandError"
                },
                message: e.message,
            })?;
    Ok(stream(command, [0, 0]))
}

pub async fn resume(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    Body(request): Body<ResumeRequest>,
) -> Result<Response, ApiError> {
    let record = state.boxes.by_id(&tenant.name, &box_id)?;
    let command = state
        .commands
        .get(&record.id, &request.command_id)
        .ok_or_else(|| ApiError::NotFound(format!("Command not found: {}", request.command_id)))?;
    command.ack(Stream::Stdout, request.stdout_offset);
    command.ack(Stream::Stderr, request.stderr_offset);
    Ok(stream(
        command,
        [request.stdout_offset, request.stderr_offset],
    ))
}

/// The event stream of `command` from `cursor`.
fn stream(command: Arc<Command>, cursor: [u64; 2]) -> Response {
    let (tx, mut rx) = mpsc::channel::<String>(16);
    tokio::spawn(async move {
        let _attached = command.attach();
        let _ = follow(&command, cursor, &tx).await;
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|e| e.map(Ok::<_, std::convert::Infallible>))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        HttpBody::from_stream(body),
    )
        .into_response()
}

async fn follow(
    command: &Command,
    mut cursor: [u64; 2],
    tx: &mpsc::Sender<String>,
) -> Result<(), mpsc::error::SendError<String>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    tx.send(event(
        "started",
        json!({"command_id": command.id, "pid": command.pid}),
    ))
    .await?;
    let mut changes = command.subscribe();
    loop {
        let read = command.read(&mut cursor, READ_AT_ONCE);
        let more = !read.pieces.is_empty();
        for piece in &read.pieces {
            let name = if piece.stream == Stream::Stdout {
                "stdout"
            } else {
                "stderr"
            };
            tx.send(event(
                name,
                json!({"offset": piece.offset, "data": b64.encode(&piece.data)}),
            ))
            .await?;
        }
        if let Some(ending) = read.ending {
            for (name, end) in [("stdout", cursor[0]), ("stderr", cursor[1])] {
                tx.send(event("stream_end", json!({"stream": name, "offset": end})))
                    .await?;
            }
            let last = match ending {
                Ending::Exit(code) => event("exit", json!({"exit_code": code})),
                Ending::TimedOut(t) => event(
                    "error",
                    json!({"error_type": "CommandTimeout", "error": format!("Command timed out after {} seconds", t.as_secs())}),
                ),
                Ending::Failed(m) => {
                    event("error", json!({"error_type": "CommandError", "error": m}))
                }
            };
            return tx.send(last).await;
        }
        if !more && read.held_back {
            return tx
                .send(event(
                    "ack_required",
                    json!({"stdout_offset": cursor[0], "stderr_offset": cursor[1]}),
                ))
                .await;
        }
        if more {
            continue;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(HEARTBEAT) => tx.send(": ping\n\n".to_string()).await?,
            () = tx.closed() => return Ok(()),
        }
    }
}
