//! `/api/v2/sandboxes/boxes`: create, list, get, update, delete, status, start, stop, and
//! ember's own `fork` and `events`.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{ok, Base, Body};
use crate::backend::{CreateSpec, Source};
use crate::boxes::{check_name, BoxRecord, Status};
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::lifecycle;
use crate::models::{CreateBox, Fork, UpdateBox};
use crate::{service_proxy, service_tokens};
use crate::state::{blocking, AppState, Shared};
use crate::tenants::Tenant;

/// How long a create that waits for ready waits when the request says not.
const DEFAULT_WAIT: u64 = 30;

/// Refuses what the request asks that ember does not do, naming the field.
fn refuse_unsupported(req: &CreateBox) -> Result<(), ApiError> {
    let refuse = |field: &str, why: &str| Err(ApiError::invalid(field, why));
    if req.mount_config.is_some() {
        return refuse("mount_config", "ember sandboxes have no mounts");
    }
    if req.access_delegation.is_some() {
        return refuse(
            "access_delegation",
            "ember grants no LangSmith access to sandboxes",
        );
    }
    if req.tag_value_ids.as_ref().is_some_and(|t| !t.is_empty()) {
        return refuse("tag_value_ids", "ember has no LangSmith tags");
    }
    if req.persistent == Some(false) {
        return refuse(
            "persistent",
            "ember sandboxes keep their disk across a stop",
        );
    }
    if req.restore_memory == Some(false) {
        return refuse(
            "restore_memory",
            "ember restores a snapshot with its memory",
        );
    }
    if req.fs_capacity_bytes.is_some() {
        return refuse(
            "fs_capacity_bytes",
            "an ember sandbox's disk is its image's size",
        );
    }
    Ok(())
}

pub async fn create(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Body(req): Body<CreateBox>,
) -> Result<impl IntoResponse, ApiError> {
    refuse_unsupported(&req)?;
    let reference = req
        .snapshot_id
        .as_deref()
        .or(req.snapshot.as_deref())
        .or(req.snapshot_name.as_deref());
    let backend = state.backend.clone();
    let templates = match reference {
        Some(_) => blocking(move || backend.templates())
            .await?
            .map_err(|e| ApiError::from_backend("cannot list templates", e))?,
        None => Vec::new(),
    };
    let (source, snapshot) = lifecycle::source_of(&state, &tenant.name, reference, &templates)?;
    if req.restore_memory == Some(true) && source == Source::Default {
        return Err(ApiError::invalid(
            "restore_memory",
            "no snapshot named to restore memory from",
        ));
    }
    if source != Source::Default && (req.vcpus.is_some() || req.mem_bytes.is_some()) {
        let field = if req.vcpus.is_some() {
            "vcpus"
        } else {
            "mem_bytes"
        };
        return Err(ApiError::invalid(
            field,
            "a sandbox restored from a snapshot has the snapshot's vCPUs and memory",
        ));
    }
    let vcpus = req.vcpus.map(|v| {
        u8::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| ApiError::invalid("vcpus", format!("{v} vCPUs")))
    });
    let name = match &req.name {
        Some(name) => name.clone(),
        None => format!(
            "sandbox-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
    };
    check_name(&name)?;
    let mut record = BoxRecord::new(&tenant.name, &name);
    record.snapshot_id = snapshot.as_ref().map(|s| s.id.clone());
    record.idle_ttl_seconds = req
        .idle_ttl_seconds
        .unwrap_or(state.config.default_idle_ttl_seconds);
    record.delete_after_stop_seconds = req
        .delete_after_stop_seconds
        .or(state.config.default_delete_after_stop_seconds);
    record.preserve_memory_on_stop = req.preserve_memory_on_stop.unwrap_or(false);
    record.labels = req.labels.clone().unwrap_or_default();
    let base_config = snapshot.and_then(|s| s.run_config).unwrap_or_default();
    record.run_config = base_config.merged(&req.run_config.clone().unwrap_or_default());
    record.proxy_config = req.proxy_config.clone();
    let spec = CreateSpec {
        source,
        vcpus: vcpus.transpose()?,
        mem_bytes: req.mem_bytes,
        ready_timeout: state.config.ready_timeout,
    };
    let wait = req
        .wait_for_ready
        .then(|| Duration::from_secs(req.timeout.unwrap_or(DEFAULT_WAIT)));
    let record = lifecycle::provision(&state, &tenant, record, spec, wait).await?;
    Ok(Json(record.view(&base)))
}

