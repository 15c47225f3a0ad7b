//! A box's life on the backend: provisioned in the background (a create that waits for ready
//! waits for that), started, stopped, captured, forked and deleted, each step of one box after
//! the other (its lifecycle lock) and each in its event trace.
//!
//! A box deleted while it is being provisioned is gone from the API at once; the provisioning
//! removes the backend sandbox it made once it finds the box gone.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::backend::{BackendError, CreateSpec, Source};
use crate::boxes::{BoxRecord, Status};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::models::RunConfig;
use crate::snapshots::{SnapStatus, SnapshotRecord};
use crate::state::{blocking, Shared};
use crate::tenants::Tenant;

/// A create's failure as the SDK's `handle_sandbox_creation_error` maps it.
fn creation_error(e: BackendError) -> ApiError {
    match e {
        BackendError::NotFound(m) => ApiError::NotFound(m),
        BackendError::Invalid(m) => ApiError::invalid("body", m),
        BackendError::NotReady(m) | BackendError::Failed(m) | BackendError::DialFailed(m) => ApiError::CreationFailed {
            kind: "SandboxStart",
            message: m,
        },
    }
}

/// Adds `record` (provisioning) and makes its backend sandbox from `spec` in the background;
/// with `wait`, returns once it is ready (or failed, then removed), or after `wait` with a
/// timeout while it goes on.
pub async fn provision(
    state: &Shared,
    tenant: &Tenant,
    record: BoxRecord,
    spec: CreateSpec,
    wait: Option<Duration>,
) -> Result<BoxRecord, ApiError> {
    state.boxes.insert(record.clone(), tenant)?;
    state.events.record(
        &record.id,
        json!({"kind": "lifecycle", "op": "create", "snapshot_id": record.snapshot_id}),
    );
    let (done, result) = tokio::sync::oneshot::channel();
    let (task_state, id) = (state.clone(), record.id.clone());
    tokio::spawn(async move {
        let asked = Instant::now();
        let pooled = task_state.pools.take(&spec);
        let from_pool = pooled.is_some();
        let created = match pooled {
            Some(created) => {
                task_state.pool_wanted.notify_one();
                Ok(created)
            }
            None => {
                let backend = task_state.backend.clone();
                blocking(move || backend.create(&spec))
                    .await
                    .and_then(|r| r.map_err(creation_error))
            }
        };
        let outcome = match created {
            Ok(created) => {
                task_state.metrics.created(asked.elapsed());
                let updated = task_state.boxes.update(&id, |r| {
                    r.backend = Some(created.name.clone());
                    r.status = Status::Ready;
                    r.last_active_ms = now_ms();
                    r.vcpus = Some(created.vcpus);
                    r.mem_bytes = Some(created.mem_bytes);
                    r.fs_capacity_bytes = created.disk_bytes;
                });
                if updated.is_none() {
                    let backend = task_state.backend.clone();
                    let _ = blocking(move || backend.remove(&created.name)).await;
                }
                task_state.events.record(&id, json!({"kind": "lifecycle", "op": "ready", "seconds": asked.elapsed().as_secs_f64(), "pooled": from_pool}));
                updated.ok_or_else(|| {
                    ApiError::NotFound("the sandbox was deleted while it was being created".into())
                })
            }
            Err(e) => {
                task_state.boxes.update(&id, |r| {
                    r.status = Status::Failed;
                    r.status_message = Some(e.to_string());
                });
                task_state.events.record(
                    &id,
                    json!({"kind": "lifecycle", "op": "failed", "message": e.to_string()}),
                );
                Err(e)
            }
        };
        let _ = done.send(outcome);
    });
    let Some(wait) = wait else { return Ok(record) };
    match tokio::time::timeout(wait, result).await {
        Ok(Ok(Ok(ready))) => Ok(ready),
        Ok(Ok(Err(e))) => {
            // The caller hears why; a failed box kept would only hold its name.
            remove_record(state, &record.id);
            Err(e)
        }
        Ok(Err(_)) => Err(ApiError::Internal(
            "the sandbox's creation was abandoned".into(),
        )),
        Err(_) => Err(ApiError::Timeout(format!(
            "Sandbox '{}' not ready after {}s (last status: provisioning)",
            record.name,
            wait.as_secs()
        ))),
    }
}

