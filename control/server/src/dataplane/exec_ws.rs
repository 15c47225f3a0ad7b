//! `GET .../execute/ws`: a command over a WebSocket, as `langsmith/sandbox/_ws_execute.py`
//! speaks it. The client's first message is `execute` (get-or-create by its `command_id`) or
//! `reconnect` (with the offsets it has); the server answers `started`, then `stdout` and
//! `stderr` frames (text, each with the byte offset of its first byte), then `exit` (or an
//! `error`), and closes. Meanwhile the client may send `input`, `close_stdin` and `kill`. The
//! command goes on when the socket drops.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::commands::{Command, Ending};
use super::execute::{get_or_start, ExecError, ExecuteRequest};
use super::output::Utf8Splitter;
use crate::backend::Stream;
use crate::boxes::BoxRecord;
use crate::error::ApiError;
use crate::state::Shared;
use crate::tenants::Tenant;

/// Bytes of output read from the log at a time, between looks at the client's messages.
const READ_AT_ONCE: usize = 256 << 10;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Execute(Box<ExecuteRequest>),
    Reconnect {
        command_id: String,
        #[serde(default)]
        stdout_offset: u64,
        #[serde(default)]
        stderr_offset: u64,
    },
    Input {
        data: String,
    },
    CloseStdin,
    Kill,
}

pub async fn upgrade(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let record = super::running_box(&state, &tenant, &box_id).await?;
    Ok(ws.on_upgrade(move |socket| session(state, record, socket)))
}

fn error_frame(kind: &str, message: &str) -> Message {
    Message::Text(
        json!({"type": "error", "error_type": kind, "error": message})
            .to_string()
            .into(),
    )
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// The last frame for `ending`.
fn ending_frame(ending: &Ending) -> Message {
    match ending {
        Ending::Exit(code) => Message::Text(
            json!({"type": "exit", "exit_code": code})
                .to_string()
                .into(),
        ),
        Ending::TimedOut(t) => error_frame(
            "CommandTimeout",
            &format!("Command timed out after {} seconds", t.as_secs()),
        ),
        Ending::Failed(m) => error_frame("CommandError", m),
    }
}

async fn session(state: Shared, record: BoxRecord, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let first = loop {
        match rx.next().await {
            Some(Ok(Message::Text(text))) => break text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return,
        }
    };
    let opened = match serde_json::from_str::<ClientMessage>(&first) {
        Ok(ClientMessage::Execute(request)) => get_or_start(&state, &record, &request)
            .await
            .map(|c| (c, [0, 0])),
        Ok(ClientMessage::Reconnect {
            command_id,
            stdout_offset,
            stderr_offset,
        }) => match state.commands.get(&record.id, &command_id) {
            Some(command) => {
                command.ack(Stream::Stdout, stdout_offset);
                command.ack(Stream::Stderr, stderr_offset);
                Ok((command, [stdout_offset, stderr_offset]))
            }
            None => Err(ExecError {
                kind: "CommandNotFound",
                message: format!("Command not found: {command_id}"),
            }),
        },
        Ok(_) => Err(ExecError {
            kind: "InvalidRequest",
            message: "the first message must be execute or reconnect".into(),
        }),
        Err(e) => Err(ExecError {
            kind: "InvalidRequest",
            message: format!("cannot read the message: {e}"),
        }),
    };
    let (command, cursor) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = tx.send(error_frame(e.kind, &e.message)).await;
            let _ = close(&mut tx, &mut rx).await;
            return;
        }
    };
    let _attached = command.attach();
    let started = json!({"type": "started", "command_id": command.id, "pid": command.pid});
    if tx
        .send(Message::Text(started.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let _ = follow(&command, cursor, &mut tx, &mut rx).await;
}

/// How long a client has to answer the server's Close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The closing handshake: a Close, then what the client still sends read (and dropped) until
/// its Close. A socket dropped with the client's messages unread sends a TCP reset, and a
/// client that has not yet read the last frames may then lose them.
async fn close(
    tx: &mut (impl SinkExt<Message, Error = axum::Error> + Unpin),
    rx: &mut (impl StreamExt<Item = Result<Message, axum::Error>> + Unpin),
) -> Result<(), axum::Error> {
    tx.send(Message::Close(None)).await?;
    let drained = async {
        while let Some(Ok(message)) = rx.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drained).await;
    Ok(())
}

/// Sends the command's output from `cursor` as it comes, and its ending, while serving the
/// client's messages; returns when the client is gone or the command's end was sent.
async fn follow(
    command: &Command,
    mut cursor: [u64; 2],
    tx: &mut (impl SinkExt<Message, Error = axum::Error> + Unpin),
    rx: &mut (impl StreamExt<Item = Result<Message, axum::Error>> + Unpin),
) -> Result<(), axum::Error> {
    let mut changes = command.subscribe();
    let mut text = [Utf8Splitter::default(), Utf8Splitter::default()];
    loop {
        let read = command.read(&mut cursor, READ_AT_ONCE);
        let more = !read.pieces.is_empty();
        for piece in read.pieces {
            let mut frames = Vec::new();
            text[piece.stream as usize].feed(piece.offset, &piece.data, &mut frames);
            for (offset, data) in frames {
                let frame =
                    json!({"type": stream_name(piece.stream), "data": data, "offset": offset});
                tx.send(Message::Text(frame.to_string().into())).await?;
            }
            command.ack(piece.stream, piece.offset + piece.data.len() as u64);
        }
        if let Some(ending) = read.ending {
            for (stream, splitter) in [Stream::Stdout, Stream::Stderr]
                .into_iter()
                .zip(text.iter_mut())
            {
                let mut frames = Vec::new();
                splitter.flush(&mut frames);
                for (offset, data) in frames {
                    tx.send(Message::Text(
                        json!({"type": stream_name(stream), "data": data, "offset": offset})
                            .to_string()
                            .into(),
                    ))
                    .await?;
                }
            }
            tx.send(ending_frame(&ending)).await?;
            return close(tx, rx).await;
        }
        tokio::select! {
            biased;
            message = rx.next() => match message {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ClientMessage>(&t) {
                    Ok(ClientMessage::Input { data }) => command.write_stdin(data.as_bytes()),
                    Ok(ClientMessage::CloseStdin) => command.close_stdin(),
                    Ok(ClientMessage::Kill) => command.kill(),
                    Ok(_) => tx.send(error_frame("InvalidRequest", "this connection already follows a command")).await?,
                    Err(e) => tx.send(error_frame("InvalidRequest", &format!("cannot read the message: {e}"))).await?,
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
            () = std::future::ready(()), if more => {}
            changed = changes.changed(), if !more => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
