//! Snapshots as the API knows them: the installation's templates, which every tenant sees and
//! none can delete, and the snapshots a tenant captured from its boxes, which only it sees.
//!
//! A snapshot is named by its id, or by `name:tag` (a bare `name` is `name:latest`, else the
//! newest ready snapshot of that name). Tags belong to a name: capturing under a tag moves it
//! from the snapshot that had it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::backend::Template;
use crate::clock::{now_ms, rfc3339};
use crate::error::ApiError;
use crate::models::{RunConfig, SnapshotView};

pub const LATEST: &str = "latest";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapStatus {
    Building,
    Ready,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// The backend's template of that name.
    Template(String),
    /// Captured by the backend under the snapshot's id.
    Captured,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    /// Its tenant; `None` for a template, everyone's.
    pub tenant: Option<String>,
    pub name: String,
    pub tags: Vec<String>,
    pub status: SnapStatus,
    pub status_message: Option<String>,
    pub source_sandbox_id: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub origin: Origin,
    pub run_config: Option<RunConfig>,
}

impl SnapshotRecord {
    /// A snapshot being captured from box `source` for `tenant`.
    pub fn captured(
        tenant: &str,
        name: &str,
        tag: &str,
        source: &str,
        run_config: Option<RunConfig>,
    ) -> SnapshotRecord {
        let now = now_ms();
        SnapshotRecord {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: Some(tenant.into()),
            name: name.into(),
            tags: vec![tag.into()],
            status: SnapStatus::Building,
            status_message: None,
            source_sandbox_id: Some(source.into()),
            created_ms: now,
            updated_ms: now,
            origin: Origin::Captured,
            run_config,
        }
    }

    /// A snapshot being built from a Docker image for `tenant`.
    pub fn from_image(tenant: &str, name: &str, tag: &str) -> SnapshotRecord {
        SnapshotRecord { source_sandbox_id: None, ..SnapshotRecord::captured(tenant, name, tag, "", None) }
    }

    /// The snapshot template `t` is; its id is the same on every server.
    pub fn template(t: &Template) -> SnapshotRecord {
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!("ember:template:{}", t.name).as_bytes(),
        );
        SnapshotRecord {
            id: id.to_string(),
            tenant: None,
            name: t.name.clone(),
            tags: vec![LATEST.into()],
            status: SnapStatus::Ready,
            status_message: None,
            source_sandbox_id: None,
            created_ms: t.created.saturating_mul(1000),
            updated_ms: t.created.saturating_mul(1000),
            origin: Origin::Template(t.name.clone()),
            run_config: None,
        }
    }

    pub fn view(&self) -> SnapshotView {
        SnapshotView {
            id: self.id.clone(),
            name: self.name.clone(),
            status: match self.status {
                SnapStatus::Building => "building",
                SnapStatus::Ready => "ready",
                SnapStatus::Failed => "failed",
            },
            status_message: self.status_message.clone(),
            fs_capacity_bytes: 0,
            source_sandbox_id: self.source_sandbox_id.clone(),
            created_at: rfc3339(self.created_ms),
            updated_at: rfc3339(self.updated_ms),
            tags: self.tags.clone(),
            run_config: self.run_config.clone(),
        }
    }
}

fn not_found(reference: &str) -> ApiError {
    ApiError::NotFound(format!("Snapshot '{reference}' not found"))
}

#[derive(Default)]
pub struct Snapshots {
    captured: Mutex<HashMap<String, SnapshotRecord>>,
    /// Counts the changes, for the registry (as `Boxes::changes`).
    changes: AtomicU64,
}

