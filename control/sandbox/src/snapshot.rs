//! Snapshots of sandboxes, and new sandboxes started from them.
//!
//! A sandbox snapshot is a directory: the VM's `state` and `memory` files, and `disk.qcow2`, a
//! frozen copy of the sandbox's overlay taken while the VM was paused and its disk flushed (it
//! still names the base image as its backing file). The snapshotted sandbox runs on, on its
//! own overlay. A sandbox started from the snapshot gets a fresh overlay on the frozen disk,
//! its own vsock socket and CID (load overrides), and is ready when its guest agent answers
//! again after the vsock transport reset a restore sends. A snapshot of a sandbox with egress
//! keeps its policy (`egress.json`), and the sandboxes started from it get egress under it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::paths::{EGRESS_POLICY, OVERLAY, VSOCK_SOCKET};
use crate::record::{Origin, Record};
use crate::error::io;
use crate::jails::View;
use crate::{SandboxError, Shape, Store};
use api::client::ApiClient;
use api::models::{
    DiskFormat, DriveOverride, MemBackend, MemBackendType, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
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
        let view = self.view(name)?;
        self.while_paused(name, |api| self.snapshot_paused(api, name, &view, &files, &dir))?;
        if let Some(agent_uptime_ms) = agent_ms {
            let path = dir.join(GUEST_FILE);
            let json = serde_json::to_vec(&GuestFacts { agent_uptime_ms }).expect("plain numbers serialize");
            std::fs::write(&path, json).map_err(io("cannot write", &path))?;
        }
        // Its copies go on with its egress (their guests forward to a proxy already).
        if let Some(policy) = self.egress_policy(name)? {
            crate::egress::write_policy(&dir.join(EGRESS_POLICY), &policy)?;
        }
        Ok(())
    }

    fn snapshot_paused(&self, api: &ApiClient, name: &str, view: &View, files: &SnapshotFiles, dir: &Path) -> Result<(), SandboxError> {
        // The create flushes the sandbox's disk, so the copy after it holds everything the
        // guest wrote before the pause.
        api.put(
            "/snapshot/create",
            &SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: view.out_path(&files.state),
                mem_file_path: view.out_path(&files.memory),
                freeze_memory: false,
            },
        )?;
        // The memory file first and the state last, as the VMM wrote them: a state file is
        // never beside a memory file older than itself.
        view.collect(&files.memory)?;
        view.collect(&api::snapshot_meta::meta_path(&files.state))?;
        view.collect(&files.state)?;
        let overlay_path = self.dir(name).join(OVERLAY);
        let frozen = dir.join(SNAPSHOT_DISK);
        std::fs::copy(&overlay_path, &frozen).map_err(io("cannot copy the sandbox's disk to", &frozen))?;
        Ok(())
    }

    /// Starts a new sandbox from the snapshot in `dir`; returns once its guest agent answers.
    /// The snapshot's disk may be backed by files in `dir`, `$EMBER_STATE` and the store's disk
    /// directories only (see [`Store::disk_policy`]).
    pub fn start_from_snapshot(
        &self,
        name: Option<String>,
        dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Record, SandboxError> {
        // Any other file's absence is the snapshot's fault; without a state file it is none.
        if !SnapshotFiles::in_dir(dir).state.is_file() {
            return Err(SandboxError::NotASnapshot(dir.to_path_buf()));
        }
        self.start_from_snapshot_over(name, dir, None, ready_timeout)
    }

    /// [`Store::start_from_snapshot`], the backing files of its disk also allowed in the
    /// directory of `base`, the base image ember recorded for it (a template's).
    pub(crate) fn start_from_snapshot_over(
        &self,
        name: Option<String>,
        dir: &Path,
        base: Option<&Path>,
        ready_timeout: Duration,
    ) -> Result<Record, SandboxError> {
        let dir = absolute(dir)?;
        let files = SnapshotFiles::in_dir(&dir);
        // Read first, so that a bad snapshot fails before a VMM is spawned (the VMM checks the
        // state file itself when it loads it).
        let meta = SnapshotMeta::read(&files.state)?;
        let disk = dir.join(SNAPSHOT_DISK);
        let named: Vec<&Path> = [Some(disk.as_path()), base].into_iter().flatten().collect();
        let source = RestoreSource {
            state: &files.state,
            mem_size: meta.mem_size_bytes,
            vcpus: meta.vcpu_count,
            memory: RestoreMemory::File(files.memory.display().to_string()),
            disk: &disk,
            image: base.unwrap_or(&disk),
            // The snapshot's disk is a copy of the file the drive had: in that format.
            disk_format: meta.drives.first().map_or(DiskFormat::Qcow2, |d| d.format),
            backing: self.disk_policy(&named)?,
            // Snapshots from before this file existed are restored unchecked.
            agent_ms: std::fs::read(dir.join(GUEST_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<GuestFacts>(&b).ok())
                .map(|g| g.agent_uptime_ms),
            origin: Origin::Snapshot(dir.clone()),
        };
        let egress = crate::egress::read_policy(&dir.join(EGRESS_POLICY))?;
        let record = self.create(name, |name, sandbox_dir| {
            self.restore_into(name, sandbox_dir, &source, self.reserve_cid(name)?, ready_timeout)
        })?;
        self.carry_egress(record, egress)
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
        let format = match source.disk_format {
            DiskFormat::Raw => disk::Format::Raw,
            DiskFormat::Qcow2 => disk::Format::Qcow2,
        };
        overlay::create(overlay::Base { path: source.disk, format, policy: &source.backing }, &overlay_path)?;
        let shape = Shape {
            image: source.image.to_path_buf(),
            backing: source.backing.clone(),
            mem_mib: source.mem_size >> 20,
            vcpus: source.vcpus,
            cid,
            resumes_agent_ms: source.agent_ms,
            origin: Some(source.origin.clone()),
        };
        let mut inputs = vec![source.state.to_path_buf()];
        let (mem_backend, mem_fds) = match &source.memory {
            RestoreMemory::File(path) => {
                inputs.push(PathBuf::from(path));
                (Some(MemBackend { backend_type: MemBackendType::File, backend_path: path.clone() }), None)
            }
            RestoreMemory::Fds(fds) => (None, Some(fds.len())),
        };
        let fds: Vec<_> = match &source.memory {
            RestoreMemory::File(_) => Vec::new(),
            RestoreMemory::Fds(fds) => fds.iter().map(AsFd::as_fd).collect(),
        };
        self.launch(name, sandbox_dir, shape, ready_timeout, &inputs, |api, view| {
            let uds = view.run_path(&sandbox_dir.join(VSOCK_SOCKET))?;
            Ok(api.put_with_fds(
                "/snapshot/load",
                &SnapshotLoadParams {
                    snapshot_path: source.state.display().to_string(),
                    mem_backend,
                    mem_file_path: None,
                    enable_diff_snapshots: false,
                    track_dirty_pages: false,
                    resume_vm: true,
                    // A state file names no host files: every drive and the vsock socket are
                    // given here, the drive's flags and format too.
                    drive_overrides: vec![DriveOverride {
                        index: 0,
                        path_on_host: overlay_path.display().to_string(),
                        is_read_only: Some(false),
                        format: Some(DiskFormat::Qcow2),
                    }],
                    vsock_override: Some(VsockOverride { guest_cid: Some(cid), uds_path: Some(uds) }),
                    mem_fds,
                },
                &fds,
            )?)
        })
    }
}

/// Where a restored sandbox's guest memory comes from.
pub(super) enum RestoreMemory {
    /// A snapshot's memory file, by path.
    File(String),
    /// A forked VM's frozen memory, as its VMM passed it: descriptors of the memory file, then
    /// of each layer, passed on to each child's VMM with its load request (so a child needs no
    /// access to the parent VMM's files or `/proc`).
    Fds(Vec<OwnedFd>),
}

/// What a new sandbox is restored from: a state file, the guest memory to map and the disk its
/// overlay goes on.
pub(super) struct RestoreSource<'a> {
    pub state: &'a Path,
    pub mem_size: u64,
    pub vcpus: u8,
    pub memory: RestoreMemory,
    pub disk: &'a Path,
    /// What the sandbox's record names as its image: the base image the user chose (an
    /// imported image's exec defaults are found beside it), else `disk`.
    pub image: &'a Path,
    pub disk_format: DiskFormat,
    /// Where the backing files of `disk`'s chain may lie.
    pub backing: disk::BackingPolicy,
    /// The guest agent's uptime when the source was frozen, if known (see `Shape`).
    pub agent_ms: Option<u64>,
    pub origin: Origin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_snapshot_fails_before_any_sandbox_exists() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        let snap = tmp.as_path().join("snap");
        for not_one in [snap.clone(), tmp.as_path().to_path_buf()] {
            let err = store.start_from_snapshot(Some("s1".into()), &not_one, Duration::from_secs(1)).unwrap_err();
            let shown = not_one.display();
            assert_eq!(
                err.to_string(),
                format!("{shown} is not a snapshot directory (it has no snapshot state): give a directory `ember snapshot` wrote")
            );
        }
        std::fs::create_dir(&snap).unwrap();
        std::fs::write(snap.join(STATE_FILE), b"not a snapshot at all, longer than a header").unwrap();
        let err = store.start_from_snapshot(Some("s1".into()), &snap, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("is not a snapshot ember wrote"), "{err}");
        std::fs::write(snap.join("state.meta.json"), b"{\"meta_version\": 2}").unwrap();
        let err = store.start_from_snapshot(Some("s1".into()), &snap, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("is not ember snapshot metadata"), "{err}");
        assert!(!store.dir("s1").exists());
        assert!(matches!(store.snapshot("nope", &snap), Err(SandboxError::NotFound(_))));
    }
}
