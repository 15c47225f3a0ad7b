//! A restarted server adopts the boxes and snapshots the last one made (its registry file):
//! running ones are ready and usable, stopped ones start again, ones whose sandbox went away
//! meanwhile are failed saying so, and a capture in flight is failed.

mod common;

use axum::http::StatusCode;
use serde_json::json;
use server::backend::Backend;

use common::{app_with_registry, ALICE, BOB};

#[tokio::test]
async fn a_restarted_server_adopts_its_boxes_and_snapshots() {
    let app = app_with_registry();
    let running = app.create(ALICE, "running").await;
    app.create(ALICE, "stopped").await;
    let gone = app.create(ALICE, "gone").await;
    app.create(BOB, "bobs").await;
    let (status, _) = app
        .call("POST", "/api/v2/sandboxes/boxes/stopped/stop", Some(ALICE), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, snap) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes/running/snapshot",
            Some(ALICE),
            Some(json!({"name": "snap"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{snap}");
    // Its capture finishes in the background: wait until it is ready.
    for _ in 0..100 {
        let (_, got) = app
            .call("GET", &format!("/api/v2/sandboxes/snapshots/{}", snap["id"].as_str().unwrap()), Some(ALICE), None)
            .await;
        if got["status"] == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let gone_backend = app.state.boxes.find(gone["id"].as_str().unwrap()).unwrap().backend.unwrap();
    app.backend.remove(&gone_backend).unwrap();

    let app = app.restarted();
    let (_, list) = app.call("GET", "/api/v2/sandboxes/boxes", Some(ALICE), None).await;
    let states: Vec<(String, String)> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().into(), b["status"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        states,
        [
            ("running".to_string(), "ready".to_string()),
            ("stopped".to_string(), "stopped".to_string()),
            ("gone".to_string(), "failed".to_string()),
        ]
    );
    let (_, failed) = app.call("GET", "/api/v2/sandboxes/boxes/gone", Some(ALICE), None).await;
    assert!(
        failed["status_message"].as_str().unwrap().contains("is gone"),
        "{failed}"
    );
    let (_, theirs) = app.call("GET", "/api/v2/sandboxes/boxes", Some(BOB), None).await;
    assert_eq!(theirs["sandboxes"].as_array().unwrap().len(), 1, "each tenant keeps its own");
    assert_eq!(
        running["id"],
        app.call("GET", "/api/v2/sandboxes/boxes/running", Some(ALICE), None).await.1["id"],
        "same id, so its data plane URL still works"
    );
    // The adopted ones work: a file through the running one's data plane, a start of the
    // stopped one, a box from the snapshot.
    let id = running["id"].as_str().unwrap();
    let (status, _) = app
        .call("GET", &format!("/dataplane/{id}/download?path=/nonexistent"), Some(ALICE), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the box answers: the file is missing");
    let (status, _) = app
        .call("POST", "/api/v2/sandboxes/boxes/stopped/start", Some(ALICE), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // The start goes on in the background.
    let mut now = String::new();
    for _ in 0..100 {
        now = app.call("GET", "/api/v2/sandboxes/boxes/stopped", Some(ALICE), None).await.1["status"]
            .as_str()
            .unwrap()
            .into();
        if now == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(now, "ready", "the stopped box started again");
    let (status, from_snap) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "again", "snapshot": "snap"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{from_snap}");
}

#[tokio::test]
async fn a_registry_in_another_format_is_refused_with_what_to_do() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-registry-").unwrap();
    let path = dir.as_path().join("registry.json");
    std::fs::write(&path, br#"{"format": 99, "boxes": [], "snapshots": []}"#).unwrap();
    let err = server::registry::Registry::new(path).load().unwrap_err().to_string();
    assert!(err.contains("format 99") && err.contains("move it away"), "{err}");
}