impl Snapshots {
    /// Snapshots with `records` (a restarted server's, see `registry`).
    pub fn with(records: Vec<SnapshotRecord>) -> Snapshots {
        Snapshots {
            captured: Mutex::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
            changes: AtomicU64::new(0),
        }
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Every captured snapshot of every tenant.
    pub fn all(&self) -> Vec<SnapshotRecord> {
        self.captured.lock().unwrap().values().cloned().collect()
    }

    /// Adds a captured snapshot, moving its tags from the tenant's other snapshots of its name.
    pub fn insert(&self, record: SnapshotRecord) {
        let mut all = self.captured.lock().unwrap();
        for other in all
            .values_mut()
            .filter(|o| o.tenant == record.tenant && o.name == record.name)
        {
            other.tags.retain(|t| !record.tags.contains(t));
        }
        all.insert(record.id.clone(), record);
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    pub fn update(&self, id: &str, f: impl FnOnce(&mut SnapshotRecord)) {
        if let Some(record) = self.captured.lock().unwrap().get_mut(id) {
            f(record);
            record.updated_ms = now_ms();
        }
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    pub fn remove(&self, id: &str) {
        self.captured.lock().unwrap().remove(id);
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// What `tenant` sees: its own snapshots, then the templates, newest first within each.
    pub fn visible(&self, tenant: &str, templates: &[Template]) -> Vec<SnapshotRecord> {
        let all = self.captured.lock().unwrap();
        let mut mine: Vec<SnapshotRecord> = all
            .values()
            .filter(|r| r.tenant.as_deref() == Some(tenant))
            .cloned()
            .collect();
        mine.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        let mut shared: Vec<SnapshotRecord> =
            templates.iter().map(SnapshotRecord::template).collect();
        shared.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.name.cmp(&b.name)));
        mine.extend(shared);
        mine
    }

    /// The snapshot `reference` names for `tenant`: an id, `name:tag` or `name`.
    pub fn resolve(
        &self,
        tenant: &str,
        reference: &str,
        templates: &[Template],
    ) -> Result<SnapshotRecord, ApiError> {
        let visible = self.visible(tenant, templates);
        if let Some(found) = visible.iter().find(|s| s.id == reference) {
            return Ok(found.clone());
        }
        let (name, tag) = match reference.split_once(':') {
            Some((name, tag)) => (name, Some(tag)),
            None => (reference, None),
        };
        let named = || visible.iter().filter(|s| s.name == name);
        let tagged = named().find(|s| s.tags.iter().any(|t| t == tag.unwrap_or(LATEST)));
        let found = match tag {
            Some(_) => tagged,
            None => tagged.or_else(|| named().find(|s| s.status == SnapStatus::Ready)),
        };
        found.cloned().ok_or_else(|| not_found(reference))
    }

    /// The tags under `name` that `tenant` sees, with the snapshot each resolves to, by tag.
    pub fn tags(
        &self,
        tenant: &str,
        name: &str,
        templates: &[Template],
    ) -> Result<Vec<(String, String)>, ApiError> {
        let visible = self.visible(tenant, templates);
        let named: Vec<&SnapshotRecord> = visible.iter().filter(|s| s.name == name).collect();
        if named.is_empty() {
            return Err(ApiError::NotFound(format!(
                "Snapshot name '{name}' not found"
            )));
        }
        let mut tags: Vec<(String, String)> = Vec::new();
        for s in named {
            for t in &s.tags {
                if !tags.iter().any(|(seen, _)| seen == t) {
                    tags.push((t.clone(), s.id.clone()));
                }
            }
        }
        tags.sort();
        Ok(tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str) -> Template {
        Template {
            name: name.into(),
            vcpus: 1,
            mem_bytes: 256 << 20,
            created: 1,
        }
    }

    fn ready(tenant: &str, name: &str, tag: &str) -> SnapshotRecord {
        SnapshotRecord {
            status: SnapStatus::Ready,
            ..SnapshotRecord::captured(tenant, name, tag, "box", None)
        }
    }

    #[test]
    fn references_resolve_by_id_name_and_tag_within_the_tenant() {
        let snaps = Snapshots::default();
        let templates = [template("python")];
        let v1 = ready("alice", "app", LATEST);
        snaps.insert(v1.clone());
        let v2 = ready("alice", "app", LATEST);
        snaps.insert(v2.clone());
        let dev = ready("alice", "app", "dev");
        snaps.insert(dev.clone());
        assert_eq!(
            snaps.resolve("alice", "app", &templates).unwrap().id,
            v2.id,
            "latest moved to the newer one"
        );
        assert_eq!(
            snaps.resolve("alice", "app:latest", &templates).unwrap().id,
            v2.id
        );
        assert_eq!(
            snaps.resolve("alice", "app:dev", &templates).unwrap().id,
            dev.id
        );
        assert_eq!(
            snaps.resolve("alice", &v1.id, &templates).unwrap().id,
            v1.id,
            "an untagged one by its id"
        );
        assert!(
            snaps.resolve("bob", &v1.id, &templates).is_err(),
            "another tenant's"
        );
        assert!(snaps.resolve("bob", "app", &templates).is_err());
        let python = snaps.resolve("bob", "python", &templates).unwrap();
        assert_eq!(
            (python.tenant, python.origin),
            (None, Origin::Template("python".into()))
        );
        assert_eq!(
            snaps.resolve("bob", &python.id, &templates).unwrap().name,
            "python"
        );
        let tags = snaps.tags("alice", "app", &templates).unwrap();
        assert_eq!(
            tags,
            [
                ("dev".to_string(), dev.id.clone()),
                ("latest".to_string(), v2.id.clone())
            ]
        );
        assert!(snaps.tags("bob", "app", &templates).is_err());
    }

    #[test]
    fn a_bare_name_without_latest_is_the_newest_ready_one() {
        let snaps = Snapshots::default();
        let only = ready("alice", "app", "v1");
        snaps.insert(only.clone());
        assert_eq!(snaps.resolve("alice", "app", &[]).unwrap().id, only.id);
        assert!(snaps.resolve("alice", "app:latest", &[]).is_err());
    }
}
