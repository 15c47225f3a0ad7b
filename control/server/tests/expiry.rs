//! Boxes that end on their own: stopped after `idle_ttl_seconds` without use, deleted
//! `delete_after_stop_seconds` after they stopped; what counts as use. The reaper's rounds are
//! run here by hand (`server::expiry::reap`), after sleeping past the TTLs.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};
use server::backend::{Backend, State};

use common::{app, App, ALICE};

async fn create(app: &App, body: Value) -> Value {
    let (status, made) = app
        .call("POST", "/api/v2/sandboxes/boxes", Some(ALICE), Some(body))
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    made
}

async fn status_of(app: &App, name: &str) -> (StatusCode, String) {
    let (status, body) = app
        .call("GET", &format!("/api/v2/sandboxes/boxes/{name}"), Some(ALICE), None)
        .await;
    (status, body["status"].as_str().unwrap_or_default().to_string())
}

fn backend_name(app: &App, id: &str) -> String {
    app.state.boxes.find(id).unwrap().backend.unwrap()
}

#[tokio::test]
async fn an_idle_box_is_stopped_and_one_in_use_is_not() {
    let app = app();
    let idle = create(&app, json!({"name": "idle", "idle_ttl_seconds": 1})).await;
    let used = create(&app, json!({"name": "used", "idle_ttl_seconds": 1})).await;
    create(&app, json!({"name": "forever", "idle_ttl_seconds": 0})).await;
    server::expiry::reap(&app.state).await;
    assert_eq!(status_of(&app, "idle").await.1, "ready", "not idle for a second yet");
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A data plane request is use: the box's idle time starts over.
    let used_id = used["id"].as_str().unwrap();
    let (status, _) = app
        .call(
            "GET",
            &format!("/dataplane/{used_id}/download?path=/nonexistent"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    tokio::time::sleep(Duration::from_millis(500)).await;
    server::expiry::reap(&app.state).await;
    assert_eq!(status_of(&app, "idle").await.1, "stopped");
    let idle_backend = backend_name(&app, idle["id"].as_str().unwrap());
    assert_eq!(
        app.backend.state(&idle_backend).unwrap(),
        State::Stopped { memory: false },
        "its VMM is gone"
    );
    assert_eq!(status_of(&app, "used").await.1, "ready", "used 0.5 s ago");
    assert_eq!(status_of(&app, "forever").await.1, "ready", "0 is never");
    let (_, events) = app
        .call("GET", "/api/v2/sandboxes/boxes/idle/events", Some(ALICE), None)
        .await;
    assert!(
        events.as_str().unwrap().contains(r#""reason":"idle""#),
        "the trace says why it stopped: {events}"
    );
    // Started again by the next use, then idle again.
    let idle_id = idle["id"].as_str().unwrap();
    app.call("GET", &format!("/dataplane/{idle_id}/download?path=/x"), Some(ALICE), None)
        .await;
    assert_eq!(status_of(&app, "idle").await.1, "ready");
}

#[tokio::test]
async fn a_box_running_a_command_is_not_idle() {
    let app = app();
    let made = create(&app, json!({"name": "busy", "idle_ttl_seconds": 1})).await;
    let id = made["id"].as_str().unwrap();
    // The SSE start answers once the command runs; its body is never read here.
    let router = app.router.clone();
    let request = axum::http::Request::builder()
        .method("POST")
        .uri(format!("/dataplane/{id}/execute/stream/start"))
        .header("host", "ember.test:8080")
        .header("x-api-key", ALICE)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(json!({"command": "sleep 3"}).to_string()))
        .unwrap();
    let response = tower::ServiceExt::oneshot(router, request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server::expiry::reap(&app.state).await;
    assert_eq!(status_of(&app, "busy").await.1, "ready", "its command still runs");
    drop(response);
}

#[tokio::test]
async fn a_stopped_box_is_deleted_after_its_delete_after_stop_time() {
    let app = app();
    let made = create(&app, json!({"name": "temp", "delete_after_stop_seconds": 1})).await;
    create(&app, json!({"name": "kept"})).await;
    let backend = backend_name(&app, made["id"].as_str().unwrap());
    for name in ["temp", "kept"] {
        let (status, _) = app
            .call("POST", &format!("/api/v2/sandboxes/boxes/{name}/stop"), Some(ALICE), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    server::expiry::reap(&app.state).await;
    assert_eq!(status_of(&app, "temp").await.1, "stopped", "stopped less than a second ago");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server::expiry::reap(&app.state).await;
    assert_eq!(status_of(&app, "temp").await.0, StatusCode::NOT_FOUND);
    assert!(app.backend.state(&backend).is_err(), "its sandbox is gone too");
    assert_eq!(status_of(&app, "kept").await.1, "stopped", "none set: kept");
}

#[tokio::test]
async fn a_create_that_names_no_idle_ttl_gets_the_servers_default() {
    let app = app();
    let made = create(&app, json!({"name": "d"})).await;
    assert_eq!(made["idle_ttl_seconds"], 600);
}
