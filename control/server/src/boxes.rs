//! The server's sandboxes ("boxes" on the wire): each tenant's names for them, what the API
//! reports of them, and the backend sandbox each one is.
//!
//! A box is found by its tenant and name (the control plane) or by its id (the data plane,
//! whose URL carries the id so that it stays the same across renames, stops and starts).
//! Another tenant's box is never found: it is a 404, as one that does not exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::clock::{now_ms, rfc3339};
use crate::error::ApiError;
use crate::models::{BoxView, RunConfig};
use crate::tenants::Tenant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created or started.
    Provisioning,
    Ready,
    Failed,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Provisioning => "provisioning",
            Status::Ready => "ready",
            Status::Failed => "failed",
            Status::Stopped => "stopped",
        }
    }

    pub const ALL: [Status; 4] = [
        Status::Provisioning,
        Status::Ready,
        Status::Failed,
        Status::Stopped,
    ];
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// The backend's name for it, once it has one.
    pub backend: Option<String>,
    pub status: Status,
    pub status_message: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub stopped_ms: Option<u64>,
    /// The last time a request of its data plane came or one of its commands ended: what its
    /// idle time counts from. Not kept across restarts: a restarted server counts from then.
    #[serde(skip, default = "now_ms")]
    pub last_active_ms: u64,
    pub snapshot_id: Option<String>,
    pub vcpus: Option<u8>,
    pub mem_bytes: Option<u64>,
    pub fs_capacity_bytes: Option<u64>,
    pub idle_ttl_seconds: u64,
    pub delete_after_stop_seconds: Option<u64>,
    pub preserve_memory_on_stop: bool,
    pub labels: BTreeMap<String, String>,
    pub run_config: RunConfig,
    /// Kept for the egress proxy, which reads it once it exists.
    pub proxy_config: Option<serde_json::Value>,
}

impl BoxRecord {
    /// A box about to be provisioned.
    pub fn new(tenant: &str, name: &str) -> BoxRecord {
        let now = now_ms();
        BoxRecord {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: tenant.into(),
            name: name.into(),
            backend: None,
            status: Status::Provisioning,
            status_message: None,
            created_ms: now,
            updated_ms: now,
            stopped_ms: None,
            last_active_ms: now,
            snapshot_id: None,
            vcpus: None,
            mem_bytes: None,
            fs_capacity_bytes: None,
            idle_ttl_seconds: 0,
            delete_after_stop_seconds: None,
            preserve_memory_on_stop: false,
            labels: BTreeMap::new(),
            run_config: RunConfig::default(),
            proxy_config: None,
        }
    }

    /// What the API says of it; `base` is the server's URL as the client reached it.
    pub fn view(&self, base: &str) -> BoxView {
        BoxView {
            id: self.id.clone(),
            name: self.name.clone(),
            dataplane_url: format!("{base}/dataplane/{}", self.id),
            status: self.status.as_str(),
            status_message: self.status_message.clone(),
            created_at: rfc3339(self.created_ms),
            updated_at: rfc3339(self.updated_ms),
            idle_ttl_seconds: self.idle_ttl_seconds,
            delete_after_stop_seconds: self.delete_after_stop_seconds,
            stopped_at: self.stopped_ms.map(rfc3339),
            snapshot_id: self.snapshot_id.clone(),
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            fs_capacity_bytes: self.fs_capacity_bytes,
            run_config: self.run_config.clone(),
            preserve_memory_on_stop: self.preserve_memory_on_stop,
            labels: self.labels.clone(),
            proxy_config: self.proxy_config.clone(),
        }
    }
}

/// Whether `name` is a name a box can have: 1 to 63 letters, digits, `-`, `_` or `.`,
/// starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match ok {
        true => Ok(()),
        false => Err(ApiError::invalid(
            "name",
            format!("'{name}' is not a valid name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"),
        )),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("Sandbox '{name}' not found"))
}

#[derive(Default)]
pub struct Boxes {
    records: Mutex<HashMap<String, BoxRecord>>,
    /// Held while a box's lifecycle changes (create, start, stop, snapshot, fork, delete), so
    /// that those of one box happen one after the other.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Counts the changes to the records (not their use, [`Boxes::touch`]): what tells the
    /// registry that they need saving.
    changes: AtomicU64,
}

