//! The control plane's routing, state and tenancy over the fake backend, through the router
//! itself (tower's `oneshot`).

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use server::backend::Backend;
use tower::ServiceExt;

use common::{app, ALICE, BOB, CAROL};

#[tokio::test]
async fn boxes_are_created_found_renamed_and_deleted_per_tenant() {
    let app = app();
    let made = app.create(ALICE, "web").await;
    assert_eq!(made["status"], "ready");
    let id = made["id"].as_str().unwrap();
    assert_eq!(
        made["dataplane_url"],
        format!("http://ember.test:8080/dataplane/{id}")
    );
    let (status, got) = app
        .call("GET", "/api/v2/sandboxes/boxes/web", Some(ALICE), None)
        .await;
    assert_eq!((status, got["id"].as_str()), (StatusCode::OK, Some(id)));
    let (_, list) = app
        .call("GET", "/api/v2/sandboxes/boxes", Some(ALICE), None)
        .await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
    let (_, theirs) = app
        .call("GET", "/api/v2/sandboxes/boxes", Some(BOB), None)
        .await;
    assert_eq!(
        theirs["sandboxes"],
        json!([]),
        "another tenant sees none of them"
    );
    let (status, body) = app
        .call("GET", "/api/v2/sandboxes/boxes/web", Some(BOB), None)
        .await;
    assert_eq!(
        (status, body["detail"]["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );
    app.create(BOB, "web").await; // names are each tenant's own
    let (status, body) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "web"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    app.create(ALICE, "db").await;
    let (status, _) = app
        .call(
            "PATCH",
            "/api/v2/sandboxes/boxes/web",
            Some(ALICE),
            Some(json!({"name": "db"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, renamed) = app
        .call(
            "PATCH",
            "/api/v2/sandboxes/boxes/web",
            Some(ALICE),
            Some(json!({"name": "api", "idle_ttl_seconds": 120})),
        )
        .await;
    assert_eq!(
        (
            status,
            renamed["id"].as_str(),
            renamed["idle_ttl_seconds"].as_u64()
        ),
        (StatusCode::OK, Some(id), Some(120))
    );
    let (status, _) = app
        .call("DELETE", "/api/v2/sandboxes/boxes/api", Some(BOB), None)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another tenant cannot delete it"
    );
    let backend_name = app.state.boxes.by_id("alice", id).unwrap().backend.unwrap();
    let (status, _) = app
        .call("DELETE", "/api/v2/sandboxes/boxes/api", Some(ALICE), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .call("GET", "/api/v2/sandboxes/boxes/api", Some(ALICE), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        app.backend.state(&backend_name).is_err(),
        "its backend sandbox is gone"
    );
}

#[tokio::test]
async fn keys_are_required_everywhere() {
    let app = app();
    let id = app.create(ALICE, "web").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (method, uri) in [
        ("GET", "/api/v2/sandboxes/boxes".to_string()),
        ("GET", "/api/v2/sandboxes/snapshots".to_string()),
        ("GET", "/metrics".to_string()),
        ("GET", format!("/dataplane/{id}/download?path=/x")),
    ] {
        for key in [None, Some("alice-key-0123456788")] {
            let (status, body) = app.call(method, &uri, key, None).await;
            assert_eq!(
                (status, body["detail"]["error"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("Unauthorized")),
                "{uri} with {key:?}"
            );
        }
    }
    let (status, _) = app
        .call(
            "GET",
            &format!("/dataplane/{id}/download?path=/x"),
            Some(BOB),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's data plane");
}

#[tokio::test]
async fn refusals_have_the_shapes_the_sdk_maps() {
    let app = app();
    let (status, body) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "bad name"})),
        )
        .await;
    assert_eq!(
        (
            status,
            body["detail"][0]["type"].as_str(),
            body["detail"][0]["loc"][1].as_str()
        ),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("value_error"),
            Some("name")
        )
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"mount_config": {}})),
        )
        .await;
    assert_eq!(
        (status, body["detail"][0]["loc"][1].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("mount_config"))
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"vcpus": 64})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the backend's refusal of a size: {body}"
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"snapshot": "nope"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app
        .call("POST", "/api/v2/sandboxes/snapshots", Some(ALICE), Some(json!({"name": "x"})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "no docker_image: {body}");
    let (status, _) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!("not an object")),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, body) = app.call("GET", "/api/v2/nothing", Some(ALICE), None).await;
    assert_eq!(
        (status, body["detail"]["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );
    app.create(CAROL, "one").await;
    let request = Request::post("/api/v2/sandboxes/boxes")
        .header("host", "h")
        .header("x-api-key", CAROL)
        .body(Body::from("{}"))
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(
        (
            response.status(),
            response.headers()["retry-after"].to_str().unwrap()
        ),
        (StatusCode::TOO_MANY_REQUESTS, "0")
    );
}

#[tokio::test]
async fn a_box_made_without_waiting_is_provisioning_then_ready_and_one_deleted_meanwhile_is_cleaned_up(
) {
    let app = app();
    *app.backend.create_delay.lock().unwrap() = Duration::from_millis(300);
    let (_, made) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "slow", "wait_for_ready": false})),
        )
        .await;
    assert_eq!(made["status"], "provisioning");
    let (_, status) = app
        .call(
            "GET",
            "/api/v2/sandboxes/boxes/slow/status",
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status["status"], "provisioning");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, status) = app
        .call(
            "GET",
            "/api/v2/sandboxes/boxes/slow/status",
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status["status"], "ready");
    app.call(
        "POST",
        "/api/v2/sandboxes/boxes",
        Some(ALICE),
        Some(json!({"name": "gone", "wait_for_ready": false})),
    )
    .await;
    let (status, _) = app
        .call("DELETE", "/api/v2/sandboxes/boxes/gone", Some(ALICE), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, list) = app
        .call("GET", "/api/v2/sandboxes/boxes", Some(ALICE), None)
        .await;
    let backend_names: Vec<String> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(backend_names, ["slow"]);
    assert!(
        app.backend.state("fake-2").is_err(),
        "the sandbox made for the deleted box was removed"
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "late", "timeout": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
}

