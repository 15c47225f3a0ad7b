//! Download links over the fake backend: minting (tenancy, refusals), fetching with no key
//! (GET, Range, HEAD, the pinned headers), wrong and expired tokens, a stopped box woken, a
//! deleted box's links ended, and links kept across a restart. The SDK's own
//! `generate_download_url` is tested in tests/sdk/test_files.py.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server::backend::Backend;
use tower::ServiceExt;

use common::{app, App, ALICE, BOB};

/// A box `name` of alice's with `/r.txt` holding `0123456789`; its id.
async fn box_with_file(app: &App, name: &str) -> String {
    let id = app.create(ALICE, name).await["id"].as_str().unwrap().to_string();
    let sandbox = app.state.boxes.find(&id).unwrap().backend.unwrap();
    app.backend.upload(&sandbox, "/r.txt", &mut std::io::Cursor::new(b"0123456789"), 0o644).unwrap();
    id
}

async fn mint(app: &App, key: &str, name: &str, body: Value) -> (StatusCode, Value) {
    app.call("POST", &format!("/api/v2/sandboxes/boxes/{name}/download-url"), Some(key), Some(body)).await
}

/// `method` of link `url` with no key (and `range`, if given): (status, headers, body).
async fn fetch(app: &App, method: &str, url: &str, range: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let path = url.strip_prefix("http://ember.test:8080").unwrap_or(url);
    let mut request = Request::builder().method(method).uri(path).header("host", "ember.test:8080");
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let response = app.router.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

fn url(minted: &Value) -> String {
    minted["download_url"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_link_serves_its_file_with_no_key_with_ranges_head_and_its_headers() {
    let app = app();
    box_with_file(&app, "web").await;
    let (status, minted) = mint(&app, ALICE, "web", json!({"path": "r.txt", "content_type": "text/plain", "content_disposition": "attachment"})).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let token = minted["token"].as_str().unwrap();
    assert_eq!(url(&minted), format!("http://ember.test:8080/downloads/{token}/r.txt"), "absolute, named as the file");
    assert_eq!(minted["expires_at"], Value::Null, "no expiry asked: none");

    let (status, headers, body) = fetch(&app, "GET", &url(&minted), None).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"0123456789"[..]));
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["content-disposition"], "attachment; filename=\"r.txt\"; filename*=UTF-8''r.txt");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["content-security-policy"], "sandbox");

    let (status, headers, body) = fetch(&app, "GET", &url(&minted), Some("bytes=2-4")).await;
    assert_eq!((status, body.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"234"[..]));
    assert_eq!(headers["content-range"], "bytes 2-4/10");
    assert_eq!(fetch(&app, "GET", &url(&minted), Some("bytes=20-")).await.0, StatusCode::RANGE_NOT_SATISFIABLE);

    let (status, headers, body) = fetch(&app, "HEAD", &url(&minted), None).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    assert_eq!((&headers["content-length"], &headers["accept-ranges"]), (&"10".parse().unwrap(), &"bytes".parse().unwrap()));

    // Without pinned headers: the data plane's, and no disposition.
    let (_, plain) = mint(&app, ALICE, "web", json!({"path": "/r.txt"})).await;
    let (_, headers, _) = fetch(&app, "GET", &url(&plain), None).await;
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(headers.get("content-disposition").is_none());

    // A name that is not URL-safe is percent-encoded, and found again.
    let id = app.state.boxes.get("alice", "web").unwrap().id;
    let sandbox = app.state.boxes.find(&id).unwrap().backend.unwrap();
    app.backend.upload(&sandbox, "/dir/a bü.txt", &mut std::io::Cursor::new(b"odd"), 0o644).unwrap();
    let (_, odd) = mint(&app, ALICE, "web", json!({"path": "/dir/a bü.txt", "content_disposition": "inline"})).await;
    assert!(url(&odd).ends_with("/a%20b%C3%BC.txt"), "{odd}");
    let (status, headers, body) = fetch(&app, "GET", &url(&odd), None).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"odd"[..]));
    assert_eq!(headers["content-disposition"], "inline; filename=\"a b_.txt\"; filename*=UTF-8''a%20b%C3%BC.txt");

    // A missing file is the data plane's 404.
    let (_, missing) = mint(&app, ALICE, "web", json!({"path": "/nothing"})).await;
    assert_eq!(fetch(&app, "GET", &url(&missing), None).await.0, StatusCode::NOT_FOUND);

    let (_, trace) = app.call("GET", "/api/v2/sandboxes/boxes/web/events", Some(ALICE), None).await;
    let trace = trace.as_str().unwrap();
    assert!(trace.contains(r#""kind":"download_url","op":"mint""#), "{trace}");
    assert!(trace.contains(r#""via":"download_url""#), "{trace}");
}

#[tokio::test]
async fn a_wrong_tampered_or_repointed_token_is_refused() {
    let app = app();
    box_with_file(&app, "web").await;
    let (_, minted) = mint(&app, ALICE, "web", json!({"path": "/r.txt"})).await;
    let token = minted["token"].as_str().unwrap();
    let (id, secret) = token.split_once('.').unwrap();
    let flipped = format!("{}{}", if secret.starts_with('0') { '1' } else { '0' }, &secret[1..]);
    for (path, why) in [
        (format!("/downloads/{id}.{flipped}/r.txt"), "a tampered secret"),
        (format!("/downloads/{id}/r.txt"), "no secret"),
        ("/downloads/nothing.nothing/r.txt".to_string(), "an unknown token"),
        (format!("/downloads/{token}/other.txt"), "the token under another file's name"),
    ] {
        let (status, _, body) = fetch(&app, "GET", &path, None).await;
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, body["detail"]["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("Unauthorized")), "{why}");
    }
    assert_eq!(fetch(&app, "GET", &format!("/downloads/{token}"), None).await.0, StatusCode::NOT_FOUND, "no file name");
}

#[tokio::test]
async fn an_expired_link_says_so() {
    let app = app();
    box_with_file(&app, "web").await;
    let (status, minted) = mint(&app, ALICE, "web", json!({"path": "/r.txt", "expires_in_seconds": 1})).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    assert!(minted["expires_at"].as_str().unwrap().ends_with('Z'), "{minted}");
    assert_eq!(fetch(&app, "GET", &url(&minted), None).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, body) = fetch(&app, "GET", &url(&minted), None).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["detail"]["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("TokenExpired")));
}

#[tokio::test]
async fn only_the_boxs_tenant_mints_and_bad_requests_name_their_field() {
    let app = app();
    box_with_file(&app, "web").await;
    assert_eq!(mint(&app, BOB, "web", json!({"path": "/r.txt"})).await.0, StatusCode::NOT_FOUND, "another tenant's box");
    let (status, _) = app.call("POST", "/api/v2/sandboxes/boxes/web/download-url", None, Some(json!({"path": "/r.txt"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (body, field) in [
        (json!({"path": "/r.txt", "expires_in_seconds": 0}), "expires_in_seconds"),
        (json!({"path": "/r.txt", "content_disposition": "download"}), "content_disposition"),
        (json!({"path": "/r.txt", "content_type": "plain"}), "content_type"),
        (json!({"path": "/r.txt", "content_type": "text/plain\r\nx-evil: 1"}), "content_type"),
        (json!({"path": ""}), "path"),
    ] {
        let (status, answer) = mint(&app, ALICE, "web", body.clone()).await;
        assert_eq!((status, answer["detail"][0]["loc"][1].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{body}");
    }
}

#[tokio::test]
async fn a_fetch_wakes_a_stopped_box_and_a_deleted_boxs_links_end() {
    let app = app();
    box_with_file(&app, "web").await;
    let (_, minted) = mint(&app, ALICE, "web", json!({"path": "/r.txt"})).await;
    let (status, _) = app.call("POST", "/api/v2/sandboxes/boxes/web/stop", Some(ALICE), Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = fetch(&app, "GET", &url(&minted), None).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"0123456789"[..]));
    let (_, got) = app.call("GET", "/api/v2/sandboxes/boxes/web", Some(ALICE), None).await;
    assert_eq!(got["status"], "ready", "the fetch started it");

    let (status, _) = app.call("DELETE", "/api/v2/sandboxes/boxes/web", Some(ALICE), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetch(&app, "GET", &url(&minted), None).await.0, StatusCode::UNAUTHORIZED);
    // Another box of the same name is another box: the old link does not open it.
    box_with_file(&app, "web").await;
    assert_eq!(fetch(&app, "GET", &url(&minted), None).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn links_outlive_a_restart_and_a_box_that_cannot_run_is_a_503() {
    let app = common::app_with_registry();
    let id = box_with_file(&app, "web").await;
    let (_, kept) = mint(&app, ALICE, "web", json!({"path": "/r.txt"})).await;
    box_with_file(&app, "lost").await;
    let (_, lost) = mint(&app, ALICE, "lost", json!({"path": "/r.txt"})).await;
    let lost_id = app.state.boxes.get("alice", "lost").unwrap().id;
    let sandbox = app.state.boxes.find(&lost_id).unwrap().backend.unwrap();
    app.backend.remove(&sandbox).unwrap();

    let app = app.restarted();
    let (status, _, body) = fetch(&app, "GET", &url(&kept), None).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"0123456789"[..]), "box {id}");
    let (status, _, body) = fetch(&app, "GET", &url(&lost), None).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["detail"]["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("NotReady")), "{body}");
}
