//! A box's ports through the server, over the fake backend (whose ports are this host's
//! loopback, dialed by the real agent in-process): service URLs' tokens and their proxy (a
//! WebSocket, the lifecycle of the box, forks, tenants, the event trace) and `/tunnel`'s
//! refusals. The SDK's own `sb.tunnel()` and `sb.service()` are tested in tests/sdk.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

use common::{app, App, ALICE, BOB};

const TOKEN: &str = "x-langsmith-sandbox-service-token";

fn http_ok() -> u16 {
    common::http_says("ok")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn mint(app: &App, key: &str, name: &str, port: u16) -> (StatusCode, Value) {
    app.call("POST", &format!("/api/v2/sandboxes/boxes/{name}/service-url"), Some(key), Some(json!({"port": port}))).await
}

async fn get(app: &App, url: &str, token: &str) -> (StatusCode, String) {
    common::service_get(app, url, token).await
}

#[tokio::test]
async fn tokens_lifecycle_forks_tenants_and_the_trace() {
    let app = app();
    app.create(ALICE, "web").await;
    let port = http_ok();
    let (status, minted) = mint(&app, ALICE, "web", port).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let (url, token) = (minted["service_url"].as_str().unwrap(), minted["token"].as_str().unwrap());
    assert!(minted["browser_url"].as_str().unwrap().contains("token="), "{minted}");
    assert_eq!(get(&app, url, token).await, (StatusCode::OK, "ok".into()));
    assert_eq!(get(&app, url, "wrong.token").await.0, StatusCode::UNAUTHORIZED);

    // Another tenant cannot mint for this box: it does not exist for them.
    assert_eq!(mint(&app, BOB, "web", port).await.0, StatusCode::NOT_FOUND);

    // A fork's child is a box of its own: the parent's token does not open it.
    let (status, forked) = app.call("POST", "/api/v2/sandboxes/boxes/web/fork", Some(ALICE), Some(json!({"count": 1}))).await;
    assert_eq!(status, StatusCode::OK, "{forked}");
    let child = forked["sandboxes"][0]["id"].as_str().unwrap();
    assert_eq!(get(&app, &format!("/services/{child}/{port}"), token).await.0, StatusCode::UNAUTHORIZED);

    // Stopped: a clear 503; started again: the same URL and token work.
    app.call("POST", "/api/v2/sandboxes/boxes/web/stop", Some(ALICE), Some(json!({}))).await;
    let (status, body) = get(&app, url, token).await;
    assert!(status == StatusCode::SERVICE_UNAVAILABLE && body.contains("stopped"), "{status} {body}");
    app.call("POST", "/api/v2/sandboxes/boxes/web/start", Some(ALICE), Some(json!({}))).await;
    for _ in 0..100 {
        let (_, b) = app.call("GET", "/api/v2/sandboxes/boxes/web", Some(ALICE), None).await;
        if b["status"] == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(&app, url, token).await, (StatusCode::OK, "ok".into()));

    // Nothing listening: 502 naming the port.
    let closed = free_port();
    let (_, other) = mint(&app, ALICE, "web", closed).await;
    let (status, body) = get(&app, other["service_url"].as_str().unwrap(), other["token"].as_str().unwrap()).await;
    assert!(status == StatusCode::BAD_GATEWAY && body.contains(&format!("port {closed}")), "{status} {body}");

    let (_, trace) = app.call("GET", "/api/v2/sandboxes/boxes/web/events", Some(ALICE), None).await;
    let trace = trace.as_str().unwrap().to_string();
    assert!(trace.contains(r#""outcome":"connected""#) && trace.contains(r#""outcome":"refused""#), "{trace}");
    assert!(trace.contains(r#""kind":"service_url""#), "{trace}");
}

// The header callback's error type is tungstenite's (a whole HTTP response), not ours.
#[allow(clippy::result_large_err)]
#[tokio::test]
async fn a_websocket_passes_through_a_service_url_with_forwarded_headers() {
    let app = app();
    app.create(ALICE, "ws").await;
    // A WebSocket echo service that keeps the headers of its upgrade request.
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    let keep = seen.clone();
    tokio::spawn(async move {
        let (s, _) = service.accept().await.unwrap();
        let callback = |req: &WsRequest, resp: WsResponse| {
            let headers = req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()));
            keep.lock().unwrap().extend(headers);
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(s, callback).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() {
                ws.send(m).await.unwrap();
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(listener, app.state.clone(), std::future::pending()));

    let (_, minted) = mint(&app, ALICE, "ws", port).await;
    let path = minted["service_url"].as_str().unwrap().strip_prefix("http://ember.test:8080").unwrap().to_string();
    let mut request = format!("ws://{addr}{path}/echo").into_client_request().unwrap();
    request.headers_mut().insert(TOKEN, minted["token"].as_str().unwrap().parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text("through the proxy")).await.unwrap();
    let back = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::text("through the proxy"));

    let seen = seen.lock().unwrap().clone();
    let header = |name: &str| seen.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(header("x-forwarded-prefix"), Some(path.clone()));
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header(TOKEN), None, "the proxy keeps its credentials to itself");
}

#[tokio::test]
async fn a_tunnel_into_a_stopped_box_or_another_tenants_is_refused() {
    let app = app();
    let id = app.create(ALICE, "t").await["id"].as_str().unwrap().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(listener, app.state.clone(), std::future::pending()));
    let open = |key: &'static str| {
        let mut request = format!("ws://{addr}/dataplane/{id}/tunnel").into_client_request().unwrap();
        request.headers_mut().insert("x-api-key", key.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status(),
        Err(e) => panic!("{e}"),
        Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
    };
    assert_eq!(status(open(ALICE).await), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(status(open(BOB).await), StatusCode::NOT_FOUND);
    app.call("POST", "/api/v2/sandboxes/boxes/t/stop", Some(ALICE), Some(json!({}))).await;
    assert_eq!(status(open(ALICE).await), StatusCode::BAD_REQUEST, "a stopped box is NotReady");
}

/// A request through `router` with Host `host`: (status, headers, body text).
async fn get_at_host(app: &App, host: &str, path: &str, token: Option<&str>) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut request = Request::builder().uri(path).header("host", host);
    if let Some(token) = token {
        request = request.header(TOKEN, token);
    }
    let response = app.router.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into())
}

#[tokio::test]
async fn with_a_service_domain_a_host_name_routes_to_its_box_and_port() {
    let app = common::app_configured(|c| c.service_domain = Some("svc.test".into()));
    let id = app.create(ALICE, "web").await["id"].as_str().unwrap().to_string();
    let port = http_ok();
    let (_, minted) = mint(&app, ALICE, "web", port).await;
    let host = format!("{port}-{id}.svc.test:8080");
    assert_eq!(minted["host_url"], json!(format!("http://{host}")), "{minted}");
    let token = minted["token"].as_str().unwrap();

    let (status, _, body) = get_at_host(&app, &host, "/any/path?q=1", Some(token)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(get_at_host(&app, &host.to_uppercase(), "/", Some(token)).await.0, StatusCode::OK, "host names are case-blind");
    assert_eq!(get_at_host(&app, &host, "/", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(get_at_host(&app, &format!("{}-{id}.svc.test", port + 1), "/", Some(token)).await.0, StatusCode::UNAUTHORIZED, "the token is its port's");
    // Even the API's paths are the service's on its host.
    assert_eq!(get_at_host(&app, &host, "/api/v2/sandboxes/boxes", None).await.0, StatusCode::UNAUTHORIZED);

    // The login URL sets a cookie for the whole host.
    let (status, headers, _) = get_at_host(&app, &host, &format!("/.ember-login?token={token}"), None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("Path=/;"), "{cookie}");
    assert_eq!(headers["location"], "/");

    // Other hosts are the API's.
    let (status, listed) = app.call("GET", "/api/v2/sandboxes/boxes", Some(ALICE), None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(get_at_host(&app, &format!("{port}-{id}.elsewhere.test"), "/", Some(token)).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn without_a_service_domain_host_names_route_nothing() {
    let app = app();
    let id = app.create(ALICE, "web").await["id"].as_str().unwrap().to_string();
    let port = http_ok();
    let (_, minted) = mint(&app, ALICE, "web", port).await;
    assert!(minted.get("host_url").is_none(), "{minted}");
    let (status, _, _) = get_at_host(&app, &format!("{port}-{id}.svc.test"), "/", minted["token"].as_str()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the API's unknown path");
}