#[tokio::test]
async fn stop_and_start_follow_the_backends_successor_and_snapshots_make_boxes() {
    let app = app();
    let id = app.create(ALICE, "web").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = app
        .state
        .boxes
        .by_id("alice", &id)
        .unwrap()
        .backend
        .unwrap();
    let (status, _) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes/web/stop",
            Some(ALICE),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, got) = app
        .call("GET", "/api/v2/sandboxes/boxes/web", Some(ALICE), None)
        .await;
    assert!(
        got["status"] == "stopped" && got["stopped_at"].is_string(),
        "{got}"
    );
    app.call(
        "POST",
        "/api/v2/sandboxes/boxes/web/start",
        Some(ALICE),
        Some(json!({})),
    )
    .await;
    let mut status = Value::Null;
    for _ in 0..100 {
        status = app
            .call(
                "GET",
                "/api/v2/sandboxes/boxes/web/status",
                Some(ALICE),
                None,
            )
            .await
            .1;
        if status["status"] == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status["status"], "ready");
    let after = app
        .state
        .boxes
        .by_id("alice", &id)
        .unwrap()
        .backend
        .unwrap();
    assert_ne!(before, after, "the box is the backend's successor now");
    let (status, snap) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes/web/snapshot",
            Some(ALICE),
            Some(json!({"name": "base"})),
        )
        .await;
    assert_eq!(
        (status, snap["status"].as_str()),
        (StatusCode::OK, Some("building"))
    );
    let mut got = Value::Null;
    for _ in 0..100 {
        got = app
            .call(
                "GET",
                "/api/v2/sandboxes/snapshots/base:latest",
                Some(ALICE),
                None,
            )
            .await
            .1;
        if got["status"] == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        (got["status"].as_str(), got["source_sandbox_id"].as_str()),
        (Some("ready"), Some(id.as_str()))
    );
    let (status, _) = app
        .call("GET", "/api/v2/sandboxes/snapshots/base", Some(BOB), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, child) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(ALICE),
            Some(json!({"name": "c", "snapshot": "base"})),
        )
        .await;
    assert_eq!(
        (status, &child["snapshot_id"]),
        (StatusCode::OK, &snap["id"])
    );
    let uri = format!(
        "/api/v2/sandboxes/snapshots/{}",
        snap["id"].as_str().unwrap()
    );
    assert_eq!(
        app.call("DELETE", &uri, Some(ALICE), None).await.0,
        StatusCode::CONFLICT,
        "in use"
    );
    app.call("DELETE", "/api/v2/sandboxes/boxes/c", Some(ALICE), None)
        .await;
    assert_eq!(
        app.call("DELETE", &uri, Some(ALICE), None).await.0,
        StatusCode::OK
    );
    let (_, templates) = app
        .call("GET", "/api/v2/sandboxes/snapshots", Some(BOB), None)
        .await;
    assert_eq!(
        templates["snapshots"][0]["name"], "python",
        "templates are every tenant's"
    );
    let python = templates["snapshots"][0]["id"].as_str().unwrap();
    assert_eq!(
        app.call(
            "DELETE",
            &format!("/api/v2/sandboxes/snapshots/{python}"),
            Some(BOB),
            None
        )
        .await
        .0,
        StatusCode::CONFLICT
    );
}

