//! The host's own sandboxes exposed by `ember expose` (`/api/v2/sandboxes/local/...`), over the
//! fake backend: only the server's own user's key mints, the URL serves the sandbox's port,
//! a stopped sandbox is 503, a removed one's URLs end even when its name is given again, and
//! no tenant sees the sandbox. Then the client `ember expose` sends its requests with, over a
//! real listener.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server::local::{LocalAccess, LocalError};
use tower::ServiceExt;

use common::{app_configured, http_says, service_get, App, ALICE};

const KEY: &str = "the-local-key-0123456789abcdef";

/// `method uri` with the local key `key` (if any): (status, JSON body).
async fn local(app: &App, method: &str, uri: &str, key: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri).header("host", "ember.test:8080");
    if let Some(key) = key {
        request = request.header(server::local::KEY_HEADER, key);
    }
    let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
    let response = app.router.clone().oneshot(request.body(body).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn expose(app: &App, name: &str, port: u16) -> (StatusCode, Value) {
    local(app, "POST", &format!("/api/v2/sandboxes/local/{name}/service-url"), Some(KEY), Some(json!({"port": port}))).await
}

/// GET through the service URL `minted` with its token: (status, body text).
async fn get(app: &App, minted: &Value) -> (StatusCode, String) {
    service_get(app, minted["service_url"].as_str().unwrap(), minted["token"].as_str().unwrap()).await
}

#[tokio::test]
async fn the_servers_own_user_exposes_a_host_sandbox_until_it_is_gone() {
    let app = app_configured(|c| c.local_key = Some(KEY.into()));
    app.backend.add("web");
    let port = http_says("first");
    let uri = "/api/v2/sandboxes/local/web/service-url";

    // Only with the local key: a tenant's key, a wrong key or none is refused.
    for key in [None, Some("wrong"), Some(ALICE)] {
        let (status, body) = local(&app, "POST", uri, key, Some(json!({"port": port}))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{key:?}: {body}");
    }
    let (status, body) = app.call("POST", uri, Some(ALICE), Some(json!({"port": port}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(expose(&app, "nothing", port).await.0, StatusCode::NOT_FOUND);

    let (status, minted) = expose(&app, "web", port).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    assert!(minted["service_url"].as_str().unwrap().starts_with("http://ember.test:8080/services/host-"), "{minted}");
    assert_eq!(get(&app, &minted).await, (StatusCode::OK, "first".into()));
    let (_, again) = expose(&app, "web", port).await;
    assert_eq!(again["service_url"], minted["service_url"], "one sandbox keeps its URL");

    // No tenant sees it.
    let (_, listed) = app.call("GET", "/api/v2/sandboxes/boxes", Some(ALICE), None).await;
    assert!(!listed.to_string().contains("web"), "{listed}");

    // Not running: 503; revoked: 401.
    use server::backend::Backend;
    app.backend.stop("web", false).unwrap();
    assert_eq!(get(&app, &minted).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(expose(&app, "web", port).await.0, StatusCode::BAD_REQUEST, "a stopped sandbox is NotReady");
    app.backend.remove("web").unwrap();
    app.backend.add("web");
    let (status, revoked) = local(&app, "DELETE", &format!("{uri}?port={port}"), Some(KEY), None).await;
    assert_eq!((status, revoked["revoked"].as_u64()), (StatusCode::OK, Some(2)), "{revoked}");
    assert_eq!(get(&app, &minted).await.0, StatusCode::UNAUTHORIZED);

    // Removed and made again under its name: the old URL's tokens do not open the new one.
    let (_, old) = expose(&app, "web", port).await;
    app.backend.remove("web").unwrap();
    app.backend.add("web");
    let (status, body) = get(&app, &old).await;
    assert!(status == StatusCode::NOT_FOUND && body.contains("removed"), "{status} {body}");
    assert_eq!(get(&app, &old).await.0, StatusCode::UNAUTHORIZED, "its tokens ended with it");
    let (_, new) = expose(&app, "web", port).await;
    assert_ne!(new["service_url"], old["service_url"]);
    assert_eq!(get(&app, &new).await, (StatusCode::OK, "first".into()));
}

#[tokio::test]
async fn without_a_local_key_the_server_exposes_nothing_of_the_host() {
    let app = app_configured(|_| {});
    app.backend.add("web");
    let (status, _) = expose(&app, "web", 80).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_client_of_ember_expose_mints_and_revokes_over_a_real_listener() {
    let app = app_configured(|c| c.local_key = Some(KEY.into()));
    app.backend.add("web");
    let port = http_says("hello");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = server::local::url_of(listener.local_addr().unwrap());
    tokio::spawn(server::serve(listener, app.state.clone(), std::future::pending()));
    let access = LocalAccess { url: url.clone(), key: KEY.into() };

    let minted = access.request(Method::POST, "/api/v2/sandboxes/local/web/service-url", Some(json!({"port": port, "expires_in_seconds": 60}))).await.unwrap();
    let service = minted["service_url"].as_str().unwrap();
    assert!(service.starts_with(&format!("{url}/services/host-")), "the URL names the server as the client reached it: {service}");
    assert_eq!(get(&app, &json!({"service_url": service.replace(&url, "http://ember.test:8080"), "token": minted["token"]})).await.1, "hello");

    let wrong = LocalAccess { key: "not-the-key".into(), ..access.clone() };
    match wrong.request(Method::POST, "/api/v2/sandboxes/local/web/service-url", Some(json!({"port": port}))).await {
        Err(LocalError::Refused { status: 403, message }) => assert!(message.contains("own user"), "{message}"),
        other => panic!("{other:?}"),
    }
    match access.request(Method::POST, "/api/v2/sandboxes/local/web/service-url", Some(json!({"port": 0}))).await {
        Err(LocalError::Refused { status: 422, message }) => assert!(message.contains("port"), "{message}"),
        other => panic!("{other:?}"),
    }
    let revoked = access.request(Method::DELETE, "/api/v2/sandboxes/local/web/service-url", None).await.unwrap();
    assert_eq!(revoked["revoked"], 1);

    let nobody = LocalAccess { url: server::local::url_of(std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()), ..access };
    assert!(matches!(nobody.request(Method::DELETE, "/x", None).await, Err(LocalError::Connect { .. })));
}
