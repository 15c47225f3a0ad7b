//! The HTTP routes: the control plane under `/api/v2/sandboxes` (what the SDK's
//! `SandboxClient` calls), each box's data plane under `/dataplane/{box id}` (the
//! `dataplane_url` the SDK is handed), and `/metrics`.

pub mod boxes;
pub mod downloads;
pub mod snapshots;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::Router;

use crate::error::ApiError;
use crate::state::Shared;
use crate::tenants::{Tenant, KEY_HEADER};

impl FromRequestParts<Shared> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let given = parts.headers.get(KEY_HEADER).map(|v| v.as_bytes());
        state
            .config
            .tenants
            .authenticate(given)
            .ok_or(ApiError::Unauthorized)
    }
}

/// The server's URL as this request reached it, for the URLs it hands out.
pub struct Base(pub String);

impl FromRequestParts<Shared> for Base {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        if let Some(url) = &state.config.public_url {
            return Ok(Base(url.trim_end_matches('/').to_string()));
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        match host {
            Some(host) if !host.is_empty() && !host.contains(['/', ' ']) => {
                Ok(Base(format!("http://{host}")))
            }
            _ => Err(ApiError::BadRequest {
                kind: "InvalidRequest",
                message: "the request has no usable Host header".into(),
            }),
        }
    }
}

/// A JSON body, refused in the API's error shape when it does not parse.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid("body", format!("cannot read the request body: {e}")))?;
        let bytes = if bytes.is_empty() {
            axum::body::Bytes::from_static(b"{}")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::invalid("body", e.to_string()))
    }
}

async fn metrics(State(state): State<Shared>, _tenant: Tenant) -> impl IntoResponse {
    let text = state
        .metrics
        .render(
            &state.boxes.count_by_status(),
            state.commands.running(),
            &state.pools.sizes(),
        );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The SDK's `client.registries`: ember keeps registry credentials on the host, never in an API.
async fn registries() -> ApiError {
    ApiError::NotImplemented(
        "ember serve has no registries API: it pulls with the host's credentials (docker's config.json of the user running ember serve, or ember image pull --registry-auth)".into(),
    )
}

async fn unknown() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// Every route of the server.
pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/boxes", post(boxes::create).get(boxes::list))
        .route(
            "/boxes/{name}",
            get(boxes::get).patch(boxes::update).delete(boxes::delete),
        )
        .route("/boxes/{name}/status", get(boxes::status))
        .route("/boxes/{name}/start", post(boxes::start))
        .route("/boxes/{name}/stop", post(boxes::stop))
        .route("/boxes/{name}/fork", post(boxes::fork))
        .route("/boxes/{name}/events", get(boxes::events))
        .route("/boxes/{name}/service-url", post(boxes::service_url).delete(boxes::revoke_service_urls))
        .route("/local/{name}/service-url", post(crate::host_sandboxes::expose).delete(crate::host_sandboxes::unexpose))
        .route("/boxes/{name}/download-url", post(downloads::mint))
        .route("/boxes/{name}/snapshot", post(snapshots::capture))
        .route(
            "/snapshots",
            post(snapshots::from_docker).get(snapshots::list),
        )
        .route(
            "/snapshots/{reference}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/snapshots-by-name/{name}", get(snapshots::tags))
        .route("/registries", any(registries))
        .route("/registries/{name}", any(registries));
    Router::new()
        .nest("/api/v2/sandboxes", api)
        .nest("/dataplane/{box_id}", crate::dataplane::router())
        .route("/downloads/{token}/{name}", get(downloads::fetch).head(downloads::fetch))
        .route("/services/{box_id}/{port}", any(crate::service_proxy::proxy))
        .route("/services/{box_id}/{port}/", any(crate::service_proxy::proxy))
        .route("/services/{box_id}/{port}/{*rest}", any(crate::service_proxy::proxy))
        .route("/metrics", get(metrics))
        .fallback(unknown)
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::service_proxy::route_by_host))
        .with_state(state)
}

/// An empty `{}` answer.
pub fn ok() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(serde_json::json!({})))
}
