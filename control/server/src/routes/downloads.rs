//! Download links (see `download_links`): `POST .../boxes/{name}/download-url` mints one, as
//! the SDK's `generate_download_url` asks (its `DownloadURL`: `download_url`, `token`,
//! `expires_at`, null for none), and `GET|HEAD /downloads/{token}/{file name}` serves the
//! file to whoever holds the URL, with no API key, through the data plane's download (ranges,
//! validators, HEAD). A wrong token, or one shown under another file name: 401; an expired
//! one: 401 `TokenExpired`; a stopped box is started first, as the data plane's files start
//! it, and one that cannot run (failed, still being made): 503 `NotReady`.
//!
//! The file is served with the link's pinned headers and with headers that keep it inert on
//! the server's origin, which the API and the path-prefix service URLs share: `nosniff`, a
//! `sandbox` CSP (a page opened inline runs no script and has no origin of the server's),
//! and no `Referer` carrying the link onwards.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{Base, Body};
use crate::clock::{now_ms, rfc3339};
use crate::dataplane::files;
use crate::download_links::{disposition, file_name, percent_encode, Link};
use crate::error::ApiError;
use crate::grants::Refusal;
use crate::lifecycle;
use crate::service_proxy::error;
use crate::state::Shared;
use crate::tenants::Tenant;

#[derive(Debug, Deserialize)]
pub struct DownloadUrlRequest {
    pub path: String,
    /// None: the link lasts as long as its box.
    pub expires_in_seconds: Option<u64>,
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
}

/// The prefix of a link's path.
const PREFIX: &str = "/downloads";

pub async fn mint(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Path(name): Path<String>,
    Body(req): Body<DownloadUrlRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    let path = files::resolve(&record, &req.path)?;
    if req.expires_in_seconds == Some(0) {
        return Err(ApiError::invalid("expires_in_seconds", "at least 1; omit it for a link that never expires"));
    }
    if let Some(t) = &req.content_type {
        let usable = t.split_once('/').is_some_and(|(a, b)| !a.trim().is_empty() && !b.trim().is_empty());
        if !usable || HeaderValue::from_str(t).is_err() {
            return Err(ApiError::invalid("content_type", "a media type, such as text/plain; charset=utf-8"));
        }
    }
    if req.content_disposition.as_deref().is_some_and(|d| d != "attachment" && d != "inline") {
        return Err(ApiError::invalid("content_disposition", "attachment or inline"));
    }
    let expires_ms = req.expires_in_seconds.map(|s| now_ms().saturating_add(s.saturating_mul(1000)));
    let token = state.download_links.mint(Link {
        box_id: record.id.clone(),
        path: path.clone(),
        content_type: req.content_type,
        disposition: req.content_disposition,
        expires_ms,
    });
    let expires_at = expires_ms.map(rfc3339);
    state.events.record(&record.id, json!({"kind": "download_url", "op": "mint", "path": path, "expires_at": expires_at}));
    Ok(Json(json!({
        "download_url": format!("{base}{PREFIX}/{token}/{}", percent_encode(file_name(&path))),
        "token": token,
        "expires_at": expires_at,
    })))
}

pub async fn fetch(
    State(state): State<Shared>,
    Path((token, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let link = match state.download_links.check(&token) {
        Ok(link) if name == file_name(&link.path) => link,
        Ok(_) | Err(Refusal::Invalid) => {
            return error(StatusCode::UNAUTHORIZED, "Unauthorized", "the download link is not valid".into())
        }
        Err(Refusal::Expired) => {
            return error(StatusCode::UNAUTHORIZED, "TokenExpired", "the download link has expired: ask for a new one".into())
        }
    };
    match send(&state, &link, &method, &headers).await {
        Ok(r) => r,
        Err(ApiError::BadRequest { kind: "NotReady", message }) => error(StatusCode::SERVICE_UNAVAILABLE, "NotReady", message),
        Err(e) => e.into_response(),
    }
}

async fn send(state: &Shared, link: &Link, method: &Method, headers: &HeaderMap) -> Result<Response, ApiError> {
    let record = state
        .boxes
        .find(&link.box_id)
        .ok_or_else(|| ApiError::NotFound("the sandbox of this download link is gone".into()))?;
    // A fetch is use of the box, for its idle TTL, and wakes it if it stopped.
    state.boxes.touch(&record.id);
    let record = lifecycle::running(state, record).await?;
    let mut response = files::send(state, &record, link.path.clone(), method, headers, Some("download_url")).await?;
    let out = response.headers_mut();
    if let Some(t) = link.content_type.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        out.insert(header::CONTENT_TYPE, t);
    }
    if let Some(kind) = &link.disposition {
        if let Ok(d) = HeaderValue::from_str(&disposition(kind, file_name(&link.path))) {
            out.insert(header::CONTENT_DISPOSITION, d);
        }
    }
    out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    out.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
    out.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Ok(response)
}
