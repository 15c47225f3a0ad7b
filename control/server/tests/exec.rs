//! Commands over the data plane's WebSocket, on a real listener over the fake backend: output
//! with offsets, a client that leaves and comes back, kill, and who may attach.

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{app, ALICE, BOB};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Served {
    url: String,
    box_id: String,
    _app: common::App,
}

async fn served() -> Served {
    let app = app();
    let box_id = app.create(ALICE, "web").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(server::serve(
        listener,
        app.state.clone(),
        std::future::pending(),
    ));
    Served {
        url,
        box_id,
        _app: app,
    }
}

async fn connect(s: &Served, key: &str) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("{}/dataplane/{}/execute/ws", s.url, s.box_id)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", key.parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

async fn next(socket: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(_))) | None => return Value::Null,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{e}"),
        }
    }
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

/// Frames until `exit` (included) or the end.
async fn rest(socket: &mut Socket) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = next(socket).await;
        if frame.is_null() {
            return frames;
        }
        let last = frame["type"] == "exit" || frame["type"] == "error";
        frames.push(frame);
        if last {
            return frames;
        }
    }
}

fn text(frames: &[Value], stream: &str) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == stream)
        .map(|f| f["data"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_command_streams_with_offsets_and_ends_with_its_exit_code() {
    let s = served().await;
    let mut ws = connect(&s, ALICE).await.unwrap();
    send(&mut ws, json!({"type": "execute", "command": "echo one; echo two >&2; echo three; exit 5", "close_stdin": true})).await;
    let started = next(&mut ws).await;
    assert!(
        started["type"] == "started" && started["pid"].as_u64().is_some(),
        "{started}"
    );
    let frames = rest(&mut ws).await;
    assert_eq!(
        (text(&frames, "stdout"), text(&frames, "stderr")),
        ("one\nthree\n".to_string(), "two\n".to_string())
    );
    let offsets: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "stdout")
        .map(|f| f["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "exit", "exit_code": 5})
    );
}

#[tokio::test]
async fn a_command_outlives_its_client_and_a_reconnect_resumes_at_its_offsets() {
    let s = served().await;
    let mut ws = connect(&s, ALICE).await.unwrap();
    let command = "echo before; read line; echo after-$line; echo err >&2";
    send(
        &mut ws,
        json!({"type": "execute", "command": command, "command_id": "c1"}),
    )
    .await;
    let id = next(&mut ws).await["command_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id, "c1", "the client's command id is kept");
    let first = next(&mut ws).await;
    assert_eq!(
        (first["data"].as_str(), first["offset"].as_u64()),
        (Some("before\n"), Some(0))
    );
    ws.close(None).await.unwrap();
    drop(ws);
    // Another client feeds it stdin (and leaves at once): the command lives on the server.
    let mut feeder = connect(&s, ALICE).await.unwrap();
    send(
        &mut feeder,
        json!({"type": "reconnect", "command_id": id, "stdout_offset": 7, "stderr_offset": 0}),
    )
    .await;
    assert_eq!(next(&mut feeder).await["type"], "started");
    send(&mut feeder, json!({"type": "input", "data": "x\n"})).await;
    send(&mut feeder, json!({"type": "close_stdin"})).await;
    let fed = rest(&mut feeder).await;
    assert_eq!(text(&fed, "stdout"), "after-x\n");
    let mut again = connect(&s, ALICE).await.unwrap();
    send(
        &mut again,
        json!({"type": "reconnect", "command_id": id, "stdout_offset": 7, "stderr_offset": 0}),
    )
    .await;
    let started = next(&mut again).await;
    assert_eq!(
        (started["type"].as_str(), started["command_id"].as_str()),
        (Some("started"), Some(id.as_str()))
    );
    let frames = rest(&mut again).await;
    assert_eq!(
        (text(&frames, "stdout"), text(&frames, "stderr")),
        ("after-x\n".to_string(), "err\n".to_string())
    );
    assert_eq!(
        frames.iter().find(|f| f["type"] == "stdout").unwrap()["offset"],
        7
    );
    assert_eq!(frames.last().unwrap()["exit_code"], 0);
    let mut same = connect(&s, ALICE).await.unwrap();
    send(
        &mut same,
        json!({"type": "execute", "command": "echo never run", "command_id": "c1"}),
    )
    .await;
    assert_eq!(next(&mut same).await["command_id"], "c1");
    assert_eq!(
        text(&rest(&mut same).await, "stdout"),
        "before\nafter-x\n",
        "an execute of a known id attaches to it"
    );
}

#[tokio::test]
async fn kill_ends_the_command_and_unknown_commands_are_refused() {
    let s = served().await;
    let mut ws = connect(&s, ALICE).await.unwrap();
    send(
        &mut ws,
        json!({"type": "execute", "command": "sleep 60", "command_id": "k"}),
    )
    .await;
    next(&mut ws).await;
    send(&mut ws, json!({"type": "kill"})).await;
    assert_eq!(
        rest(&mut ws).await.last().unwrap(),
        &json!({"type": "exit", "exit_code": 137})
    );
    let mut ws = connect(&s, ALICE).await.unwrap();
    send(&mut ws, json!({"type": "reconnect", "command_id": "nope"})).await;
    assert_eq!(next(&mut ws).await["error_type"], "CommandNotFound");
    let mut ws = connect(&s, ALICE).await.unwrap();
    send(
        &mut ws,
        json!({"type": "execute", "command": "sleep 60", "timeout_seconds": 1}),
    )
    .await;
    next(&mut ws).await;
    assert_eq!(
        rest(&mut ws).await.last().unwrap()["error_type"],
        "CommandTimeout"
    );
}

#[tokio::test]
async fn only_the_boxes_tenant_may_attach() {
    let s = served().await;
    let status = |e: tokio_tungstenite::tungstenite::Error| match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => response.status().as_u16(),
        other => panic!("{other}"),
    };
    assert_eq!(status(connect(&s, BOB).await.unwrap_err()), 404);
    assert_eq!(
        status(connect(&s, "not-a-key-0123456789").await.unwrap_err()),
        401
    );
}
