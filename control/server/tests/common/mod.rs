//! What the Rust tests share: the server over the fake backend, with three tenants.

#![allow(dead_code)]

#[path = "../fake/mod.rs"]
pub mod fake;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use server::tenants::Tenants;
use tower::ServiceExt;

pub const ALICE: &str = "alice-key-0123456789";
pub const BOB: &str = "bob-key-0123456789ab";
pub const CAROL: &str = "carol-key-0123456789";

pub struct App {
    pub state: server::Shared,
    pub backend: Arc<fake::FakeBackend>,
    pub router: Router,
    _root: vmm_sys_util::tempdir::TempDir,
}

fn config() -> server::Config {
    let tenants = Tenants::parse(&format!(
        "alice {ALICE}\nbob {BOB}\ncarol {CAROL} max_boxes=1\n"
    ))
    .unwrap();
    server::Config::new(tenants)
}

pub fn app() -> App {
    app_configured(|_| {})
}

/// A server over a fresh fake backend whose configuration `f` changed.
pub fn app_configured(f: impl FnOnce(&mut server::Config)) -> App {
    made(f, false)
}

/// A server over a fresh fake backend whose records are kept in `registry.json` in the
/// backend's directory.
pub fn app_with_registry() -> App {
    app_with_registry_configured(|_| {})
}

/// [`app_with_registry`] with its configuration changed by `f` (kept across restarts).
pub fn app_with_registry_configured(f: impl FnOnce(&mut server::Config)) -> App {
    made(f, true)
}

fn made(f: impl FnOnce(&mut server::Config), with_registry: bool) -> App {
    let root = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-server-test-").unwrap();
    let backend = Arc::new(fake::FakeBackend::new(root.as_path()));
    let mut config = config();
    f(&mut config);
    let state = match with_registry {
        false => server::AppState::new(backend.clone(), config),
        true => {
            let registry = server::registry::Registry::new(root.as_path().join("registry.json"));
            server::AppState::restore(backend.clone(), config, registry).unwrap()
        }
    };
    let router = server::routes::router(state.clone());
    App {
        state,
        backend,
        router,
        _root: root,
    }
}

impl App {
    /// The server started again over the same backend and registry (this one's records saved
    /// first, as its saver would have).
    pub fn restarted(self) -> App {
        self.state.save_if_changed();
        let path = self.state.registry.as_ref().expect("a registry").path().to_path_buf();
        let mut config = config();
        config.pools = self.state.config.pools.clone();
        let state = server::AppState::restore(
            self.backend.clone(),
            config,
            server::registry::Registry::new(path),
        )
        .unwrap();
        let router = server::routes::router(state.clone());
        App {
            state,
            router,
            ..self
        }
    }
}

impl App {
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "ember.test:8080");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    pub async fn create(&self, key: &str, name: &str) -> Value {
        let (status, body) = self
            .call(
                "POST",
                "/api/v2/sandboxes/boxes",
                Some(key),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

/// An HTTP service on the host's loopback (a fake box's ports are the host's) answering every
/// request with `body`; its port.
pub fn http_says(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            let _ = s.write_all(answer.as_bytes());
        }
    });
    port
}

/// GET of service URL `url`'s root through the router with `token`: (status, body text).
pub async fn service_get(app: &App, url: &str, token: &str) -> (StatusCode, String) {
    let path = url.strip_prefix("http://ember.test:8080").unwrap_or(url);
    let request = Request::builder()
        .uri(format!("{path}/"))
        .header("x-langsmith-sandbox-service-token", token)
        .body(Body::empty())
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into())
}