pub async fn list(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
) -> Json<serde_json::Value> {
    let views: Vec<_> = state
        .boxes
        .list(&tenant.name)
        .iter()
        .map(|r| r.view(&base))
        .collect();
    Json(json!({ "sandboxes": views }))
}

pub async fn get(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.boxes.get(&tenant.name, &name)?.view(&base)))
}

pub async fn update(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Path(name): Path<String>,
    Body(req): Body<UpdateBox>,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    if req.proxy_config.is_some() && record.status != Status::Ready {
        return Err(ApiError::BadRequest {
            kind: "InvalidRequest",
            message: format!("Sandbox '{name}' must be ready to change its proxy config"),
        });
    }
    if let Some(new_name) = &req.name {
        check_name(new_name)?;
        state.boxes.rename(&record.id, new_name)?;
    }
    let updated = state.boxes.update(&record.id, |r| {
        if let Some(ttl) = req.idle_ttl_seconds {
            r.idle_ttl_seconds = ttl;
        }
        if let Some(after) = req.delete_after_stop_seconds {
            r.delete_after_stop_seconds = Some(after);
        }
        if let Some(config) = &req.run_config {
            r.run_config = r.run_config.merged(config);
        }
        if let Some(proxy) = &req.proxy_config {
            r.proxy_config = Some(proxy.clone());
        }
    });
    let updated =
        updated.ok_or_else(|| ApiError::NotFound(format!("Sandbox '{name}' not found")))?;
    state.events.record(
        &record.id,
        json!({"kind": "lifecycle", "op": "update", "name": updated.name}),
    );
    Ok(Json(updated.view(&base)))
}

pub async fn delete(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    lifecycle::delete(&state, &record.id).await?;
    Ok(ok())
}

pub async fn status(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    Ok(Json(
        json!({"status": record.status.as_str(), "status_message": record.status_message}),
    ))
}

/// Starts a stopped box in the background (the SDK polls its status until ready). The body
/// the SDK sends (`{}`) is read, as in every handler that takes none: a body left unread
/// closes the connection after the answer, which a client reusing it sees as a failure.
pub async fn start(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Path(name): Path<String>,
    _body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    match record.status {
        Status::Ready | Status::Provisioning => {}
        Status::Stopped => {
            let (state, id) = (state.clone(), record.id.clone());
            tokio::spawn(async move {
                if let Err(e) = lifecycle::start(&state, &id).await {
                    tracing::warn!("start of box {id}: {e}");
                }
            });
        }
        Status::Failed => {
            let message = format!(
                "Sandbox '{name}' failed and cannot start: {}",
                record.status_message.unwrap_or_default()
            );
            return Err(ApiError::BadRequest {
                kind: "InvalidRequest",
                message,
            });
        }
    }
    Ok(Json(record.view(&base)))
}

pub async fn stop(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
    _body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    lifecycle::stop(&state, &record.id).await?;
    Ok(ok())
}

/// ember's `POST .../boxes/{name}/fork {"count": N}`: N children that go on from the box's
/// state, as boxes `<name>-1`, `<name>-2`, ...
pub async fn fork(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Path(name): Path<String>,
    Body(req): Body<Fork>,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    let timeout = req
        .timeout
        .map_or(state.config.ready_timeout, Duration::from_secs);
    let children = lifecycle::fork(&state, &tenant, &record.id, req.count, timeout).await?;
    let views: Vec<_> = children.iter().map(|r| r.view(&base)).collect();
    Ok(Json(json!({ "sandboxes": views })))
}

