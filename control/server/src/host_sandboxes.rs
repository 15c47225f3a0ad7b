//! Sandboxes of this host's CLI (`ember run --detach`, in the server's own state directory)
//! given service URLs by `ember expose`: `POST /api/v2/sandboxes/local/{name}/service-url`
//! (the body and answer of a box's) and `DELETE` of it (`?port=N`), open only to the server's
//! own user (`local`'s key; 403 without it).
//!
//! Such a sandbox is not made a box of any tenant: no tenant may list, exec in, stop or delete
//! what the host's user made, and the server's idle reaper leaves it alone. It is given an id
//! of its own (a fresh one per server run; the service URL's path carries it), kept in memory
//! with its tokens, bound to the sandbox's incarnation ([`Backend::instance`]): once the
//! sandbox is removed, its URLs end (404), even if another sandbox of that name is made. A
//! sandbox that is not running is 503, as a stopped box is. Its dials go to the server's log
//! (it has no event trace: that is a box's).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::Json;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::backend::{BackendError, State as Machine};
use crate::error::ApiError;
use crate::routes::boxes::{grant, ServiceUrlRequest};
use crate::routes::{Base, Body};
use crate::state::{blocking, Shared};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Adopted {
    name: String,
    instance: String,
}

#[derive(Default)]
pub struct HostSandboxes {
    by_id: Mutex<HashMap<String, Adopted>>,
}

impl HostSandboxes {
    /// The id of sandbox `name` in its `instance`: the one it was given before, else a fresh
    /// one. Also returns the ids of earlier sandboxes of that name, which are forgotten.
    fn adopt(&self, name: &str, instance: &str) -> (String, Vec<String>) {
        let mut all = self.by_id.lock().unwrap();
        let wanted = Adopted { name: name.into(), instance: instance.into() };
        if let Some((id, _)) = all.iter().find(|(_, a)| **a == wanted) {
            return (id.clone(), Vec::new());
        }
        let stale: Vec<String> = all.iter().filter(|(_, a)| a.name == name).map(|(id, _)| id.clone()).collect();
        for id in &stale {
            all.remove(id);
        }
        let id = format!("host-{}", uuid::Uuid::new_v4());
        all.insert(id.clone(), wanted);
        (id, stale)
    }

    fn find(&self, id: &str) -> Option<Adopted> {
        self.by_id.lock().unwrap().get(id).cloned()
    }

    fn id_of(&self, name: &str) -> Option<String> {
        self.by_id.lock().unwrap().iter().find(|(_, a)| a.name == name).map(|(id, _)| id.clone())
    }

    fn forget(&self, id: &str) {
        self.by_id.lock().unwrap().remove(id);
    }
}

/// A request of the server's own user: it carries `local.json`'s key.
pub struct LocalUser;

impl FromRequestParts<Shared> for LocalUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Self::Rejection> {
        let Some(key) = &state.config.local_key else {
            return Err(ApiError::NotFound("this server takes no requests of a local user (it has no local key)".into()));
        };
        let given = parts.headers.get(crate::local::KEY_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        match bool::from(key.as_bytes().ct_eq(given)) {
            true => Ok(LocalUser),
            false => Err(ApiError::Forbidden(format!(
                "only the server's own user may expose this host's sandboxes: `ember expose` sends the key of the server's {}",
                crate::local::FILE
            ))),
        }
    }
}

fn gone(name: &str) -> ApiError {
    ApiError::NotFound(format!("there is no sandbox '{name}' on the server's host (see `ember ls`)"))
}

/// The sandbox's incarnation, if it runs: `gone` when it does not exist, `NotReady` when it
/// does but does not run.
async fn running(state: &Shared, name: &str) -> Result<String, ApiError> {
    let backend = state.backend.clone();
    let owned = name.to_string();
    let found = blocking(move || backend.state(&owned).and_then(|s| Ok((s, backend.instance(&owned)?)))).await?;
    match found {
        Ok((Machine::Running, instance)) => Ok(instance),
        Ok((other, _)) => Err(ApiError::BadRequest {
            kind: "NotReady",
            message: format!("sandbox '{name}' is not running ({})", if other == Machine::Failed { "failed" } else { "stopped" }),
        }),
        Err(BackendError::NotFound(_)) => Err(gone(name)),
        Err(e) => Err(ApiError::from_backend(&format!("sandbox '{name}'"), e)),
    }
}

/// `POST .../local/{name}/service-url`.
pub async fn expose(
    State(state): State<Shared>,
    _local: LocalUser,
    Base(base): Base,
    Path(name): Path<String>,
    Body(req): Body<ServiceUrlRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let instance = running(&state, &name).await?;
    let (id, stale) = state.host_sandboxes.adopt(&name, &instance);
    for id in stale {
        state.service_tokens.revoke(&id, None);
    }
    let (answer, _) = grant(&state, &base, &id, &req)?;
    tracing::info!("service URL minted for port {} of host sandbox {name}", req.port);
    Ok(Json(answer))
}

/// `DELETE .../local/{name}/service-url[?port=N]`: revokes its tokens.
pub async fn unexpose(
    State(state): State<Shared>,
    _local: LocalUser,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, u16>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let revoked = state.host_sandboxes.id_of(&name).map_or(0, |id| state.service_tokens.revoke(&id, q.get("port").copied()));
    tracing::info!("{revoked} service URLs of host sandbox {name} revoked");
    Ok(Json(json!({ "revoked": revoked })))
}

/// The backend's name of host sandbox `id`, to dial it: it must be the incarnation exposed
/// (else its URLs end) and running.
pub async fn resolve(state: &Shared, id: &str) -> Result<Option<String>, ApiError> {
    let Some(adopted) = state.host_sandboxes.find(id) else { return Ok(None) };
    match running(state, &adopted.name).await {
        Ok(instance) if instance == adopted.instance => Ok(Some(adopted.name)),
        Err(e @ ApiError::BadRequest { .. }) => Err(e),
        _ => {
            state.host_sandboxes.forget(id);
            state.service_tokens.revoke(id, None);
            Err(ApiError::NotFound(format!("sandbox '{}' was removed since it was exposed: its service URLs have ended", adopted.name)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_keeps_its_id_until_another_of_its_name_replaces_it() {
        let hosts = HostSandboxes::default();
        let (web, stale) = hosts.adopt("web", "1-100");
        assert!(stale.is_empty());
        assert!(web.starts_with("host-"), "{web}");
        assert_eq!(hosts.adopt("web", "1-100"), (web.clone(), Vec::new()));
        let (db, _) = hosts.adopt("db", "2-200");
        assert_ne!(db, web);
        let (again, stale) = hosts.adopt("web", "3-300");
        assert_ne!(again, web, "a new sandbox of the old name is not the old one");
        assert_eq!(stale, vec![web.clone()]);
        assert_eq!(hosts.find(&web), None);
        assert_eq!(hosts.id_of("web"), Some(again));
        assert_eq!(hosts.find(&db).unwrap().name, "db");
    }
}