impl Boxes {
    /// Boxes with `records` (a restarted server's, see `registry`).
    pub fn with(records: Vec<BoxRecord>) -> Boxes {
        Boxes {
            records: Mutex::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
            ..Boxes::default()
        }
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds `record`, unless its tenant has a box of that name or is at its quota.
    pub fn insert(&self, record: BoxRecord, tenant: &Tenant) -> Result<(), ApiError> {
        let mut all = self.records.lock().unwrap();
        if all
            .values()
            .any(|r| r.tenant == record.tenant && r.name == record.name)
        {
            return Err(ApiError::Conflict(format!(
                "Sandbox name '{}' already in use",
                record.name
            )));
        }
        let owned = all.values().filter(|r| r.tenant == record.tenant).count();
        if let Some(max) = tenant.max_boxes.filter(|&max| owned >= max) {
            return Err(ApiError::Quota(format!(
                "sandbox count limit of {max} reached for tenant {}",
                tenant.name
            )));
        }
        all.insert(record.id.clone(), record);
        self.changed();
        Ok(())
    }

    pub fn get(&self, tenant: &str, name: &str) -> Result<BoxRecord, ApiError> {
        let all = self.records.lock().unwrap();
        all.values()
            .find(|r| r.tenant == tenant && r.name == name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    pub fn by_id(&self, tenant: &str, id: &str) -> Result<BoxRecord, ApiError> {
        let all = self.records.lock().unwrap();
        all.get(id)
            .filter(|r| r.tenant == tenant)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// Box `id`, whichever tenant's (for the server's own steps on a box it already found).
    pub fn find(&self, id: &str) -> Option<BoxRecord> {
        self.records.lock().unwrap().get(id).cloned()
    }

    /// The tenant's boxes, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<BoxRecord> {
        let all = self.records.lock().unwrap();
        let mut mine: Vec<BoxRecord> = all
            .values()
            .filter(|r| r.tenant == tenant)
            .cloned()
            .collect();
        mine.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
        mine
    }

    /// Every box of every tenant (for the server's own rounds over them).
    pub fn all(&self) -> Vec<BoxRecord> {
        self.records.lock().unwrap().values().cloned().collect()
    }

    /// Box `id` was used just now (its update time, which the API shows, stays).
    pub fn touch(&self, id: &str) {
        if let Some(r) = self.records.lock().unwrap().get_mut(id) {
            r.last_active_ms = now_ms();
        }
    }

    /// Changes box `id` with `f` (its update time set); its new state, if it still exists.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut BoxRecord)) -> Option<BoxRecord> {
        let mut all = self.records.lock().unwrap();
        let record = all.get_mut(id)?;
        f(record);
        record.updated_ms = now_ms();
        self.changed();
        Some(record.clone())
    }

    /// Renames box `id`, unless its tenant has another box of that name.
    pub fn rename(&self, id: &str, name: &str) -> Result<BoxRecord, ApiError> {
        let mut all = self.records.lock().unwrap();
        let tenant = all
            .get(id)
            .map(|r| r.tenant.clone())
            .ok_or_else(|| not_found(id))?;
        if all
            .values()
            .any(|r| r.tenant == tenant && r.name == name && r.id != id)
        {
            return Err(ApiError::Conflict(format!(
                "Sandbox name '{name}' already in use"
            )));
        }
        let record = all.get_mut(id).ok_or_else(|| not_found(id))?;
        record.name = name.into();
        record.updated_ms = now_ms();
        self.changed();
        Ok(record.clone())
    }

    pub fn remove(&self, id: &str) -> Option<BoxRecord> {
        self.locks.lock().unwrap().remove(id);
        let removed = self.records.lock().unwrap().remove(id);
        self.changed();
        removed
    }

    pub fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// How many boxes are in each status, all tenants together.
    pub fn count_by_status(&self) -> Vec<(Status, usize)> {
        let all = self.records.lock().unwrap();
        Status::ALL
            .iter()
            .map(|&s| (s, all.values().filter(|r| r.status == s).count()))
            .collect()
    }

    /// Whether any box of any tenant was made from snapshot `id`.
    pub fn any_from_snapshot(&self, id: &str) -> bool {
        self.records
            .lock()
            .unwrap()
            .values()
            .any(|r| r.snapshot_id.as_deref() == Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, max_boxes: Option<usize>) -> Tenant {
        Tenant {
            name: name.into(),
            max_boxes,
        }
    }

    #[test]
    fn names_are_per_tenant_and_other_tenants_boxes_are_not_found() {
        let boxes = Boxes::default();
        let a = BoxRecord::new("alice", "web");
        boxes.insert(a.clone(), &tenant("alice", None)).unwrap();
        boxes
            .insert(BoxRecord::new("bob", "web"), &tenant("bob", None))
            .unwrap();
        let again = boxes.insert(BoxRecord::new("alice", "web"), &tenant("alice", None));
        assert!(matches!(again, Err(ApiError::Conflict(_))), "{again:?}");
        assert_eq!(boxes.get("alice", "web").unwrap().id, a.id);
        assert!(matches!(
            boxes.by_id("bob", &a.id),
            Err(ApiError::NotFound(_))
        ));
        assert_eq!(boxes.list("bob").len(), 1);
        boxes
            .insert(BoxRecord::new("alice", "db"), &tenant("alice", None))
            .unwrap();
        assert!(matches!(
            boxes.rename(&a.id, "db"),
            Err(ApiError::Conflict(_))
        ));
        assert_eq!(boxes.rename(&a.id, "api").unwrap().name, "api");
        assert!(boxes.get("alice", "web").is_err());
    }

    #[test]
    fn a_tenant_at_its_quota_gets_no_more_boxes() {
        let boxes = Boxes::default();
        let t = tenant("alice", Some(1));
        boxes.insert(BoxRecord::new("alice", "one"), &t).unwrap();
        assert!(matches!(
            boxes.insert(BoxRecord::new("alice", "two"), &t),
            Err(ApiError::Quota(_))
        ));
        boxes
            .insert(BoxRecord::new("bob", "two"), &tenant("bob", Some(1)))
            .unwrap();
    }

    #[test]
    fn box_names_follow_the_sandbox_name_rules() {
        for good in ["a", "web-1", "A_b.c", &"x".repeat(63)] {
            check_name(good).unwrap();
        }
        for bad in ["", "-a", ".hidden", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