/// ember's `GET .../boxes/{name}/events`: the box's trace, JSON lines.
pub async fn events(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        state.events.read(&record.id),
    ))
}

#[derive(Debug, Deserialize)]
pub struct ServiceUrlRequest {
    pub port: u16,
    #[serde(default = "default_service_ttl")]
    pub expires_in_seconds: u64,
    pub access: Option<String>,
}

fn default_service_ttl() -> u64 {
    600
}

/// `POST .../boxes/{name}/service-url`: a token for one port of the box, and the URLs it opens
/// (the SDK's `ServiceURL`): `service_url` takes the token in a header, `browser_url` sets it
/// as a cookie. Login-gated access (`access`) is LangSmith's accounts, which ember has not.
pub async fn service_url(
    State(state): State<Shared>,
    tenant: Tenant,
    Base(base): Base,
    Path(name): Path<String>,
    Body(req): Body<ServiceUrlRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    let (answer, expires_ms) = grant(&state, &base, &record.id, &req)?;
    state.events.record(&record.id, json!({"kind": "service_url", "op": "mint", "port": req.port, "expires_at": rfc3339(expires_ms)}));
    Ok(Json(answer))
}

/// Mints a token for the port `req` names of the box (or host sandbox) `id`: the SDK's
/// `ServiceURL` for it, and when it expires (ms since the epoch).
pub fn grant(state: &AppState, base: &str, id: &str, req: &ServiceUrlRequest) -> Result<(serde_json::Value, u64), ApiError> {
    if req.port == 0 {
        return Err(ApiError::invalid("port", "a port from 1 to 65535"));
    }
    if !(1..=service_tokens::MAX_TTL_SECONDS).contains(&req.expires_in_seconds) {
        return Err(ApiError::invalid("expires_in_seconds", format!("from 1 to {}", service_tokens::MAX_TTL_SECONDS)));
    }
    if req.access.is_some() {
        return Err(ApiError::NotImplemented("login-gated service URLs need LangSmith accounts, which ember has not: omit access for a token URL".into()));
    }
    let (token, expires_ms) = state.service_tokens.mint(id, req.port, req.expires_in_seconds);
    let service = format!("{base}{}", service_proxy::prefix(id, req.port));
    let mut answer = json!({
        "service_url": service,
        "browser_url": format!("{service}/{}?token={token}", service_proxy::LOGIN),
        "token": token,
        "expires_at": rfc3339(expires_ms),
        "embed_url": "",
        "embed_origins": [],
    });
    // ember's own: the same service at the root of a host of its own, for apps whose links
    // are absolute paths.
    if let Some(domain) = &state.config.service_domain {
        let (scheme, authority) = base.split_once("://").unwrap_or(("http", base));
        let listen_port = authority.rsplit_once(':').map(|(_, p)| p).filter(|p| p.bytes().all(|b| b.is_ascii_digit()));
        let host = format!("{scheme}://{}-{id}.{domain}{}", req.port, listen_port.map(|p| format!(":{p}")).unwrap_or_default());
        answer["host_url"] = json!(host);
        answer["host_browser_url"] = json!(format!("{host}/{}?token={token}", service_proxy::LOGIN));
    }
    Ok((answer, expires_ms))
}

/// ember's `DELETE .../boxes/{name}/service-url[?port=N]`: revokes the box's service tokens
/// (of one port, with `port`).
pub async fn revoke_service_urls(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, u16>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    let revoked = state.service_tokens.revoke(&record.id, q.get("port").copied());
    state.events.record(&record.id, json!({"kind": "service_url", "op": "revoke", "count": revoked}));
    Ok(Json(json!({ "revoked": revoked })))
}
