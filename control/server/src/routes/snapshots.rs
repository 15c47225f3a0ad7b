//! `/api/v2/sandboxes/snapshots`: build from a Docker image, capture from a box, get, list,
//! tags, delete.

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::{ok, Body};
use crate::backend::{BackendError, Template};
use crate::boxes::check_name;
use crate::error::ApiError;
use crate::lifecycle;
use crate::models::{CaptureSnapshot, ListSnapshots};
use crate::snapshots::{Origin, SnapshotRecord, LATEST};
use crate::state::{blocking, Shared};
use crate::tenants::Tenant;

/// The most snapshots one list answers.
const MAX_LIMIT: usize = 500;
const DEFAULT_LIMIT: usize = 50;

async fn templates(state: &Shared) -> Result<Vec<Template>, ApiError> {
    let backend = state.backend.clone();
    blocking(move || backend.templates())
        .await?
        .map_err(|e| ApiError::from_backend("cannot list templates", e))
}

/// `POST /snapshots {name, docker_image, fs_capacity_bytes, tag?, run_config?}`: answers the
/// snapshot while it builds (the SDK polls it); the image's own Env, WorkingDir and User are its
/// run_config, under the request's.
pub async fn from_docker(
    State(state): State<Shared>,
    tenant: Tenant,
    Body(req): Body<CaptureSnapshot>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(image) = req.docker_image.clone().filter(|i| !i.is_empty()) else {
        return Err(ApiError::invalid("docker_image", "name the Docker image to build the snapshot from"));
    };
    check_name(&req.name)?;
    // The image's own tag, else latest.
    let own_tag = image.rsplit('/').next().and_then(|last| last.split_once(':')).map(|(_, t)| t.to_string());
    let tag = req.tag.clone().or(own_tag).unwrap_or_else(|| LATEST.into());
    check_name(&tag).map_err(|_| ApiError::invalid("tag", format!("'{tag}' is not a valid tag")))?;
    let snapshot = SnapshotRecord::from_image(&tenant.name, &req.name, &tag);
    Ok(Json(lifecycle::build_from_image(&state, snapshot, image, req.fs_capacity_bytes, req.run_config).view()))
}

pub async fn capture(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
    Body(req): Body<CaptureSnapshot>,
) -> Result<impl IntoResponse, ApiError> {
    let record = state.boxes.get(&tenant.name, &name)?;
    if req.docker_image.is_some() {
        return Err(ApiError::invalid("docker_image", "a snapshot from a Docker image is made with POST /snapshots"));
    }
    if req.fs_capacity_bytes.is_some() {
        return Err(ApiError::invalid(
            "fs_capacity_bytes",
            "a captured snapshot has its sandbox's disk",
        ));
    }
    check_name(&req.name)?;
    let tag = req.tag.clone().unwrap_or_else(|| LATEST.into());
    check_name(&tag)
        .map_err(|_| ApiError::invalid("tag", format!("'{tag}' is not a valid tag")))?;
    // The sandbox's own layer stays with it: a snapshot keeps what it was made from.
    let base = match &record.snapshot_id {
        Some(id) => state
            .snapshots
            .resolve(&tenant.name, id, &templates(&state).await?)
            .ok()
            .and_then(|s| s.run_config),
        None => None,
    };
    let run_config = match (base, req.run_config) {
        (None, None) => None,
        (base, over) => Some(base.unwrap_or_default().merged(&over.unwrap_or_default())),
    };
    let snapshot = SnapshotRecord::captured(&tenant.name, &req.name, &tag, &record.id, run_config);
    Ok(Json(
        lifecycle::capture(&state, &record, snapshot).await?.view(),
    ))
}

pub async fn get(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(reference): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let templates = templates(&state).await?;
    Ok(Json(
        state
            .snapshots
            .resolve(&tenant.name, &reference, &templates)?
            .view(),
    ))
}

pub async fn list(
    State(state): State<Shared>,
    tenant: Tenant,
    Query(q): Query<ListSnapshots>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be from 1 to {MAX_LIMIT}"),
        ));
    }
    let needle = q.name_contains.map(|n| n.to_lowercase());
    let all = state
        .snapshots
        .visible(&tenant.name, &templates(&state).await?);
    let page: Vec<_> = all
        .iter()
        .filter(|s| {
            needle
                .as_ref()
                .is_none_or(|n| s.name.to_lowercase().contains(n))
        })
        .skip(q.offset.unwrap_or(0))
        .take(limit)
        .map(SnapshotRecord::view)
        .collect();
    Ok(Json(json!({ "snapshots": page })))
}

pub async fn tags(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    if name.contains(':') {
        return Err(ApiError::BadRequest {
            kind: "InvalidRequest",
            message: format!("'{name}' carries a tag: give the name alone"),
        });
    }
    let tags = state
        .snapshots
        .tags(&tenant.name, &name, &templates(&state).await?)?;
    let tags: Vec<_> = tags
        .into_iter()
        .map(|(tag, snapshot_id)| json!({"tag": tag, "snapshot_id": snapshot_id}))
        .collect();
    Ok(Json(json!({ "tags": tags })))
}

pub async fn delete(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(reference): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let snapshot = state
        .snapshots
        .resolve(&tenant.name, &reference, &templates(&state).await?)?;
    if let Origin::Template(name) = &snapshot.origin {
        return Err(ApiError::Conflict(format!("snapshot {name} is a template of the installation: remove it on the host with `ember template rm {name}`")));
    }
    if state.boxes.any_from_snapshot(&snapshot.id) {
        return Err(ApiError::Conflict(format!(
            "snapshot {reference} is in use by a sandbox made from it"
        )));
    }
    let (backend, id) = (state.backend.clone(), snapshot.id.clone());
    match blocking(move || backend.remove_snapshot(&id)).await? {
        Ok(()) | Err(BackendError::NotFound(_)) => {}
        Err(BackendError::NotReady(m)) => return Err(ApiError::Conflict(m)),
        Err(e) => {
            return Err(ApiError::from_backend(
                &format!("cannot delete snapshot {reference}"),
                e,
            ))
        }
    }
    state.snapshots.remove(&snapshot.id);
    Ok(ok())
}