fn remove_record(state: &Shared, id: &str) {
    state.commands.remove_box(id);
    state.download_links.revoke_box(id);
    state.service_tokens.revoke(id, None);
    state.boxes.remove(id);
    state.events.forget(id);
}

fn gone(id: &str) -> ApiError {
    ApiError::NotFound(format!("Sandbox '{id}' not found"))
}

pub(crate) fn not_ready(record: &BoxRecord) -> ApiError {
    let why = record
        .status_message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    ApiError::BadRequest {
        kind: "NotReady",
        message: format!(
            "Sandbox '{}' is {}{why}",
            record.name,
            record.status.as_str()
        ),
    }
}

/// Box `id` ready to run commands and move files: started first if it is stopped.
pub async fn running(state: &Shared, record: BoxRecord) -> Result<BoxRecord, ApiError> {
    match record.status {
        Status::Ready => Ok(record),
        Status::Stopped => start(state, &record.id).await,
        Status::Provisioning | Status::Failed => Err(not_ready(&record)),
    }
}

/// Starts box `id` if it is stopped; returns it ready.
pub async fn start(state: &Shared, id: &str) -> Result<BoxRecord, ApiError> {
    let lock = state.boxes.lock(id);
    let _held = lock.lock().await;
    let record = state.boxes.find(id).ok_or_else(|| gone(id))?;
    let Some(name) = record
        .backend
        .clone()
        .filter(|_| record.status == Status::Stopped)
    else {
        return match record.status {
            Status::Ready => Ok(record),
            _ => Err(not_ready(&record)),
        };
    };
    state.boxes.update(id, |r| r.status = Status::Provisioning);
    let (backend, timeout) = (state.backend.clone(), state.config.ready_timeout);
    let started = blocking(move || backend.start(&name, timeout)).await?;
    match started {
        Ok(successor) => {
            state
                .events
                .record(id, json!({"kind": "lifecycle", "op": "start"}));
            state.boxes.update(id, |r| {
                r.backend = Some(successor);
                r.status = Status::Ready;
                r.stopped_ms = None;
                r.last_active_ms = now_ms();
            });
            state.boxes.find(id).ok_or_else(|| gone(id))
        }
        Err(e) => {
            state.boxes.update(id, |r| {
                r.status = Status::Stopped;
                r.status_message = Some(e.to_string());
            });
            Err(ApiError::from_backend(
                &format!("cannot start sandbox {}", record.name),
                e,
            ))
        }
    }
}

/// Stops box `id` (keeping its memory if it was made with `preserve_memory_on_stop`); its
/// commands are killed.
pub async fn stop(state: &Shared, id: &str) -> Result<BoxRecord, ApiError> {
    stop_when(state, id, "request", |_| true)
        .await?
        .ok_or_else(|| gone(id))
}

/// Stops box `id` as [`stop`] does if, under its lifecycle lock, `still` holds of it (what made
/// the caller decide may have changed meanwhile); `why` goes to its trace. Its new state, or
/// `None` if `still` did not hold.
pub async fn stop_when(
    state: &Shared,
    id: &str,
    why: &'static str,
    still: impl FnOnce(&BoxRecord) -> bool,
) -> Result<Option<BoxRecord>, ApiError> {
    let lock = state.boxes.lock(id);
    let _held = lock.lock().await;
    let record = state.boxes.find(id).ok_or_else(|| gone(id))?;
    if !still(&record) {
        return Ok(None);
    }
    let name = match (record.status, record.backend.clone()) {
        (Status::Stopped, _) => return Ok(Some(record)),
        (Status::Ready, Some(name)) => name,
        _ => return Err(not_ready(&record)),
    };
    state.commands.remove_box(id);
    let (backend, memory) = (state.backend.clone(), record.preserve_memory_on_stop);
    blocking(move || backend.stop(&name, memory))
        .await?
        .map_err(|e| ApiError::from_backend(&format!("cannot stop sandbox {}", record.name), e))?;
    state.events.record(
        id,
        json!({"kind": "lifecycle", "op": "stop", "memory": memory, "reason": why}),
    );
    let stopped = state.boxes.update(id, |r| {
        r.status = Status::Stopped;
        r.stopped_ms = Some(now_ms());
        r.status_message = None;
    });
    stopped.ok_or_else(|| gone(id)).map(Some)
}

