//! The control plane's request and response bodies, as `langsmith/sandbox/_client.py` sends
//! them and `_models.py` / `_sandbox.py` read them. Fields the SDK may send that ember does
//! not take are named here so that a request using them is refused, never silently ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The user, working directory and environment commands run with (`RunConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
}

impl RunConfig {
    /// `over` layered on this one: its user and work_dir replace, its env_vars merge.
    pub fn merged(&self, over: &RunConfig) -> RunConfig {
        let env_vars = match (&self.env_vars, &over.env_vars) {
            (None, None) => None,
            (base, top) => {
                let mut all = base.clone().unwrap_or_default();
                all.extend(top.clone().unwrap_or_default());
                Some(all)
            }
        };
        RunConfig {
            user: over.user.clone().or_else(|| self.user.clone()),
            work_dir: over.work_dir.clone().or_else(|| self.work_dir.clone()),
            env_vars,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateBox {
    pub snapshot_id: Option<String>,
    pub snapshot: Option<String>,
    pub snapshot_name: Option<String>,
    pub name: Option<String>,
    /// Seconds to wait for ready, with `wait_for_ready`.
    pub timeout: Option<u64>,
    #[serde(default = "yes")]
    pub wait_for_ready: bool,
    pub idle_ttl_seconds: Option<u64>,
    pub delete_after_stop_seconds: Option<u64>,
    pub persistent: Option<bool>,
    pub preserve_memory_on_stop: Option<bool>,
    pub restore_memory: Option<bool>,
    pub vcpus: Option<u64>,
    pub mem_bytes: Option<u64>,
    pub fs_capacity_bytes: Option<u64>,
    pub labels: Option<BTreeMap<String, String>>,
    pub tag_value_ids: Option<Vec<String>>,
    pub mount_config: Option<serde_json::Value>,
    pub proxy_config: Option<serde_json::Value>,
    pub run_config: Option<RunConfig>,
    pub access_delegation: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct UpdateBox {
    pub name: Option<String>,
    pub idle_ttl_seconds: Option<u64>,
    pub delete_after_stop_seconds: Option<u64>,
    pub proxy_config: Option<serde_json::Value>,
    pub run_config: Option<RunConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CaptureSnapshot {
    pub name: String,
    pub tag: Option<String>,
    pub docker_image: Option<String>,
    pub fs_capacity_bytes: Option<u64>,
    pub run_config: Option<RunConfig>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Fork {
    pub count: usize,
    /// Seconds each child has to become ready.
    pub timeout: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListSnapshots {
    pub name_contains: Option<String>,
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

/// A sandbox as the SDK's `Sandbox.from_dict` reads it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BoxView {
    pub id: String,
    pub name: String,
    pub dataplane_url: String,
    pub status: &'static str,
    pub status_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub idle_ttl_seconds: u64,
    pub delete_after_stop_seconds: Option<u64>,
    pub stopped_at: Option<String>,
    pub snapshot_id: Option<String>,
    pub vcpus: Option<u8>,
    pub mem_bytes: Option<u64>,
    pub fs_capacity_bytes: Option<u64>,
    pub run_config: RunConfig,
    pub preserve_memory_on_stop: bool,
    pub labels: BTreeMap<String, String>,
    pub proxy_config: Option<serde_json::Value>,
}

/// A snapshot as `Snapshot.from_dict` reads it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SnapshotView {
    pub id: String,
    pub name: String,
    pub status: &'static str,
    pub status_message: Option<String>,
    pub fs_capacity_bytes: u64,
    pub source_sandbox_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub tags: Vec<String>,
    pub run_config: Option<RunConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_configs_layer_user_and_dir_replacing_and_env_merging() {
        let env = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let base = RunConfig {
            user: Some("root".into()),
            work_dir: Some("/srv".into()),
            env_vars: env(&[("A", "1"), ("B", "2")]),
        };
        let top = RunConfig {
            user: Some("1000".into()),
            work_dir: None,
            env_vars: env(&[("B", "3")]),
        };
        let merged = base.merged(&top);
        assert_eq!(merged.user.as_deref(), Some("1000"));
        assert_eq!(merged.work_dir.as_deref(), Some("/srv"));
        assert_eq!(merged.env_vars, env(&[("A", "1"), ("B", "3")]));
        assert_eq!(
            RunConfig::default().merged(&RunConfig::default()),
            RunConfig::default()
        );
    }
}