#[tokio::test]
async fn forks_are_boxes_of_the_tenant_and_events_trace_them() {
    let app = app();
    app.create(ALICE, "p").await;
    let (status, forked) = app
        .call(
            "POST",
            "/api/v2/sandboxes/boxes/p/fork",
            Some(ALICE),
            Some(json!({"count": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{forked}");
    let names: Vec<&str> = forked["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["p-1", "p-2"]);
    assert_eq!(
        app.call("GET", "/api/v2/sandboxes/boxes/p-2", Some(ALICE), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        app.call(
            "POST",
            "/api/v2/sandboxes/boxes/p/fork",
            Some(BOB),
            Some(json!({"count": 1}))
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (_, events) = app
        .call("GET", "/api/v2/sandboxes/boxes/p/events", Some(ALICE), None)
        .await;
    let ops: Vec<String> = events
        .as_str()
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["op"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ops, ["create", "ready", "fork"]);
    let (_, metrics) = app.call("GET", "/metrics", Some(BOB), None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("ember_sandboxes{status=\"ready\"} 3"),
        "{metrics}"
    );
}

/// Polls snapshot `id` until it is no longer building.
async fn built(app: &common::App, id: &str) -> Value {
    for _ in 0..200 {
        let (_, got) = app.call("GET", &format!("/api/v2/sandboxes/snapshots/{id}"), Some(ALICE), None).await;
        if got["status"] != "building" {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("snapshot {id} still building");
}

#[tokio::test]
async fn a_snapshot_from_a_docker_image_takes_its_config_and_tag_and_makes_boxes() {
    let app = app();
    let (status, snap) = app
        .call(
            "POST",
            "/api/v2/sandboxes/snapshots",
            Some(ALICE),
            Some(json!({"name": "py", "docker_image": "example.org/py:3.12", "fs_capacity_bytes": 1u64 << 30,
                        "run_config": {"user": "0", "env_vars": {"MINE": "1"}}})),
        )
        .await;
    assert_eq!((status, snap["status"].as_str()), (StatusCode::OK, Some("building")), "{snap}");
    let got = built(&app, snap["id"].as_str().unwrap()).await;
    assert_eq!(got["status"], "ready", "{got}");
    assert_eq!(got["tags"], json!(["3.12"]), "the image's own tag");
    // The image's Env and WorkingDir, the request's user and variables over them.
    assert_eq!(got["run_config"], json!({"user": "0", "work_dir": "/", "env_vars": {"EMBER_IMAGE": "example.org/py:3.12", "MINE": "1"}}));
    let (status, made) = app
        .call("POST", "/api/v2/sandboxes/boxes", Some(ALICE), Some(json!({"name": "from-image", "snapshot": "py:3.12"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    assert_eq!(made["run_config"]["env_vars"]["EMBER_IMAGE"], "example.org/py:3.12");

    let (_, snap) = app
        .call("POST", "/api/v2/sandboxes/snapshots", Some(ALICE), Some(json!({"name": "gone", "docker_image": "127.0.0.1:1/none:1"})))
        .await;
    let got = built(&app, snap["id"].as_str().unwrap()).await;
    assert_eq!(got["status"], "failed", "{got}");
    assert!(got["status_message"].as_str().unwrap().contains("127.0.0.1:1/none:1"), "{got}");
}