/// Deletes box `id` with its backend sandbox and commands.
pub async fn delete(state: &Shared, id: &str) -> Result<(), ApiError> {
    delete_when(state, id, "request", |_| true).await.map(|_| ())
}

/// Deletes box `id` as [`delete`] does if, under its lifecycle lock, `still` holds of it;
/// `why` goes to the server's log. Whether it was deleted.
pub async fn delete_when(
    state: &Shared,
    id: &str,
    why: &'static str,
    still: impl FnOnce(&BoxRecord) -> bool,
) -> Result<bool, ApiError> {
    let lock = state.boxes.lock(id);
    let _held = lock.lock().await;
    let record = state.boxes.find(id).ok_or_else(|| gone(id))?;
    if !still(&record) {
        return Ok(false);
    }
    tracing::info!(sandbox = %record.name, tenant = %record.tenant, reason = why, "deleting a sandbox");
    remove_record(state, id);
    if let Some(name) = record.backend {
        let backend = state.backend.clone();
        match blocking(move || backend.remove(&name)).await? {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => {
                return Err(ApiError::from_backend(
                    &format!("cannot delete sandbox {}", record.name),
                    e,
                ))
            }
        }
    }
    Ok(true)
}

/// Captures ready box `record` as `snapshot` in the background; returns it building.
pub async fn capture(
    state: &Shared,
    record: &BoxRecord,
    snapshot: SnapshotRecord,
) -> Result<SnapshotRecord, ApiError> {
    let name = match (record.status, record.backend.clone()) {
        (Status::Ready, Some(name)) => name,
        _ => return Err(not_ready(record)),
    };
    state.snapshots.insert(snapshot.clone());
    let (task_state, box_id, snap_id) = (state.clone(), record.id.clone(), snapshot.id.clone());
    tokio::spawn(async move {
        let lock = task_state.boxes.lock(&box_id);
        let _held = lock.lock().await;
        let (backend, id) = (task_state.backend.clone(), snap_id.clone());
        let done = blocking(move || backend.snapshot(&name, &id))
            .await
            .and_then(|r| r.map_err(|e| ApiError::from_backend("cannot capture", e)));
        task_state.events.record(&box_id, json!({"kind": "lifecycle", "op": "snapshot", "snapshot_id": snap_id, "ok": done.is_ok()}));
        task_state.snapshots.update(&snap_id, |s| match done {
            Ok(()) => s.status = SnapStatus::Ready,
            Err(e) => {
                s.status = SnapStatus::Failed;
                s.status_message = Some(e.to_string());
            }
        });
    });
    Ok(snapshot)
}

/// Builds `snapshot` from Docker image `image` in the background; its run_config becomes the
/// image's, with `over` layered on it.
pub fn build_from_image(
    state: &Shared,
    snapshot: SnapshotRecord,
    image: String,
    capacity: Option<u64>,
    over: Option<RunConfig>,
) -> SnapshotRecord {
    state.snapshots.insert(snapshot.clone());
    let (task_state, id) = (state.clone(), snapshot.id.clone());
    tokio::spawn(async move {
        let (backend, snap_id) = (task_state.backend.clone(), id.clone());
        let done = blocking(move || backend.snapshot_from_image(&snap_id, &image, capacity))
            .await
            .and_then(|r| r.map_err(|e| ApiError::from_backend("cannot build the snapshot", e)));
        task_state.snapshots.update(&id, |s| match done {
            Ok(d) => {
                let own = RunConfig { user: d.user, work_dir: d.work_dir, env_vars: Some(d.env.into_iter().collect()) };
                s.run_config = Some(own.merged(&over.unwrap_or_default()));
                s.status = SnapStatus::Ready;
            }
            Err(e) => {
                s.status = SnapStatus::Failed;
                s.status_message = Some(e.to_string());
            }
        });
    });
    snapshot
}

