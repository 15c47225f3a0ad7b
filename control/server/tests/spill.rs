//! A command's output past the memory bound goes to disk while no client reads it: the command
//! runs to its end instead of waiting, and a client that comes later gets every byte, at its
//! offsets.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{app_configured, ALICE};

fn sse_request(id: &str, what: &str, body: Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(format!("/dataplane/{id}/execute/stream/{what}"))
        .header("host", "ember.test:8080")
        .header("x-api-key", ALICE)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn output_nobody_reads_spills_to_disk_and_a_later_client_gets_all_of_it() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-spill-test-").unwrap();
    let spill_dir = dir.as_path().to_path_buf();
    let app = app_configured(move |c| {
        c.output_capacity = 1 << 20;
        c.spill = Some((spill_dir, 16 << 20));
    });
    let id = app.create(ALICE, "loud").await["id"].as_str().unwrap().to_string();
    let bytes = 5_000_000usize;
    let started = app
        .router
        .clone()
        .oneshot(sse_request(
            &id,
            "start",
            json!({"command": format!("head -c {bytes} /dev/zero | tr '\\0' x"), "command_id": "c1"}),
        ))
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::OK);
    // Nobody reads that response: without the spill the command would wait at 1 MiB.
    let command = app.state.commands.get(&id, "c1").expect("the command is registered");
    for _ in 0..200 {
        if !command.running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!command.running(), "the command ran to its end");
    drop(started);
    let resumed = app
        .router
        .clone()
        .oneshot(sse_request(&id, "resume", json!({"command_id": "c1"})))
        .await
        .unwrap();
    let text = String::from_utf8(resumed.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let (mut got, mut next, mut event) = (0usize, 0u64, "");
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            event = name;
        } else if let (Some(data), "stdout") = (line.strip_prefix("data: "), event) {
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["offset"].as_u64(), Some(next), "pieces follow on at their offsets");
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(data["data"].as_str().unwrap())
                .unwrap();
            assert!(decoded.iter().all(|&b| b == b'x'));
            got += decoded.len();
            next += decoded.len() as u64;
        }
    }
    assert_eq!(got, bytes, "every byte came back");
    assert!(text.contains("event: exit"), "and the ending");
}
