//! Snapshots of sandboxes, and new sandboxes started from them.
//!
//! A sandbox snapshot is a directory: the VM's `state` and `memory` files, and `disk.qcow2`, a
//! frozen copy of the sandbox's overlay taken while the VM was paused and its disk flushed (it
//! still names the base image as its backing file). The snapshotted sandbox runs on, on its
//! own overlay. A sandbox started from the snapshot gets a fresh overlay on the frozen disk,
//! its own vsock socket and CID (load overrides), and is ready when its guest agent answers
//! again after the vsock transport reset a restore sends.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::paths::{OVERLAY, VSOCK_SOCKET};
use crate::record::Record;
use crate::error::io;
use crate::{SandboxError, Shape, Store};
use api::client::ApiClient;
use api::models::{
    DriveOverride, MemBackend, MemBackendType, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    VsockOverride,
};
use disk::overlay;
use api::snapshot_meta::SnapshotMeta;

/// The frozen disk in a sandbox snapshot directory.
pub const SNAPSHOT_DISK: &str = "disk.qcow2";
/// The VM's state and memory files in a sandbox snapshot directory (the VMM writes the state
/// file's metadata beside it, `api::snapshot_meta`).
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
/// What the control plane knows of the guest in a sandbox snapshot: `{"agent_uptime_ms": N}`,
/// how long its agent had run before the snapshot (see `Shape`).
pub const GUEST_FILE: &str = "guest.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct GuestFacts {
    agent_uptime_ms: u64,
}

/// Where a snapshot's VM files are (Firecracker's `snapshot_path` and `mem_file_path`).
pub(crate) struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl SnapshotFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self { state: dir.join(STATE_FILE), memory: dir.join(MEMORY_FILE) }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, SandboxError> {
    std::path::absolute(path).map_err(io("cannot resolve", path))
}

impl Store {
    /// Writes a snapshot of sandbox `name` into `dir` (created; must not hold a snapshot yet).
    /// The sandbox is paused meanwhile and resumed after, whatever happened.
    pub fn snapshot(&self, name: &str, dir: &Path) -> Result<(), SandboxError> {
        self.ready_record(name)?;
        let dir = absolute(dir)?;
        let files = SnapshotFiles::in_dir(&dir);
        if files.state.exists() {
            return Err(SandboxError::SnapshotExists(dir));
        }
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let agent_ms = self.agent_uptime_ms(name).ok();
        self.while_paused(name, |api| self.snapshot_paused(api, name, &files, &dir))?;
        if let Some(agent_uptime_ms) = agent_ms {
            let path = dir.join(GUEST_FILE);
            let json = serde_json::to_vec(&GuestFacts { agent_uptime_ms }).expect("plain numbers serialize");
            std::fs::write(&path, json).map_err(io("cannot write", &path))?;
        }
        Ok(())
    }

    fn snapshot_paused(&self, api: &ApiClient, name: &str, files: &SnapshotFiles, dir: &Path) -> Result<(), SandboxError> {
        // The create flushes the sandbox's disk, so the copy after it holds everything the
        // guest wrote before the pause.
        api.put(
            "/snapshot/create",
            &SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: files.state.display().to_string(),
                mem_file_path: files.memory.display().to_string(),
                freeze_memory: false,
            },
        )?;
        let overlay_path = self.dir(name).join(OVERLAY);
        let frozen = dir.join(SNAPSHOT_DISK);
        std::fs::copy(&overlay_path, &frozen).map_err(io("cannot copy the sandbox's disk to", &frozen))?;
        Ok(())
    }

    /// Starts a new sandbox from the snapshot in `dir`; returns once its guest agent answers.
    pub fn start_from_snapshot(
        &self,
        name: Option<String>,
        dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Record, SandboxError> {
        let dir = absolute(dir)?;
        let files = SnapshotFiles::in_dir(&dir);
        // Read first, so that a bad snapshot fails before a VMM is spawned (the VMM checks the
        // state file itself when it loads it).
        let meta = SnapshotMeta::read(&files.state)?;
        let source = RestoreSource {
            state: &files.state,
            mem_size: meta.mem_size_bytes,
            vcpus: meta.vcpu_count,
            memory: files.memory.display().to_string(),
            mem_layers: Vec::new(),
            disk: &dir.join(SNAPSHOT_DISK),
            // Snapshots from before this file existed are restored unchecked.
            agent_ms: std::fs::read(dir.join(GUEST_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<GuestFacts>(&b).ok())
                .map(|g| g.agent_uptime_ms),
        };
        self.create(name, |name, sandbox_dir| {
            self.restore_into(name, sandbox_dir, &source, self.reserve_cid(name)?, ready_timeout)
        })
    }

    /// Restores `source` as sandbox `name` in `sandbox_dir`, on a new overlay over its disk.
    pub(super) fn restore_into(
        &self,
        name: &str,
        sandbox_dir: &Path,
        source: &RestoreSource,
        cid: u32,
        ready_timeout: Duration,
    ) -> Result<Record, SandboxError> {
        let overlay_path = sandbox_dir.join(OVERLAY);
        overlay::create(source.disk, &overlay_path)?;
        let shape = Shape {
            image: source.disk.to_path_buf(),
            mem_mib: source.mem_size >> 20,
            vcpus: source.vcpus,
            cid,
            resumes_agent_ms: source.agent_ms,
        };
        let uds = sandbox_dir.join(VSOCK_SOCKET);
        self.launch(name, sandbox_dir, shape, ready_timeout, |api| {
            api.put(
                "/snapshot/load",
                &SnapshotLoadParams {
                    snapshot_path: source.state.display().to_string(),
                    mem_backend: Some(MemBackend { backend_type: MemBackendType::File, backend_path: source.memory.clone() }),
                    mem_file_path: None,
                    enable_diff_snapshots: false,
                    track_dirty_pages: false,
                    resume_vm: true,
                    drive_overrides: vec![DriveOverride { index: 0, path_on_host: overlay_path.display().to_string() }],
                    vsock_override: Some(VsockOverride { guest_cid: Some(cid), uds_path: Some(uds.display().to_string()) }),
                    mem_layers: source.mem_layers.clone(),
                },
            )
        })
    }
}

/// What a new sandbox is restored from: a state file, the guest memory to map (a snapshot's
/// memory file, or a forked VM's frozen memory with its layers) and the disk its overlay goes on.
pub(super) struct RestoreSource<'a> {
    pub state: &'a Path,
    pub mem_size: u64,
    pub vcpus: u8,
    pub memory: String,
    pub mem_layers: Vec<String>,
    pub disk: &'a Path,
    /// The guest agent's uptime when the source was frozen, if known (see `Shape`).
    pub agent_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_snapshot_fails_before_any_sandbox_exists() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        let snap = tmp.as_path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        std::fs::write(snap.join(STATE_FILE), b"not a snapshot at all, longer than a header").unwrap();
        let err = store.start_from_snapshot(Some("s1".into()), &snap, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("is not a snapshot ember wrote"), "{err}");
        std::fs::write(snap.join("state.meta.json"), b"{\"meta_version\": 1}").unwrap();
        let err = store.start_from_snapshot(Some("s1".into()), &snap, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("is not ember snapshot metadata"), "{err}");
        assert!(!store.dir("s1").exists());
        assert!(matches!(store.snapshot("nope", &snap), Err(SandboxError::NotFound(_))));
    }
}