/// Forks ready box `id` into `count` children, boxes of the same tenant named
/// `<name>-<n>` (the smallest free numbers); returns them ready.
pub async fn fork(
    state: &Shared,
    tenant: &Tenant,
    id: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<BoxRecord>, ApiError> {
    if !(1..=64).contains(&count) {
        return Err(ApiError::invalid("count", "fork 1 to 64 children at once"));
    }
    let lock = state.boxes.lock(id);
    let _held = lock.lock().await;
    let parent = state.boxes.by_id(&tenant.name, id)?;
    let name = match (parent.status, parent.backend.clone()) {
        (Status::Ready, Some(name)) => name,
        _ => return Err(not_ready(&parent)),
    };
    if let Some(max) = tenant
        .max_boxes
        .filter(|&max| state.boxes.list(&tenant.name).len() + count > max)
    {
        return Err(ApiError::Quota(format!(
            "sandbox count limit of {max} reached for tenant {}",
            tenant.name
        )));
    }
    let backend = state.backend.clone();
    let children = blocking(move || backend.fork(&name, count, timeout))
        .await?
        .map_err(|e| ApiError::from_backend(&format!("cannot fork sandbox {}", parent.name), e))?;
    let mut made = Vec::new();
    let mut n = 1;
    for child in children {
        let mut record = loop {
            let candidate = format!("{}-{n}", parent.name);
            n += 1;
            if state.boxes.get(&tenant.name, &candidate).is_err() {
                break BoxRecord::new(&tenant.name, &candidate);
            }
        };
        record.backend = Some(child.name.clone());
        record.status = Status::Ready;
        record.vcpus = Some(child.vcpus);
        record.mem_bytes = Some(child.mem_bytes);
        record.snapshot_id = parent.snapshot_id.clone();
        record.run_config = parent.run_config.clone();
        record.labels = parent.labels.clone();
        record.preserve_memory_on_stop = parent.preserve_memory_on_stop;
        record.idle_ttl_seconds = parent.idle_ttl_seconds;
        record.delete_after_stop_seconds = parent.delete_after_stop_seconds;
        record.proxy_config = parent.proxy_config.clone();
        if let Err(e) = state.boxes.insert(record.clone(), tenant) {
            let backend = state.backend.clone();
            let _ = blocking(move || backend.remove(&child.name)).await;
            return Err(e);
        }
        state.events.record(
            &record.id,
            json!({"kind": "lifecycle", "op": "create", "forked_from": parent.id}),
        );
        made.push(record);
    }
    let ids: Vec<&str> = made.iter().map(|r| r.id.as_str()).collect();
    state.events.record(
        id,
        json!({"kind": "lifecycle", "op": "fork", "children": ids}),
    );
    Ok(made)
}

/// What a create names as its source, resolved for `tenant`.
pub fn source_of(
    state: &Shared,
    tenant: &str,
    reference: Option<&str>,
    templates: &[crate::backend::Template],
) -> Result<(Source, Option<SnapshotRecord>), ApiError> {
    let Some(reference) = reference else {
        return Ok((Source::Default, None));
    };
    let snapshot = state.snapshots.resolve(tenant, reference, templates)?;
    if snapshot.status != SnapStatus::Ready {
        return Err(ApiError::BadRequest {
            kind: "NotReady",
            message: format!("snapshot {reference} is {:?}", snapshot.status),
        });
    }
    let source = match &snapshot.origin {
        crate::snapshots::Origin::Template(name) => Source::Template(name.clone()),
        crate::snapshots::Origin::Captured => Source::Snapshot(snapshot.id.clone()),
    };
    Ok((source, Some(snapshot)))
}
